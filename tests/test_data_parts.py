"""The data path's parts one at a time: the order's planning without a DataLoader, the position
as a checkpoint part, and the TrainLoader owning the position."""
from __future__ import annotations

import numpy as np
import pytest

from imgcls.config import AugmentConfig, DataConfig
from imgcls.data import DataError, DataPosition, Layout, ShardReader, TrainLoader, order
from imgcls.data.eval import whole_shard_batches, whole_shard_plans
from tests.conftest import build_bands_dataset

COUNTS = [50, 0, 37, 50, 13, 50]  # an empty shard and short ones: the cuts cross shard edges


def sequence_indices(plans: list[order.Plan], counts, seed, epoch) -> list[tuple[int, int]]:
    """The plans' samples as (shard, sample number in its tar)."""
    return [(shard_id, int(order.shard_permutation(seed, epoch, shard_id, counts[shard_id])[i]))
            for plan in plans for shard_id, picks in plan for i in picks]


@pytest.mark.parametrize("world_size,workers,batch_size", [(1, 1, 16), (2, 2, 8), (3, 4, 5), (4, 3, 7)])
def test_every_ranks_plans_together_are_the_sequence_less_the_remainder(world_size, workers, batch_size):
    layout, seed, epoch = Layout(world_size, workers, batch_size), 3, 2
    sequence = order.sequence(COUNTS, seed, epoch)
    assert sorted(sequence) == sorted((s, i) for s, n in enumerate(COUNTS) for i in range(n))
    read = [pair for rank in range(world_size)
            for pair in sequence_indices(order.worker_plans(COUNTS, seed, epoch, layout, rank), COUNTS, seed, epoch)]
    kept = world_size * batch_size * layout.batches_per_rank(len(sequence))
    assert read == sequence[:kept]  # ranks then workers in order: contiguous ranges of G
    assert len(sequence) - kept < world_size * batch_size


def test_plans_are_pure_functions_of_their_inputs():
    layout = Layout(2, 3, 4)
    one = order.worker_plans(COUNTS, 5, 1, layout, 1)
    two = order.worker_plans(list(COUNTS), 5, 1, layout, 1)
    assert [[(s, p.tolist()) for s, p in plan] for plan in one] == [[(s, p.tolist()) for s, p in plan] for plan in two]
    assert order.sequence(COUNTS, 5, 1) != order.sequence(COUNTS, 5, 2)
    assert order.sequence(COUNTS, 5, 1) != order.sequence(COUNTS, 6, 1)


def test_remaining_after_a_segment_is_what_the_segment_did_not_read():
    length, first = sum(COUNTS), Layout(2, 2, 8)
    segment = {"world_size": 2, "workers": 2, "batch_size": 8, "batches": 3}
    live = order.remaining(length, [segment])
    assert sorted(set(live.tolist()) | set(first.consumed(length, 3).tolist())) == list(range(length))
    assert len(live) == length - 2 * 3 * 8
    with pytest.raises(ValueError, match="cannot hold the checkpoint's 99 batches"):
        order.remaining(length, [{**segment, "batches": 99}])


def test_skip_and_resume_point_cover_the_tail_once():
    plan = [(0, np.arange(5)), (2, np.arange(3))]
    assert [(s, p.tolist()) for s, p in order.skip(plan, 6)] == [(2, [1, 2])]
    counts = Layout(1, 3, 4).worker_batches(100)  # 25 batches over 3 workers
    for start in (0, 1, 7, 24):
        positions = sorted(p for w in range(3) for p in order.resume_point(counts, start, w)[1])
        assert positions == list(range(start, 25))
        assert order.resume_point(counts, start, 0)[1][0] == start  # loader worker 0 owns the next batch


def test_eval_plans_deal_whole_shards_to_ranks_then_workers():
    plans = [whole_shard_plans(COUNTS, rank, 2, 2) for rank in range(2)]
    assert sorted(s for rank in plans for plan in rank for s, _ in plan) == list(range(len(COUNTS)))
    assert whole_shard_batches(plans[0], 16) == [4, 3]  # 50 + 13 and 37 samples: the last batch partial


def test_the_position_round_trips_and_refuses_another_dataset():
    shards = [{"path": f"s{i}.tar", "count": n} for i, n in enumerate(COUNTS)]
    position = DataPosition(shards, Layout(1, 2, 8), url="mem://x", split="train")
    position.set_epoch(3, 4)
    again = DataPosition(shards, Layout(1, 2, 8), url="mem://x", split="train")
    again.load_state_dict(position.state_dict())
    assert again.state_dict() == position.state_dict()
    assert again.samples == 4 * 8
    other = DataPosition([*shards, {"path": "new.tar", "count": 1}], Layout(1, 2, 8), url="mem://x", split="train")
    with pytest.raises(DataError, match="shards differ"):
        other.load_state_dict(position.state_dict())


@pytest.fixture(scope="module")
def bands(tmp_path_factory):
    return build_bands_dataset(tmp_path_factory.mktemp("bands"), n=600)


def train_loader(url, epochs=2, **kw):
    data = DataConfig(url=url, batch_size=16, num_workers=kw.pop("num_workers", 2),
                      augment=AugmentConfig(pad=1, flip=True))
    return TrainLoader(ShardReader(data, "train", seed=1), epochs=epochs, **kw)


def test_the_loader_owns_the_position_and_its_state_resumes_at_the_next_batch(bands):
    started = []
    loader = train_loader(bands, before_start=lambda: started.append(True))
    first = [next(loader) for _ in range(5)]
    assert [b["position"] for b in first] == list(range(5)) and loader.position == 5
    assert started == [True]  # the workers were forked once, after the callback
    state = loader.state_dict()
    want = next(loader)
    loader.stop()

    resumed = train_loader(bands)
    resumed.load_state_dict(state)
    assert resumed.position == 5
    got = next(resumed)
    assert got["key"] == want["key"] and got["position"] == 5
    resumed.stop()


def test_the_loader_counts_steps_and_moves_to_the_next_epoch(bands):
    loader = train_loader(bands, epochs=2, num_workers=0)
    total = loader.batches_per_epoch()
    assert loader.steps_per_epoch(2) == [total // 2, total // 2]
    for _ in range(3):
        next(loader)
    assert loader.steps_left(2) == total // 2 - 1
    loader.next_epoch()  # the second epoch's batches are started at once
    assert (loader.epoch, loader.position, loader.done) == (1, 0, False)
    assert next(loader)["position"] == 0
    loader.next_epoch()
    assert loader.done
