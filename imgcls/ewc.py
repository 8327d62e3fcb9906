"""Elastic Weight Consolidation (Kirkpatrick et al. 2017): learn a new task while protecting
the weights a previous task needs, with the penalty

    (importance / 2) * sum_i F_i (w_i - w*_i)^2

added to every optimizer step's loss. w* (the anchor) are the previous checkpoint's raw
weights, the ones `model.pretrained=CKPT` starts the new run from (not its EMA: the penalty
is then zero at the start, and F is the curvature at the point it protects).

F is the diagonal Fisher of the previous model on N samples of the previous task's data:
the mean over samples of the squared gradient of log p(y|x), one gradient per sample
(torch.func.vmap). Per sample, because squaring a mini-batch's gradient instead gives
(sum of gradients)^2 / B, whose cross terms cancel: a B-fold underestimate of the Fisher for
weights whose gradients disagree between samples. y is drawn from the model's own prediction
(the true Fisher, as in the paper), with a uniform from a hash of (seed, sample key), so F
does not depend on the number of ranks or on any RNG state.

The samples are the first N of the split in shard order (shards are shuffled when built);
each rank takes those in its own shards (ShardReader's eval sharding), and the sums are
all-reduced. F and w* are a stateful part of the checkpoint: a resume restores them and
never recomputes (nor reads the previous checkpoint).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial

import torch
from torch.func import functional_call, grad, vmap

from imgcls import distributed
from imgcls.augment import sample_uniforms
from imgcls.config import ConfigError
from imgcls.data import ShardReader

log = logging.getLogger(__name__)
FISHER_DRAW = -1  # the "epoch" of the label draws' hash: apart from every augmentation draw


class EWC:
    """The penalty's state, per parameter name: the Fisher diagonal and the anchor weights.
    A checkpoint part (state_dict/load_state_dict)."""

    def __init__(self, model: torch.nn.Module, importance: float, is_main: bool = True):
        self.model, self.importance, self.is_main = model, importance, is_main
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self) -> torch.Tensor:
        """(importance / 2) * sum F (w - w*)^2, in fp32 whatever the autocast around it."""
        params = dict(self.model.named_parameters())
        device = next(iter(params.values())).device
        with torch.autocast(device.type, enabled=False):
            total = torch.zeros((), device=device)
            for name, fisher in self.fisher.items():
                total = total + (fisher * (params[name].float() - self.anchor[name]).square()).sum()
        return self.importance / 2 * total

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self.fisher = {n: t.to(device) for n, t in state["fisher"].items()}
        self.anchor = {n: t.to(device) for n, t in state["anchor"].items()}
        if self.is_main:
            log.info("ewc: Fisher and anchor of %d tensors restored from the checkpoint (not recomputed)",
                     len(self.fisher))


def build_ewc(cfg, model: torch.nn.Module, dist: distributed.DistInfo, *, resuming: bool, lr: float) -> EWC:
    """The run's EWC part: computed now on a fresh run; left empty on a resume, for the
    checkpoint to fill. Collective on a fresh run (every rank calls it)."""
    ewc = EWC(model, cfg.ewc.importance, dist.is_main)
    if resuming:
        return ewc
    if cfg.model.pretrained != cfg.ewc.previous and dist.is_main:
        log.warning("ewc: model.pretrained=%r is not ewc.previous=%r: the run starts away from the anchor",
                    cfg.model.pretrained, cfg.ewc.previous)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # building the previous model draws random init weights
        previous, data_cfg, manifest = previous_model(cfg.ewc)
    own = dict(model.named_parameters())
    kept = {n: p for n, p in previous.named_parameters() if n in own and own[n].shape == p.shape}
    if not kept:
        raise ConfigError(f"ewc.previous={cfg.ewc.previous}: no parameter matches this run's model "
                          f"(previous {cfg.ewc.previous} has {list(dict(previous.named_parameters()))[:3]}, ...)")
    left_out = [n for n in own if n not in kept]
    if left_out and dist.is_main:
        log.warning("ewc: not protected (absent from, or shaped unlike, the previous model): %s", ", ".join(left_out))
    previous = previous.to(dist.device)
    sums, count = fisher_sums(previous, data_cfg, manifest, cfg.ewc, dist, seed=cfg.run.seed)
    ewc.fisher = {n: sums[n] / count for n in kept}
    ewc.anchor = {n: p.detach().float().clone() for n, p in previous.named_parameters() if n in kept}
    if dist.is_main:
        stiffest = max(f.max().item() for f in ewc.fisher.values())
        log.info("ewc: diagonal Fisher of %s from %d samples of %s/%s in %.1f s: %d tensors, max %.3g; "
                 "importance %g", cfg.ewc.previous, count, data_cfg.url, cfg.ewc.split,
                 time.perf_counter() - start, len(ewc.fisher), stiffest, cfg.ewc.importance)
        limit = sgd_step_limit(cfg.optim)
        if lr * cfg.ewc.importance * stiffest > limit:
            log.warning("ewc: lr %g x importance %g x max Fisher %.3g is above %.2f, where SGD diverges on a "
                        "quadratic: the stiffest weights will oscillate away; lower ewc.importance or the lr",
                        lr, cfg.ewc.importance, stiffest, limit)
    return ewc


def sgd_step_limit(optim_cfg) -> float:
    """The largest lr x curvature for which SGD converges on a quadratic: 2 (1 + m) with heavy-ball
    momentum m, 2 (1 + m) / (1 + 2m) with Nesterov's; no limit for AdamW (its steps are
    normalised)."""
    if optim_cfg.name != "sgd":
        return float("inf")
    m = optim_cfg.momentum
    return 2 * (1 + m) / (1 + 2 * m) if optim_cfg.nesterov else 2 * (1 + m)


def previous_model(ewc_cfg):
    """(the previous checkpoint's model with its raw weights, in eval mode; the data config it
    was trained with, pointed at ewc.data_url when given; that data's manifest)."""
    from imgcls.models.trained import load_model

    try:
        previous = load_model(ewc_cfg.previous, use_ema=False, data_url=ewc_cfg.data_url)
    except FileNotFoundError:
        raise ConfigError(f"ewc.previous: no checkpoint at {ewc_cfg.previous}") from None
    # its mean/std too: the Fisher is of the model on the inputs it was trained on
    data_cfg = replace(previous.config.data, num_workers=0, eval_batch_size=ewc_cfg.batch_size)
    return previous.model, data_cfg, previous.manifest


def rank_quota(shards: list[dict], total: int, rank: int, world_size: int) -> int:
    """How many of the split's first `total` samples (in shard order) lie in this rank's shards
    (ShardReader's eval sharding: shards rank, rank + world_size, ...). They are the first ones
    this rank reads, since it reads its shards in order."""
    quota, offset = 0, 0
    for index, shard in enumerate(shards):
        if index % world_size == rank:
            quota += min(max(total - offset, 0), shard["count"])
        offset += shard["count"]
    return quota


def fisher_sums(model, data_cfg, manifest, ewc_cfg, dist, *, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Sums over the first `ewc_cfg.fisher_samples` samples of the split of the squared
    per-sample gradients of log p(y|x), all-reduced over the ranks; and their number."""
    reader = ShardReader(data_cfg, ewc_cfg.split, rank=dist.rank, world_size=dist.world_size, train=False,
                         manifest=manifest)
    available = reader.split_count()
    if ewc_cfg.fisher_samples < 1 or ewc_cfg.fisher_samples > available:
        raise ConfigError(f"ewc.fisher_samples={ewc_cfg.fisher_samples}: {data_cfg.url} split {ewc_cfg.split!r} "
                          f"has {available} samples")
    quota = rank_quota(reader.shards, ewc_cfg.fisher_samples, dist.rank, dist.world_size)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    per_sample = vmap(grad(partial(_log_likelihood_of_a_draw, model=model)), in_dims=(None, None, 0, 0))
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for batch in reader:
        if seen >= quota:
            break
        take = min(len(batch["label"]), quota - seen)
        images = reader.transform(batch, dist.device)[:take]
        uniforms = torch.tensor([sample_uniforms(seed, FISHER_DRAW, k)[0] for k in batch["key"][:take]],
                                dtype=torch.float32, device=dist.device)
        grads = per_sample(params, buffers, images, uniforms)
        for name, g in grads.items():
            sums[name] += g.square().sum(0)
        seen += take
    flat = torch.cat([s.flatten() for s in sums.values()] + [torch.tensor([float(seen)], device=dist.device)])
    distributed.all_reduce(flat)
    sizes = [s.numel() for s in sums.values()]
    totals = flat[:-1].split(sizes)
    return {n: t.view_as(sums[n]) for n, t in zip(sums, totals)}, int(flat[-1].item())


def _log_likelihood_of_a_draw(params, buffers, image, uniform, *, model):
    """log p(y|x) for one image, y drawn from the model's prediction by inverse CDF of `uniform`."""
    logits = functional_call(model, (params, buffers), (image[None],))[0].float()
    log_probs = logits.log_softmax(0)
    cdf = log_probs.detach().exp().cumsum(0)
    label = (cdf < uniform).sum().clamp(max=len(cdf) - 1)
    return log_probs.gather(0, label[None])[0]
