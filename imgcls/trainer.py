"""The training loop: DDP, gradient accumulation, mixed precision, exact resume.

Same code under torchrun, srun and plain python (imgcls.distributed). Every stateful part
has state_dict()/load_state_dict(), so a checkpoint is one dict of parts, and a run stopped
at any optimizer step resumes bit-for-bit: the reader restarts at the exact batch, each
sample's augmentation depends only on (seed, epoch, key), and every rank's RNGs are restored.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from imgcls import checkpoint, distributed, storage
from imgcls.config import Config, save_config, to_dict
from imgcls.data import DataError, ShardReader, first_images, read_manifest
from imgcls.evaluation import evaluate, model_from_checkpoint
from imgcls.losses import classification_loss, distillation_loss, mix_batch
from imgcls.models import apply_unfreeze_schedule, build_model
from imgcls.signals import StopRequest
from imgcls.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class Progress:
    """Where training is: the part of the checkpoint that is neither weights nor data."""
    step: int = 0                # optimizer steps done (the global step for logging)
    epoch: int = 0               # epochs fully done
    best: float = -math.inf      # best value of train.early_stop_metric
    bad_epochs: int = 0          # epochs since `best` improved
    restarts: int = 0            # how many times this run was resumed

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def record_resume(run_dir: str, step: int) -> int:
    """Append this resume's step to RUN_DIR/resumes.jsonl (outside the checkpoint: a job that
    dies before its next checkpoint must still be counted) and return how many resumes in a
    row before this one started at the same step, i.e. made no progress."""
    url = storage.join(run_dir, "resumes.jsonl")
    old = storage.read_bytes(url).decode() if storage.exists(url) else ""
    steps = [json.loads(line)["step"] for line in old.splitlines() if line.strip()] + [step]
    storage.write_bytes_atomic(url, (old + json.dumps({"step": step, "time": time.time()}) + "\n").encode())
    stalled = 0
    while stalled + 1 < len(steps) and steps[-2 - stalled] == step:
        stalled += 1
    return stalled


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """autocast dtype; None means fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def effective_lr(cfg: Config, world_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr ∝ effective batch."""
    effective_batch = cfg.data.batch_size * cfg.train.accum_steps * world_size
    return cfg.optim.lr * effective_batch / cfg.optim.base_batch


def make_optimizer(cfg: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-d tensors), as is standard.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optim.name: unknown optimizer {cfg.optim.name!r} (sgd | adamw)")


def make_schedule(cfg: Config, optimizer, total_steps: int, steps_per_epoch: int):
    s = cfg.schedule
    warmup = int(s.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.name == "cosine":
            t = (step - warmup) / max(1, total_steps - warmup)
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if s.name == "step":
            return s.gamma ** (step // (s.step_epochs * steps_per_epoch))
        if s.name == "constant":
            return 1.0
        raise ValueError(f"schedule.name: unknown schedule {s.name!r} (cosine | step | constant)")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Objective:
    """The loss of one micro-batch: cross-entropy or focal loss with label smoothing, against
    the Mixup/CutMix targets when the batch was mixed, plus distillation from a teacher."""

    def __init__(self, train_cfg=None, distill_cfg=None, teacher: torch.nn.Module | None = None):
        self.label_smoothing = train_cfg.label_smoothing if train_cfg else 0.0
        self.focal_gamma = train_cfg.focal_gamma if train_cfg else 0.0
        self.distill, self.teacher = distill_cfg, teacher

    def __call__(self, logits, images, labels, batch) -> torch.Tensor:
        def loss_for(targets):
            return classification_loss(logits, targets, label_smoothing=self.label_smoothing,
                                       focal_gamma=self.focal_gamma)
        loss = loss_for(labels)
        if "label_b" in batch:
            lam = batch["lam"]
            loss = lam * loss + (1 - lam) * loss_for(batch["label_b"].to(labels.device))
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images).float()
            alpha = self.distill.alpha
            loss = (1 - alpha) * loss + alpha * distillation_loss(logits, teacher_logits, self.distill.temperature)
        return loss


def forward_backward(ddp, micro_batches: list[dict], scaler, autocast, device, *, objective: Objective | None = None,
                     channels_last: bool = False, distributed_enabled: bool = False):
    """Accumulate the gradient of the mean loss over `micro_batches` (one optimizer step).

    Gradients are all-reduced only on the last micro-batch (no_sync before it). Each
    micro-batch's loss is divided by their number, so the step's gradient is the mean over
    the effective batch whatever the split into ranks and micro-batches.
    Returns [loss sum, correct, seen] over this rank's samples.
    """
    objective = objective or Objective()
    totals = torch.zeros(3, dtype=torch.float64)
    accum = len(micro_batches)
    for micro, batch in enumerate(micro_batches):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = micro == accum - 1
        with contextlib.nullcontext() if last or not distributed_enabled else ddp.no_sync():
            with autocast():
                logits = ddp(images)
                loss = objective(logits.float(), images, labels, batch)
            scaler.scale(loss / accum).backward()
        _maybe_inject_fault()
        totals[0] += loss.detach().double() * len(labels)
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
    return totals


def _maybe_inject_fault() -> None:
    """Tests only: IMGCLS_CRASH_AFTER_BATCHES=N hard-kills rank 0 after the backward of its
    N-th micro-batch in this process (like SIGKILL or a lost node: no cleanup, no checkpoint)."""
    global _batches_seen
    limit = os.environ.get("IMGCLS_CRASH_AFTER_BATCHES")
    if limit is None:
        return
    _batches_seen += 1
    if _batches_seen >= int(limit) and distributed.env_ranks()[0] == 0:
        os._exit(137)


_batches_seen = 0


def train(cfg: Config) -> dict:
    """Train until the epochs are done, early stopping, `max_steps`, or a stop signal.

    Returns {"status": "done" | "stopped" | "early_stopped" | "pruned", "step", "epoch", ...}.
    "stopped" means a checkpoint was written for a requeued job to resume from.
    """
    stop = StopRequest()
    dist = distributed.init_distributed()
    # No cleanup collective on failure: the other ranks may be inside one; torchrun or srun
    # (--kill-on-bad-exit) ends them.
    result = _train(cfg, dist, stop)
    gc.collect()  # _train's DDP model (and any cycle holding its reducer) is gone before the group
    distributed.shutdown()
    return result


def _train(cfg: Config, dist, stop: StopRequest) -> dict:
    run_dir, device = cfg.run.dir, dist.device
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    manifest = read_manifest(cfg.data.url)
    num_classes, channels = len(manifest["classes"]), manifest["image"]["channels"]
    reader = ShardReader(cfg.data, "train", rank=dist.rank, world_size=dist.world_size,
                         seed=cfg.run.seed, manifest=manifest)
    val_reader = (ShardReader(cfg.data, "val", rank=dist.rank, world_size=dist.world_size,
                              seed=cfg.run.seed, train=False, manifest=manifest)
                  if "val" in manifest["splits"] else None)

    state, url = checkpoint.load_latest(run_dir)  # None: a fresh run
    model = build_model(cfg.model, num_classes, channels).to(device)
    if state is None and cfg.model.whiten_images and hasattr(model, "init_whitening"):  # a fresh fast_cnn
        model.init_whitening(first_images(cfg.data, "train", cfg.model.whiten_images, manifest).to(device))
    if cfg.prune.sparsity > 0:  # before loading a checkpoint, whose state has the masks
        from imgcls.pruning import apply_pruning
        apply_pruning(model, cfg.prune)
    accum = cfg.train.accum_steps
    steps_per_epoch = [reader.batches_per_epoch(e) // accum for e in range(cfg.train.epochs)]
    if min(steps_per_epoch, default=0) == 0:
        raise DataError(f"{cfg.data.url}: fewer than accum_steps={accum} batches of {cfg.data.batch_size} per rank")
    total_steps = sum(steps_per_epoch)
    lr = effective_lr(cfg, dist.world_size)
    optimizer = make_optimizer(cfg, model, lr)
    scheduler = make_schedule(cfg, optimizer, total_steps, steps_per_epoch[0])
    dtype = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
        if cfg.train.ema_decay > 0 else None)
    progress = Progress()
    rng = checkpoint.RNGState(dist.rank)
    tracker = Tracker(cfg.track, run_dir, enabled=dist.is_main, name=cfg.run.name or run_dir.rstrip("/").rsplit("/", 1)[-1])

    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
             "data": reader, "progress": progress, "tracker": tracker}
    if ema is not None:
        parts["ema"] = ema
    if state is not None:
        for name, part in parts.items():
            part.load_state_dict(state[name])
        rng.load_state_dict(state["rng"])
        progress.restarts += 1
        if dist.is_main:  # the other ranks are ended by torchrun/srun if this raises
            stalled = record_resume(run_dir, progress.step)
            if stalled > cfg.train.max_requeues:
                raise RuntimeError(f"{run_dir}: resumed {stalled} times at step {progress.step} without progress "
                                   f"(train.max_requeues={cfg.train.max_requeues}); giving up")
            log.info("resumed from %s at step %d (epoch %d, batch %d)", url, progress.step, reader.epoch, reader.position)
    if dist.is_main:
        save_config(cfg, storage.join(run_dir, "config.yaml"))
    tracker.start(to_dict(cfg))

    def save(best: bool = False) -> None:
        """Collective (RNG states are gathered); rank 0 writes."""
        snapshot = {name: part.state_dict() for name, part in parts.items()}
        snapshot["rng"] = rng.state_dict()
        snapshot["config"] = to_dict(cfg)
        if dist.is_main:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteLoss(f"non-finite weights at step {progress.step}: checkpoint not written")
            checkpoint.save(snapshot, run_dir, progress.step, cfg.train.keep_last, best=best)

    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    teacher = None
    if cfg.distill.teacher:
        teacher_state = checkpoint.load(cfg.distill.teacher)
        teacher, _ = model_from_checkpoint(teacher_state, num_classes, channels)
        teacher = teacher.to(device).requires_grad_(False)
        del teacher_state
    objective = Objective(cfg.train, cfg.distill, teacher)
    compiled = torch.compile(model) if cfg.train.compile else model
    status, reason = "done", ""
    bar = None
    if dist.is_main and cfg.track.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True)

    unplotted, last_plot = None, time.monotonic()
    while reader.epoch < cfg.train.epochs:
        epoch = reader.epoch
        if apply_unfreeze_schedule(model, cfg.model.unfreeze_schedule, epoch) and dist.is_main:
            log.info("epoch %d: unfroze layers per model.unfreeze_schedule", epoch)
        # DDP is (re)built each epoch: it registers hooks only for parameters that require grad.
        ddp = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else compiled
        batches = iter(reader.loader())
        window = {"loss": 0.0, "correct": 0, "seen": 0, "bad": 0, "time": time.perf_counter()}
        for _ in range(reader.position // accum, steps_per_epoch[epoch]):
            micro_batches = []
            for micro in range(accum):
                batch = next(batches)
                if batch["position"] != reader.position + micro:
                    raise DataError(f"reader order broke: got batch {batch['position']}, expected {reader.position + micro}")
                if cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0:
                    batch["image"], batch["label_b"], batch["lam"] = mix_batch(
                        batch["image"], batch["label"], seed=cfg.run.seed, epoch=epoch, position=batch["position"],
                        mixup_alpha=cfg.train.mixup_alpha, cutmix_alpha=cfg.train.cutmix_alpha)
                micro_batches.append(batch)
                window["bad"] += batch["bad"]
            flags = torch.zeros(5, dtype=torch.float64)  # loss sum, correct, seen, non-finite, stop
            flags[:3] = forward_backward(ddp, micro_batches, scaler, autocast, device, objective=objective,
                                         channels_last=cfg.model.channels_last, distributed_enabled=dist.enabled)
            flags[3] = float(not math.isfinite(flags[0].item()))
            flags[4] = float(stop.requested)
            distributed.all_reduce_sum(flags)  # every rank sees the same flags: they stop together
            if flags[3] > 0:
                raise NonFiniteLoss(f"non-finite loss at step {progress.step + 1} (epoch {epoch}, "
                                    f"batch {reader.position}); the last good checkpoint is kept")
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            progress.step += 1
            reader.position += accum
            window["loss"] += flags[0].item()
            window["correct"] += flags[1].item()
            window["seen"] += flags[2].item()
            if bar is not None:
                bar.update(1)
            if progress.step % cfg.train.log_every == 0:
                elapsed = time.perf_counter() - window["time"]
                record = {"epoch": epoch, "train/loss": window["loss"] / window["seen"],
                          "train/acc": window["correct"] / window["seen"], "train/lr": scheduler.get_last_lr()[0],
                          "train/images_per_s": window["seen"] / elapsed}
                if window["bad"]:
                    record["data/bad_samples"] = window["bad"]
                tracker.log(progress.step, record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}", img_s=f"{record['train/images_per_s']:.0f}")
                window = {"loss": 0.0, "correct": 0, "seen": 0, "bad": 0, "time": time.perf_counter()}
            if flags[4] > 0 or progress.step == cfg.train.max_steps:
                status = "stopped"
                reason = f"signal {stop.describe()}" if flags[4] > 0 else "max_steps"
                break
            if progress.step % cfg.train.ckpt_every == 0:
                save()
        del batches  # shut the epoch's workers down
        if status == "stopped":
            save()
            break

        reader.set_epoch(epoch + 1, 0)
        improved = False
        if val_reader is not None:
            val_model = ema.module if ema is not None else model
            metrics = evaluate(val_model, val_reader, device, autocast, num_classes)  # one view: see train.eval_flip
            confusion = metrics.pop("confusion")
            record = {"epoch": epoch + 1, **{f"val/{k}": v for k, v in metrics.items()}}
            tracker.log(progress.step, record)
            value = record.get(cfg.train.early_stop_metric, record["val/acc"])
            if "loss" in cfg.train.early_stop_metric:
                value = -value  # lower is better
            improved = value > progress.best
            progress.best, progress.bad_epochs = (value, 0) if improved else (progress.best, progress.bad_epochs + 1)
            if dist.is_main:
                log.info("epoch %d: val acc %.4f loss %.4f (%d samples)", epoch + 1, metrics["acc"], metrics["loss"], metrics["count"])
                unplotted = confusion
                if time.monotonic() - last_plot >= cfg.track.plots_every_s:
                    _write_epoch_plots(run_dir, tracker, confusion, manifest["classes"], progress.step)
                    unplotted, last_plot = None, time.monotonic()
        prune = torch.zeros(1)
        if cfg.hpo.study and val_reader is not None and dist.is_main:
            from imgcls import hpo
            prune[0] = float(hpo.report(cfg.hpo, record[cfg.hpo.metric], epoch + 1))
        distributed.all_reduce_sum(prune)  # rank 0 asked the study; every rank follows
        save(best=improved)
        if prune.item() > 0:
            status = "pruned"
            break
        if cfg.train.early_stop_patience and progress.bad_epochs >= cfg.train.early_stop_patience:
            status = "early_stopped"
            break
        if dist.enabled:
            del ddp

    if unplotted is not None:
        _write_epoch_plots(run_dir, tracker, unplotted, manifest["classes"], progress.step)
    if bar is not None:
        bar.close()
    tracker.finish()
    result = {"status": status, "reason": reason, "step": progress.step, "epoch": reader.epoch,
              "best": progress.best if math.isfinite(progress.best) else None,
              "run_id": tracker.run_id, "restarts": progress.restarts}
    return result


def _write_epoch_plots(run_dir, tracker, confusion, class_names, step) -> None:
    """Training curves and the val confusion matrix as PNGs in the run dir (any URL)."""
    from imgcls.plots import plot_confusion_matrix, plot_training_curves

    plot_training_curves(tracker.records, storage.join(run_dir, "training_curves.png"))
    confusion_png = storage.join(run_dir, "confusion_val.png")
    plot_confusion_matrix(confusion.matrix.numpy(), class_names, confusion_png)
    tracker.log_image(step, "val/confusion_matrix", confusion_png)
