"""Where a split's reading stands: the checkpoint part "data". (epoch, position) under this
run's layout, the segments read under earlier layouts in this epoch (`consumed`, elastic
resume), and the split's fingerprint. Nothing here reads data."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

import numpy as np

from imgcls.data import order
from imgcls.data.manifest import DataError
from imgcls.data.order import Layout

log = logging.getLogger(__name__)


def fingerprint(shards: list[dict]) -> str:
    """The split's identity: a hash of its shards' paths, counts and checksums. A resume on
    shards rebuilt at the same URL would read another dataset from the saved position."""
    rows = [[s["path"], s["count"], s.get("sha256")] for s in shards]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


class DataPosition:
    """`position` counts this layout's batches done on every rank in `epoch`; `consumed`
    holds the segments read under earlier layouts in this epoch."""

    def __init__(self, shards: list[dict], layout: Layout, *, url: str, split: str):
        self.layout, self.url, self.split = layout, url, split
        self.length = sum(s["count"] for s in shards)  # the epoch's sequence G
        self.fingerprint = fingerprint(shards)
        self.epoch, self.position = 0, 0
        self.consumed: list[dict] = []

    def state_dict(self) -> dict:
        """`samples` (all ranks, this epoch) is derived, for logs and schedules."""
        return {"epoch": self.epoch, "position": self.position, "layout": asdict(self.layout),
                "consumed": [dict(segment) for segment in self.consumed], "samples": self.samples,
                "shards": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state` stopped. Under the same layout (or a state without
        one) the batches are the same; under another, the batches read so far become a
        segment and the rest of the epoch is cut by this layout."""
        if state.get("shards", self.fingerprint) != self.fingerprint:  # absent: saved before it was recorded
            raise DataError(f"{self.url}: the {self.split!r} shards differ from the ones this run was "
                            "reading (rebuilt or re-indexed at the same URL?): resuming would continue on "
                            "another dataset; start a new run.dir, or point data.url at the original shards")
        saved = Layout(**state.get("layout", asdict(self.layout)))
        epoch, position = int(state["epoch"]), int(state["position"])
        consumed = [dict(segment) for segment in state.get("consumed", [])]
        if saved != self.layout:
            if position:
                consumed.append({**asdict(saved), "batches": position})
            log.info("%s/%s: resuming epoch %d under %s after %s: the rest of the epoch is re-cut",
                     self.url, self.split, epoch, self.layout, saved)
            position = 0
        self.epoch, self.position, self.consumed = epoch, position, consumed
        # a state the manifest cannot hold is an error here, not in a loader worker
        if position > self.batches_per_epoch():
            raise DataError(f"{self.url}: split {self.split!r} cannot hold the checkpoint's {position} "
                            f"batches under {self.layout} (were the shards rebuilt?)")

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Batch `position` of a whole epoch under this layout (earlier segments are cleared)."""
        self.epoch, self.position, self.consumed = epoch, position, []

    @property
    def samples(self) -> int:
        """Samples of the current epoch read by all ranks, over every segment."""
        done = [(s["world_size"] * s["batch_size"], s["batches"]) for s in self.consumed]
        done.append((self.layout.world_size * self.layout.batch_size, self.position))
        return sum(per_batch * batches for per_batch, batches in done)

    def consumed_in(self, epoch: int) -> list[dict]:
        """The segments read before this layout in `epoch` (only the current epoch has any)."""
        return self.consumed if epoch == self.epoch else []

    def remaining(self, epoch: int | None = None) -> np.ndarray:
        """Indices into G that this layout still cuts in `epoch`: all of G, less the samples
        that earlier layouts' segments of the current epoch read; in G order."""
        epoch = self.epoch if epoch is None else epoch
        try:
            return order.remaining(self.length, self.consumed_in(epoch))
        except ValueError as e:
            raise DataError(f"{self.url}: split {self.split!r} {e} (were the shards rebuilt?)") from None

    def remaining_count(self, epoch: int | None = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        return len(self.remaining(epoch)) if self.consumed_in(epoch) else self.length

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches each rank reads in an epoch. For the current epoch after an elastic resume:
        the batches of this layout's segment."""
        return self.layout.batches_per_rank(self.remaining_count(epoch))
