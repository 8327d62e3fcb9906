"""Checkpoints: one dict of every stateful part's state_dict, written atomically by rank 0.

    {"config": ..., "model": ..., "optimizer": ..., "scheduler": ..., "scaler": ...,
     "ema": ..., "data": {"epoch", "position"}, "rng": [per rank], "progress": ...,
     "tracker": {"run_id", ...}, "ewc": {"fisher", "anchor"} (with ewc.previous)}

Files are `RUN_DIR/checkpoints/step-00001234.pt` (any fsspec URL) plus `best.pt`. Loading
uses torch.load(weights_only=True), so a checkpoint can never execute a pickle; a newest
file that does not load (truncated by a crash or full disk) is skipped with a warning.
"""
from __future__ import annotations

import io
import logging
import random
import re

import numpy as np
import torch

from imgcls import storage
from imgcls.distributed import all_gather_object

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"step-(\d+)\.pt$")


class RNGState:
    """Python, NumPy and torch RNG states of every rank; each rank restores its own."""

    def __init__(self, rank: int):
        self.rank = rank

    def state_dict(self) -> list:
        mine = {
            "python": random.getstate(),
            "numpy": _numpy_state_to_tensors(np.random.get_state(legacy=False)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        return all_gather_object(mine)

    def load_state_dict(self, states: list) -> None:
        if self.rank >= len(states):
            log.warning("checkpoint holds RNG states for %d ranks; rank %d starts from its seed", len(states), self.rank)
            return
        mine = states[self.rank]
        version, internal, gauss = mine["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_numpy_state_from_tensors(mine["numpy"]))
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])


def _numpy_state_to_tensors(state: dict) -> dict:
    inner = state["state"]
    return {**state, "state": {"key": torch.from_numpy(inner["key"].astype(np.int64)), "pos": int(inner["pos"])}}


def _numpy_state_from_tensors(state: dict) -> dict:
    inner = state["state"]
    return {**state, "state": {"key": inner["key"].numpy().astype(np.uint32), "pos": inner["pos"]}}


def checkpoint_dir(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def save(state: dict, run_dir: str, step: int, keep_last: int, best: bool = False) -> str:
    """Write step-N.pt (and best.pt) atomically, then prune old step files. Rank 0 only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    url = storage.join(checkpoint_dir(run_dir), f"step-{step:08d}.pt")
    storage.write_bytes_atomic(url, data)
    if best:
        storage.write_bytes_atomic(storage.join(checkpoint_dir(run_dir), "best.pt"), data)
    stale = list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []
    for old in stale:
        fs, path = storage.filesystem(old)
        fs.rm(path)
    return url


def list_checkpoints(run_dir: str) -> list[str]:
    """Step checkpoints, oldest first."""
    fs, path = storage.filesystem(checkpoint_dir(run_dir))
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    steps = sorted((int(m.group(1)), n) for n in names if (m := STEP_FILE.search(n)))
    return [storage.join(checkpoint_dir(run_dir), n.rsplit("/", 1)[-1]) for _, n in steps]


def load(url: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


def load_latest(run_dir: str) -> tuple[dict, str] | tuple[None, None]:
    """The newest checkpoint that loads; unreadable newer ones are skipped with a warning."""
    for url in reversed(list_checkpoints(run_dir)):
        try:
            return load(url), url
        except Exception as e:  # a truncated zip raises one of several errors
            log.warning("skipping unreadable checkpoint %s: %s", url, e)
    return None, None


class Checkpointer:
    """Owns the dict of a run's stateful parts (torchtitan's CheckpointManager in miniature).

    Created before the parts exist, it looks up the newest good checkpoint once, so the
    caller knows whether it is `resuming` while it builds them; then `parts` is set, and
    `restore()` loads every part, `save(step)` writes them all. Saving is collective (the
    RNG part gathers every rank's state); rank 0 writes.
    """

    def __init__(self, run_dir: str, keep_last: int, is_main: bool, config: dict):
        self.run_dir, self.keep_last, self.is_main, self.config = run_dir, keep_last, is_main, config
        self.parts: dict = {}
        self._state, self.url = load_latest(run_dir)

    @property
    def resuming(self) -> bool:
        return self._state is not None

    def check_config(self, allow_change: bool) -> None:
        """Refuse to resume with a config that changes what the run computes (a diff names the
        keys), unless `allow_change`; log the changes a resume may make (more epochs, logging)."""
        from imgcls.config import ConfigError, config_changes

        if self._state is None:
            return
        refused, accepted = config_changes(self._state["config"], self.config)
        if refused and not allow_change:
            raise ConfigError(f"{self.url}: the run was started with another config, and these keys cannot change "
                              f"mid-run: {'; '.join(refused)}. Resume with the run's config "
                              f"({storage.join(self.run_dir, 'config.yaml')}), use another run.dir, or force it "
                              "with train.allow_config_change=true")
        if self.is_main:
            for change in refused:
                log.warning("resuming with a changed config (train.allow_config_change=true): %s", change)
            for change in accepted:
                log.info("resuming with a changed config: %s", change)

    def saved(self, part: str):
        """What the checkpoint found at start holds for `part`."""
        return self._state[part]

    def restore(self) -> str:
        """Load every part from the checkpoint found at start; returns its URL."""
        for name, part in self.parts.items():
            part.load_state_dict(self._state[name])
        self._state = None  # the weights now live in the parts: don't hold a second copy
        return self.url

    def save(self, step: int, best: bool = False) -> None:
        snapshot = {name: part.state_dict() for name, part in self.parts.items()}
        snapshot["config"] = self.config
        if self.is_main:
            save(snapshot, self.run_dir, step, self.keep_last, best=best)
