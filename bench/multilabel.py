"""Multi-label against softmax on real images made multi-label: two Fashion-MNIST items side by side.

    .venv/bin/python bench/multilabel.py                      # 3 seeds; data in /tmp/multilabel-fm
    .venv/bin/python bench/multilabel.py --seeds 0 --epochs 1 # quicker

The set: each image is two Fashion-MNIST items of different classes side by side (28x56 px),
labelled with both classes. Train and val pairs are drawn from the official training images,
test pairs from the official test images (no item is in two splits). They are written as
PNGs plus a label file with a `labels` column (the multi-label Kaggle layout) and built into
shards by `shards.build`, as a user would (`task: multilabel`).

Two models, identical except for the output and the loss: the same network (simple_cnn of
width 16, built by imgcls.models), seed, optimizer (SGD with Nesterov momentum, one-cycle cosine),
batches and epochs, on the shards' train split, in one plain single-process loop:
- multi-label: a sigmoid per class, binary cross-entropy on the two-hot target (train.loss=bce);
- softmax: a softmax over the 10 classes, cross-entropy on the two-hot target normalised to
  0.5/0.5 (the softmax baseline of Mahajan et al. 2018, "Exploring the limits of weakly
  supervised pretraining"): it sees the same labels as the multi-label model, which training
  on one label per image would not.
Both are scored on the test split with the same rules: mAP (mean over classes of the exact
average precision, as sklearn's average_precision_score) and top-2 exact-set accuracy (the two
highest-scoring classes are the image's two classes). The multi-label model is also scored by
subset accuracy at the micro-F1-best threshold chosen on val, as predict and serve decide.
The machine is shared: the load average is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PAIRS = {"train": 6000, "val": 1000, "test": 2000}


def make_label_file(folder: Path, seed: int = 0) -> Path:
    """folder/img/<split>/NNNNN.png (two items side by side) and folder/labels.csv
    (path,labels,split), from Debian's Fashion-MNIST as shards reads it."""
    from PIL import Image

    from shards.sources import open_source

    source = open_source("fashion-mnist")
    rng = np.random.default_rng(seed)
    official_train = np.flatnonzero(~source.is_test)
    rng.shuffle(official_train)
    pools = {"train": official_train[:50000], "val": official_train[50000:],
             "test": np.flatnonzero(source.is_test)}
    names = [c.replace("/", "-").replace(" ", "-") for c in source.classes]  # one word per class
    rows = ["path,labels,split"]
    for split, count in PAIRS.items():
        (folder / "img" / split).mkdir(parents=True, exist_ok=True)
        pool = pools[split]
        for n in range(count):
            while True:
                left, right = rng.choice(pool, 2, replace=False)
                if source.labels[left] != source.labels[right]:
                    break
            pair = np.concatenate([np.asarray(source.load(left)).reshape(28, 28),
                                   np.asarray(source.load(right)).reshape(28, 28)], axis=1)
            Image.fromarray(pair).save(folder / "img" / split / f"{n:05d}.png")
            rows.append(f"img/{split}/{n:05d}.png,{names[source.labels[left]]} {names[source.labels[right]]},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def load_split(dest: str, manifest: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split's images [N,1,H,W] (normalised with the manifest's statistics) and
    multi-hot targets [N,C], decoded with the reader's own code."""
    from shardio.format import decode_sample, read_tar
    from shardio.storage import join, read_bytes

    images, targets = [], []
    for shard in manifest["splits"][split]["shards"]:
        for sample in read_tar(read_bytes(join(dest, shard["path"]))):
            image, labels = decode_sample(sample, manifest)
            images.append(image[:, :, 0])
            row = np.zeros(len(manifest["classes"]), np.float32)
            row[labels] = 1
            targets.append(row)
    mean, std = manifest["stats"]["mean"][0], manifest["stats"]["std"][0]
    x = (torch.from_numpy(np.stack(images)).float()[:, None] / 255 - mean) / std
    return x, torch.from_numpy(np.stack(targets))


def train(kind: str, data: dict, seed: int, epochs: int, batch: int, lr: float, width: int) -> torch.nn.Module:
    from imgcls.config import ModelConfig
    from imgcls.models import build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="simple_cnn", width=width), data["train"][1].shape[1], 1, 56)
    x, y = data["train"]
    steps = epochs * (len(x) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch + 1, batch):
            idx = order[start:start + batch]
            logits = model(x[idx])
            if kind == "multi-label":
                loss = F.binary_cross_entropy_with_logits(logits, y[idx], reduction="sum") / batch
            else:  # the two-hot target normalised to a distribution
                loss = F.cross_entropy(logits, y[idx] / y[idx].sum(1, keepdim=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def scores(model: torch.nn.Module, kind: str, x: torch.Tensor) -> np.ndarray:
    logits = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    return (torch.sigmoid(logits) if kind == "multi-label" else torch.softmax(logits, 1)).cpu().numpy()


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """sklearn's average_precision_score: precision summed at each distinct score's recall step."""
    order = np.argsort(-score, kind="stable")
    score, positive = score[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the end of each tie group
    tp = np.cumsum(positive)[last]
    precision, recall = tp / (last + 1), tp / positive.sum()
    return float(np.sum(np.diff(recall, prepend=0) * precision))


def mean_ap(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean([average_precision(probs[:, c], targets[:, c] > 0) for c in range(targets.shape[1])]))


def top2_exact(probs: np.ndarray, targets: np.ndarray) -> float:
    top2 = np.argsort(-probs, axis=1)[:, :2]
    return float(np.mean(np.take_along_axis(targets, top2, 1).sum(1) == 2))


def val_threshold(probs: np.ndarray, targets: np.ndarray) -> float:
    """The micro-F1-best threshold on a 0.01 grid (validation chooses it, as training does)."""
    def micro_f1(t):
        pred = probs >= t
        tp = (pred & (targets > 0)).sum()
        return 2 * tp / (pred.sum() + (targets > 0).sum())
    return max(np.arange(0.01, 1, 0.01), key=micro_f1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/multilabel-fm", help="where the PNGs, label file and shards go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=16, help="simple_cnn's width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    import shards

    work = Path(args.work)
    dest = work / "shards"
    if not (dest / "manifest.json").exists():
        start = time.time()
        label_file = make_label_file(work / "files")
        manifest = shards.build(label_file, dest, progress=False, workers=2)
        print(f"made {sum(PAIRS.values())} pairs and built them in {time.time() - start:.0f} s", flush=True)
    import json
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["task"] == "multilabel"
    data = {split: load_split(str(dest), manifest, split) for split in ("train", "val", "test")}
    print(f"train {len(data['train'][0])}, val {len(data['val'][0])}, test {len(data['test'][0])} images "
          f"of {tuple(data['train'][0].shape[2:])} px, {len(manifest['classes'])} classes", flush=True)

    results: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        for kind in ("multi-label", "softmax"):
            start = time.time()
            model = train(kind, data, seed, args.epochs, args.batch, args.lr, args.width)
            seconds = time.time() - start
            test = scores(model, kind, data["test"][0])
            target = data["test"][1].cpu().numpy()
            row = results.setdefault(kind, {})
            row.setdefault("mAP", []).append(mean_ap(test, target))
            row.setdefault("top-2 exact", []).append(top2_exact(test, target))
            row.setdefault("train s", []).append(seconds)
            if kind == "multi-label":
                t = val_threshold(scores(model, kind, data["val"][0]), data["val"][1].cpu().numpy())
                row.setdefault("subset acc @ val threshold", []).append(
                    float(np.mean(((test >= t) == (target > 0)).all(1))))
            print(f"seed {seed} {kind}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in row.items()), flush=True)

    print(f"\nload average at end: {os.getloadavg()[0]:.1f}; {len(args.seeds)} seed(s), {args.epochs} epochs, "
          f"simple_cnn width {args.width}, batch {args.batch}, lr {args.lr}\n")
    print("| model | test mAP | top-2 exact-set accuracy | subset accuracy at the val threshold | train time |")
    print("|---|---:|---:|---:|---:|")

    def cell(values: list[float] | None, percent: bool = True, unit: str = "") -> str:
        if not values:
            return "–"
        scale = 100 if percent else 1
        spread = f" ± {scale * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{scale * statistics.mean(values):.2f}{spread}{unit}"
    for kind, row in results.items():
        print(f"| {kind} | {cell(row['mAP'])} | {cell(row['top-2 exact'])} | "
              f"{cell(row.get('subset acc @ val threshold'))} | {cell(row['train s'], False, ' s')} |")


if __name__ == "__main__":
    main()
