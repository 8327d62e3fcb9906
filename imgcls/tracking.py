"""Metrics: always in the run dir; wandb on rank 0 (online with a key, else offline).

Locally (and on any filesystem that appends) records go to `RUN_DIR/metrics.jsonl`. Object
stores cannot append, and rewriting one file at every log costs more as the run grows; there
they go to segments, `RUN_DIR/metrics/00000000.jsonl`, ..., each rewritten while it holds
fewer than SEGMENT_RECORDS records, then a new one: a log costs at most one segment's PUT.
`read_metrics` concatenates them (after a metrics.jsonl of an older run).

Every write is fenced by the run dir's lease (`fence`, the lease's check), and on object
stores every segment PUT is conditional: `If-Match` the ETag this writer last wrote,
`If-None-Match: *` for a new one. A new holder first seals the last segment (rewrites it,
conditionally, with a `{"sealed": ...}` line), so a frozen old holder's next PUT of it fails:
it stops with LeaseLost instead of writing older steps into the new holder's metrics.

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
from imgcls.lease import LeaseLost
from shardio import storage

log = logging.getLogger(__name__)

WANDB_DEFAULT_URL = "https://api.wandb.ai"
SEGMENT_RECORDS = 200  # records per metrics segment on object stores: a log's PUT stays small


def appends(url: str) -> bool:
    """Whether files at `url` can be appended to (local paths); object stores cannot."""
    return "://" not in url or url.startswith("file://")


def segment_url(run_dir: str, index: int) -> str:
    return storage.join(run_dir, "metrics", f"{index:08d}.jsonl")


def segment_urls(run_dir: str) -> list[str]:
    """The metrics segments of a run dir on an object store, in order."""
    fs, path = storage.filesystem(storage.join(run_dir, "metrics"))
    try:
        names = storage.retrying(lambda: fs.ls(path, detail=False, refresh=True), run_dir)
    except FileNotFoundError:
        return []
    names = sorted(n.rsplit("/", 1)[-1] for n in names if n.endswith(".jsonl"))
    return [storage.join(run_dir, "metrics", n) for n in names]


def read_metrics(run_dir: str) -> list[dict]:
    """Every record logged to a run dir: metrics.jsonl, then the segments (object stores)."""
    url = storage.join(run_dir, "metrics.jsonl")
    texts = [(url, storage.read_bytes(url).decode(errors="replace"))] if storage.exists(url) else []
    if not appends(run_dir):
        texts += [(u, storage.read_bytes(u).decode(errors="replace")) for u in segment_urls(run_dir)]
    return [r for u, text in texts for r in parse_jsonl(text, u)[0] if "sealed" not in r]


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
        self.fence = lambda: None    # called before every write: the run dir's lease check

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
        and the file is rewritten without it, so the next append starts on a line of its own.
        On an object store, the last segment is sealed and a new one begins."""
        if not appends(self.metrics_url):
            return self._take_over_segments()
        if not storage.exists(self.metrics_url):
            return []
        text = storage.read_bytes(self.metrics_url).decode(errors="replace")
        records, torn = parse_jsonl(text, self.metrics_url)
        if torn or (text and not text.endswith("\n")):
            self._rewrite(records)
        return records

    def _rewrite(self, records: list[dict]) -> None:
        self.fence()
        storage.write_bytes_atomic(self.metrics_url, "".join(json.dumps(r) + "\n" for r in records).encode())

    def _take_over_segments(self) -> list[dict]:
        """Seal the last segment (conditionally: its old writer's next PUT of it then fails)
        and start a new one; return every record."""
        urls = segment_urls(self.run_dir)
        self._segment, self._lines, self._etag = len(urls), [], None
        if urls:
            fs, path = storage.filesystem(urls[-1])
            for _ in range(5):  # its old writer may be writing it right now: read it again
                etag = storage.retrying(lambda: fs.info(path, refresh=True)["ETag"], urls[-1])
                text = storage.read_bytes(urls[-1]).decode(errors="replace")
                seal = json.dumps({"sealed": time.time(), "by": f"{socket.gethostname()}:{os.getpid()}"})
                try:
                    storage.put_if(urls[-1], (text.rstrip("\n") + "\n" if text.strip() else "").encode()
                                   + (seal + "\n").encode(), etag)
                    break
                except storage.WriteConflict:
                    continue
        return read_metrics(self.run_dir)
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
        self.fence()
        if not appends(self.metrics_url):
            self._put_segment(line)
            return
        path = self.metrics_url.removeprefix("file://")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "a") as f:
                f.write(line)
        except OSError as e:  # a full disk, a quota: say where
            raise type(e)(e.errno, e.strerror, path) from e

    def _put_segment(self, line: str) -> None:
        """Rewrite the current segment with `line` added (a new one after SEGMENT_RECORDS),
        conditionally on being its only writer."""
        if len(self._lines) >= SEGMENT_RECORDS:
            self._segment, self._lines, self._etag = self._segment + 1, [], None
        self._lines.append(line)
        url = segment_url(self.run_dir, self._segment)
        try:
            self._etag = storage.put_if(url, "".join(self._lines).encode(), self._etag)
        except storage.WriteConflict:
            raise LeaseLost(f"{self.run_dir}: another job writes its metrics now ({url} changed); "
                            "this job stops") from None

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
