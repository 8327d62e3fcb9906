"""Transfer learning, measured: EfficientNet-Lite0 fine-tuned at 224 px from its ImageNet
weights against the same network from scratch, on a photo-like folder, in one run.

    .venv/bin/python bench/transfer.py [--per-class 100] [--epochs 3] [--seeds 0] [overrides ...]

The folder is Fashion-MNIST turned photo-like (tests/conftest.py `build_photo_folder`: RGB,
tinted, each image scaled to 40-300 px with a random aspect ratio, saved as JPEG, PNG and
WebP), built into shards that keep the source bytes. Both runs use configs/photos.yaml
(RandomResizedCrop 224, AdamW at an effective lr of 1e-3, cosine, label smoothing; no EMA in
so short a run) through jobs/train.py under a 2-process torchrun, and differ only in
model.pretrained; each is evaluated on the test split (resize 256 + center-crop 224). Prints a
markdown table, mean ± std over seeds, with its provenance.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards import build  # noqa: E402
from tests.conftest import build_photo_folder  # noqa: E402  (the same folder the tests use)

STARTS = {"ImageNet weights": "imagenet", "from scratch": ""}


def train_and_evaluate(run_dir: Path, data: str, seed: int, pretrained: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "jobs/train.py", "--config", "configs/photos.yaml", f"data.url={data}", f"run.dir={run_dir}",
           f"run.seed={seed}", f"model.pretrained={pretrained}", f"train.epochs={args.epochs}",
           f"data.batch_size={args.batch_size}", "data.eval_batch_size=64", "data.num_workers=1",
           # an effective lr of 1e-3 at any batch; no EMA: a run of ~100 steps would evaluate
           # mostly the initial weights through it
           f"optim.lr={1e-3 * 256 / (args.batch_size * args.nproc):g}", "schedule.warmup_epochs=0.5",
           "train.ema_decay=0", "track.wandb=disabled", *args.overrides]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    out = subprocess.run([sys.executable, "jobs/evaluate.py", str(run_dir / "checkpoints" / "best.pt"),
                          "--split", "test"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"acc": summary["acc"], "balanced_acc": summary["balanced_acc"], "train_s": seconds}


def mean_std(values: list[float], scale: float = 100, digits: int = 1) -> str:
    mean = scale * statistics.mean(values)
    return (f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1
            else f"{mean:.{digits}f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_transfer")
    p.add_argument("--per-class", type=int, default=100, help="images per class (10 classes)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = p.parse_args()
    out = Path(args.out).resolve()
    folder = build_photo_folder(out / "photos", per_class=args.per_class)
    data = out / "shards"
    if not (data / "manifest.json").exists():
        build(str(folder), str(data), split=(0.6, 0.1, 0.3), progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    counts = {name: split["count"] for name, split in manifest["splits"].items()}

    results = {label: [] for label in STARTS}
    for seed in args.seeds:
        for label, pretrained in STARTS.items():
            run_dir = out / f"{'imagenet' if pretrained else 'scratch'}-seed{seed}"
            results[label].append(train_and_evaluate(run_dir, str(data), seed, pretrained, args))
            print(f"seed {seed}, {label}: {results[label][-1]}", flush=True)

    print(f"\nEfficientNet-Lite0 at 224 px, photo-like Fashion-MNIST folder ({counts['train']} train / "
          f"{counts['test']} test images, 10 classes), {args.epochs} epochs, configs/photos.yaml, "
          f"{args.nproc}-process torchrun; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; seeds {args.seeds}\n")
    print("| start | test accuracy (%) | balanced accuracy (%) | training time (s) |\n|---|---|---|---|")
    for label, rows in results.items():
        print(f"| {label} | {mean_std([r['acc'] for r in rows])} | {mean_std([r['balanced_acc'] for r in rows])} "
              f"| {mean_std([r['train_s'] for r in rows], scale=1, digits=0)} |")


if __name__ == "__main__":
    main()
