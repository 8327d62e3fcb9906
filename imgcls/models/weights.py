"""Pretrained weights from a local file or any fsspec URL: `load_pretrained` copies every
tensor whose name and shape match, and folds RGB stem filters into other channel counts."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    path: str
    loaded: list[str]       # copied into the model
    adapted: list[str]      # first-conv weights whose RGB filters were folded into in_channels
    skipped: list[str]      # in both, with different shapes: left as initialised
    missing: list[str]      # in the model only: left as initialised
    unexpected: list[str]   # in the file only: ignored


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fold a conv weight [out, 3, kh, kw] trained on RGB into `in_channels` input channels.

    For one channel, sum the RGB filters: a grey image x then gives exactly the response
    the RGB model gives to (x, x, x). Otherwise repeat the filters cyclically and rescale
    by 3/in_channels, which keeps the response to a constant image the same.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    from imgcls.checkpoint import pointer_target
    from shardio import storage  # imported here: models has no other use for fsspec

    try:
        data = storage.read_bytes(path)
        target = pointer_target(data)
        if target is not None:  # a run's best.pt names its best-STEP.pt beside it
            path = storage.join(path.rsplit("/", 1)[0] if "/" in path else ".", target)
            data = storage.read_bytes(path)
        if path.endswith(".safetensors"):  # timm's and the Hugging Face hub's weights files
            from safetensors.torch import load

            obj = load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load weights from {path}: {e}") from e
    # our checkpoints keep the weights under "model"; Lightning-style ones under "state_dict"
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    state = {}
    for key, value in obj.items():
        if torch.is_tensor(value):
            # saved from a DDP-wrapped or torch.compile'd model
            for prefix in ("module.", "_orig_mod."):
                key = key.removeprefix(prefix)
            state[key] = value
    # a pruned model's checkpoint: weight = weight_orig * weight_mask (torch.nn.utils.prune)
    for key in [k for k in state if k.endswith("_orig")]:
        mask = state.pop(key.removesuffix("_orig") + "_mask", None)
        if mask is not None:
            state[key.removesuffix("_orig")] = state.pop(key) * mask
    return state


def load_pretrained(model: nn.Module, path: str) -> LoadReport:
    """Copy the tensors of the weights file at `path` (local path or fsspec URL) into `model`.

    Accepts a plain state_dict (torchvision weights files are one), or a dict holding it under
    "model" (our checkpoints) or "state_dict". Tensors whose shapes differ (typically the head,
    and the stem of a small-stem ResNet) are skipped; the first conv of an RGB model is folded
    into the model's input channels. Logs what was skipped or missing; raises ValueError when
    no tensor matched at all.
    """
    state = _read_state_dict(path)
    own = model.state_dict()
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem_key = convs[0] + ".weight" if convs else None  # a network of one's own may have no conv
    loadable, adapted, skipped = {}, [], []
    for key, tensor in state.items():
        if key not in own:
            continue
        target = own[key].shape
        if (key == stem_key and tensor.ndim == 4 and tensor.shape != target
                and tensor.shape[0] == target[0] and tensor.shape[2:] == target[2:]):
            tensor = adapt_input_channels(tensor, target[1])
            adapted.append(key)
        if tensor.shape != target:
            skipped.append(f"{key} {tuple(tensor.shape)} -> {tuple(target)}")
            continue
        loadable[key] = tensor
    if not loadable:
        raise ValueError(f"no tensor in {path} matches {type(model).__name__} (file keys such "
                         f"as {list(state)[:3]}, model keys such as {list(own)[:3]})")
    model.load_state_dict(loadable, strict=False)

    report = LoadReport(path, list(loadable), adapted, skipped,
                        missing=[k for k in own if k not in state],
                        unexpected=[k for k in state if k not in own])
    log.info("loaded %d/%d tensors from %s", len(loadable), len(own), path)
    if adapted:
        log.info("folded RGB filters into %s", ", ".join(adapted))
    if skipped:
        log.warning("skipped (shape differs, left as initialised): %s", "; ".join(skipped))
    if report.missing:
        log.warning("missing from %s (left as initialised): %s", path, ", ".join(report.missing))
    if report.unexpected:
        log.warning("ignored (not in the model): %s", ", ".join(report.unexpected))
    return report




def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d")
