"""Freezing by toggling `requires_grad` (see imgcls.models for the DDP rules)."""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def head_name(model: nn.Module) -> str:
    """Name of the classifier head: the last nn.Linear registered in the model
    (`fc` for simple_cnn and ResNet, `classifier.3` for MobileNetV3, `_fc` for EfficientNet)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return names[-1]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def freeze_backbone(model: nn.Module) -> None:
    """Train only the head: every other parameter gets requires_grad=False."""
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)


def apply_unfreeze_schedule(model: nn.Module, schedule, epoch: int) -> list[str]:
    """Unfreeze every module prefix scheduled at an epoch <= `epoch` ("all": everything).

    Cumulative and idempotent: call it at the start of every epoch. Returns the names of the
    parameters it unfroze just now; when non-empty, the trainer must re-wrap DDP.
    """
    params = dict(model.named_parameters())
    unfrozen = []
    for entry in schedule:
        start, prefix = entry
        matched = [n for n in params
                   if prefix == "all" or n == prefix or n.startswith(prefix + ".")]
        if not matched:  # checked before `start` so that a typo fails at epoch 0
            top = sorted({n.split(".")[0] for n in params})
            raise ValueError(f"unfreeze_schedule prefix {prefix!r} matches no parameter; "
                             f"top-level modules: {', '.join(top)}")
        if epoch >= start:
            for n in matched:
                if not params[n].requires_grad:
                    params[n].requires_grad_(True)
                    unfrozen.append(n)
    if unfrozen:
        log.info("epoch %d: unfroze %d parameter tensors", epoch, len(unfrozen))
    return unfrozen
