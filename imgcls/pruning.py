"""Magnitude pruning with torch.nn.utils.prune, kept during training (then fine-tuning).

`apply_pruning(model, cfg.prune)` replaces each pruned layer's `weight` by `weight_orig` (the
trained parameter) times `weight_mask` (a buffer), recomputed by a forward pre-hook before
every forward. So fine-tuning keeps the zeros, and the state_dict holds weight_orig/weight_mask:
a checkpoint resumes exactly when the masks are applied to the fresh model before
load_state_dict (the trainer does; imgcls.models.trained.load_model does too and then
calls `make_permanent`, which bakes the zeros into a plain `weight`).

Methods (PruneConfig.method):
- "unstructured": global L1 magnitude over the weights of every Conv2d and Linear layer except
  the classifier head (the last Linear): the `sparsity` fraction of smallest weights, ranked
  across layers, are zeroed. The head is left dense: it is tiny and every one of its weights
  feeds a logit directly, so pruning it costs accuracy for almost no size.
- "channel": in every Conv2d, the `sparsity` fraction of output channels (filters) with the
  smallest L2 norm are zeroed (ln_structured n=2 dim=0), per layer. The filters are only zeroed,
  not removed: the layer keeps its shape (physically removing them means rewriting the next
  layer and the norm layer between them, which we do not do), and a BatchNorm after a zeroed
  filter still outputs its constant shift.

Prune after the trained weights are loaded (build_model loads model.pretrained first), so the
magnitudes are the trained ones; on a fresh model they are those of the random init.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

METHODS = ("unstructured", "channel")


def prunable_layers(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers `method` prunes."""
    if method == "channel":
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if method == "unstructured":
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        head = [n for n, m in layers if isinstance(m, nn.Linear)][-1:]  # the classifier
        return [(n, m) for n, m in layers if n not in head]
    raise ValueError(f"prune.method: unknown method {method!r} ({' | '.join(METHODS)})")


def apply_pruning(model: nn.Module, prune_cfg) -> nn.Module:
    """Mask the smallest weights (or channels) of `model` in place; see the module docstring."""
    if not 0 < prune_cfg.sparsity < 1:
        raise ValueError(f"prune.sparsity must be in (0, 1), got {prune_cfg.sparsity}")
    layers = prunable_layers(model, prune_cfg.method)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer to prune with method {prune_cfg.method!r}")
    # global_unstructured flattens the weights with view(-1), which channels_last ones refuse:
    # prune in the default layout and convert back (masks included) afterwards
    channels_last = any(p.ndim == 4 and not p.is_contiguous() for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    if prune_cfg.method == "unstructured":
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=prune_cfg.sparsity)
    else:
        for _, module in layers:
            prune.ln_structured(module, "weight", amount=prune_cfg.sparsity, n=2, dim=0)
    for _, module in layers:
        # prune leaves `weight` as a non-leaf tensor (weight_orig * mask), which deepcopy (the
        # EMA's AveragedModel) refuses; the pre-hook recomputes it before every forward anyway.
        module.weight = module.weight.detach()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake the masks in: a plain `weight` parameter with zeros, no hooks, no weight_orig/weight_mask."""
    for module in model.modules():
        if isinstance(getattr(module, "weight_mask", None), torch.Tensor):
            prune.remove(module, "weight")
    return model


def sparsity_report(model: nn.Module, method: str = "") -> dict:
    """Fraction of zero weights in every Conv2d/Linear layer, overall over all of them, and
    with `method` also over the layers that method prunes ("pruned": what prune.sparsity is
    about). Works on masked and on made-permanent models alike."""
    targets = {n for n, _ in prunable_layers(model, method)} if method else set()
    layers, totals = {}, {"overall": [0, 0], "pruned": [0, 0]}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        weight = module.weight.detach()  # masked layers: weight_orig * mask, set by prune
        zeros, total = int((weight == 0).sum()), weight.numel()
        layers[name] = {"zeros": zeros, "total": total, "sparsity": zeros / total}
        for key in ("overall", "pruned") if name in targets else ("overall",):
            totals[key][0] += zeros
            totals[key][1] += total
    report = {"layers": layers, "overall": totals["overall"][0] / max(1, totals["overall"][1])}
    if method:
        report["pruned"] = totals["pruned"][0] / max(1, totals["pruned"][1])
    return report
