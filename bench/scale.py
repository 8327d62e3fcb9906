"""ImageNet scale, by simulation: the issue-22 figures, each against its target.

    .venv/bin/python bench/scale.py            # full size (ImageNet shape; a few minutes)
    .venv/bin/python bench/scale.py --small    # the same code at toy sizes (the test suite)

1. Manifest: a manifest of ImageNet's shape (1,281,167 train + 50,000 val images, 1000
   classes, ~1000 shards of ~140 MB) as `shards build` writes it now (per-shard totals and an
   index path) and as it wrote it before (plus one [w, h] per sample): its bytes, the CPU to
   write it, and, per rank, the CPU (time.process_time) and memory (tracemalloc, what stays
   allocated) of reading it with shardio.manifest.read.
2. Read amplification at 8/64/512 ranks x 8 workers: the reader's own plans
   (ShardReader.worker_plans on that manifest, no I/O), each worker's reads cut by
   shardio.shard.windows over a synthetic index (samples of 80-140 kB), ranges coalesced by
   shardio.shard.coalesce (gaps fetched up to 10% of the samples' bytes, to save requests).
   Bytes fetched per epoch over the dataset's bytes: whole shards (before) and ranged reads
   (now, index files included), and GETs per worker.
3. A worker's peak memory (tracemalloc, the worker-side code in this process) over one epoch
   of two real shards (raw 128x128x3 samples, ~140 MB each), against its bytes in flight
   (two data.read_window_mb windows: the one it decodes, the next one fetched meanwhile).
4. S3 at 30 ms latency and 80 MB/s per connection vs local, in images/s: the same shards of
   JPEG photo crops (bench/decode.py, 224 px RandomResizedCrop, 2 workers), read locally and
   from a moto server behind a TCP proxy that delays each chunk by the latency (15 ms each way)
   and paces each connection to the bandwidth; and from moto directly (what latency costs).
   Epochs interleave (local, S3, local, ...). As
   in the trainer, each epoch's loader starts at the end of the last one (data.start_epoch),
   2 s (validation, the checkpoint) before its first batch is asked for; images/s are timed
   from there to the epoch's last batch. Before them, the client CPU of the parts of
   shardio.shard.reads_whole's rule, against moto: a whole read per MB, parsing a sample,
   a ranged read per request.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import queue
import socket
import socketserver
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

TARGETS = {"manifest_cpu_s": 0.5, "manifest_mb": 20.0, "amplification_512x8": 1.2, "peak_vs_in_flight": 2.0,
           "s3_vs_local": 0.9}


@dataclass
class Shape:
    train: int = 1_281_167
    val: int = 50_000
    classes: int = 1000
    shard_bytes: int = 140_000_000
    sample_bytes: int = 110_000      # mean encoded image (ImageNet's JPEGs average ~110 kB)
    ranks: tuple = (8, 64, 512)
    workers: int = 8
    batch_size: int = 64
    memory_shard_samples: int = 2850  # x 49 kB raw samples: ~140 MB shards
    window_mb: float = 16.0
    s3_images: int = 2400
    s3_shard_bytes: int = 20_000_000
    reps: int = 4


SMALL = Shape(train=12_000, val=500, classes=10, shard_bytes=1_200_000, ranks=(2, 8, 16), workers=4,
              batch_size=8, memory_shard_samples=200, window_mb=2.0, s3_images=96, s3_shard_bytes=1_000_000, reps=1)


# ---- 1. the manifest --------------------------------------------------------------------
def per_shard(shape: Shape) -> int:
    return max(1, shape.shard_bytes // (shape.sample_bytes + 1536))


def sim_manifest(shape: Shape, legacy: bool) -> dict:
    """A manifest of `shape` as `shards build` writes it (`legacy`: with per-sample sizes)."""
    from shardio.format import FORMAT
    from shardio.shard import index_path

    rng = np.random.default_rng(0)
    splits = {}
    for name, total in (("train", shape.train), ("val", shape.val), ("test", 0)):
        shards, n = [], per_shard(shape)
        for i, start in enumerate(range(0, total, n)):
            count = min(n, total - start)
            labels = rng.integers(0, shape.classes, count)
            path = f"{name}/{name}-{i:06d}.tar"
            entry = {"path": path, "count": count, "bytes": count * (shape.sample_bytes + 1536) + 1024,
                     "sha256": hashlib.sha256(path.encode()).hexdigest(),
                     "class_counts": np.bincount(labels, minlength=shape.classes).tolist()}
            if legacy:
                entry["sizes"] = rng.integers(200, 501, (count, 2)).tolist()
            else:
                entry["index"] = index_path(path)
            shards.append(entry)
        counts = np.sum([s["class_counts"] for s in shards], axis=0).tolist() if shards else [0] * shape.classes
        splits[name] = {"count": total, "class_counts": counts, "shards": shards}
    return {"format": FORMAT, "tool_version": "sim", "source": {"kind": "folder", "path": "sim", "name": "imagenet"},
            "seed": 0, "classes": [f"n{c:08d}" for c in range(shape.classes)], "encoding": "source",
            "image": {"height": None, "width": None, "channels": 3},
            "stats": {"split": "train", "images": shape.train, "mean": [0.485, 0.456, 0.406],
                      "std": [0.229, 0.224, 0.225]}, "splits": splits, "warnings": []}


def manifest_figures(shape: Shape, workdir: Path) -> dict:
    """{legacy/now: bytes, write CPU s, read CPU s, read MB} of the manifest."""
    from shardio import manifest as manifests

    out = {}
    for name, legacy in (("before", True), ("now", False)):
        m = sim_manifest(shape, legacy)
        dest = str(workdir / f"manifest-{name}")
        cpu = time.process_time()
        manifests.write(dest, m)
        written = time.process_time() - cpu
        del m
        cpu = time.process_time()
        manifests.read(dest)
        read_cpu = time.process_time() - cpu
        tracemalloc.start()
        kept = manifests.read(dest)
        read_mb = tracemalloc.get_traced_memory()[0] / 1e6
        tracemalloc.stop()
        del kept
        out[name] = {"bytes": os.path.getsize(manifests.url_of(dest)), "write_cpu_s": written,
                     "read_cpu_s": read_cpu, "read_mb": read_mb}
    return out


# ---- 2. read amplification --------------------------------------------------------------
def amplification(shape: Shape, ranks: int) -> dict:
    """Bytes fetched per epoch / dataset bytes, whole shards vs ranged reads, at `ranks` x workers."""
    from imgcls.config import DataConfig
    from imgcls.data import ShardReader
    from shardio.shard import RECORD, Index, coalesce, reads_whole, windows

    manifest = sim_manifest(shape, legacy=False)
    cfg = DataConfig(url="sim://imagenet", batch_size=shape.batch_size, num_workers=shape.workers,
                     image_size=224, read_window_mb=shape.window_mb)
    reader = ShardReader(cfg, "train", world_size=ranks, seed=0, manifest=manifest)
    indexes = {}

    def index(shard_id: int) -> Index:  # synthetic spans: 80-140 kB images, 3 tar headers each
        if shard_id not in indexes:
            count = reader.shards[shard_id]["count"]
            sizes = np.random.default_rng(shard_id).integers(80_000, 140_001, count) // 512 * 512 + 1536
            records = np.zeros(count, RECORD)
            records["size"], records["offset"] = sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]])
            indexes[shard_id] = Index(int(sizes.sum()) + 1024, "", records)
        return indexes[shard_id]

    whole = ranged = gets = 0
    window_bytes = int(shape.window_mb * 1e6)
    for rank in range(ranks):
        for plan in reader.worker_plans(0, rank):
            for shard_id, picks in plan:
                ix = index(shard_id)
                whole += ix.shard_bytes
                members = reader._members(0, shard_id, picks)
                if reads_whole(len(members), reader.shards[shard_id], window_bytes):
                    ranged, gets = ranged + ix.shard_bytes, gets + 1
                    continue
                ranged += len(ix.to_bytes()) if len(members) < len(ix.records) else 0
                for window in windows(ix, members, window_bytes):
                    r = ix.records[window]
                    starts, ends = coalesce(r["offset"], r["offset"] + r["size"])
                    ranged += sum(e - s for s, e in zip(starts, ends))
                    gets += len(starts)
    total = sum(index(i).shard_bytes for i in range(len(reader.shards)))
    return {"ranks": ranks, "workers": shape.workers, "before": whole / total, "now": ranged / total,
            "gets_per_worker": gets / (ranks * shape.workers), "dataset_gb": total / 1e9}


# ---- 3. a worker's memory ---------------------------------------------------------------
def memory_figures(shape: Shape, workdir: Path) -> dict:
    import shards
    from imgcls.config import AugmentConfig, DataConfig
    from imgcls.data import ShardReader

    n = 2 * shape.memory_shard_samples
    rng = np.random.default_rng(0)
    npz = workdir / "memory.npz"
    np.savez(npz, images=rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    url = str(workdir / "memory-shards")
    m = shards.build(str(npz), url, split=(1, 0, 0), shard_samples=shape.memory_shard_samples, encoding="raw",
                     progress=False, workers=2)
    npz.unlink()
    cfg = DataConfig(url=url, batch_size=16, num_workers=0, read_window_mb=shape.window_mb,
                     augment=AugmentConfig(enabled=False))
    out = {"shard_mb": m["splits"]["train"]["shards"][0]["bytes"] / 1e6,
           "in_flight_mb": 2 * shape.window_mb}
    for name, verify in (("ranged", True), ("whole", False)):
        reader = ShardReader(DataConfig(**{**cfg.__dict__, "verify_checksums": verify}), "train",
                             world_size=2 if name == "ranged" else 1)  # rank 0 of 2: half of each shard
        tracemalloc.start()
        for _ in reader.loader():
            pass
        out[f"{name}_peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return out


# ---- 4. S3 behind latency and bandwidth ------------------------------------------------
class SlowProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port` that delays every chunk by
    `latency_s` / 2 each way and paces each connection's answers to `bytes_per_s`."""

    def __init__(self, target_port: int, latency_s: float, bytes_per_s: float):
        proxy = self
        self.target_port, self.delay, self.rate = target_port, latency_s / 2, bytes_per_s

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self):
                with socket.create_connection(("127.0.0.1", proxy.target_port)) as upstream:
                    pumps = [threading.Thread(target=proxy._pump, args=(self.request, upstream, None), daemon=True),
                             threading.Thread(target=proxy._pump, args=(upstream, self.request, proxy.rate),
                                              daemon=True)]
                    for pump in pumps:
                        pump.start()
                    for pump in pumps:
                        pump.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Pipe)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        """Chunks from src reach dst `delay` after they arrived, no faster than `rate`."""
        chunks: queue.Queue = queue.Queue()

        def send():
            free_at = 0.0
            while (item := chunks.get()) is not None:
                arrived, data = item
                start = max(arrived + self.delay, free_at)
                free_at = start + (len(data) / rate if rate else 0.0)
                time.sleep(max(0.0, (free_at if rate else start) - time.monotonic()))
                with contextlib.suppress(OSError):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                chunks.put((time.monotonic(), data))
        chunks.put(None)
        sender.join()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _serve_proxy(conn, target_port: int, latency_s: float, bytes_per_s: float, cpus: set[int]) -> None:
    """A SlowProxy in this (child) process, on `cpus`, until the parent closes `conn`."""
    os.sched_setaffinity(0, cpus)
    proxy = SlowProxy(target_port, latency_s, bytes_per_s)
    conn.send(proxy.endpoint)
    with contextlib.suppress(EOFError):
        conn.recv()
    proxy.close()


@contextlib.contextmanager
def server_side(server, latency_s: float, bytes_per_s: float):
    """The proxy's endpoint, with moto and the proxy on the last CPU and this process (so its
    loader workers) on the others: S3's own machines are not the client's, so their CPU must
    not be taken from the reader's. On one CPU nothing is pinned (and the proxy runs here)."""
    import multiprocessing

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        proxy = SlowProxy(server.port, latency_s, bytes_per_s)
        try:
            yield proxy.endpoint
        finally:
            proxy.close()
        return
    os.sched_setaffinity(server.proc.pid, {cpus[-1]})
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_serve_proxy, args=(theirs, server.port, latency_s, bytes_per_s, {cpus[-1]}), daemon=True)
    child.start()
    os.sched_setaffinity(0, set(cpus[:-1]))
    try:
        yield ours.recv()
    finally:
        ours.send(None)  # the child holds a copy of this end: closing it alone is never its EOF
        ours.close()
        child.join(10)
        os.sched_setaffinity(0, set(cpus))


def s3_figures(shape: Shape, workdir: Path, latency_s: float = 0.030, bytes_per_s: float = 80e6,
               pause_s: float = 2.0) -> dict:
    """images/s of the same shards read locally and from moto behind a SlowProxy."""
    import shards
    from bench.decode import write_photo_crops
    from bench.loader import MotoServer, upload
    from shardio import storage

    write_photo_crops(workdir / "photos", shape.s3_images)
    local = workdir / "photo-shards"
    shards.build(str(workdir / "photos"), str(local), split=(1, 0, 0), shard_bytes=shape.s3_shard_bytes,
                 progress=False, workers=2)
    server = MotoServer(workdir / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env()}
    try:
        os.environ.update(server.env())
        storage._cache.clear()
        storage.filesystem("s3://bench-scale")[0].mkdir("bench-scale")
        upload(local, "s3://bench-scale/shards")
        costs = read_costs("s3://bench-scale/shards")
        with server_side(server, latency_s, bytes_per_s) as proxy_endpoint:
            return _s3_epochs(shape, local, server, proxy_endpoint, pause_s) | {
                "latency_ms": latency_s * 1e3, "mb_per_s": bytes_per_s / 1e6,
                "client_cpus": len(os.sched_getaffinity(0)), "read_costs": costs}
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        storage._cache.clear()


def read_costs(url: str, reps: int = 10, ranged: int = 32) -> dict:
    """Client CPU (time.process_time, all threads) of the three parts of shardio.shard.reads_whole's
    rule, on the first shard at `url`: a whole read's fetch and sha256 per MB, parsing a sample
    out of its tar, and a ranged read per request (`ranged` samples apart, through the index)."""
    from shardio import manifest as manifests
    from shardio import shard as shardfile
    from shardio import storage

    entry = manifests.read(url)["splits"]["train"]["shards"][0]
    shard_url = storage.join(url, entry["path"])
    index = shardfile.read_index(shard_url)
    members = np.arange(0, entry["count"], 2)[:ranged]  # every other sample: a request each, mostly
    records = index.records[members]
    requests = len(shardfile.coalesce(records["offset"], records["offset"] + records["size"])[0])

    def cpu_of(fn) -> float:
        fn()  # warm: the client's connections are open
        start = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - start) / reps

    data = shardfile.fetch(shard_url)
    fetch_s = cpu_of(lambda: hashlib.sha256(shardfile.fetch(shard_url)).digest())
    parse_s = cpu_of(lambda: shardfile.samples(data, entry["count"], shard_url))
    ranged_s = cpu_of(lambda: list(shardfile.fetch_members(shard_url, entry, index, members)))
    return {"shard_mb": entry["bytes"] / 1e6, "samples": entry["count"],
            "whole_ms_per_mb": fetch_s * 1e3 / (entry["bytes"] / 1e6),
            "parse_us_per_sample": parse_s * 1e6 / entry["count"], "ranged_ms_per_request": ranged_s * 1e3 / requests,
            "requests": requests, "ranged_samples": len(members)}


def _s3_epochs(shape: Shape, local: Path, server, proxy_endpoint: str, pause_s: float) -> dict:
    """images/s and CPU per image of epochs read locally, from moto directly and through the
    proxy, interleaved round by round (the first round warms up)."""
    from bench.loader import cpu_seconds
    from imgcls.config import AugmentConfig, DataConfig
    from imgcls.data import ShardReader, start_epoch
    from shardio import storage

    endpoints = {"local": server.endpoint, "direct": server.endpoint, "s3": proxy_endpoint}
    rates: dict[str, list[float]] = {name: [] for name in endpoints}
    cpu: dict[str, list[float]] = {name: [] for name in endpoints}  # CPU s per image: workers and moto
    for rep in range(shape.reps + 1):
        for name, endpoint in endpoints.items():
            url = str(local) if name == "local" else "s3://bench-scale/shards"
            os.environ["AWS_ENDPOINT_URL"] = endpoint  # the workers fork with it
            storage._cache.clear()
            cfg = DataConfig(url=url, batch_size=32, num_workers=2, image_size=224, read_retry_s=30,
                             augment=AugmentConfig(flip=True))
            reader = ShardReader(cfg, "train", seed=0)
            reader.set_epoch(rep)
            used = cpu_seconds() + server.cpu_seconds()
            batches = start_epoch(reader)  # as the trainer does: at the last epoch's end,
            time.sleep(pause_s)            # then validation and the checkpoint
            start, images = time.perf_counter(), 0
            for batch in batches:
                images += len(batch["key"])
            del batches  # joins the workers: their CPU time is counted
            if rep:
                rates[name].append(images / (time.perf_counter() - start))
                cpu[name].append((cpu_seconds() + server.cpu_seconds() - used) / images)
    per_round = np.array(rates["s3"]) / np.array(rates["local"])
    return {"local": float(np.mean(rates["local"])), "s3": float(np.mean(rates["s3"])),
            "direct": float(np.mean(rates["direct"])),
            "ratio": float(np.mean(rates["s3"]) / np.mean(rates["local"])),
            "ratio_rounds": [round(float(r), 3) for r in per_round], "images": shape.s3_images,
            "cpu_ratio": float(np.mean(cpu["s3"]) / np.mean(cpu["local"])), "load": os.getloadavg()[0]}


# ---- the report -------------------------------------------------------------------------
def run(shape: Shape, workdir: Path, s3: bool = True) -> dict:
    results = {"manifest": manifest_figures(shape, workdir),
               "amplification": [amplification(shape, r) for r in shape.ranks],
               "memory": memory_figures(shape, workdir)}
    if s3:
        results["s3"] = s3_figures(shape, workdir)
    return results


def checks(results: dict) -> list[tuple[str, float, float, bool]]:
    """(figure, value, target, met) for each target of the issue."""
    now, last, mem = results["manifest"]["now"], results["amplification"][-1], results["memory"]
    rows = [("manifest read CPU per rank (s)", now["read_cpu_s"], TARGETS["manifest_cpu_s"]),
            ("manifest memory per rank (MB)", now["read_mb"], TARGETS["manifest_mb"]),
            (f"read amplification at {last['ranks']}x{last['workers']}", last["now"], TARGETS["amplification_512x8"]),
            ("worker peak / bytes in flight", mem["ranged_peak_mb"] / mem["in_flight_mb"],
             TARGETS["peak_vs_in_flight"])]
    out = [(name, value, target, value <= target) for name, value, target in rows]
    if "s3" in results:
        ratio = results["s3"]["ratio"]
        target = TARGETS["s3_vs_local"]
        out.append(("S3 (30 ms, 80 MB/s) / local images/s", ratio, target, ratio >= target))
    return out


def report(results: dict) -> str:
    m = results["manifest"]
    lines = ["| manifest | bytes | write CPU | read CPU per rank | read memory per rank |", "|---|---|---|---|---|"]
    for name in ("before", "now"):
        f = m[name]
        lines.append(f"| {name} | {f['bytes'] / 1e6:.2f} MB | {f['write_cpu_s']:.2f} s | {f['read_cpu_s']:.3f} s "
                     f"| {f['read_mb']:.1f} MB |")
    lines += ["", "| ranks x workers | whole shards (before) | ranged reads (now) | GETs per worker |",
              "|---|---|---|---|"]
    for a in results["amplification"]:
        lines.append(f"| {a['ranks']} x {a['workers']} | {a['before']:.2f}x | {a['now']:.3f}x "
                     f"| {a['gets_per_worker']:.0f} |")
    mem = results["memory"]
    lines += ["", f"worker memory: shards of {mem['shard_mb']:.0f} MB, {mem['in_flight_mb']:.0f} MB in flight: peak "
              f"{mem['ranged_peak_mb']:.1f} MB ranged, {mem['whole_peak_mb']:.1f} MB reading whole shards"]
    if "s3" in results:
        s = results["s3"]
        lines.append(f"S3 behind {s['latency_ms']:.0f} ms and {s['mb_per_s']:.0f} MB/s per connection: "
                     f"{s['s3']:.0f} images/s vs {s['local']:.0f} local and {s['direct']:.0f} from moto without "
                     f"the proxy ({s['images']} 224 px JPEG crops); "
                     f"per round {', '.join(f'{r:.2f}x' for r in s['ratio_rounds'])}; "
                     f"CPU per image {s['cpu_ratio']:.2f}x local's (moto's included); "
                     f"the reader on {s['client_cpus']} CPU(s), moto and the proxy on another; "
                     f"load average {s['load']:.1f} on {os.cpu_count()} CPUs")
        from shardio import shard as shardfile

        c = s["read_costs"]
        lines.append(f"read costs, client CPU against moto ({c['shard_mb']:.1f} MB shard of {c['samples']}): a whole "
                     f"read {c['whole_ms_per_mb']:.2f} ms per MB (fetch + sha256) and {c['parse_us_per_sample']:.1f} "
                     f"us per sample parsed, a ranged read {c['ranged_ms_per_request']:.2f} ms per request "
                     f"({c['ranged_samples']} samples in {c['requests']}) "
                     f"(shardio.shard.reads_whole assumes {shardfile.BYTE_S * 1e9:g}, {shardfile.MEMBER_S * 1e6:g} "
                     f"and {shardfile.REQUEST_S * 1e3:g})")
    lines += ["", "| figure | value | target | met |", "|---|---|---|---|"]
    for name, value, target, met in checks(results):
        lines.append(f"| {name} | {value:.3f} | {target:g} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="toy sizes: the same code in seconds (the test suite)")
    p.add_argument("--no-s3", dest="s3", action="store_false", help="skip the S3 row (it starts a moto server)")
    args = p.parse_args(argv)
    shape = SMALL if args.small else Shape()
    tmp_root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: no disk in the timings
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=tmp_root) as d:
        results = run(shape, Path(d), args.s3)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
