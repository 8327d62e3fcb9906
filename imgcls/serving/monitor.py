"""Live quality of each model version over a sliding window, beside its reference behaviour on
the validation split (meta["reference"], recorded at export; imgcls/reference.py):

- the predicted-class distribution's distance from the reference (total variation);
- the mean top-1 confidence and the share of low-confidence answers;
- the share of answers flagged abnormal (1 - max softmax above the validation-calibrated threshold);
- live accuracy on the ground truth clients send back (`feedback`), and an alert while it is
  more than `alert_drop` points below the validation accuracy: a gauge, and one log line
  when it starts and one when it ends.

A model without a reference (a checkpoint served directly, an old export) still gets the live
gauges; the reference ones, the abnormal flag and the alert need a re-export.
"""
from __future__ import annotations

import collections
import logging
from typing import ClassVar

import numpy as np
from prometheus_client.core import GaugeMetricFamily

from imgcls.inference import class_probs
from imgcls.reference import LOW_CONFIDENCE, abnormality, class_distribution, distribution_distance

log = logging.getLogger("imgcls.serve")


class Monitor:
    def __init__(self, label: str, classes: int, reference: dict | None, window: int = 1000,
                 alert_drop: float = 3.0, min_feedback: int = 100, task: str | None = None):
        self.label, self.classes, self.reference = label, classes, reference
        self.task = task  # "multilabel": a sigmoid per class rather than a softmax
        self.alert_drop, self.min_feedback = alert_drop, min_feedback
        self.predicted = collections.deque(maxlen=window)
        self.confidence = collections.deque(maxlen=window)
        self.flagged = collections.deque(maxlen=window)
        self.correct = collections.deque(maxlen=window)
        self.alerting = False

    @property
    def threshold(self) -> float | None:
        return self.reference["abnormal"]["threshold"] if self.reference else None

    def observe(self, logits: np.ndarray) -> tuple[np.ndarray, dict]:
        """(probabilities, abnormal-input verdict) of one image's logits, recorded in the window."""
        probs = class_probs(logits[None].astype(np.float64), {"task": self.task})[0]
        score = float(abnormality(logits[None])[0])
        verdict = {"score": score, "threshold": self.threshold,
                   "flagged": None if self.threshold is None else score > self.threshold}
        self.predicted.append(int(probs.argmax()))
        self.confidence.append(float(probs.max()))
        self.flagged.append(bool(verdict["flagged"]))
        return probs.astype(np.float32), verdict

    def feedback(self, correct: list[bool]) -> None:
        self.correct.extend(correct)
        accuracy = self.live_accuracy()
        if accuracy is None or not self.reference:
            return
        drop = 100 * (self.reference["accuracy"] - accuracy)
        if drop > self.alert_drop and not self.alerting:
            self.alerting = True
            log.warning("ALERT started: %s live accuracy %.1f%% on the last %d labels, %.1f points below "
                        "validation %.1f%% (--alert-drop %g)", self.label, 100 * accuracy, len(self.correct),
                        drop, 100 * self.reference["accuracy"], self.alert_drop)
        elif drop <= self.alert_drop and self.alerting:
            self.alerting = False
            log.warning("ALERT ended: %s live accuracy %.1f%% on the last %d labels, within %g points of "
                        "validation %.1f%%", self.label, 100 * accuracy, len(self.correct), self.alert_drop,
                        100 * self.reference["accuracy"])

    def live_accuracy(self) -> float | None:
        return float(np.mean(self.correct)) if len(self.correct) >= self.min_feedback else None

    def gauges(self) -> dict[str, float]:
        """name -> value; NaN where there is nothing to report yet."""
        nan = float("nan")
        window = len(self.predicted)
        ref = self.reference or {}
        accuracy = self.live_accuracy()
        values = {
            "window_predictions": window,
            "mean_confidence": float(np.mean(self.confidence)) if window else nan,
            "low_confidence_share": float(np.mean(np.asarray(self.confidence) < LOW_CONFIDENCE)) if window else nan,
            "abnormal_share": float(np.mean(self.flagged)) if window and self.reference else nan,
            "live_accuracy": nan if accuracy is None else accuracy,
            "feedback_labels": len(self.correct),
            "accuracy_alert": float(self.alerting),
            "class_distance": (distribution_distance(class_distribution(np.asarray(self.predicted), self.classes),
                                                     ref["class_distribution"]) if window and ref else nan),
        }
        if ref:
            values.update(reference_accuracy=ref["accuracy"], reference_mean_confidence=ref["confidence"]["mean"],
                          reference_low_confidence_share=ref["confidence"]["low_share"],
                          reference_abnormal_share=ref["abnormal"]["validation_flagged"])
        return values


class MonitorCollector:
    """Prometheus gauges imgcls_quality_<name>{model, version} for every served version."""

    HELP: ClassVar[dict[str, str]] = {
        "window_predictions": "answers in the sliding window",
        "mean_confidence": "mean top-1 probability over the window",
        "low_confidence_share": f"share of answers with top-1 probability below {LOW_CONFIDENCE}",
        "abnormal_share": "share of answers flagged abnormal (1 - max softmax above the validation threshold)",
        "live_accuracy": "accuracy on the ground-truth labels fed back, over the window",
        "feedback_labels": "ground-truth labels in the window",
        "accuracy_alert": "1 while live accuracy is more than --alert-drop points below validation",
        "class_distance": "total variation distance of the predicted-class distribution from the reference",
        "reference_accuracy": "validation accuracy recorded at export",
        "reference_mean_confidence": "validation mean top-1 probability",
        "reference_low_confidence_share": "validation share of low-confidence answers",
        "reference_abnormal_share": "validation share flagged abnormal",
    }

    def __init__(self, versions):
        self.versions = versions  # a callable: the ModelVersions served now

    def collect(self):
        families = {name: GaugeMetricFamily(f"imgcls_quality_{name}", text, labels=["model", "version"])
                    for name, text in self.HELP.items()}
        for version in self.versions():
            for name, value in version.serving.monitor.gauges().items():
                families[name].add_metric([version.name, version.version], value)
        yield from families.values()
