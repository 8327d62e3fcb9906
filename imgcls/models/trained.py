"""A trained model rebuilt from its checkpoint: `load_model`, the one place that does it (for
evaluation, prediction, export, quantization, pruning, a distillation teacher, EWC)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imgcls.config import Config, from_dict


@dataclass
class TrainedModel:
    model: nn.Module   # in eval mode, on the device asked for
    weights: str       # "ema" | "model": which of the checkpoint's weights it holds
    config: Config     # the checkpoint's config; data.url is the data it was loaded against
    manifest: dict     # that data's manifest (classes, image)
    state: dict        # the whole checkpoint (progress holds the multi-label threshold)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]


def load_model(checkpoint_url: str, device: torch.device | str = "cpu", *, use_ema: bool = True,
               data_url: str = "", manifest: dict | None = None) -> TrainedModel:
    """The checkpoint's architecture with its weights (the EMA ones when present and wanted),
    for the classes and images of `manifest`, else of the dataset at `data_url`, else of the
    one it was trained on. Errors name the checkpoint's URL (imgcls.checkpoint.load)."""
    from imgcls import checkpoint
    from imgcls.data import read_manifest

    state = checkpoint.load(checkpoint_url)
    cfg = from_dict(state["config"])
    cfg.data.url = data_url or cfg.data.url
    if manifest is None:
        manifest = read_manifest(cfg.data.url, cfg.data.read_retry_s)
    model, weights = model_from_state(state, manifest, use_ema)
    return TrainedModel(model.to(device), weights, cfg, manifest, state)


def model_from_state(state: dict, manifest: dict, use_ema: bool = True) -> tuple[nn.Module, str]:
    """(model in eval mode, "ema" | "model") from a checkpoint already read."""
    from imgcls.data import input_size
    from imgcls.models.zoo import build_model, stem_choice

    cfg = from_dict(state["config"])
    size = input_size(cfg.data, manifest)
    cfg.model.small_stem = stem_choice(cfg.model, size)[0]  # the stem it was trained with, pretrained or not
    cfg.model.pretrained = ""  # every weight is in the checkpoint; the original file need not exist here
    model = build_model(cfg.model, len(manifest["classes"]), manifest["image"]["channels"], size)
    if cfg.prune.sparsity > 0:  # the state holds weight_orig/weight_mask: load into a masked model
        from imgcls.pruning import apply_pruning, make_permanent
        apply_pruning(model, cfg.prune)
    if use_ema and "ema" in state:  # AveragedModel's state: module.* plus n_averaged
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()
                               if k.startswith("module.")})
        weights = "ema"
    else:
        model.load_state_dict(state["model"])
        weights = "model"
    if cfg.prune.sparsity > 0:
        make_permanent(model)  # a plain `weight` with the zeros baked in
    return model.eval(), weights
