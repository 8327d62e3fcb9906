"""The shard reader against a real S3 endpoint (moto server, through s3fs), with real workers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import torch

import shards
from imgcls.augment import AugmentConfig, draw_params
from imgcls.data import DataConfig, DataError, ShardReader, interleave
from shards.format import write_tar

NUM_CLASSES = 5


def make_npz(path, n=900, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)
    labels = np.arange(n) % NUM_CLASSES
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory, s3_endpoint):
    """~630 train samples in 13 shards of 50 on S3."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("reader-data")
    npz = make_npz(tmp_path_factory.mktemp("src") / "data.npz")
    shards.build(str(npz), "s3://reader-data/ds", shard_samples=50, progress=False, workers=1)
    return "s3://reader-data/ds"


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
    # the only loss is each worker's remainder (< one batch) plus the ranks' imbalance
    assert 0 <= dropped < 2 * 2 * 16 + 2 * 50


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

    def spy(self, epoch, shard_id, lo, hi):
        opened.append(shard_id)
        return original(self, epoch, shard_id, lo, hi)

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


def test_fewer_shards_than_ranks_times_workers_is_an_error(s3_dataset):
    with pytest.raises(DataError, match="fewer than ranks × workers"):
        ShardReader(cfg(s3_dataset, num_workers=4), "train", rank=0, world_size=4)


# ---- bad data: each gets a message naming the shard (and key) ----------------------------
@pytest.fixture
def bad_dataset(tmp_path, s3_bucket):
    npz = make_npz(tmp_path / "data.npz", n=300)
    url = f"{s3_bucket}/ds"
    shards.build(str(npz), url, shard_samples=50, progress=False, workers=1)
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
    from shards.format import read_tar

    samples = list(read_tar(data))
    out = []
    for i, s in enumerate(samples):
        label, image = int(s["cls"]), s["raw"]
        if i == 0 and "image" in bad:
            image = image[:-3]
        if i == 1 and "label" in bad:
            label = NUM_CLASSES + 4
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
    assert batch["image"].dtype == torch.uint8 and batch["photometric"].shape == (16, 3)
    images = augmented.transform(batch, channels_last=True)
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
