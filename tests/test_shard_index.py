"""The per-shard index and ranged reads: a worker fetches only its samples' bytes (on a real
S3 endpoint), checks each against the index, names a corrupted one, and holds a bounded
window of bytes whatever the shard size."""
from __future__ import annotations

import json
import time
import tracemalloc
from dataclasses import replace

import pytest
import torch

import shards
from imgcls.config import AugmentConfig, DataConfig
from imgcls.data import DataError, ShardReader, start_epoch
from shardio import manifest as manifests
from shardio import shard as shardfile
from shardio import storage
from shardio.format import read_tar
from tests.conftest import random_npz


def data_cfg(url, **kw):
    return DataConfig(url=url, batch_size=kw.pop("batch_size", 10), num_workers=kw.pop("num_workers", 0),
                      augment=kw.pop("augment", AugmentConfig(pad=1, flip=True)), **kw)


def test_build_writes_an_index_beside_each_shard_and_a_manifest_without_per_sample_lists(big_shards):
    m = manifests.read(big_shards)
    entry = m["splits"]["train"]["shards"][0]
    assert set(entry) == {"path", "count", "bytes", "sha256", "class_counts", "index"}
    url = storage.join(big_shards, entry["path"])
    data = storage.read_bytes(url)
    index = shardfile.read_index(url)
    assert index.matches(entry) and len(index.records) == entry["count"] == 300
    for record, sample in zip(index.records, read_tar(data)):
        span = data[record["offset"]:record["offset"] + record["size"]]
        assert next(read_tar(span)) == sample  # a span alone reads back as its sample
        assert record["label"] == int(sample["cls"]) and (record["width"], record["height"]) == (16, 16)
    assert shards.verify(big_shards, deep=True) == []


def fetched_bytes(monkeypatch) -> list[int]:
    """Bytes of shard data every read in this process fetched (the real storage calls, counted)."""
    counts = []
    read_bytes, read_ranges = storage.read_bytes, storage.read_ranges

    def count_whole(url, *args):
        data = read_bytes(url, *args)
        counts.append(len(data) if url.endswith(".tar") else 0)
        return data

    def count_ranges(url, ranges, *args):
        blobs = read_ranges(url, ranges, *args)
        counts.append(sum(len(b) for b in blobs))
        return blobs

    monkeypatch.setattr(storage, "read_bytes", count_whole)
    monkeypatch.setattr(storage, "read_ranges", count_ranges)
    return counts


def test_ranks_fetch_only_their_samples_ranges_and_read_what_whole_shards_give(big_shards, monkeypatch):
    """8 ranks share 2 shards of 300, larger than the read window: each fetches ~its eighth of
    the bytes (ranged reads through s3fs), and its batches are the whole-shard reads' batches,
    bit for bit."""
    counts = fetched_bytes(monkeypatch)
    for rank in range(8):
        reader = ShardReader(data_cfg(big_shards, read_window_mb=0.5), "train", rank=rank, world_size=8, seed=2)
        counts.clear()
        ranged = list(reader.loader())
        index = shardfile.read_index(reader.shard_url(0))
        used = sum(len(picks) for plan in reader.worker_plans(0, rank) for _, picks in plan)
        assert used == len(ranged) * 10
        assert sum(counts) <= (1 + shardfile.SLACK) * 1.05 * used * index.records["size"].mean()  # not 2 x 300
        whole = list(ShardReader(data_cfg(big_shards, verify_checksums=False), "train", rank=rank, world_size=8,
                                 seed=2).loader())
        assert [b["key"] for b in ranged] == [b["key"] for b in whole]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ranged, whole, strict=True))


def test_a_rank_reads_a_shard_whole_without_its_index_when_that_costs_less_cpu(big_shards, monkeypatch):
    """4 ranks of 150 samples over shards of 300 (~0.8 MB, within the window): each shard a rank
    needs is fetched in one GET of the whole shard (sha256 checked) and its index is never read,
    since parsing 300 small samples costs less than a request per sample
    (shardio.shard.reads_whole). With a window smaller than the shard, the same ranks read
    their samples' ranges through the index."""
    counts, indexes_read = fetched_bytes(monkeypatch), []
    read_index = shardfile.read_index
    monkeypatch.setattr(shardfile, "read_index", lambda url, *a: indexes_read.append(url) or read_index(url, *a))
    entries = manifests.read(big_shards)["splits"]["train"]["shards"]
    sample_bytes = read_index(storage.join(big_shards, entries[0]["path"])).records["size"].mean()
    for window_mb in (64, 0.5):
        ranged_shards = 0
        for rank in range(4):
            reader = ShardReader(data_cfg(big_shards, read_window_mb=window_mb), "train", rank=rank, world_size=4,
                                 seed=2)
            counts.clear(), indexes_read.clear()
            assert sum(len(b["key"]) for b in reader.loader()) == 150
            [plan] = reader.worker_plans(0, rank)
            over = [shard_id for shard_id, _ in plan if entries[shard_id]["bytes"] > window_mb * 1e6]
            assert [shard_id for shard_id, _ in plan if reader.shard_url(shard_id) in indexes_read] == over
            whole = sum(entries[shard_id]["bytes"] for shard_id, _ in plan if shard_id not in over)
            needed = sum(len(picks) for shard_id, picks in plan if shard_id in over) * sample_bytes
            assert needed <= sum(counts) - whole <= 1.2 * needed  # the indexes' reads count 0
            ranged_shards += len(over)
        assert (ranged_shards > 0) == (window_mb < 1)


def test_whole_or_ranged_is_decided_by_cpu_cost_from_the_manifest():
    """The rule's figures (shardio.shard.reads_whole): small samples read whole from a few
    needed, ImageNet photos from about an eighth of a shard, and never a shard over the window."""
    def whole(needed, count, mb, window_mb=64):
        return shardfile.reads_whole(needed, {"count": count, "bytes": int(mb * 1e6)}, int(window_mb * 1e6))

    assert not whole(8, 2000, 5.13) and whole(32, 2000, 5.13)  # Fashion-MNIST-sized shards
    assert not whole(40, 580, 64) and whole(120, 580, 64) and whole(580, 580, 64)  # 110 kB photos
    assert not whole(1270, 1270, 140)  # over the window: by range, whatever is needed
    assert not whole(32, 2000, 5.13, window_mb=5)


def corrupt_sample(url: str, shard_path: str, member: int) -> str:
    """Flip a byte in the image of sample `member` of a shard, keeping the manifest and the
    index as they were; returns the sample's key."""
    shard_url = storage.join(url, shard_path)
    data = bytearray(storage.read_bytes(shard_url))
    record = shardfile.read_index(shard_url).records[member]
    data[int(record["offset"] + record["size"]) - 600] ^= 0xFF  # in the image bytes: tar can't tell
    storage.write_bytes_atomic(shard_url, bytes(data))
    return list(read_tar(bytes(data)))[member]["__key__"]


def test_a_corrupted_member_is_named_by_ranged_reads_and_whole_reads_check_sha256(tmp_path):
    url = str(tmp_path / "ds")
    shards.build(random_npz(tmp_path / "d.npz", n=200, size=16, channels=3), url, shard_samples=70, split=(1, 0, 0),
                 progress=False, workers=1)
    # windows of 50 kB, smaller than a shard (~160 kB): read by range even for half a shard
    reader = ShardReader(data_cfg(url, read_window_mb=0.05), "train", rank=1, world_size=2, seed=5)
    (shard_id, picks), *_ = reader.worker_plans(0, 1)[0]
    member = int(reader._shard_permutation(0, shard_id)[picks][3])
    path = reader.shards[shard_id]["path"]
    key = corrupt_sample(url, path, member)
    with pytest.raises(DataError) as error:
        list(reader.loader())
    assert str(error.value) == (f"shard {url}/{path} is corrupt: sample {key} differs from the shard's index "
                                "(crc32)")
    whole = ShardReader(data_cfg(url), "train", seed=5)  # one rank reads every shard whole
    with pytest.raises(DataError, match=f"shard {url}/{path} is corrupt: its sha256 differs"):
        list(whole.loader())


def test_a_stale_index_is_a_warning_and_the_shard_is_read_whole(tmp_path, caplog):
    url = str(tmp_path / "ds")  # windows smaller than a shard: rank 0 reads by range, through the index
    shards.build(random_npz(tmp_path / "d.npz", n=120, size=8, channels=3), url, shard_samples=60, split=(1, 0, 0),
                 progress=False)
    before = [b["key"] for b in ShardReader(data_cfg(url, read_window_mb=0.01), "train", rank=0, world_size=4).loader()]
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    entry = m["splits"]["train"]["shards"][0]
    entry["sha256"] = "0" * 64  # as if the shard were rewritten (checksums off: it is read as it is)
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(m))
    reader = ShardReader(data_cfg(url, read_window_mb=0.01), "train", rank=0, world_size=4)
    with pytest.raises(DataError, match="sha256 differs"):
        list(reader.loader())
    assert f"{url}/train/train-000000.idx indexes another shard than the manifest's (stale)" in caplog.text
    off = ShardReader(data_cfg(url, read_window_mb=0.01, verify_checksums=False), "train", rank=0,
                      world_size=4)
    assert [b["key"] for b in off.loader()] == before


def traced_peak(reader) -> int:
    """Peak bytes Python allocated while the reader went through an epoch (in this process)."""
    tracemalloc.start()
    try:
        for _ in reader.loader():
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_workers_memory_follows_its_read_window_not_the_shard_size(tmp_path):
    """Shards of 4.6 MB, windows of 0.25 MB: a worker holds two windows (the one it decodes,
    the next one fetched meanwhile), so its peak stays within 2x those bytes in flight; reading
    the shard whole holds all of it."""
    url = str(tmp_path / "ds")
    shards.build(random_npz(tmp_path / "d.npz", n=2000, size=32, channels=3), url, shard_samples=1000, split=(1, 0, 0),
                 progress=False)
    shard_bytes = manifests.read(url)["splits"]["train"]["shards"][0]["bytes"]
    assert shard_bytes > 4e6
    window = 0.25e6
    cfg = data_cfg(url, batch_size=16, read_window_mb=window / 1e6, augment=AugmentConfig(enabled=False))
    in_flight = 2 * window
    assert traced_peak(ShardReader(cfg, "train")) <= 2 * in_flight < shard_bytes / 4
    assert traced_peak(ShardReader(replace(cfg, verify_checksums=False), "train")) > shard_bytes


def first_batch_wait(batches, idle_s: float) -> float:
    """Seconds the first batch took to come, after `idle_s` of other work (validation, a save)."""
    time.sleep(idle_s)
    start = time.perf_counter()
    next(batches)
    return time.perf_counter() - start


def test_the_next_epochs_first_batch_is_read_while_the_last_epoch_ends(big_shards, slow_s3):
    """Storage answers in 0.6 s. A loader started when the trainer asks for the first batch
    waits for the index and the first window; one started at the end of the last epoch
    (start_epoch, before validation) has its first batch ready."""
    reader = ShardReader(data_cfg(big_shards, num_workers=1), "train", seed=1)
    reader.set_epoch(1)
    waited = first_batch_wait(iter(reader.loader()), idle_s=0)
    reader.set_epoch(2)
    early = start_epoch(reader)
    ahead = first_batch_wait(early, idle_s=5)
    assert ahead < 0.3 and waited > 1.2, (ahead, waited)
    assert len(list(early)) == reader.batches_per_epoch() - 1


def test_bench_scale_reports_each_figure_against_its_target(tmp_path):
    """bench/scale.py at toy sizes: the same code as the README's full-size figures."""
    from bench.scale import SMALL, checks, report, run

    results = run(SMALL, tmp_path)
    rows = {name: (value, met) for name, value, _, met in checks(results)}
    assert len(rows) == 5 and "S3 (30 ms, 80 MB/s) / local images/s" in rows
    assert rows["manifest memory per rank (MB)"][1] and rows["manifest read CPU per rank (s)"][1]
    assert rows["worker peak / bytes in flight"][1]
    amplification = results["amplification"]
    assert all(a["now"] <= 1.15 for a in amplification) and amplification[-1]["before"] > 1
    assert results["manifest"]["now"]["bytes"] < results["manifest"]["before"]["bytes"]
    assert "| figure | value | target | met |" in report(results)
