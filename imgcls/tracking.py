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
import socket
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from imgcls.config import redact_text, redacted
from imgcls.jsonl import parse_jsonl
from shardio import storage

log = logging.getLogger(__name__)

WANDB_DEFAULT_URL = "https://api.wandb.ai"


def wandb_mode(setting: str, timeout: float = 3.0) -> str:
    """auto: online with an API key (or a wandb login in ~/.netrc) when the wandb server
    answers within `timeout`; offline otherwise (a compute node without internet). An
    explicit WANDB_MODE wins."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    if not has_key:
        return "offline"
    url = os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL
    if not reachable(url, timeout):
        log.warning("track.wandb=auto: %s is not reachable: logging offline (`wandb sync` later)", url)
        return "offline"
    return "online"


def reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to `url`'s host (or to the HTTPS/HTTP proxy that would carry
    it) opens within `timeout` seconds."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


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
        argv = sys.argv
        sys.argv = [redact_text(arg) for arg in argv]  # wandb sends the command line (settings._args)
        try:
            self.run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity or None, id=self.run_id,
                name=self.name or None, config=redacted(config),
                dir=local_dir, mode=mode, resume="allow",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        finally:
            sys.argv = argv
        self.run.define_metric("*", step_metric="step")
        log.info("wandb run %s (%s) in %s", self.run_id, mode, self.run.dir)

    def _read_records(self) -> list[dict]:
        """The records logged so far. A torn line (a killed append) is skipped and reported,
        and the file is rewritten without it, so the next append starts on a line of its own."""
        if not storage.exists(self.metrics_url):
            return []
        text = storage.read_bytes(self.metrics_url).decode(errors="replace")
        records, torn = parse_jsonl(text, self.metrics_url)
        if torn or (text and not text.endswith("\n")):
            self._rewrite(records)
        return records

    def _rewrite(self, records: list[dict]) -> None:
        storage.write_bytes_atomic(self.metrics_url, "".join(json.dumps(r) + "\n" for r in records).encode())

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
        self._send(lambda run: run.log({"step": step, **metrics}))

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if "://" in self.metrics_url and not self.metrics_url.startswith("file://"):
            self._rewrite(self.records)  # object stores cannot append: rewrite the (small) file
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

            image = wandb.Image(Image.open(io.BytesIO(storage.read_bytes(url))))
            self._send(lambda run: run.log({"step": step, name: image}))

    def finish(self) -> None:
        self._send(lambda run: run.finish())
        self.run = None

    def _send(self, call) -> None:
        """call(wandb run). If wandb's service is gone, go on without it: scancel's SIGTERM
        reaches every process of the job step, wandb's service too, and the rank still has
        a checkpoint to write. metrics.jsonl keeps every record."""
        if self.run is None:
            return
        try:
            call(self.run)
        except OSError as error:  # ConnectionResetError, BrokenPipeError from the service socket
            log.warning("wandb stopped answering (%s): logging to metrics.jsonl only", error)
            self.run = None


def configure_logging() -> bool:
    """INFO on rank 0, warnings only elsewhere. Returns whether this is rank 0."""
    from imgcls.distributed import env_ranks

    is_main = env_ranks()[0] == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return is_main
