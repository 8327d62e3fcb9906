"""The optimizer and the learning-rate schedule: the linear scaling rule, weight decay and a
learning rate per part, and a schedule over samples seen (not steps), so a run resumed on
another number of ranks stays where it was on its schedule."""
from __future__ import annotations

import math

import torch

from imgcls.config import Config, ConfigError
from imgcls.models.parts import param_groups


def effective_batch(cfg: Config, world_size: int) -> int:
    return cfg.data.batch_size * cfg.train.accum_steps * world_size


def effective_lr(cfg: Config, world_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr ∝ effective batch."""
    return cfg.optim.lr * effective_batch(cfg, world_size) / cfg.optim.base_batch


def make_optimizer(cfg: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """No weight decay on biases and norm weights (1-d tensors), as is standard; a learning rate
    per part with optim.head_lr_mult and optim.layer_decay (imgcls.models.parts)."""
    o = cfg.optim
    if not (o.head_lr_mult > 0 and 0 < o.layer_decay <= 1):
        raise ConfigError(f"optim.head_lr_mult={o.head_lr_mult} must be > 0 and optim.layer_decay={o.layer_decay} "
                          "in (0, 1]")
    groups = param_groups(model, lr, o.weight_decay, o.head_lr_mult, o.layer_decay)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optim.name: unknown optimizer {cfg.optim.name!r} (sgd | adamw)")


class SampleSchedule:
    """The learning rate as a function of the training samples seen by all ranks together,
    not of the step count: a run resumed on another number of ranks (so another effective
    batch and linearly scaled peak lr) stays where it was on its schedule.

    lr = peak × factor(samples): linear warmup over `warmup` samples, then cosine to
    min_lr_ratio at `total`, step decay by gamma every `step_epochs` epochs, or constant.
    """

    def __init__(self, cfg, optimizer, *, batch: int, samples_per_epoch: int, total: int):
        self.cfg, self.optimizer, self.batch = cfg, optimizer, batch
        self.samples_per_epoch, self.total = samples_per_epoch, total
        self.warmup = int(cfg.warmup_epochs * samples_per_epoch // batch) * batch
        if cfg.name not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule.name: unknown schedule {cfg.name!r} (cosine | step | constant)")
        self.peak = [group["lr"] for group in optimizer.param_groups]
        self.samples = 0
        self._apply()

    def factor(self) -> float:
        s, n = self.cfg, self.samples
        if n < self.warmup:
            return (n + self.batch) / self.warmup
        if s.name == "cosine":
            t = (n - self.warmup) / max(self.batch, self.total - self.warmup)
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if s.name == "step":
            return s.gamma ** (n // (s.step_epochs * self.samples_per_epoch))
        return 1.0

    def step(self) -> None:
        """After an optimizer step: `batch` more samples seen."""
        self.samples += self.batch
        self._apply()

    def _apply(self) -> None:
        factor = self.factor()
        for group, peak in zip(self.optimizer.param_groups, self.peak):
            group["lr"] = peak * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint of torch's LambdaLR (step-based, before this schedule): steps x batch
        self.samples = state["samples"] if "samples" in state else state["last_epoch"] * self.batch
        self._apply()


def make_schedule(cfg: Config, optimizer, steps_per_epoch: list[int], world_size: int) -> SampleSchedule:
    batch = effective_batch(cfg, world_size)
    return SampleSchedule(cfg.schedule, optimizer, batch=batch, samples_per_epoch=steps_per_epoch[0] * batch,
                          total=sum(steps_per_epoch) * batch)
