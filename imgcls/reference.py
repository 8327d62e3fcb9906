"""A model's reference behaviour on the validation split: recorded at export in the model's
metadata (meta["reference"]) and watched live by serve (imgcls/serving/monitor.py).

    {"split": "val", "samples": N, "accuracy": 0.93,
     "class_distribution": [share of predictions per class],
     "confidence": {"edges": [0, 0.1, ..., 1], "shares": [...], "mean": 0.91,
                    "low": 0.5, "low_share": 0.04},
     "abnormal": {"score": "1 - max softmax", "threshold": 0.31, "validation_flagged": 0.05}}

The abnormal-input score is 1 - the top-1 probability (the max-softmax baseline, Hendrycks &
Gimpel 2017): low for inputs like the training data, higher for others. Its threshold is the
ABNORMAL_QUANTILE of the validation scores, so that share of the validation set passes and the
rest is flagged. On the bands model and Fashion-MNIST images it separated better than the
energy score -logsumexp(logits) (Liu et al. 2020): AUROC 0.97 against 0.80, 90% flagged
against 60% (tests/test_serve.py).

A multi-label model (multi-hot `labels`) is described by its sigmoid probabilities: its top-1
answer counts as correct when it is one of the sample's labels (as serve's feedback, which
names one true class, counts it); the abnormal score stays the same function of the logits.
"""
from __future__ import annotations

import numpy as np

from imgcls.inference import class_probs, softmax

CONFIDENCE_BINS = 10
LOW_CONFIDENCE = 0.5        # a top-1 probability below this is a low-confidence answer
ABNORMAL_QUANTILE = 0.95    # the share of the validation set below the abnormal threshold


def abnormality(logits: np.ndarray) -> np.ndarray:
    """1 - the top-1 probability, one per row; higher means less like the training data."""
    return 1 - softmax(logits.astype(np.float64)).max(axis=1)


def class_distribution(predicted: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(predicted, minlength=classes) / max(len(predicted), 1)


def distribution_distance(p, q) -> float:
    """Total variation distance: half the L1 distance, 0 (same) to 1 (disjoint)."""
    return float(0.5 * np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def reference_behaviour(logits: np.ndarray, labels: np.ndarray, split: str) -> dict:
    """What a model does on `split` (its logits and the true labels: [N], or multi-hot [N, C]),
    for meta["reference"]."""
    multilabel = labels.ndim == 2
    probs = class_probs(logits.astype(np.float64), {"task": "multilabel" if multilabel else ""})
    top1 = probs.max(axis=1)
    predicted = probs.argmax(axis=1)
    scores = abnormality(logits)
    threshold = float(np.quantile(scores, ABNORMAL_QUANTILE))
    edges = np.linspace(0, 1, CONFIDENCE_BINS + 1)
    return {
        "split": split,
        "samples": len(labels),
        "accuracy": float((labels[np.arange(len(labels)), predicted] > 0 if multilabel
                           else predicted == labels).mean()),
        "class_distribution": class_distribution(predicted, logits.shape[1]).tolist(),
        "confidence": {"edges": edges.tolist(), "shares": (np.histogram(top1, edges)[0] / len(top1)).tolist(),
                       "mean": float(top1.mean()), "low": LOW_CONFIDENCE,
                       "low_share": float((top1 < LOW_CONFIDENCE).mean())},
        "abnormal": {"score": "1 - max softmax", "threshold": threshold,
                     "validation_flagged": float((scores > threshold).mean())},
    }
