"""The shard reader against a real S3 endpoint (moto server, through s3fs), with real workers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import torch

import shards
from imgcls.augment import draw_params
from imgcls.config import AugmentConfig, DataConfig
from imgcls.data import DataError, ShardReader, interleave
from shardio.format import write_tar
from tests.conftest import RANDOM_CLASSES, random_npz


def cfg(url, **kw):
    return DataConfig(url=url, batch_size=kw.pop("batch_size", 16), num_workers=kw.pop("num_workers", 2),
                      augment=AugmentConfig(pad=1, flip=True, rotate_deg=10, brightness=0.2, contrast=0.2), **kw)


def read_epoch(reader, epoch=0, position=0):
    reader.set_epoch(epoch, position)
    return list(reader.loader())


def test_interleave_is_round_robin_skipping_exhausted():
    assert interleave([1, 3]) == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert interleave([2, 0, 1]) == [(0, 0), (2, 0), (0, 1)]


def test_two_ranks_two_workers_read_every_key_once_with_equal_batches(s3_dataset):
    seen, batch_counts = [], []
    manifest = None
    for rank in range(2):
        reader = ShardReader(cfg(s3_dataset), "train", rank=rank, world_size=2, seed=3)
        manifest = reader.manifest
        batches = read_epoch(reader, epoch=1)
        assert [b["position"] for b in batches] == list(range(len(batches)))
        assert all(len(b["key"]) == 16 for b in batches)
        batch_counts.append(len(batches))
        assert len(batches) == reader.batches_per_epoch(1)
        seen += [k for b in batches for k in b["key"]]
    assert batch_counts[0] == batch_counts[1] > 0
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    train_count = manifest["splits"]["train"]["count"]
    dropped = train_count - len(seen)
    # the only loss is the epoch's remainder: less than one batch per rank, at the end of G
    assert dropped == train_count % (2 * 16)


def test_order_is_a_function_of_seed_and_epoch(s3_dataset):
    reader = ShardReader(cfg(s3_dataset, num_workers=2), "train", seed=7)
    a = [b["key"] for b in read_epoch(reader, 2)]
    b = [b["key"] for b in read_epoch(ShardReader(cfg(s3_dataset, num_workers=2), "train", seed=7), 2)]
    c = [b["key"] for b in read_epoch(reader, 3)]
    assert a == b
    assert a != c


@pytest.mark.parametrize("position", [1, 5, 10, 17])
def test_resume_yields_exactly_the_uninterrupted_tail(s3_dataset, position):
    reader = ShardReader(cfg(s3_dataset), "train", rank=1, world_size=2, seed=1)
    full = read_epoch(reader, epoch=4)
    assert len(full) > position
    resumed = read_epoch(ShardReader(cfg(s3_dataset), "train", rank=1, world_size=2, seed=1), 4, position)
    assert [b["position"] for b in resumed] == list(range(position, len(full)))
    for got, want in zip(resumed, full[position:], strict=True):
        assert got["key"] == want["key"]
        assert torch.equal(got["label"], want["label"])
        assert torch.equal(got["image"], want["image"])  # augmentation included


def test_resume_skips_whole_shards_without_reading_them(s3_dataset, monkeypatch):
    """Resuming near the end opens only the shards that still hold unread batches."""
    opened = []
    original = ShardReader._read_shard

    def spy(self, epoch, shard_id, picks, *ahead):
        opened.append(shard_id)
        return original(self, epoch, shard_id, picks, *ahead)

    monkeypatch.setattr(ShardReader, "_read_shard", spy)
    reader = ShardReader(cfg(s3_dataset, num_workers=0), "train", seed=1)
    total = reader.batches_per_epoch(0)
    list(read_epoch(reader, 0, total - 1))
    assert len(opened) <= 2


def test_augmentation_depends_on_seed_epoch_key_only():
    aug = AugmentConfig(pad=2, rotate_deg=15, brightness=0.3, contrast=0.3)
    one = draw_params(aug, 0, 1, ["a", "b", "c"])
    assert np.array_equal(one[1], draw_params(aug, 0, 1, ["b"])[0])  # batch-mates don't matter
    assert not np.array_equal(one, draw_params(aug, 0, 2, ["a", "b", "c"]))
    assert not np.array_equal(one, draw_params(aug, 1, 1, ["a", "b", "c"]))


def test_eval_reads_every_sample_once_with_unequal_rank_shares(s3_dataset):
    keys, counts = [], []
    for rank in range(2):
        reader = ShardReader(cfg(s3_dataset, batch_size=16, eval_batch_size=7), "val", rank=rank,
                             world_size=2, train=False)
        batches = list(reader.loader())
        counts.append(sum(len(b["key"]) for b in batches))
        keys += [k for b in batches for k in b["key"]]
    manifest = reader.manifest["splits"]["val"]
    assert len(keys) == len(set(keys)) == manifest["count"]
    assert sum(counts) == manifest["count"]


def test_more_ranks_times_workers_than_shards_still_reads_every_key_once(s3_dataset):
    """Ranges cut G, not the shard list: 4 ranks x 4 workers share 13 shards."""
    keys = []
    for rank in range(4):
        reader = ShardReader(cfg(s3_dataset, num_workers=4), "train", rank=rank, world_size=4)
        batches = read_epoch(reader)
        assert len(batches) == reader.batches_per_epoch() == reader.split_count() // (4 * 16)
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == reader.samples_per_epoch()


# ---- bad data: each gets a message naming the shard (and key) ----------------------------
@pytest.fixture
def bad_dataset(tmp_path, s3_bucket):
    source = random_npz(tmp_path / "data.npz", n=300, size=8)
    url = f"{s3_bucket}/ds"
    shards.build(source, url, shard_samples=50, progress=False, workers=1)
    return url


def rewrite_shard(url, index, mutate, fix_manifest=True):
    """Replace train shard `index` with mutate(bytes); optionally keep the manifest consistent."""
    import hashlib

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    manifest = json.loads(fs.cat(f"{url}/manifest.json"))
    entry = manifest["splits"]["train"]["shards"][index]
    path = f"{url}/{entry['path']}"
    data = mutate(fs.cat(path))
    if data is None:
        fs.rm(path)
    else:
        fs.pipe(path, data)
        if fix_manifest:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            fs.pipe(f"{url}/manifest.json", json.dumps(manifest).encode())
    return path


def iterate_all(url, **kw):
    reader = ShardReader(cfg(url, num_workers=2, **kw), "train")
    return list(reader.loader())


def test_flipped_byte_is_named_by_the_reader(bad_dataset):
    def flip(data):
        data = bytearray(data)
        data[2048] ^= 0xFF  # inside the first sample's image bytes: tar can't notice, sha256 does
        return bytes(data)

    path = rewrite_shard(bad_dataset, 0, flip, fix_manifest=False)
    with pytest.raises(DataError, match=f"shard {path}.*corrupt"):
        iterate_all(bad_dataset)


def test_missing_shard_is_named(bad_dataset):
    path = rewrite_shard(bad_dataset, 1, lambda data: None)
    with pytest.raises(DataError, match=f"shard {path} is missing"):
        iterate_all(bad_dataset)


def test_truncated_shard_is_named(bad_dataset):
    path = rewrite_shard(bad_dataset, 2, lambda data: data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=f"shard {path}"):
        iterate_all(bad_dataset, verify_checksums=False)


def _samples_with(data, bad):
    """Rewrite a shard, replacing its first two samples' label and image bytes."""
    from shardio.format import read_tar

    samples = list(read_tar(data))
    out = []
    for i, s in enumerate(samples):
        label, image = int(s["cls"]), s["raw"]
        if i == 0 and "image" in bad:
            image = image[:-3]
        if i == 1 and "label" in bad:
            label = RANDOM_CLASSES + 4
        out.append((s["__key__"], label, "raw", image))
    return write_tar(out), [samples[0]["__key__"], samples[1]["__key__"]]


def test_undecodable_sample_and_bad_label_fail_naming_shard_and_key(bad_dataset):
    keys = {}

    def mutate(data):
        new, keys["k"] = _samples_with(data, {"image"})
        return new

    path = rewrite_shard(bad_dataset, 0, mutate)
    with pytest.raises(DataError, match=f"shard {path}, sample {keys['k'][0]}: raw image has"):
        iterate_all(bad_dataset)


def test_bad_samples_are_skipped_counted_and_limited(bad_dataset):
    def mutate(data):
        return _samples_with(data, {"image", "label"})[0]

    rewrite_shard(bad_dataset, 0, mutate)
    batches = iterate_all(bad_dataset, max_bad_samples=2)
    assert sum(b["bad"] for b in batches) == 2
    assert all(len(b["key"]) + b["bad"] == 16 for b in batches)  # batch positions stay exact
    with pytest.raises(DataError, match="more than data.max_bad_samples=1"):
        iterate_all(bad_dataset, max_bad_samples=1)


def test_batches_are_uint8_and_the_transform_makes_the_float_input(s3_dataset):
    """The loader ships uint8 (4x less host-to-device traffic); crop and flip are applied in
    the worker, rotation, jitter and normalisation by `transform` on the device."""
    plain = DataConfig(url=s3_dataset, batch_size=16, num_workers=0, mean=[0.25], std=[0.5],
                       augment=AugmentConfig(enabled=False))
    reader = ShardReader(plain, "train", seed=0)
    batch = next(iter(reader.loader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 1, 8, 8)
    assert batch["photometric"] is None
    expected = (batch["image"].float() / 255 - 0.25) / 0.5
    assert torch.equal(reader.transform(batch), expected)

    augmented = ShardReader(cfg(s3_dataset, num_workers=0), "train", seed=0)
    batch = next(iter(augmented.loader()))
    assert batch["image"].dtype == torch.uint8 and batch["photometric"].shape == (16, 4)
    images = augmented.transform(batch, channels_last=True)
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)


# ---- elastic resume: the epoch's sequence G does not depend on the layout ----------------
def sequence_keys(reader, epoch):
    """The keys of G, from the shard files themselves, in `reader.sequence(epoch)` order."""
    from shardio import storage
    from shardio.format import read_tar

    keys = {shard_id: [s["__key__"] for s in read_tar(storage.read_bytes(reader.shard_url(shard_id)))]
            for shard_id in range(len(reader.shards))}
    return [keys[shard_id][i] for shard_id, i in reader.sequence(epoch)]


def rank_ranges(batches, reader):
    """A rank's batches regrouped per worker (each worker's range in its own order), concatenated."""
    owners = [w for w, _ in interleave(reader.worker_batches(reader.epoch, reader.rank))]
    return [k for w in range(reader.workers) for b in batches if owners[b["position"]] == w for k in b["key"]]


@pytest.mark.parametrize("world_size,workers,batch_size", [(2, 2, 16), (3, 1, 8), (1, 3, 16)])
def test_ranks_and_workers_cut_one_sequence_into_contiguous_ranges(s3_dataset, world_size, workers, batch_size):
    readers = [ShardReader(cfg(s3_dataset, num_workers=workers, batch_size=batch_size), "train", rank=r,
                           world_size=world_size, seed=9) for r in range(world_size)]
    expected = sequence_keys(readers[0], 3)
    assert sorted(expected) == sorted(set(expected)) and len(expected) == readers[0].split_count()
    read = [k for reader in readers for k in rank_ranges(read_epoch(reader, 3), reader)]
    assert read == expected[:readers[0].samples_per_epoch()]
    assert len(expected) - len(read) == len(expected) % (world_size * batch_size)


def read_until(reader, stop):
    """Batches from the reader's position until `stop`, advancing it as the trainer does."""
    batches = []
    for batch in reader.loader():
        if reader.position == stop:
            break
        assert batch["position"] == reader.position
        batches.append(batch)
        reader.position += 1
    return batches


def stopped_on_two_ranks(url, position):
    """Every key two ranks (2 workers each) read in epoch 2 up to `position`, and rank 0's state."""
    keys, state = [], None
    for rank in range(2):
        reader = ShardReader(cfg(url), "train", rank=rank, world_size=2, seed=4)
        reader.set_epoch(2)
        keys += [k for b in read_until(reader, position) for k in b["key"]]
        state = state or reader.state_dict()
    return keys, state


def resume_everywhere(url, state, world_size, workers, batch_size, stop=None):
    """Keys all ranks of a new layout read after loading `state`, and rank 0's reader."""
    keys, first = [], None
    for rank in range(world_size):
        reader = ShardReader(cfg(url, num_workers=workers, batch_size=batch_size), "train", rank=rank,
                             world_size=world_size, seed=4)
        reader.load_state_dict(state)
        batches = read_until(reader, reader.batches_per_epoch() if stop is None else stop)
        assert stop is not None or len(batches) == reader.batches_per_epoch()
        keys += [k for b in batches for k in b["key"]]
        first = first or reader
    return keys, first


@pytest.mark.parametrize("world_size,workers,batch_size", [(1, 3, 16), (3, 1, 16), (3, 2, 8)])
def test_stopped_on_two_ranks_then_resumed_elsewhere_reads_every_key_once(s3_dataset, world_size, workers,
                                                                          batch_size):
    before, state = stopped_on_two_ranks(s3_dataset, 5)
    assert state["samples"] == len(before) == 2 * 5 * 16
    after, reader = resume_everywhere(s3_dataset, state, world_size, workers, batch_size)
    assert reader.consumed == [{"world_size": 2, "workers": 2, "batch_size": 16, "batches": 5}]
    assert reader.batches_per_epoch() == (reader.split_count() - len(before)) // (world_size * batch_size)
    seen = before + after
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    expected = sequence_keys(reader, 2)
    remainder = [k for k in expected if k not in set(seen)]
    # only the documented remainder is missing: the end of what was left, less than a batch per rank
    assert len(remainder) == (len(expected) - len(before)) % (world_size * batch_size)
    assert remainder == [k for k in expected if k not in set(before)][len(after):]


def test_two_layout_changes_in_one_epoch_and_the_next_epoch_is_whole_again(s3_dataset):
    before, state = stopped_on_two_ranks(s3_dataset, 4)
    middle, reader = resume_everywhere(s3_dataset, state, 3, 1, 8, stop=3)
    state = reader.state_dict()
    assert len(state["consumed"]) == 1 and state["position"] == 3
    assert state["samples"] == 2 * 4 * 16 + 3 * 3 * 8
    # the same layout again: the segment's own tail, exactly
    segment = ShardReader(cfg(s3_dataset, num_workers=1, batch_size=8), "train", rank=0, world_size=3, seed=4)
    segment.load_state_dict(state)
    assert segment.position == 3 and len(segment.consumed) == 1
    tail = [b["key"] for b in segment.loader()]
    segment.load_state_dict(stopped_on_two_ranks(s3_dataset, 4)[1])
    assert tail == [b["key"] for b in segment.loader()][3:]
    after, last = resume_everywhere(s3_dataset, state, 1, 2, 16)
    assert [s["world_size"] for s in last.consumed] == [2, 3]
    seen = before + middle + after
    assert len(seen) == len(set(seen))
    assert len(seen) == last.split_count() - (last.split_count() - 2 * 4 * 16 - 3 * 3 * 8) % 16
    last.set_epoch(3)
    assert last.consumed == [] and last.batches_per_epoch() == last.split_count() // 16


def test_same_layout_state_resumes_exactly_and_old_states_load_as_same_layout(s3_dataset):
    full = read_epoch(ShardReader(cfg(s3_dataset), "train", rank=1, world_size=2, seed=4), 2)
    _, state = stopped_on_two_ranks(s3_dataset, 6)
    for saved in (state, {"epoch": 2, "position": 6}):
        reader = ShardReader(cfg(s3_dataset), "train", rank=1, world_size=2, seed=4)
        reader.load_state_dict(saved)
        assert reader.consumed == [] and reader.position == 6
        resumed = list(reader.loader())
        assert [b["key"] for b in resumed] == [b["key"] for b in full[6:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[6:], strict=True))


def test_a_state_the_manifest_cannot_hold_is_refused_naming_the_dataset(s3_dataset):
    reader = ShardReader(cfg(s3_dataset), "train", seed=4)
    state = {"epoch": 0, "position": 100, "layout": {"world_size": 2, "workers": 2, "batch_size": 16}}
    with pytest.raises(DataError, match=f"{s3_dataset}: split 'train' cannot hold the checkpoint's 100 batches"):
        reader.load_state_dict(state)


def test_a_same_layout_position_past_the_epoch_is_refused(s3_dataset):
    reader = ShardReader(cfg(s3_dataset), "train", seed=4)
    with pytest.raises(DataError, match="cannot hold the checkpoint's 40 batches"):
        reader.load_state_dict({"epoch": 0, "position": 40})
