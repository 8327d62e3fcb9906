"""The whole-shard evaluation reading: every sample once, in manifest order, with no
permutation and no state. Shards are dealt to ranks, then to a rank's workers; each worker's
last batch may be partial."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from imgcls.data.order import Plan


def whole_shard_plans(counts: Sequence[int], rank: int, world_size: int, workers: int) -> list[Plan]:
    """Per worker of `rank`: its whole shards, [(shard, every sample index)]."""
    mine = list(range(len(counts)))[rank::world_size]
    return [[(i, np.arange(counts[i])) for i in mine[w::workers]] for w in range(workers)]


def whole_shard_batches(plans: list[Plan], batch_size: int) -> list[int]:
    """Batches per worker, the partial last one included."""
    per_worker = [sum(len(picks) for _, picks in plan) for plan in plans]
    return [-(-n // batch_size) for n in per_worker]
