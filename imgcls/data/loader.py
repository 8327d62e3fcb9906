"""The main-process side of reading a split: each epoch's DataLoader, and, for training, the
`TrainLoader` that owns the data position and hands out batches in order."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from imgcls.data.manifest import DataError
from imgcls.data.stream import ShardStream
from imgcls.signals import keep_worker_through_cancel


def make_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream's current (epoch, position). Build a new one each epoch.
    `pin_memory` (for CUDA) lets the host-to-device copies run asynchronously."""
    workers = stream.cfg.num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is, pin_memory=pin_memory,
                      worker_init_fn=keep_worker_through_cancel,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def start_epoch(reader, pin_memory: bool = False):
    """Batches from the reader's current (epoch, position), its loader workers started now:
    they fetch and decode while the caller does other work (the last epoch's validation and
    checkpoint), so the first batch of an epoch does not wait on storage. The DataLoader draws
    its workers' base seed from torch's RNG; that draw is undone, so training's random stream
    is the same whenever the loader starts (the reader's order and augmentation never use it)."""
    with torch.random.fork_rng(devices=[]):
        return iter(reader.loader(pin_memory))


def _as_is(batch: dict) -> dict:
    """The loader's collate_fn: batches are ready as they are. (The default, default_convert,
    returns an equal dict after walking every key string of every batch.)"""
    return batch


class TrainLoader:
    """Training's batches, in order, over `epochs` epochs: the one owner of the data position
    (the checkpoint part "data", in ShardReader.state_dict's format).

    next() hands out the next batch of the current epoch and counts it: `position` is the
    number of this layout's batches every rank has taken, so after whole optimizer steps it is
    what a checkpoint must hold. `next_epoch()` moves to the next epoch and starts its workers
    at once, so their first reads overlap the caller's validation and save. `before_start` runs
    before workers are forked (the checkpointer's wait: no fork while a background write holds
    locks)."""

    def __init__(self, reader, *, epochs: int, pin_memory: bool = False,
                 before_start: Callable[[], None] = lambda: None):
        self.reader, self.state = reader, reader.state
        self.epochs, self.pin_memory, self.before_start = epochs, pin_memory, before_start
        self._batches = None  # the started epoch's DataLoader iterator

    # ---- the position --------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def position(self) -> int:
        return self.state.position

    @property
    def samples(self) -> int:
        return self.state.samples

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stop()  # workers started from another position would hand out the wrong batches
        self.state.load_state_dict(state)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return self.state.batches_per_epoch(epoch)

    def steps_per_epoch(self, accum: int) -> list[int]:
        """Optimizer steps of `accum` batches in each epoch (the current one: under this layout)."""
        return [self.batches_per_epoch(epoch) // accum for epoch in range(self.epochs)]

    def steps_left(self, accum: int) -> int:
        """Whole optimizer steps left in the current epoch."""
        return self.batches_per_epoch() // accum - self.position // accum

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    # ---- the batches ---------------------------------------------------------------------
    def start(self) -> None:
        """Fork the current epoch's workers, if not yet started (data.start_epoch)."""
        if self._batches is None:
            self.before_start()
            self._batches = start_epoch(self.reader, pin_memory=self.pin_memory)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.start()
        batch = next(self._batches)
        if batch["position"] != self.position:
            raise DataError(f"reader order broke: got batch {batch['position']}, expected {self.position}")
        self.state.position += 1
        return batch

    def next_epoch(self) -> None:
        """Go to the next epoch's first batch; its workers start now (unless it is past the last)."""
        self.stop()
        self.state.set_epoch(self.epoch + 1, 0)
        if not self.done:
            self.start()

    def stop(self) -> None:
        """Shut the started workers down (they ignore SIGTERM: imgcls.signals)."""
        self._batches = None

    def transform(self, batch: dict, device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
        return self.reader.transform(batch, device, channels_last)
