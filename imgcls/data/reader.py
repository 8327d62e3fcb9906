"""`ShardReader`: one split for one rank, as tools and tests use it. The stream (worker side)
with its position's and order's questions answered in one place; every answer comes from the
parts (imgcls.data.order, .position, .loader)."""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from imgcls.config import DataConfig
from imgcls.data import order
from imgcls.data.loader import make_loader
from imgcls.data.order import Plan
from imgcls.data.stream import ShardStream

log = logging.getLogger(__name__)


class ShardReader(ShardStream):
    """One split of a manifest, as batches for one rank. Use `loader()` to iterate an epoch."""

    def __init__(self, cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, manifest: dict | None = None):
        super().__init__(cfg, split, rank=rank, world_size=world_size, seed=seed, train=train, manifest=manifest)
        if train:
            dropped = self.split_count() - self.samples_per_epoch()
            log.info("%s/%s: %d batches of %d per rank per epoch; %d samples (%.2f%%) dropped as remainder",
                     cfg.url, split, self.batches_per_epoch(0), self.batch_size, dropped,
                     100 * dropped / max(1, self.split_count()))

    # ---- the position (imgcls.data.position) ------------------------------------------------
    epoch = property(lambda self: self.state.epoch)
    consumed = property(lambda self: self.state.consumed)
    samples = property(lambda self: self.state.samples)
    fingerprint = property(lambda self: self.state.fingerprint)

    @property
    def position(self) -> int:
        return self.state.position

    @position.setter
    def position(self, value: int) -> None:
        self.state.position = value

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.state.set_epoch(epoch, position)

    def remaining(self, epoch: int | None = None) -> np.ndarray:
        return self.state.remaining(epoch)

    # ---- the order (imgcls.data.order) ------------------------------------------------------
    def split_count(self) -> int:
        return self.state.length

    def samples_per_epoch(self) -> int:
        """Samples all ranks read in a whole epoch under this layout (the remainder dropped)."""
        return self.world_size * self.batch_size * self.layout.batches_per_rank(self.split_count())

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.shards)))
        return order.shard_order(self.seed, epoch, len(self.shards))

    def _shard_permutation(self, epoch: int, shard_id: int) -> np.ndarray:
        return order.shard_permutation(self.seed, epoch, shard_id, self.counts[shard_id])

    def sequence(self, epoch: int) -> list[tuple[int, int]]:
        """The epoch's sample sequence G (imgcls.data.order.sequence)."""
        return order.sequence(self.counts, self.seed, epoch)

    def worker_shards(self, epoch: int, rank: int) -> list[list[int]]:
        """Shard indices per worker of `rank` for `epoch` (a shard straddling two workers' ranges is in both)."""
        plans: list[Plan] = self.worker_plans(epoch, rank)
        return [[shard_id for shard_id, _ in plan] for plan in plans]

    # ---- the batches (imgcls.data.loader) ---------------------------------------------------
    def loader(self, pin_memory: bool = False) -> DataLoader:
        """A DataLoader over the current (epoch, position). Build a new one each epoch."""
        return make_loader(self, pin_memory)


def first_images(cfg: DataConfig, split: str, count: int, manifest: dict | None = None) -> torch.Tensor:
    """The first `count` images of a split in shard order, normalised and not augmented: the
    same on every rank, whatever the world size. Reads only the shards it needs."""
    images, seen = [], 0
    reader = ShardReader(replace(cfg, num_workers=0), split, train=False, manifest=manifest)
    for batch in reader:
        images.append(reader.transform(batch))
        seen += len(batch["image"])
        if seen >= count:
            break
    return torch.cat(images)[:count]
