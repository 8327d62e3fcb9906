"""The order of a training epoch, planned from the manifest's counts alone (docs/design.md,
"Reader order"). Pure functions of (the split's shard counts, seed, epoch, layout, consumed):
no storage, no DataLoader, no state.

Shards are permuted, each shard's samples are permuted, and the concatenation is the epoch's
sequence G, whatever the world size or worker count. A `Layout` cuts G into equal contiguous
ranges, one per rank, each cut into contiguous ranges per worker; a worker cuts its range into
batches, and the rank's batch sequence interleaves its workers round-robin, exactly as torch's
DataLoader returns them. After an elastic resume, `consumed` holds the segments read under
earlier layouts in the epoch; the rest of G (`remaining`) is cut by the new layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Plan = list[tuple[int, np.ndarray]]  # [(shard index, sample indices in the shard's epoch order)]


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """Round-robin over workers with `counts` batches, skipping exhausted ones:
    the order in which DataLoader returns an IterableDataset's batches. [(worker, local index)]"""
    order, taken = [], [0] * len(counts)
    while len(order) < sum(counts):
        for w, c in enumerate(counts):
            if taken[w] < c:
                order.append((w, taken[w]))
                taken[w] += 1
    return order


@dataclass(frozen=True)
class Layout:
    """How a training sequence is cut: `world_size` equal contiguous rank ranges of whole
    batches, packed from its start (the last length % (world_size * batch_size) samples are
    dropped), each cut into `workers` contiguous ranges of whole batches, balanced."""
    world_size: int
    workers: int
    batch_size: int

    def batches_per_rank(self, length: int) -> int:
        return length // (self.world_size * self.batch_size)

    def worker_batches(self, length: int) -> list[int]:
        n, k = self.batches_per_rank(length), self.workers
        return [n // k + (w < n % k) for w in range(k)]

    def worker_starts(self, length: int, rank: int) -> list[int]:
        """Index in the sequence where each worker of `rank` starts."""
        counts, b = self.worker_batches(length), self.batch_size
        first = rank * self.batches_per_rank(length) * b
        return [first + sum(counts[:w]) * b for w in range(self.workers)]

    def delivered(self, length: int, batches: int) -> list[int]:
        """Batches each worker had delivered once a rank had taken `batches`."""
        taken = [0] * self.workers
        for w, _ in interleave(self.worker_batches(length))[:batches]:
            taken[w] += 1
        return taken

    def consumed(self, length: int, batches: int) -> np.ndarray:
        """Indices into the sequence that all ranks read in their first `batches` batches."""
        b, taken = self.batch_size, self.delivered(length, batches)
        return np.concatenate([np.arange(start, start + n * b, dtype=np.int64)
                               for rank in range(self.world_size)
                               for start, n in zip(self.worker_starts(length, rank), taken)])


def segment_layout(segment: dict) -> Layout:
    """The layout of a consumed segment ({world_size, workers, batch_size, batches})."""
    return Layout(segment["world_size"], segment["workers"], segment["batch_size"])


def shard_order(seed: int, epoch: int, shards: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(shards).tolist()


def shard_permutation(seed: int, epoch: int, shard_id: int, count: int) -> np.ndarray:
    """The order of a shard's `count` samples in `epoch`: sample numbers in its tar."""
    return np.random.default_rng([seed, epoch, shard_id]).permutation(count)


def sequence(counts: Sequence[int], seed: int, epoch: int) -> list[tuple[int, int]]:
    """The epoch's sample sequence G as (shard index, sample index in the shard's tar),
    independent of ranks, workers and batch size. For checks and tools: it walks every sample."""
    return [(shard_id, int(i)) for shard_id in shard_order(seed, epoch, len(counts))
            for i in shard_permutation(seed, epoch, shard_id, counts[shard_id])]


def remaining(length: int, consumed: Sequence[dict] = ()) -> np.ndarray:
    """Indices into G (of `length` samples) that are left once the `consumed` segments were
    read, in G order. ValueError for a segment the sequence cannot hold."""
    live = np.arange(length, dtype=np.int64)
    for segment in consumed:
        layout = segment_layout(segment)
        if not 0 <= segment["batches"] <= layout.batches_per_rank(len(live)):
            raise ValueError(f"cannot hold the checkpoint's {segment['batches']} batches under {layout}")
        live = np.delete(live, layout.consumed(len(live), segment["batches"]))
    return live


def plan(counts: Sequence[int], seed: int, epoch: int, indices: np.ndarray) -> Plan:
    """Sorted indices into G as [(shard, indices into the shard's epoch order)]."""
    order = shard_order(seed, epoch, len(counts))
    starts = np.cumsum([0] + [counts[i] for i in order[:-1]])
    which = np.searchsorted(starts, indices, side="right") - 1  # an empty shard is never picked
    cuts = np.flatnonzero(np.diff(which)) + 1
    return [(order[which[run[0]]], indices[run] - starts[which[run[0]]])
            for run in np.split(np.arange(len(indices)), cuts) if len(run)]


def cut(counts: Sequence[int], seed: int, epoch: int, layout: Layout, live: np.ndarray, rank: int) -> list[Plan]:
    """Per worker of `rank`: its share of the `live` indices into G, as plans."""
    b = layout.batch_size
    return [plan(counts, seed, epoch, live[start:start + n * b])
            for start, n in zip(layout.worker_starts(len(live), rank), layout.worker_batches(len(live)))]


def worker_plans(counts: Sequence[int], seed: int, epoch: int, layout: Layout, rank: int,
                 consumed: Sequence[dict] = ()) -> list[Plan]:
    """Per worker of `rank`: the samples it reads in `epoch` after the `consumed` segments."""
    return cut(counts, seed, epoch, layout, remaining(sum(counts), consumed), rank)


def skip(plan: Plan, n: int) -> Plan:
    """The plan without its first n samples; shards left with none are dropped (never opened)."""
    out = []
    for shard_id, picks in plan:
        if n >= len(picks):
            n -= len(picks)
            continue
        out.append((shard_id, picks[n:]))
        n = 0
    return out


def resume_point(counts: list[int], start: int, worker_id: int) -> tuple[int, list[int], int]:
    """Where loader worker `worker_id` starts when a rank resumes at batch `start`, its workers
    having `counts` batches: (the worker whose plan it reads, the rank positions of its batches,
    how many batches of that plan are already done). Workers are rotated so that loader
    worker 0 owns batch `start`; (-1, [], 0) when it has nothing left to read."""
    order = interleave(counts)
    tail = order[start:]
    if not tail:
        return -1, [], 0
    role = (tail[0][0] + worker_id) % len(counts)
    positions = [start + i for i, (w, _) in enumerate(tail) if w == role]
    done = sum(1 for w, _ in order[:start] if w == role)
    return (role, positions, done) if positions else (-1, [], 0)
