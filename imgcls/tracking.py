"""Metrics: always `RUN_DIR/metrics.jsonl`; wandb on rank 0 (online with a key, else offline).

One wandb run across restarts: the run id lives in the checkpoint (wandb 0.31's offline
`resume=` starts a new directory, so we cannot rely on it) and is passed back as `id=`.
Steps are global optimizer steps and never go backwards: after a resume from an older
checkpoint the replayed steps (identical, since resume is exact) are not logged again.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from imgcls import storage

log = logging.getLogger(__name__)


def wandb_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return os.environ.get("WANDB_MODE", "online")
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker:
    """Rank 0 logs; other ranks hold a Tracker that does nothing."""

    def __init__(self, cfg, run_dir: str, enabled: bool, name: str = ""):
        self.cfg, self.run_dir, self.enabled, self.name = cfg, run_dir, enabled, name
        self.run_id: str | None = None
        self.last_step = -1          # highest step ever logged, from metrics.jsonl
        self.run = None
        self.metrics_url = storage.join(run_dir, "metrics.jsonl")

    def state_dict(self) -> dict:
        return {"run_id": self.run_id or ""}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id") or None

    def start(self, config: dict) -> None:
        """Open metrics.jsonl and the wandb run (new, or the checkpoint's run id)."""
        self.records = self._read_records() if self.enabled else []
        if not self.enabled:
            return
        self.last_step = max((r.get("step", -1) for r in self.records), default=-1)
        if self.run_id is None:
            self.run_id = self.cfg.run_id or uuid.uuid4().hex[:12]
        mode = wandb_mode(self.cfg.wandb)
        if mode == "disabled":
            return
        import wandb

        local_dir = self.run_dir if "://" not in self.run_dir else "."
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity or None, id=self.run_id,
            name=self.name or None, config=config,
            dir=local_dir, mode=mode, resume="allow",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.run.define_metric("*", step_metric="step")
        log.info("wandb run %s (%s) in %s", self.run_id, mode, self.run.dir)

    def _read_records(self) -> list[dict]:
        if not storage.exists(self.metrics_url):
            return []
        lines = storage.read_bytes(self.metrics_url).decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def log(self, step: int, metrics: dict) -> None:
        """Record metrics at `step` unless an earlier attempt already logged them there."""
        if not self.enabled or step < self.last_step:
            return
        if step == self.last_step and any(r.get("step") == step and metrics.keys() <= r.keys()
                                          for r in self.records[-3:]):
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.records.append(record)
        self.last_step = max(self.last_step, step)
        self._append(record)
        if self.run is not None:
            self.run.log({"step": step, **metrics})

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if "://" in self.metrics_url and not self.metrics_url.startswith("file://"):
            # object stores cannot append: rewrite the (small) file
            storage.write_bytes_atomic(self.metrics_url, "".join(json.dumps(r) + "\n" for r in self.records).encode())
            return
        path = self.metrics_url.removeprefix("file://")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)

    def log_image(self, step: int, name: str, url: str) -> None:
        """Log the image at `step`, or at the last logged step when that is later (a plot drawn
        after a stop), so the run's steps never go backwards."""
        step = max(step, self.last_step)
        if self.enabled and self.run is not None:
            import io

            import wandb
            from PIL import Image

            self.run.log({"step": step, name: wandb.Image(Image.open(io.BytesIO(storage.read_bytes(url))))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def configure_logging() -> bool:
    """INFO on rank 0, warnings only elsewhere. Returns whether this is rank 0."""
    from imgcls.distributed import env_ranks

    is_main = env_ranks()[0] == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return is_main
