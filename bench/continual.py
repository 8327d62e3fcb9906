"""Continual learning: Fashion-MNIST as two tasks of 5 classes, plain fine-tuning vs EWC, in one run.

    .venv/bin/python bench/continual.py [--seeds 0 1 2] [--importance 10 100] [overrides ...]

Task A is classes 0-4 (T-shirt/top ... Coat), task B classes 5-9 (Sandal ... Ankle boot), each
a shard dataset with all 10 class names (one shared 10-way head). Per seed: train A, then B
from A's weights (model.pretrained) with plain fine-tuning and with EWC at each importance
(ewc.previous = A's checkpoint, Fisher from A's train split); every run goes through
jobs/train.py, the same trainer. Then each model is evaluated on A's and B's test sets:

- 10-way accuracy: argmax over all 10 classes (class-incremental: "which of the 10?");
- within-task accuracy: argmax over the task's own 5 classes (task-incremental: the task is
  known at test time, as with one head per task).

Prints a markdown table, mean ± std over seeds, with its provenance.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imgcls import checkpoint  # noqa: E402
from imgcls.data import ShardReader  # noqa: E402
from imgcls.models.trained import load_model  # noqa: E402
from jobs import add_output_argument  # noqa: E402
from shards import build  # noqa: E402
from shards.sources import FASHION_MNIST_CLASSES, open_source  # noqa: E402

TASKS = {"A": [0, 1, 2, 3, 4], "B": [5, 6, 7, 8, 9]}
# a small CPU recipe: the tutorial CNN has no normalisation layers, so what EWC protects (the
# weights) is all of task A's model: BatchNorm's running statistics would drift to task B unprotected
RECIPE = [
    "model.name=tutorial_cnn", "model.whiten_images=0", "model.channels_last=false", "data.batch_size=128",
    "data.num_workers=0", "optim.base_batch=128", "train.ema_decay=0", "train.label_smoothing=0",
    "train.eval_flip=false", "train.eval_shift=false", "track.wandb=disabled", "track.progress=false",
    "train.log_every=50", "train.ckpt_every=100000",
]


def build_task(name: str, dest: Path, per_class: int) -> str:
    """Shards of the task's classes: `per_class` training images of each (10% of them val) and
    their whole official test split; all 10 class names, so labels keep their meaning."""
    if (dest / "manifest.json").exists():
        return str(dest)
    src = open_source("fashion-mnist")
    images = np.stack([np.asarray(src.load(i)) for i in range(len(src.labels))])[..., 0]
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.permutation(np.flatnonzero(~src.is_test & (src.labels == c)))[:per_class]
                            for c in TASKS[name]])
    test = np.flatnonzero(src.is_test & np.isin(src.labels, TASKS[name]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    npz = dest.parent / f"task-{name}.npz"
    np.savez(npz, images=images[train], labels=src.labels[train], images_test=images[test],
             labels_test=src.labels[test], class_names=np.array(FASHION_MNIST_CLASSES))
    build(str(npz), str(dest), split=(0.9, 0.1, 0.0), shard_samples=500, progress=False, workers=1)
    return str(dest)


def train(run_dir: Path, data: str, nproc: int, overrides: list[str]) -> str:
    best = run_dir / "checkpoints" / "best.pt"
    if not best.exists():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "jobs/train.py", "--config", "configs/fashion_mnist.yaml", f"data.url={data}", f"run.dir={run_dir}",
               *RECIPE, *overrides]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return str(checkpoint.list_checkpoints(str(run_dir))[-1])  # the last epoch's weights, not the best


def accuracies(ckpt: str, data: str, classes: list[int]) -> tuple[float, float]:
    """(10-way accuracy, accuracy with the argmax over `classes` only) on the test split."""
    trained = load_model(ckpt, use_ema=False, data_url=data)
    model, manifest, data_cfg = trained.model, trained.manifest, trained.config.data
    data_cfg.num_workers = 0
    reader = ShardReader(data_cfg, "test", train=False, manifest=manifest)
    mask = torch.full((len(manifest["classes"]),), -torch.inf)
    mask[classes] = 0
    right = right_in_task = total = 0
    with torch.no_grad():
        for batch in reader:
            logits = model(reader.transform(batch)).float()
            right += (logits.argmax(1) == batch["label"]).sum().item()
            right_in_task += ((logits + mask).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    return right / total, right_in_task / total


def mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_argument(p, "folder of the runs", default="runs/bench_continual")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--importance", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6], help="EWC lambdas to try")
    p.add_argument("--fisher-samples", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1000, help="training images per class (of 6000)")
    p.add_argument("--epochs-a", type=int, default=4)
    p.add_argument("--epochs-b", type=int, default=3)
    p.add_argument("--lr-a", type=float, default=0.05, help="optim.lr for task A (batch 128)")
    p.add_argument("--lr-b", type=float, default=0.001, help="optim.lr for task B (batch 128)")
    p.add_argument("--optim-b", default="adamw", help="optim.name for task B: sgd | adamw (steps normalised: "
                   "stable at a large importance, where SGD needs lr x importance x max Fisher small)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="more config overrides for every run")
    args = p.parse_args()
    out = Path(args.output).absolute()
    data = {name: build_task(name, out / "data" / name, args.per_class) for name in TASKS}
    methods = [("plain fine-tuning", None)] + [(f"EWC λ={lam:g}", lam) for lam in args.importance]
    rows: dict[str, list[tuple]] = {"A only (before B)": []} | {name: [] for name, _ in methods}
    for seed in args.seeds:
        common = [f"run.seed={seed}", *args.overrides]
        a = train(out / f"seed{seed}" / "A", data["A"], args.nproc,
                  [*common, f"train.epochs={args.epochs_a}", f"optim.lr={args.lr_a}"])
        rows["A only (before B)"].append(evaluate_both(a, data))
        for name, lam in methods:
            ewc = [] if lam is None else [f"ewc.previous={a}", f"ewc.importance={lam}",
                                          f"ewc.fisher_samples={args.fisher_samples}"]
            tag = "plain" if lam is None else f"ewc{lam:g}"
            b = train(out / f"seed{seed}" / f"B-{tag}-{args.optim_b}-lr{args.lr_b:g}-e{args.epochs_b}", data["B"],
                      args.nproc, [*common, f"train.epochs={args.epochs_b}", f"optim.name={args.optim_b}",
                                   f"optim.lr={args.lr_b}", f"model.pretrained={a}", *ewc])
            rows[name].append(evaluate_both(b, data))
            print(f"seed {seed} {name}: {rows[name][-1]}", file=sys.stderr, flush=True)
    print(f"Fashion-MNIST, task A = classes 0-4, task B = classes 5-9, {args.per_class} train images per class "
          f"(10% val), full test sets (5000 per task). {platform.node()}: {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores, torch {torch.__version__}; {args.nproc} process(es). Model tutorial_cnn; "
          f"A: {args.epochs_a} epochs lr {args.lr_a}, B: {args.epochs_b} epochs "
          f"{args.optim_b} lr {args.lr_b} (batch 128, SGD Nesterov momentum 0.9 for A, cosine, 0.5 epoch warmup); "
          f"EWC Fisher from {args.fisher_samples} samples of A's train split; "
          f"seeds {args.seeds}; mean ± std over seeds, accuracy in %.\n")
    print("| model | A, 10-way | B, 10-way | A, within task | B, within task |\n|---|---:|---:|---:|---:|")
    for name, results in rows.items():
        cells = [mean_std([r[i] for r in results]) for i in range(4)]
        print(f"| {name} | " + " | ".join(cells) + " |")


def evaluate_both(ckpt: str, data: dict) -> tuple[float, float, float, float]:
    (a10, a5), (b10, b5) = accuracies(ckpt, data["A"], TASKS["A"]), accuracies(ckpt, data["B"], TASKS["B"])
    return a10, b10, a5, b5


if __name__ == "__main__":
    main()
