"""Checkpoints: one dict of every stateful part's state_dict, written atomically by rank 0.

    {"config": ..., "model": ..., "optimizer": ..., "scheduler": ..., "scaler": ...,
     "ema": ..., "data": {"epoch", "position"}, "rng": [per rank], "progress": ...,
     "tracker": {"run_id", ...}, "ewc": {"fisher", "anchor"} (with ewc.previous)}

Files are `RUN_DIR/checkpoints/step-00001234.pt` (any fsspec URL) plus `best-00001234.pt`, each
with a sidecar `step-00001234.pt.sha256` in `sha256sum` format, and `best.pt`: a small pointer
(`{"format": "imgcls.pointer/1", "file": "best-00001234.pt"}`) that `load` follows, so
`evaluate RUN_DIR/checkpoints/best.pt` loads the best. Loading uses
torch.load(weights_only=True), so a checkpoint can never execute a pickle.

What holds under faults:
- A checkpoint is skipped only when it is verified corrupt: its sha256 differs from the
  sidecar's, or its complete bytes are not a loadable zip (empty, truncated). It is then moved
  to `checkpoints/corrupt/` with a warning naming it, and the next older one is tried.
- Storage errors (no connection, timeouts, 5xx) are retried with backoff for up to `retry_s`,
  then raise `storage.StorageUnavailable` naming the URL: a short outage at resume can never
  make a run silently start again from step 0.
- Why a sidecar and not a header: the checkpoint stays a plain torch.save file that any tool
  can torch.load. The sidecar is written (atomically) before the checkpoint, so every
  checkpoint that is visible has its checksum; a sidecar without a checkpoint (a crash
  between the two writes) is harmless, and an older file of the same step under a new
  sidecar fails its check: it is moved aside, never loaded wrong. A checkpoint without a
  sidecar was written before checksums existed: it is loaded if it loads, with a note.
- A verified file is never overwritten in place: a new best is written under its own name
  and verified, then committed by one atomic write of the pointer, then older bests go. A
  kill, a full disk or a quota error at any point leaves the pointer on the old best or the
  new one, both complete and verified.
- Pruning removes only checkpoints of lower steps than the one just written and verified
  (its size read back from storage): files of higher steps left by a crash never push good
  checkpoints out.
- `BackgroundSaver` copies the state to host memory at the step and writes it in a thread;
  its errors are raised at the next save or at `wait()`, never lost.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import json
import logging
import posixpath
import random
import re
import threading

import numpy as np
import torch

from imgcls.distributed import all_gather_object
from shardio import storage

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"step-(\d+)\.pt$")
CHECKSUM_SUFFIX = ".sha256"
CORRUPT_DIR = "corrupt"
BEST_FILE = "best.pt"                # the pointer to the newest best-STEP.pt
BEST_STEP_FILE = re.compile(r"best-(\d+)\.pt$")
POINTER_FORMAT = "imgcls.pointer/1"
OLD_BEST = re.compile(r"best-\d+\.pt(\.sha256)?|best\.pt\.sha256")  # best.pt.sha256: when best.pt was a file


class CorruptCheckpoint(Exception):
    """A checkpoint whose bytes were read completely and are bad (checksum, not a zip)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written, or storage does not hold what was written."""


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
            log.warning("checkpoint holds RNG states for %d ranks; rank %d starts from its seed",
                        len(states), self.rank)
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
    return {**state, "state": {"key": inner["key"].cpu().numpy().astype(np.uint32), "pos": inner["pos"]}}


def checkpoint_dir(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def step_url(run_dir: str, step: int) -> str:
    return storage.join(checkpoint_dir(run_dir), f"step-{step:08d}.pt")


def step_of(url: str) -> int:
    return int(STEP_FILE.search(url).group(1))


# ---- writing ---------------------------------------------------------------------------
def save(state: dict, run_dir: str, step: int, keep_last: int, best: bool = False,
         retry_s: float = storage.DEFAULT_RETRY_S) -> str:
    """Write step-N.pt (and best.pt) with their checksums, verify, then prune. Rank 0 only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    url = step_url(run_dir, step)
    write_verified(url, data, retry_s)
    if best:
        save_best(run_dir, step, data, retry_s)
    prune(run_dir, step, keep_last, retry_s)
    return url


def save_best(run_dir: str, step: int, data: bytes, retry_s: float = storage.DEFAULT_RETRY_S) -> str:
    """best-STEP.pt (verified), then the one small write that commits it: the best.pt pointer;
    then the older bests go. Either the old best or the new one always loads."""
    directory = checkpoint_dir(run_dir)
    name = f"best-{step:08d}.pt"
    write_verified(storage.join(directory, name), data, retry_s)
    pointer = json.dumps({"format": POINTER_FORMAT, "file": name}).encode()
    storage.write_bytes_atomic(storage.join(directory, BEST_FILE), pointer, retry_s)
    fs, path = storage.filesystem(directory)
    names = storage.retrying(lambda: fs.ls(path, detail=False, refresh=True), directory, retry_s)
    names = sorted(n.rsplit("/", 1)[-1] for n in names)  # each file before its sidecar
    older = [n for n in names if OLD_BEST.fullmatch(n) and not n.startswith(name)]
    for url in (storage.join(directory, n) for n in older):
        with contextlib.suppress(FileNotFoundError):
            storage.retrying(lambda url=url: fs.rm_file(storage.filesystem(url)[1]), url, retry_s)
    return storage.join(directory, name)


def write_verified(url: str, data: bytes, retry_s: float = storage.DEFAULT_RETRY_S) -> None:
    """The sha256 sidecar, then the file (both atomic); then check that storage holds it all."""
    name = posixpath.basename(url)
    digest = hashlib.sha256(data).hexdigest()
    storage.write_bytes_atomic(url + CHECKSUM_SUFFIX, f"{digest}  {name}\n".encode(), retry_s)
    storage.write_bytes_atomic(url, data, retry_s)
    fs, path = storage.filesystem(url)
    size = storage.retrying(lambda: fs.size(path), url, retry_s)
    if size != len(data):
        raise CheckpointWriteError(f"{url}: wrote {len(data)} bytes but storage holds {size}")


def prune(run_dir: str, newest_step: int, keep_last: int, retry_s: float = storage.DEFAULT_RETRY_S) -> list[str]:
    """Delete step files behind `newest_step` (just written and verified) so that `keep_last`
    remain, counting it. Files of higher steps are not evidence of progress: left alone."""
    if keep_last <= 0:
        return []
    behind = [url for url in list_checkpoints(run_dir, retry_s) if step_of(url) < newest_step]
    stale = behind[:max(0, len(behind) - (keep_last - 1))]
    for url in stale:
        for victim in (url, url + CHECKSUM_SUFFIX):  # the checkpoint first: never one without its sum
            fs, path = storage.filesystem(victim)
            with contextlib.suppress(FileNotFoundError):
                storage.retrying(lambda fs=fs, path=path: fs.rm_file(path), victim, retry_s)
    return stale


# ---- reading ---------------------------------------------------------------------------
def list_checkpoints(run_dir: str, retry_s: float = storage.DEFAULT_RETRY_S) -> list[str]:
    """Step checkpoints, oldest first."""
    fs, path = storage.filesystem(checkpoint_dir(run_dir))
    try:  # refresh: another process (a previous job) may have written since we last looked
        names = storage.retrying(lambda: fs.ls(path, detail=False, refresh=True), checkpoint_dir(run_dir), retry_s)
    except FileNotFoundError:
        return []
    steps = sorted((int(m.group(1)), n) for n in names if (m := STEP_FILE.search(n)))
    return [storage.join(checkpoint_dir(run_dir), n.rsplit("/", 1)[-1]) for _, n in steps]


def load(url: str, retry_s: float = storage.DEFAULT_RETRY_S) -> dict:
    """The checkpoint at `url`, verified against its sha256 sidecar when it has one.

    Raises CorruptCheckpoint (bad bytes), storage.StorageUnavailable (no answer within
    `retry_s`) or FileNotFoundError."""
    # the sidecar first: a checkpoint always goes (pruned, moved aside) before its sidecar
    expected = _expected_sha256(url, retry_s)
    data = storage.read_bytes(url, retry_s)
    target = pointer_target(data)
    if target is not None:  # best.pt: the file it names
        return load(storage.join(posixpath.dirname(url), target), retry_s)
    if expected is None:
        log.info("%s has no %s sidecar (written before checksums); loading it unverified", url, CHECKSUM_SUFFIX)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpoint(f"{url}: sha256 differs from {url}{CHECKSUM_SUFFIX} ({len(data)} bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # complete bytes that do not load: truncated, empty, not a zip
        raise CorruptCheckpoint(f"{url}: not a loadable checkpoint ({len(data)} bytes): {e}") from e


def pointer_target(data: bytes) -> str | None:
    """The file name a pointer (best.pt) holds; None for a checkpoint."""
    if not data.startswith(b"{") or len(data) > 4096:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        pointer = json.loads(data)
        if pointer.get("format") == POINTER_FORMAT and BEST_STEP_FILE.fullmatch(pointer.get("file", "")):
            return pointer["file"]
    return None


def _expected_sha256(url: str, retry_s: float) -> str | None:
    try:
        text = storage.read_bytes(url + CHECKSUM_SUFFIX, retry_s).decode()
    except FileNotFoundError:
        return None
    return text.split()[0] if text.strip() else ""


def load_latest(run_dir: str, retry_s: float = storage.DEFAULT_RETRY_S,
                move_corrupt: bool = True) -> tuple[dict, str] | tuple[None, None]:
    """The newest checkpoint that verifies, and its URL; (None, None) when there is none.

    Corrupt ones are skipped with a warning (and moved to checkpoints/corrupt/ when
    `move_corrupt`: pass it on one rank only). Storage errors are retried for `retry_s`, then
    raised naming the URL: an unreachable checkpoint is never taken for a missing one."""
    for url in reversed(list_checkpoints(run_dir, retry_s)):
        try:
            return load(url, retry_s), url
        except CorruptCheckpoint as e:
            log.warning("skipping corrupt checkpoint: %s", e)
            if move_corrupt:
                move_aside(url, retry_s)
        except FileNotFoundError:  # moved aside by another rank since we listed it
            log.warning("checkpoint %s vanished while loading; trying the next older one", url)
    return None, None


def move_aside(url: str, retry_s: float = storage.DEFAULT_RETRY_S) -> str:
    """Move a corrupt checkpoint and its sidecar into checkpoints/corrupt/; returns its new URL."""
    dest_dir = storage.join(posixpath.dirname(url), CORRUPT_DIR)
    dest = storage.join(dest_dir, posixpath.basename(url))
    fs, _ = storage.filesystem(url)
    fs.makedirs(storage.filesystem(dest_dir)[1], exist_ok=True)
    # the checkpoint before its sidecar (as prune does): a load on another rank, which reads
    # the sidecar first, never meets a checkpoint without its sidecar
    for src, dst in ((url, dest), (url + CHECKSUM_SUFFIX, dest + CHECKSUM_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):  # no sidecar, or another rank was first
            storage.retrying(lambda src=src, dst=dst: fs.mv(storage.filesystem(src)[1], storage.filesystem(dst)[1]),
                             src, retry_s)
    log.warning("moved corrupt checkpoint %s to %s", url, dest)
    return dest


# ---- background saves ------------------------------------------------------------------
class BackgroundSaver:
    """Checkpoints written in a background thread; training waits only for a host copy.

        saver = BackgroundSaver(run_dir, keep_last)
        saver.save(state, step)   # waits for the previous write, copies `state` to host memory
        ...                       # training goes on while the copy is serialised and uploaded
        saver.wait()              # before exit or requeue: the checkpoint is durable after it

    A failed background write is raised (CheckpointWriteError naming the URL) by the next
    save() or wait(); it is never lost. The copy costs host memory of one state.
    """

    def __init__(self, run_dir: str, keep_last: int, retry_s: float = storage.DEFAULT_RETRY_S):
        self.run_dir, self.keep_last, self.retry_s = run_dir, keep_last, retry_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._url = ""

    def save(self, state: dict, step: int, best: bool = False) -> str:
        """Start writing step-N.pt; returns its URL. Blocks for the previous write and the copy."""
        self.wait()
        snapshot = to_host(state)
        self._url = step_url(self.run_dir, step)
        # not a daemon: an interpreter that exits still finishes (or fails) the write
        self._thread = threading.Thread(target=self._write, args=(snapshot, step, best), name=f"checkpoint-{step}")
        self._thread.start()
        return self._url

    def _write(self, snapshot: dict, step: int, best: bool) -> None:
        try:
            save(snapshot, self.run_dir, step, self.keep_last, best=best, retry_s=self.retry_s)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f"{self._url}: background checkpoint write failed: {error}") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def to_host(obj):
    """A deep copy of a state: tensors copied to CPU memory, containers rebuilt, the rest deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, to_host(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_host(v) for v in obj)
    return copy.deepcopy(obj)


class Checkpointer:
    """Owns the dict of a run's stateful parts (torchtitan's CheckpointManager in miniature),
    and with it the run dir: its lease, the newest good checkpoint, the config check, saving.

    Created before the parts exist: rank 0 takes the run dir's lease (a second job on the same
    run dir is refused, naming the holder) and clears leftovers of killed writers; then every
    rank looks up the newest good checkpoint once, so the caller knows whether it is `resuming`
    while it builds the parts. Then `parts` is set, and `restore()` loads every part,
    `save(step)` writes them all: collective (the RNG part gathers every rank's state), rank 0
    writes in the background (BackgroundSaver). `close()` waits for the last write.
    """

    def __init__(self, run_dir: str, keep_last: int, is_main: bool, config: dict, *,
                 lease_timeout_s: float = 120.0, retry_s: float = storage.DEFAULT_RETRY_S):
        from imgcls.lease import Lease, LeaseHeld

        self.run_dir, self.keep_last, self.is_main, self.config = run_dir, keep_last, is_main, config
        self.parts: dict = {}
        self.lease = self.saver = None
        refusal = ""
        if is_main:
            try:
                self.lease = Lease(run_dir, timeout_s=lease_timeout_s).acquire()
                storage.cleanup_leftovers(run_dir)
                self.saver = BackgroundSaver(run_dir, keep_last, retry_s)
            except LeaseHeld as e:
                refusal = str(e)
        refusal = all_gather_object(refusal)[0]  # every rank learns it: none waits on a collective
        if refusal:
            raise LeaseHeld(refusal)
        self._state, self.url = load_latest(run_dir, retry_s, move_corrupt=is_main)

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

    def fence(self) -> None:
        """Before any write to the run dir (metrics, plots, config.yaml, resumes.jsonl):
        LeaseLost if another job took it over. Ranks without the lease write nothing there."""
        if self.lease is not None:
            self.lease.check()

    def save(self, step: int, best: bool = False) -> None:
        snapshot = {name: part.state_dict() for name, part in self.parts.items()}
        snapshot["config"] = self.config
        if self.is_main:
            self.lease.check()  # another job took the run dir over: write nothing
            self.saver.save(snapshot, step, best=best)

    def wait(self) -> None:
        """Until the checkpoint in flight is written (its error, if any, is raised here)."""
        if self.saver is not None:
            self.saver.wait()

    def close(self, requeue: bool = False) -> None:
        """After the run: wait for the last write, then give the run dir back; a job about to be
        requeued keeps its lease record, so only its own requeue takes it back at once."""
        try:
            self.wait()
        finally:
            if self.lease is not None:
                self.lease.stop() if requeue else self.lease.release()
