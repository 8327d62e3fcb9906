"""Classification metrics from a confusion matrix, in plain torch (no sklearn).

Distributed evaluation: every rank accumulates its own `ConfusionMatrix`, the trainer sums
`.matrix` across ranks (`dist.all_reduce(cm.matrix)`, in place), and every metric is derived
from the summed matrix, so it is exact whatever the ranks' batch counts. With NCCL the matrix
must live on the GPU: `ConfusionMatrix(n, device="cuda")`.

Undefined ratios are 0, never NaN: precision of a class that was never predicted, recall of
a class with no samples, F1 when both are 0. `classification_report` says which classes
were affected.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class ConfusionMatrix:
    """`matrix[t, p]` counts the samples of true class t predicted as class p (int64)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits_or_preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: logits [B, C] (argmax taken) or predicted class ids [B]."""
        n = self.num_classes
        preds = logits_or_preds.argmax(1) if logits_or_preds.ndim == 2 else logits_or_preds
        preds, labels = preds.reshape(-1).long(), labels.reshape(-1).long()
        if preds.shape != labels.shape:
            raise ValueError(f"{preds.numel()} predictions for {labels.numel()} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= n
                               or preds.min() < 0 or preds.max() >= n):
            raise ValueError(f"class ids must be in [0, {n})")
        counts = torch.bincount(labels * n + preds, minlength=n * n).view(n, n)
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    # Derived metrics (float64 on the CPU; per-class ones are tensors of length C)

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.matrix.detach().cpu().double()
        return m.diagonal(), m.sum(1), m.sum(0)   # true positives, support, predicted

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    @property
    def support(self) -> torch.Tensor:
        return self.matrix.sum(1).cpu()

    @property
    def accuracy(self) -> float:
        tp, support, _ = self._counts()
        return float(tp.sum() / support.sum()) if support.sum() > 0 else 0.0

    @property
    def precision(self) -> torch.Tensor:
        tp, _, predicted = self._counts()
        return _ratio(tp, predicted)

    @property
    def recall(self) -> torch.Tensor:
        tp, support, _ = self._counts()
        return _ratio(tp, support)

    @property
    def f1(self) -> torch.Tensor:
        p, r = self.precision, self.recall
        return _ratio(2 * p * r, p + r)

    @property
    def present(self) -> torch.Tensor:
        """Classes that occur among the labels or the predictions (bool mask)."""
        _, support, predicted = self._counts()
        return (support + predicted) > 0

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes present (as sklearn does without `labels=`): a class
        absent from both labels and predictions would only add a meaningless 0."""
        present = self.present
        return float(self.f1[present].mean()) if present.any() else 0.0

    @property
    def weighted_f1(self) -> float:
        _, support, _ = self._counts()
        return float((self.f1 * support).sum() / support.sum()) if support.sum() > 0 else 0.0

    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            return [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        return [str(c) for c in class_names]

    def _undefined(self, names: list[str]) -> dict[str, list[str]]:
        _, support, predicted = self._counts()
        return {"precision": [n for n, k in zip(names, predicted) if k == 0],
                "recall": [n for n, k in zip(names, support) if k == 0]}

    def classification_report(self, class_names: Sequence[str] | None = None,
                              digits: int = 4) -> str:
        """A text table laid out like sklearn.metrics.classification_report."""
        names = self._names(class_names)
        p, r, f1 = self.precision, self.recall, self.f1
        support, present = self.support, self.present
        n = int(support.sum())
        macro = [float(x[present].mean()) if present.any() else 0.0 for x in (p, r, f1)]
        weighted = [float((x * support).sum() / max(n, 1)) for x in (p, r, f1)]
        p, r, f1, support = p.tolist(), r.tolist(), f1.tolist(), support.tolist()

        width = max(len("weighted avg"), *(len(s) for s in names))
        headers = ["precision", "recall", "f1-score", "support"]
        row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
        text = ("{:>{width}s} " + " {:>9}" * 4).format("", *headers, width=width) + "\n\n"
        for i, name in enumerate(names):
            text += row.format(name, p[i], r[i], f1[i], support[i], width=width, digits=digits)
        text += "\n"
        text += ("{:>{width}s} " + " {:>9}" * 2 + " {:>9.{digits}f} {:>9}\n").format(
            "accuracy", "", "", self.accuracy, n, width=width, digits=digits)
        text += row.format("macro avg", *macro, n, width=width, digits=digits)
        text += row.format("weighted avg", *weighted, n, width=width, digits=digits)

        undefined = self._undefined(names)
        if undefined["precision"]:
            text += ("\nprecision set to 0 for classes never predicted: "
                     + ", ".join(undefined["precision"]))
        if undefined["recall"]:
            text += ("\nrecall set to 0 for classes with no samples: "
                     + ", ".join(undefined["recall"]))
        if self.num_classes != int(present.sum()):
            text += ("\nmacro avg excludes classes absent from both labels and predictions: "
                     + ", ".join(n for n, k in zip(names, present) if not k))
        return text.rstrip("\n") + "\n"

    def to_json(self, class_names: Sequence[str] | None = None) -> dict:
        """Everything as plain Python numbers and lists, ready for json.dumps."""
        names = self._names(class_names)
        p, r, f1 = self.precision.tolist(), self.recall.tolist(), self.f1.tolist()
        support, predicted = self.support.tolist(), self.matrix.sum(0).tolist()
        return {
            "num_samples": self.total,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "classes": names,
            "per_class": {name: {"precision": p[i], "recall": r[i], "f1": f1[i],
                                 "support": support[i], "predicted": predicted[i]}
                          for i, name in enumerate(names)},
            "undefined_set_to_zero": self._undefined(names),
            "confusion_matrix": self.matrix.tolist(),
        }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0."""
    return torch.where(den > 0, num / den, 0.0)


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor,
                 k: int | Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k.

    Returns an int64 tensor [len(k)] on the logits' device, ready to be summed across ranks
    and batches. k larger than the number of classes counts every sample as correct.
    """
    ks = (k,) if isinstance(k, int) else tuple(k)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.reshape(-1, 1)
    return torch.stack([hits[:, :kk].any(1).sum() for kk in ks])
