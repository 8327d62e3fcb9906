"""PNG plots: confusion matrix, precision-recall curves and training curves.

Figures are drawn with matplotlib's object API on the Agg canvas, never through pyplot: no
global backend switch, no figure registry to leak, safe in worker threads. Output paths may
be any URL shardio.storage understands, and are written atomically.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from imgcls.jsonl import read_jsonl
from shardio import storage


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    storage.write_bytes_atomic(str(path), buf.getvalue())


def most_confused(matrix: np.ndarray, k: int) -> np.ndarray:
    """The k classes with the most errors, as a true or as a predicted class (off-diagonal
    mass of their row plus their column), in class order."""
    errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)
    return np.sort(np.argsort(-errors, kind="stable")[:k])


def plot_confusion_matrix(matrix, class_names: Sequence[str], path: str | Path, normalize: bool = True,
                          title: str = "Confusion matrix", max_classes: int = 50) -> list[str]:
    """Heat map of `matrix` (rows: true class, columns: predicted), a tensor, array or
    ConfusionMatrix. normalize=True divides each row by its support, so the diagonal shows
    per-class recall; rows without samples stay 0. Beyond `max_classes` classes only the
    `max_classes` most-confused are drawn (rows still normalised by their full support), and
    the title says so: a 1000-class picture would be neither readable nor cheap. Keep the full
    matrix as JSON beside it. Returns the classes drawn."""
    m = getattr(matrix, "matrix", matrix)
    m = (m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m))
    m = m.astype(np.float64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"matrix of shape {m.shape} for {n} class names")
    drawn = most_confused(m, max_classes) if n > max_classes else np.arange(n)
    if normalize:
        support = m.sum(1, keepdims=True)
        m = np.divide(m, support, out=np.zeros_like(m), where=support > 0)
    m = m[np.ix_(drawn, drawn)]
    names = [str(class_names[c]) for c in drawn]
    k = len(drawn)

    size = 3 + 0.6 * min(k, 30) + 0.3 * max(k - 30, 0)  # 50 classes: 27 inches, 2.7k pixels
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(m.max(), 1.0)
    # cells as quads: imshow resamples to the output pixels in float64 (200 MB at 50 classes)
    image = ax.pcolormesh(m, cmap="Blues", vmin=0, vmax=vmax)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # true class 0 on top, as a matrix reads
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    subset = f": the {k} most-confused of {n} classes" if k < n else ""
    ticks = np.arange(k) + 0.5  # cell centres
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true",
           title=title + (" (row-normalised)" if normalize else "") + subset)
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(names)
    if k <= 30:  # beyond that the numbers are unreadable anyway
        for t in range(k):
            for p in range(k):
                text = f"{m[t, p]:.2f}" if normalize else f"{int(m[t, p])}"
                ax.text(p + 0.5, t + 0.5, text, ha="center", va="center", fontsize=8,
                        color="white" if m[t, p] > vmax / 2 else "black")
    _save(fig, path)
    return names


def plot_pr_curves(curves, class_names: Sequence[str], path: str | Path, max_classes: int = 20,
                   title: str = "Precision-recall") -> list[str]:
    """One-vs-rest precision-recall curve per class (a PrecisionRecallCurves), with its AP in
    the legend. Beyond `max_classes` classes only the `max_classes` with the lowest AP are drawn
    (the ones worth looking at), and the title says so. Returns the classes drawn."""
    names = [str(c) for c in class_names]
    if len(names) != curves.num_classes:
        raise ValueError(f"{len(names)} class names for {curves.num_classes} classes")
    ap = curves.average_precision
    present = [c for c in range(len(names)) if curves.support[c] > 0]
    drawn = sorted(present, key=lambda c: (ap[c].item(), c))[:max_classes] if len(present) > max_classes else present
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax = fig.add_subplot()
    for c in drawn:
        precision, recall, _ = curves.curve(c)
        # a step curve from (0, first precision), as sklearn's PrecisionRecallDisplay draws it
        ax.step(torch.cat([recall.new_zeros(1), recall]).cpu().numpy(),
                torch.cat([precision[:1], precision]).cpu().numpy(),
                where="post", linewidth=1.2, label=f"{names[c]} (AP {ap[c]:.3f})")
    subset = f": the {len(drawn)} of {len(present)} classes with the lowest AP" if len(drawn) < len(present) else ""
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{title} (mean AP {curves.mean_average_precision:.3f}){subset}")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="lower left", fontsize=8, ncol=2 if len(drawn) > 10 else 1)
    _save(fig, path)
    return [names[c] for c in drawn]


# (panel title, y label, metric keys); keys absent from every record are not drawn
PANELS = [
    ("Loss", "loss", ["train/loss", "val/loss"]),
    ("Accuracy", "accuracy", ["train/acc", "val/acc"]),
    ("Learning rate", "lr", ["train/lr"]),
]


def read_records(source: str | Path | Iterable[dict]) -> list[dict]:
    """Records from a metrics JSONL file (path or URL), or the given records."""
    if isinstance(source, (str, Path)):
        return read_jsonl(source)
    return list(source)


def plot_training_curves(source: str | Path | Iterable[dict], path: str | Path) -> None:
    """Loss (train and val), accuracy and learning rate against the global step.

    `source` is a metrics JSONL file or its records, e.g. {"step": 120, "epoch": 1,
    "train/loss": 0.4, "train/lr": 0.01, "val/loss": 0.5, "val/acc": 0.9}; any key may be
    missing from a record.
    """
    records = [r for r in read_records(source) if "step" in r]
    fig = Figure(figsize=(15, 4), layout="constrained")
    for ax, (title, ylabel, keys) in zip(fig.subplots(1, len(PANELS)), PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                # validation runs are sparse: markers keep single points visible
                ax.plot(steps, values, label=key, marker="o" if key.startswith("val/") else None,
                        markersize=4, linewidth=1.2)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _save(fig, path)

