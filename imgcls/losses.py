"""Training objectives: cross-entropy or focal loss, Mixup/CutMix targets, distillation.

Mixup/CutMix draw their mixing from (seed, epoch, batch position) alone, like the
augmentation, so a resumed run mixes every batch exactly as an uninterrupted one.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F


def classification_loss(logits, labels, *, label_smoothing: float = 0.0, focal_gamma: float = 0.0,
                        class_weights: torch.Tensor | None = None):
    """Mean cross-entropy, or focal loss (Lin et al. 2017) when focal_gamma > 0; each sample's
    term scaled by its class's weight when `class_weights` is given."""
    if focal_gamma <= 0 and class_weights is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    if focal_gamma > 0:
        p_true = torch.exp(-F.cross_entropy(logits, labels, reduction="none"))
        loss = (1 - p_true) ** focal_gamma * loss
    if class_weights is not None:
        # a plain mean, not torch's sum(w*l)/sum(w): the step stays the mean over the
        # effective batch however it is split into ranks and micro-batches
        loss = loss * class_weights[labels]
    return loss.mean()


MULTILABEL_LOSSES = ("bce", "focal", "asl")


def multilabel_loss(logits, targets, kind: str = "bce", *, pos_weight: torch.Tensor | None = None,
                    focal_gamma: float = 2.0, asl_gamma_neg: float = 4.0, asl_gamma_pos: float = 0.0,
                    asl_clip: float = 0.05):
    """Sigmoid losses over [B, C] multi-hot (or Mixup-soft) targets, summed over the classes and
    averaged over the samples (timm's and ASL's convention, so a class's gradient does not shrink
    with the number of classes):

    - bce: binary cross-entropy, positives weighted by `pos_weight` [C] when given;
    - focal: BCE x |target - p|^gamma (Lin et al. 2017, the sigmoid form);
    - asl: asymmetric loss (Ridnik et al. 2021): negatives' probability shifted down by `clip`
      and focused with gamma_neg, positives with gamma_pos; bce when all three are 0.
    """
    if kind not in MULTILABEL_LOSSES:
        raise ValueError(f"train.loss={kind!r}: expected ce or one of {', '.join(MULTILABEL_LOSSES)}")
    targets = targets.to(logits.dtype)
    if kind == "bce":
        loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    elif kind == "focal":
        p = torch.sigmoid(logits)
        loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
        loss = loss * (targets - p).abs() ** focal_gamma
    else:
        p = torch.sigmoid(logits)
        p_neg = (p - asl_clip).clamp(min=0) if asl_clip > 0 else p
        log_pos = F.logsigmoid(logits)
        log_neg = torch.log((1 - p_neg).clamp(min=1e-8))
        positive = targets * log_pos * (1 - p) ** asl_gamma_pos
        if pos_weight is not None:
            positive = positive * pos_weight
        loss = -(positive + (1 - targets) * log_neg * p_neg ** asl_gamma_neg)
    return loss.sum(1).mean()


def resolve_loss(name: str, task: str = "") -> str:
    """train.loss: "" is bce for a multi-label dataset (manifest task "multilabel"), else ce."""
    name = name or ("bce" if task == "multilabel" else "ce")
    if name not in ("ce", *MULTILABEL_LOSSES):
        raise ValueError(f"train.loss={name!r}: expected ce, {', '.join(MULTILABEL_LOSSES)} or empty")
    if name == "ce" and task == "multilabel":
        raise ValueError("train.loss=ce: a multi-label dataset needs a sigmoid loss (bce, focal or asl)")
    return name


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B] class indices -> [B, C] one-hot floats; [B, C] multi-hot targets pass through."""
    return labels.float() if labels.ndim == 2 else F.one_hot(labels, num_classes).float()


def positive_weights(positive_counts: list[int], total: int) -> torch.Tensor:
    """train.class_weights=balanced for sigmoid losses: each class's positives weighted by
    negatives / positives (BCEWithLogitsLoss's pos_weight); 1 for a class without positives."""
    pos = torch.tensor(positive_counts, dtype=torch.float32)
    return torch.where(pos > 0, (total - pos) / pos.clamp(min=1), torch.ones(()))


def balanced_class_weights(class_counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights n / (k * n_c) over the k classes with samples, as
    scikit-learn's "balanced": a sample's expected weight is 1, so the loss keeps its scale.
    A class with no samples gets 0."""
    counts = torch.tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    return torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros(()))


def mix_batch(images, labels, *, seed: int, epoch: int, position: int, mixup_alpha: float, cutmix_alpha: float):
    """Mixup or CutMix (one of them, chosen per batch when both are on).

    Returns (images, labels_b, lam): the loss is lam·L(labels) + (1-lam)·L(labels_b).
    """
    digest = hashlib.blake2b(f"mix:{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = rng.integers(h), rng.integers(w)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images[partner][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the pasted area decides the label weight
    else:
        images = lam * images + (1 - lam) * images[partner]
    return images, labels[partner], lam


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """Hinton et al. 2015: KL between softened distributions, scaled by T² to keep gradients
    comparable as T changes."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


class Objective:
    """The loss of one micro-batch: cross-entropy or focal loss with label smoothing, against
    the Mixup/CutMix targets when the batch was mixed, plus distillation from a teacher, plus
    a weight penalty (EWC). The penalty is added to every micro-batch's loss, which
    forward_backward divides by their number: once per optimizer step, on every rank alike."""

    def __init__(self, train_cfg=None, distill_cfg=None, teacher: torch.nn.Module | None = None, penalty=None,
                 class_weights: torch.Tensor | None = None, loss: str = "ce"):
        self.label_smoothing = train_cfg.label_smoothing if train_cfg else 0.0
        self.focal_gamma = train_cfg.focal_gamma if train_cfg else 0.0
        self.loss = loss or "ce"  # resolve_loss's: ce, or a sigmoid loss over one-hot/multi-hot targets
        self.distill, self.teacher, self.penalty, self.class_weights = distill_cfg, teacher, penalty, class_weights

    def __call__(self, logits, images, labels, mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        def loss_for(targets):
            if self.loss != "ce":
                smooth, classes = self.label_smoothing, logits.shape[1]
                targets = one_hot_targets(targets, classes) * (1 - smooth) + smooth / classes
                return multilabel_loss(logits, targets, self.loss, pos_weight=self.class_weights,
                                       focal_gamma=self.focal_gamma or 2.0)
            return classification_loss(logits, targets, label_smoothing=self.label_smoothing,
                                       focal_gamma=self.focal_gamma, class_weights=self.class_weights)
        loss = loss_for(labels)
        if mix is not None:
            labels_b, lam = mix
            loss = lam * loss + (1 - lam) * loss_for(labels_b)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images).float()
            alpha = self.distill.alpha
            loss = (1 - alpha) * loss + alpha * distillation_loss(logits, teacher_logits, self.distill.temperature)
        if self.penalty is not None:
            loss = loss + self.penalty()
        return loss
