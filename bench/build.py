"""`shards build` speed on real-photo JPEGs: images/s with --workers 1, 2 and N, in one run.

    .venv/bin/python bench/build.py                      # 1000 crops, workers 1,2,<cpus>, 3 reps
    .venv/bin/python bench/build.py --count 4000 --workers 1,2,4,8,16

The images are bench/decode.py's `write_photo_crops`: JPEG crops (quality 90, ~500x375) of the
real photographs on this machine (scikit-image's data folder, gnome-backgrounds' wood photos),
one class folder per source photograph: about ImageNet's typical size and quality.

Each build is `shards.build(PHOTOS, <fresh dest>, workers=W, progress=False)`, the default
encoding ("source": every file decoded once to check it and count its pixels, its bytes kept),
timed with time.perf_counter around the whole call (listing, headers, pool start-up, check,
encode, tar, sha256, write). Runs are interleaved (W=1, W=2, ..., then again) so load from other
processes hits all alike. "threads" rows are the same build with threads in place of the worker
processes (how build ran before): the baseline, measured in the same run.

CPU per image: this process's CPU time (user + system) per image. With one worker that is
the whole cost of an image (everything runs in this process); with several, it is the build
process's own share, which bounds the speed-up: it lists, reads headers, assembles, hashes and
writes every shard. (The worker processes are the forkserver's children, not this process's,
so their CPU is not counted here.) `--estimate-images` and `--estimate-cores` turn the two
into a time for a larger build: the 1-worker cost spread over all cores but one, or the build
process's share, whichever is longer -- assuming the workers scale linearly (see the README).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL  # noqa: E402

import shards  # noqa: E402
from shards import writer  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def cpu_seconds() -> float:
    """This process's user + system seconds, all threads."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def timed_build(photos: Path, dest: Path, workers: int, threads: bool) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    with mock.patch.object(writer, "worker_pool", (lambda w: None) if threads else writer.worker_pool):
        cpu0, start = cpu_seconds(), time.perf_counter()
        manifest = shards.build(photos, dest, workers=workers, progress=False, split=(1, 0, 0))
        wall, cpu1 = time.perf_counter() - start, cpu_seconds()
    images = manifest["splits"]["train"]["count"]
    return {"images": images, "wall": wall, "cpu": cpu1 - cpu0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000, help="real-photo JPEG crops (default 1000)")
    p.add_argument("--workers", default=f"1,2,{os.cpu_count()}", help="worker counts (default 1,2,<cpus>)")
    p.add_argument("--reps", type=int, default=3, help="timed builds per setting, after one warm-up")
    p.add_argument("--no-threads", dest="threads", action="store_false", help="skip the threads baseline")
    p.add_argument("--workdir", type=Path, help="keep the photos here (default: a temporary folder)")
    p.add_argument("--estimate-images", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--estimate-cores", type=int, default=32)
    args = p.parse_args(argv)

    from bench.decode import write_photo_crops  # scikit-image's photographs

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-build-"))
    photos = workdir / "photos"
    if not photos.exists():
        write_photo_crops(photos, args.count)
    nbytes = sum(f.stat().st_size for f in photos.rglob("*.jpg"))
    counts = sorted({int(w) for w in args.workers.split(",")})
    settings = [("processes", w) for w in counts] + [("threads", w) for w in counts if w > 1 and args.threads]
    load_start = os.getloadavg()

    results: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
    for rep in range(args.reps + 1):  # rep 0: warm-up (page cache, forkserver start), discarded
        for kind, w in settings:
            run = timed_build(photos, workdir / "out", w, kind == "threads")
            if rep:
                results[(kind, w)].append(run)
    shutil.rmtree(workdir / "out", ignore_errors=True)

    images = results[settings[0]][0]["images"]
    print(f"shards build of {images} real-photo JPEG crops ({nbytes / images / 1e3:.0f} kB each, "
          f"~500x375, q90), encoding source, {args.reps} timed builds per row after one warm-up, "
          f"interleaved; {os.cpu_count()} CPUs, load average {load_start[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}, "
          f"Pillow {PIL.__version__}")
    print()
    print("| workers | pool | images/s | vs 1 worker | CPU ms/image in the build process |")
    print("|---|---|---|---|---|")
    base = statistics.mean(r["images"] / r["wall"] for r in results[("processes", 1)]) \
        if ("processes", 1) in results else None
    for kind, w in settings:
        runs = results[(kind, w)]
        rates = [r["images"] / r["wall"] for r in runs]
        mean = statistics.mean(rates)
        std = statistics.stdev(rates) if len(rates) > 1 else 0.0
        cpu = statistics.mean(1e3 * r["cpu"] / r["images"] for r in runs)
        pool = "in-process" if w == 1 else kind
        ratio = f"{mean / base:.2f}x" if base else "-"
        print(f"| {w} | {pool} | {mean:,.0f} ± {std:,.0f} | {ratio} | {cpu:.2f} |")

    # The estimate: the whole cost of an image (1 worker) spread over the cores but one, or the
    # build process's own share (widest process row), whichever takes longer.
    if ("processes", 1) in results and len(counts) > 1:
        total = statistics.mean(r["cpu"] / r["images"] for r in results[("processes", 1)])
        parent = statistics.mean(r["cpu"] / r["images"] for r in results[("processes", counts[-1])])
        n, cores = args.estimate_images, args.estimate_cores
        spread = n * total / (cores - 1)
        print()
        print(f"estimate for {n:,} images on {cores} cores: {max(spread, n * parent) / 60:.0f} min "
              f"({1e3 * total:.2f} ms CPU/image over {cores - 1} worker cores: {spread / 60:.0f} min; "
              f"the build process's {1e3 * parent:.2f} ms/image with {counts[-1]} workers: "
              f"{n * parent / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
