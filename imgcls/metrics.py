"""Classification metrics from a confusion matrix, in plain torch (no sklearn).

Distributed evaluation: every rank accumulates its own `ConfusionMatrix`, the trainer sums
`.matrix` across ranks (`dist.all_reduce(cm.matrix)`, in place), and every metric is derived
from the summed matrix, so it is exact whatever the ranks' batch counts. With NCCL the matrix
must live on the GPU: `ConfusionMatrix(n, device="cuda")`.

Undefined ratios are 0, never NaN: precision of a class that was never predicted, recall of
a class with no samples, F1 when both are 0. `classification_report` says which classes
were affected.

`PrecisionRecallCurves` does the same for the per-class (one-vs-rest) precision-recall curves
and average precision: histograms of the predicted probabilities, summed across ranks the same way.
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
    def balanced_accuracy(self) -> float:
        """Mean recall over the classes that occur among the labels (sklearn's
        balanced_accuracy_score): each class counts the same, however rare."""
        _, support, _ = self._counts()
        labelled = support > 0
        return float(self.recall[labelled].mean()) if labelled.any() else 0.0

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

        text += f"\nbalanced accuracy (mean recall over the labelled classes): {self.balanced_accuracy:.{digits}f}\n"
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
        support, predicted = self.support.tolist(), self.matrix.sum(0).cpu().tolist()
        return {
            "num_samples": self.total,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "classes": names,
            "per_class": {name: {"precision": p[i], "recall": r[i], "f1": f1[i],
                                 "support": support[i], "predicted": predicted[i]}
                          for i, name in enumerate(names)},
            "undefined_set_to_zero": self._undefined(names),
            "confusion_matrix": self.matrix.cpu().tolist(),
        }


class PrecisionRecallCurves:
    """One-vs-rest precision-recall curve and average precision (AP) per class.

    `counts[c, 1, b]` counts the samples of class c whose probability of c falls in bin b of
    `bins` equal bins of [0, 1]; `counts[c, 0, b]` the samples of other classes. Like the
    confusion matrix it is summed across ranks (`all_reduce(curves.counts)`) and does not grow
    with the dataset (torchmetrics' `thresholds=` mode). Each bin is one threshold: the curve and
    AP equal sklearn's (`precision_recall_curve`, `average_precision_score`) when no two samples
    of different truth share a bin, and treat such samples as tied otherwise.
    """

    def __init__(self, num_classes: int, bins: int = 1000, device: torch.device | str = "cpu"):
        self.num_classes, self.bins = num_classes, bins
        self.counts = torch.zeros(num_classes, 2, bins, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: probabilities [B, C] (softmax of the logits, or the sigmoid for multi-label)
        and labels [B] (or multi-hot [B, C])."""
        n, bins = self.num_classes, self.bins
        count = labels.shape[0] if labels.ndim == 2 else labels.numel()
        if probs.ndim != 2 or probs.shape != (count, n):
            raise ValueError(f"probabilities of shape {tuple(probs.shape)} for {count} labels and {n} classes")
        which = (probs.float().clamp(0, 1) * bins).long().clamp(max=bins - 1).T          # [C, B]
        positive = (labels.long().T if labels.ndim == 2
                    else torch.nn.functional.one_hot(labels.reshape(-1).long(), n).T)   # [C, B]
        index = (torch.arange(n, device=probs.device)[:, None] * 2 + positive) * bins + which
        self.counts += torch.bincount(index.reshape(-1), minlength=n * 2 * bins).view(n, 2, bins).to(self.counts.device)

    def curve(self, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(precision, recall, threshold) of class c, one point per occupied bin, by decreasing
        threshold (a bin's lower edge). Precision is 1 where recall is 0, as in sklearn."""
        counts = self.counts[c].detach().cpu().double().flip(1)   # highest bin first
        occupied = counts.sum(0) > 0
        tp, fp = counts[1].cumsum(0)[occupied], counts[0].cumsum(0)[occupied]
        threshold = (self.bins - 1 - torch.arange(self.bins, dtype=torch.float64))[occupied] / self.bins
        positives = counts[1].sum()
        recall = tp / positives if positives > 0 else torch.zeros_like(tp)
        return tp / (tp + fp), recall, threshold

    @property
    def support(self) -> torch.Tensor:
        return self.counts[:, 1].sum(1).cpu()

    @property
    def average_precision(self) -> torch.Tensor:
        """AP per class: sum over thresholds of (R_i - R_(i-1)) * P_i; 0 for a class without samples."""
        ap = torch.zeros(self.num_classes, dtype=torch.float64)
        for c in range(self.num_classes):
            precision, recall, _ = self.curve(c)
            ap[c] = (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum()
        return ap

    @property
    def mean_average_precision(self) -> float:
        """Mean AP over the classes that have samples."""
        present = self.support > 0
        return float(self.average_precision[present].mean()) if present.any() else 0.0

    def at_thresholds(self) -> dict[str, torch.Tensor]:
        """Multi-label predictions "class c when its probability >= t" at every bin edge t = b/bins:
        per class [C, bins] precision, recall and F1, and [bins] micro and macro F1 (macro over
        the classes with samples). Exact on the bin grid, from the counts alone."""
        above = self.counts.detach().cpu().double().flip(2).cumsum(2).flip(2)  # [C, 2, b]: at or above bin b
        tp, fp = above[:, 1], above[:, 0]
        fn = self.counts[:, 1].sum(1, keepdim=True).cpu().double() - tp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        micro = _ratio(2 * tp.sum(0), (2 * tp + fp + fn).sum(0))
        present = self.support > 0
        macro = f1[present].mean(0) if present.any() else torch.zeros(self.bins, dtype=torch.float64)
        return {"precision": precision, "recall": recall, "f1": f1, "micro_f1": micro, "macro_f1": macro}

    def best_threshold(self) -> float:
        """The bin edge with the highest micro F1 (chosen on val, then used on test and in predict)."""
        return int(self.at_thresholds()["micro_f1"].argmax()) / self.bins

    def multilabel_metrics(self, threshold: float) -> dict:
        """mAP, and at `threshold`: per-class precision, recall and F1 (lists), micro and macro F1."""
        b = min(int(round(threshold * self.bins)), self.bins - 1)
        at = self.at_thresholds()
        return {"map": self.mean_average_precision, "threshold": b / self.bins,
                "micro_f1": float(at["micro_f1"][b]), "macro_f1": float(at["macro_f1"][b]),
                **{f"{k}_per_class": at[k][:, b].tolist() for k in ("precision", "recall", "f1")}}

    def to_json(self, class_names: Sequence[str]) -> dict:
        ap = self.average_precision.tolist()
        return {"average_precision": dict(zip(class_names, ap)), "mean_average_precision": self.mean_average_precision,
                "pr_bins": self.bins,
                "average_precision_undefined": [n for n, k in zip(class_names, self.support.tolist()) if k == 0]}

    def report(self, class_names: Sequence[str], digits: int = 4) -> str:
        """Average precision per class, laid out like the classification report."""
        width = max(len("mean AP"), *(len(str(n)) for n in class_names))
        lines = [f"{'':>{width}s}  {'avg prec':>9}  {'support':>9}", ""]
        for name, ap, support in zip(class_names, self.average_precision.tolist(), self.support.tolist()):
            lines.append(f"{name:>{width}s}  {ap:>9.{digits}f}  {support:>9}")
        lines += ["", f"{'mean AP':>{width}s}  {self.mean_average_precision:>9.{digits}f}  "
                      f"{int(self.support.sum()):>9}"]
        return "\n".join(lines) + "\n"


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
