"""Multi-label against softmax on Fashion-MNIST pairs: two items side by side (28x56), labelled
with both classes (one when they are the same class). Offline, from the Debian package's files.

    .venv/bin/python bench/multilabel.py --train-pairs 10000 --epochs 4

Both models are fast_cnn trained by jobs/train.py on the same images for the same epochs: the
multi-label one with BCE on the multi-hot labels (threshold chosen on val), the softmax one
with cross-entropy on one of the two labels drawn at random per pair. On the test pairs: the
mAP of each model's scores (sigmoid / softmax), and the micro F1 of the multi-label model's
labels over its threshold against the softmax model's top-2.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx(name: str, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(FASHION / name).read(), np.uint8, offset=offset)


def pairs(images: np.ndarray, labels: np.ndarray, count: int, rng) -> tuple[np.ndarray, np.ndarray]:
    a, b = rng.integers(0, len(images), (2, count))
    hot = np.zeros((count, 10), np.float32)
    hot[np.arange(count), labels[a]] = hot[np.arange(count), labels[b]] = 1
    return np.concatenate([images[a], images[b]], axis=2), hot


def build(work: Path, args) -> tuple[str, str]:
    """(multi-label dataset, single-label dataset) of the same pair images."""
    import hashlib

    import shards
    from shardio.format import read_tar, write_tar
    from shardio.manifest import manifest_bytes

    rng = np.random.default_rng(0)
    x, y = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), idx("train-labels-idx1-ubyte.gz", 8)
    tx, ty = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28), idx("t10k-labels-idx1-ubyte.gz", 8)
    train, train_hot = pairs(x, y, args.train_pairs, rng)
    test, test_hot = pairs(tx, ty, args.test_pairs, rng)
    one = lambda hot: np.array([rng.choice(np.flatnonzero(h)) for h in hot])  # noqa: E731
    np.savez(work / "pairs.npz", images=train, labels=one(train_hot), x_test=test, y_test=one(test_hot))
    single = str(work / "single")
    shards.build(str(work / "pairs.npz"), single, split=(0.9, 0.1, 0.0), shard_samples=2000, progress=False)
    multi = work / "multi"
    manifest = json.loads(Path(single, "manifest.json").read_text())
    hot = {"train": train_hot, "test": test_hot}
    for split in manifest["splits"].values():
        positives = np.zeros(10, np.int64)
        for entry in split["shards"]:
            rows = []
            for sample in read_tar(Path(single, entry["path"]).read_bytes()):
                part, index = sample["__key__"].rsplit("-", 1)
                labels = np.flatnonzero(hot[part][int(index)])
                positives[labels] += 1
                ext = next(k for k in sample if k not in ("__key__", "cls"))
                rows.append((sample["__key__"], " ".join(map(str, labels)), ext, sample[ext]))
            data = write_tar(rows)
            (multi / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            (multi / entry["path"]).write_bytes(data)
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        split["class_counts"] = positives.tolist()
    manifest["task"] = "multilabel"
    (multi / "manifest.json").write_bytes(manifest_bytes(manifest))
    return str(multi), single


def train(data: str, run_dir: Path, args) -> str:
    common = ["model.name=fast_cnn", "data.num_workers=1", f"train.epochs={args.epochs}", "track.wandb=disabled",
              "track.progress=false", "data.augment.flip=false"]
    subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), f"data.url={data}", f"run.dir={run_dir}",
                    *common], check=True, capture_output=True)
    return str(run_dir / "checkpoints" / "best.pt") if (run_dir / "checkpoints" / "best.pt").exists() else \
        sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1].as_posix()


def scores(checkpoint_url: str, multi: str) -> tuple[np.ndarray, np.ndarray, dict]:
    from imgcls.export import read_samples
    from imgcls.inference import class_probs, load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint_url, multi)
    images, hot = read_samples(meta, "test", data_url=multi)
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(images[i:i + 512])) for i in range(0, len(images), 512)])
    return class_probs(logits.numpy(), meta), hot, meta


def metrics(probs: np.ndarray, hot: np.ndarray, predicted: np.ndarray) -> dict:
    from imgcls.metrics import PrecisionRecallCurves

    curves = PrecisionRecallCurves(10)
    curves.update(torch.from_numpy(probs), torch.from_numpy(hot))
    truth = hot > 0
    tp, fp, fn = (predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()
    return {"map": curves.mean_average_precision, "micro_f1": 2 * tp / (2 * tp + fp + fn),
            "exact_match": float((predicted == truth).all(1).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-pairs", type=int, default=10000)
    p.add_argument("--test-pairs", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-multilabel-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        multi, single = build(work, args)
        rows = {}
        for name, data in (("multi-label (BCE, threshold from val)", multi), ("softmax (CE), top-2", single)):
            probs, hot, meta = scores(train(data, work / name.split()[0], args), multi)
            if meta.get("task") == "multilabel":
                predicted = probs >= meta["threshold"]
            else:
                predicted = np.zeros_like(probs, dtype=bool)
                np.put_along_axis(predicted, np.argsort(-probs, 1)[:, :2], True, 1)
            rows[name] = metrics(probs, hot, predicted)
        print(f"Fashion-MNIST pairs: {args.train_pairs} train (90/10 train/val), {args.test_pairs} test, fast_cnn, "
              f"{args.epochs} epochs, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s in all\n")
        print("| model | test mAP | micro F1 | exact match |\n|---|---:|---:|---:|")
        for name, m in rows.items():
            print(f"| {name} | {m['map']:.4f} | {m['micro_f1']:.4f} | {m['exact_match']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
