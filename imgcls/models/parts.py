"""A learning rate per part: the head's multiplier and a geometric decay over the stages below
it (optim.head_lr_mult, optim.layer_decay), as timm's param_groups_layer_decay does.

Unlike timm's helper, frozen parameters keep their group: every parameter is in the optimizer
from the start (see imgcls.models), so a stage unfrozen later by model.unfreeze_schedule trains
at its own rate, not the head's.
"""
from __future__ import annotations

from torch import nn

from imgcls.models.freezing import head_name

HEAD = "head"


def stages(model: nn.Module) -> list[list[str]]:
    """The names of the model's parameters by stage, from the input to the head (the last list).

    timm models use their own group_matcher (blocks one by one, as timm's layer decay). Other
    networks: each top-level child is a stage, a top-level Sequential or ModuleList of
    parametrised blocks counts block by block, and consecutive lone layers (a stem's conv and
    its norm) form one stage; the head is the last nn.Linear (imgcls.models.head_name)."""
    head = head_name(model)
    names = [n for n, _ in model.named_parameters()]
    in_head = {n for n in names if n.startswith(head + ".")}
    if hasattr(model, "group_matcher"):  # a timm model
        from timm.models import group_parameters

        layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        keys = [layer_of.get(n, max(layer_of.values())) for n in names]
    else:
        keys = [_stage_key(model, n) for n in names]
    order: dict = {}
    for name, key in zip(names, keys):
        if name not in in_head:
            order.setdefault(key, []).append(name)
    return [*order.values(), [n for n in names if n in in_head]]


def _stage_key(model: nn.Module, name: str) -> str:
    top, _, rest = name.partition(".")
    child = model.get_submodule(top)
    if (isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1
            and all(any(True for _ in block.parameters()) for block in child)):
        return f"{top}.{rest.partition('.')[0]}"
    if not any(True for _ in child.children()) and not isinstance(child, nn.Linear):
        return _lone_layer_stage(model, top)
    return top


def _lone_layer_stage(model: nn.Module, top: str) -> str:
    """A parameter-holding leaf at the top level (conv1, bn1) joins the run of leaves before it."""
    first = None
    for name, child in model.named_children():
        leaf = not any(True for _ in child.children()) and any(True for _ in child.parameters())
        if not leaf or isinstance(child, nn.Linear):
            first = None
        elif first is None:
            first = name
        if name == top:
            return f"lone:{first}"
    return top


def lr_scales(num_stages: int, head_lr_mult: float, layer_decay: float) -> list[float]:
    """The multiplier of each stage's learning rate, input first: layer_decay ** distance from the
    head for the stages, head_lr_mult for the head (the last)."""
    return [layer_decay ** (num_stages - i) for i in range(num_stages)] + [head_lr_mult]


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups of every parameter (frozen ones too): no weight decay on 1-d tensors
    (biases, norm weights), and with a part multiplier, one decay and one no-decay group per stage
    at lr x its scale."""
    params = dict(model.named_parameters())
    if head_lr_mult == 1 and layer_decay == 1:  # the two groups runs had before part rates
        return [{"params": [p for p in params.values() if p.ndim > 1], "weight_decay": weight_decay},
                {"params": [p for p in params.values() if p.ndim <= 1], "weight_decay": 0.0}]
    parts = stages(model)
    groups = []
    for names, scale in zip(parts, lr_scales(len(parts) - 1, head_lr_mult, layer_decay)):
        for decay, wanted in ((weight_decay, lambda p: p.ndim > 1), (0.0, lambda p: p.ndim <= 1)):
            chosen = [params[n] for n in names if wanted(params[n])]
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr": lr * scale, "lr_scale": scale})
    return groups
