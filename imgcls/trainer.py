"""The training loop: DDP, gradient accumulation, mixed precision, exact resume.

Same code under torchrun, srun and plain python (imgcls.distributed). A `Trainer` wires the
components; `Checkpointer` owns the dict of stateful parts (every part has state_dict() and
load_state_dict()), so a checkpoint is one dict and a run stopped at any optimizer step
resumes bit-for-bit: the reader restarts at the exact batch, each sample's augmentation
depends only on (seed, epoch, key), and every rank's RNGs are restored.

The story of a step: read `accum` uint8 micro-batches, turn them into float input on the
device, forward and backward (all-reducing gradients on the last one), step. The step's loss
and accuracy stay on the device; only every `train.sync_every` steps (and at logs, checkpoints
and epoch ends) do the ranks agree on the flags (non-finite loss, stop request) and the host
reads them, so a GPU never waits for the host in between.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from imgcls import distributed
from imgcls.checkpoint import Checkpointer, RNGState
from imgcls.config import Config, ConfigError, redacted, save_config, to_dict
from imgcls.data import DataError, ShardReader, TrainLoader, first_images, input_size, read_manifest
from imgcls.evaluation import evaluate, evaluate_multilabel
from imgcls.jsonl import parse_jsonl
from imgcls.losses import Objective, balanced_class_weights, mix_batch, positive_weights, resolve_loss
from imgcls.models import apply_unfreeze_schedule, build_model, describe_stem, is_user_model
from imgcls.observe import TrainingObserver
from imgcls.optim import effective_batch, effective_lr, make_optimizer, make_schedule
from imgcls.precision import autocast, precision_name, resolve_precision
from imgcls.signals import StopRequest, wants_requeue
from imgcls.tracking import Tracker
from shardio import storage

log = logging.getLogger(__name__)
NO_STEP = 2 ** 52  # "no non-finite step yet" in the flags' max-reduce (exact in float64)


class NonFiniteLoss(FloatingPointError):
    """A non-finite loss or gradient norm, named with its step."""


def first_bad(first: torch.Tensor, value: torch.Tensor, step: int) -> torch.Tensor:
    """`first` (NO_STEP until then), or `step` if `value` is the first non-finite one: on the device."""
    return torch.where(~torch.isfinite(value) & (first == NO_STEP), float(step), first)


@dataclass
class Progress:
    """Where training is: the part of the checkpoint that is neither weights nor data."""
    step: int = 0                # optimizer steps done (the global step for logging)
    best: float = -math.inf      # best value of train.early_stop_metric
    bad_epochs: int = 0          # epochs since `best` improved
    restarts: int = 0            # how many times this run was resumed
    threshold: float = 0.5       # multi-label: the probability threshold chosen on val (micro F1)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        # older checkpoints also hold an "epoch" that was never advanced: the data state owns it
        vars(self).update({key: value for key, value in state.items() if key != "epoch"})


@dataclass
class MicroBatch:
    images: torch.Tensor                          # the model's input, on the device
    labels: torch.Tensor
    mix: tuple[torch.Tensor, float] | None = None  # Mixup/CutMix: (partner labels, lam)


def record_resume(run_dir: str, step: int) -> int:
    """Append this resume's step to RUN_DIR/resumes.jsonl (outside the checkpoint: a job that
    dies before its next checkpoint must still be counted) and return how many resumes in a
    row before this one started at the same step, i.e. made no progress."""
    url = storage.join(run_dir, "resumes.jsonl")
    old = storage.read_bytes(url).decode() if storage.exists(url) else ""
    steps = [record["step"] for record in parse_jsonl(old, url)[0]] + [step]
    storage.write_bytes_atomic(url, (old + json.dumps({"step": step, "time": time.time()}) + "\n").encode())
    stalled = 0
    while stalled + 1 < len(steps) and steps[-2 - stalled] == step:
        stalled += 1
    return stalled


def forward_backward(ddp, micro_batches: list[MicroBatch], scaler, autocast_ctx, *,
                     objective: Objective | None = None, distributed_enabled: bool = False) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over `micro_batches` (one optimizer step).

    Gradients are all-reduced only on the last micro-batch (no_sync before it). Each
    micro-batch's loss is divided by their number, so the step's gradient is the mean over
    the effective batch whatever the split into ranks and micro-batches.
    Returns [loss sum, correct, seen] over this rank's samples, on the device (no host sync).
    """
    objective = objective or Objective()
    totals = torch.zeros(3, dtype=torch.float64, device=micro_batches[0].images.device)
    accum = len(micro_batches)
    for micro, batch in enumerate(micro_batches):
        last = micro == accum - 1
        with contextlib.nullcontext() if last or not distributed_enabled else ddp.no_sync():
            with autocast_ctx():
                logits = ddp(batch.images)
                loss = objective(logits.float(), batch.images, batch.labels, batch.mix)
            scaler.scale(loss / accum).backward()
        _maybe_inject_fault()
        totals[0] += loss.detach().double() * len(batch.labels)
        totals[1] += correct(logits, batch.labels)
        totals[2] += len(batch.labels)
    return totals


def clip_grad_norm(model: torch.nn.Module, optimizer, scaler, max_norm: float) -> torch.Tensor:
    """The gradient's total norm before clipping, on the device (no host sync), and clipping to
    `max_norm` when > 0. Under fp16 the gradients are unscaled first, so the norm and the clip
    threshold are in true units (the scaler then skips a step whose gradient overflowed)."""
    scaler.unscale_(optimizer)  # nothing to do without fp16
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 hits; for multi-hot labels [B, C], samples whose every label is right at logit 0
    (probability 0.5): subset accuracy."""
    if labels.ndim == 2:
        return ((logits > 0) == labels.bool()).all(1).sum()
    return (logits.argmax(1) == labels).sum()


# Tests only: IMGCLS_CRASH_AFTER_BATCHES=N hard-kills rank 0 after the backward of its N-th
# micro-batch in this process (like SIGKILL or a lost node: no cleanup, no checkpoint).
_CRASH_AFTER = int(os.environ.get("IMGCLS_CRASH_AFTER_BATCHES", 0))
_batches_seen = 0


def _maybe_inject_fault() -> None:
    global _batches_seen
    if not _CRASH_AFTER:
        return
    _batches_seen += 1
    if _batches_seen >= _CRASH_AFTER and distributed.env_ranks()[0] == 0:
        os._exit(137)


def train(cfg: Config) -> dict:
    """Train until the epochs are done, early stopping, `max_steps`, or a stop signal.

    Returns {"status": "done" | "stopped" | "early_stopped" | "pruned", "step", "epoch", ...}.
    "stopped" means a checkpoint was written for a requeued job to resume from.
    """
    stop = StopRequest()
    dist = distributed.init_distributed(cfg.run.device, cfg.run.dist_timeout_min, cfg.run.always_init_group)
    # No cleanup collective on failure: the other ranks may be inside one; torchrun or srun
    # (--kill-on-bad-exit) ends them.
    # the run dir's owner: its lease, its newest checkpoint; created before the model is built,
    # so a fresh run is known as such (whitening runs only then)
    checkpointer = Checkpointer(cfg.run.dir, cfg.train.keep_last, dist.is_main, config=redacted(to_dict(cfg)),
                                lease_timeout_s=cfg.run.lease_timeout_s, retry_s=cfg.run.storage_retry_s)
    try:
        result = Trainer(cfg, dist, stop, checkpointer).train()
    except BaseException:
        with contextlib.suppress(Exception):  # give the run dir back, without hiding the error
            checkpointer.close()
        raise
    finally:
        stop.close()
    # the last checkpoint is written first; a SLURM job stopped to come back (USR2) is requeued
    # by its caller (imgcls.cluster) and takes its lease back, so the record stays
    checkpointer.close(requeue=wants_requeue(result["reason"]) and "SLURM_JOB_ID" in os.environ)
    gc.collect()  # the Trainer's DDP model (and any cycle holding its reducer) is gone before the group
    distributed.shutdown()
    return result


class Trainer:
    """Wires the components of a run from its config, then trains them (`train`)."""

    def __init__(self, cfg: Config, dist: distributed.DistInfo, stop: StopRequest, checkpointer: Checkpointer):
        self.cfg, self.dist, self.stop, self.checkpointer = cfg, dist, stop, checkpointer
        self.device = device = dist.device
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self._set_backend_flags()
        self.manifest = read_manifest(cfg.data.url, cfg.data.read_retry_s)
        self.classes = self.manifest["classes"]
        channels = self.manifest["image"]["channels"]
        # the data position's one owner: the trainer takes batches from it and asks it where it is
        self.data = TrainLoader(ShardReader(cfg.data, "train", rank=dist.rank, world_size=dist.world_size,
                                            seed=cfg.run.seed, manifest=self.manifest),
                                epochs=cfg.train.epochs, pin_memory=device.type == "cuda",
                                before_start=checkpointer.wait)  # no fork while a background write holds locks
        self.val_reader = (ShardReader(cfg.data, "val", rank=dist.rank, world_size=dist.world_size,
                                       seed=cfg.run.seed, train=False, manifest=self.manifest)
                           if self.manifest["splits"].get("val", {}).get("count") else None)
        checkpointer.check_config(cfg.train.allow_config_change)
        self.model = self._build_model(channels)
        accum = cfg.train.accum_steps
        steps_per_epoch = self.data.steps_per_epoch(accum)
        if min(steps_per_epoch, default=0) == 0:
            raise DataError(f"{cfg.data.url}: fewer than accum_steps={accum} batches of {cfg.data.batch_size} per rank")
        self.lr = effective_lr(cfg, dist.world_size)
        self.optimizer = make_optimizer(cfg, self.model, self.lr)
        self.scheduler = make_schedule(cfg, self.optimizer, steps_per_epoch, dist.world_size)
        self.dtype = resolve_precision(cfg.train.precision, device)
        self.autocast = autocast(device, self.dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = (torch.optim.swa_utils.AveragedModel(
            self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay),
            use_buffers=True) if cfg.train.ema_decay > 0 else None)
        self.ewc = self._ewc()
        try:
            self.loss_kind = resolve_loss(cfg.train.loss, self.manifest.get("task", ""))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.progress = Progress()
        name = cfg.run.name or cfg.run.dir.rstrip("/").rsplit("/", 1)[-1]
        self.tracker = Tracker(cfg.track, cfg.run.dir, enabled=dist.is_main, name=name)
        self.tracker.fence = self.checkpointer.fence  # every write to the run dir goes through the lease
        self.observer = TrainingObserver(cfg.track, self.tracker, cfg.run.dir, self.classes, cfg.train.epochs,
                                         dist.is_main, self.checkpointer.fence)
        self.checkpointer.parts = {
            "model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
            "data": self.data, "progress": self.progress, "tracker": self.tracker, "rng": RNGState(dist.rank),
            **({"ema": self.ema} if self.ema is not None else {}),
            **({"ewc": self.ewc} if self.ewc is not None else {})}
        self.objective = Objective(cfg.train, cfg.distill, self._teacher(),
                                   penalty=self.ewc.penalty if self.ewc is not None else None,
                                   class_weights=self._class_weights(), loss=self.loss_kind)
        self.compiled = torch.compile(self.model) if cfg.train.compile else self.model
        # rank 0's epoch-end callbacks: each gets (val record, epoch) and returns True to stop the run
        self.epoch_end_callbacks: list[Callable[[dict, int], bool]] = []
        if cfg.hpo.study and dist.is_main:
            from imgcls.hpo import OptunaPruning  # optuna: only for trials
            self.epoch_end_callbacks.append(OptunaPruning(cfg.hpo))
        self.window = self._new_window()
        self.first_bad_step = torch.full((), NO_STEP, dtype=torch.float64, device=device)
        self.first_bad_grad = torch.full((), NO_STEP, dtype=torch.float64, device=device)  # the gradient norm's

    # ---- wiring ------------------------------------------------------------------------
    def _set_backend_flags(self) -> None:
        if self.cfg.run.deterministic:
            if self.device.type == "cuda":  # cuBLAS needs this for deterministic results
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only on CUDA: a few backward kernels there have no deterministic version
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not self.cfg.run.deterministic

    def _build_model(self, channels: int) -> torch.nn.Module:
        cfg = self.cfg
        model = build_model(cfg.model, len(self.classes), channels, input_size(cfg.data, self.manifest)).to(self.device)
        if not self.checkpointer.resuming and cfg.model.whiten_images and hasattr(model, "init_whitening"):
            model.init_whitening(first_images(cfg.data, "train", cfg.model.whiten_images,
                                              self.manifest).to(self.device))
        if cfg.prune.sparsity > 0:  # before loading a checkpoint, whose state has the masks
            from imgcls.pruning import apply_pruning
            apply_pruning(model, cfg.prune)
        return model

    def _class_weights(self) -> torch.Tensor | None:
        """train.class_weights=balanced: inverse-frequency weights from the manifest's counts."""
        kind = self.cfg.train.class_weights
        if kind not in ("", "balanced"):
            raise ConfigError(f"train.class_weights={kind!r}: expected balanced or empty")
        if not kind:
            return None
        train = self.manifest["splits"]["train"]
        if self.loss_kind != "ce":  # sigmoid losses: a positive weight per class
            weights = positive_weights(train["class_counts"], train["count"])
            log.info("positive weights (balanced): %s", " ".join(f"{w:.3g}" for w in weights.tolist()))
            return weights.to(self.device)
        weights = balanced_class_weights(train["class_counts"])
        log.info("class weights (balanced): %s", " ".join(f"{w:.3g}" for w in weights.tolist()))
        return weights.to(self.device)

    def _teacher(self) -> torch.nn.Module | None:
        if not self.cfg.distill.teacher:
            return None
        from imgcls.models.trained import load_model

        teacher = load_model(self.cfg.distill.teacher, self.device, manifest=self.manifest).model
        return teacher.requires_grad_(False)

    def _ewc(self):
        """The EWC penalty's state (ewc.previous): computed on a fresh run, restored on a resume."""
        if not self.cfg.ewc.previous:
            return None
        from imgcls.ewc import build_ewc

        return build_ewc(self.cfg, self.model, self.dist, resuming=self.checkpointer.resuming, lr=self.lr)

    def resume(self) -> None:
        """Restore every part from the newest checkpoint, if there is one."""
        if not self.checkpointer.resuming:
            return
        url = self.checkpointer.restore()
        self.progress.restarts += 1
        if self.dist.is_main:  # the other ranks are ended by torchrun/srun if this raises
            self.checkpointer.fence()
            stalled = record_resume(self.cfg.run.dir, self.progress.step)
            if stalled > self.cfg.train.max_requeues:
                raise RuntimeError(f"{self.cfg.run.dir}: resumed {stalled} times at step {self.progress.step} without "
                                   f"progress (train.max_requeues={self.cfg.train.max_requeues}); giving up")
            log.info("resumed from %s at step %d (epoch %d, %d samples of it read, batch %d of this layout)", url,
                     self.progress.step, self.data.epoch, self.data.samples, self.data.position)

    OWN_STEMS = ("simple_cnn", "fast_cnn", "tutorial_cnn")  # model.small_stem does not apply

    def describe(self) -> str:
        """The start-up line: what runs where, at which batch and learning rate, from where."""
        cfg, dist, device = self.cfg, self.dist, self.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        counts = ", ".join(f"{s} {v['count']}" for s, v in self.manifest["splits"].items())
        start = (f"resuming at step {self.progress.step} (epoch {self.data.epoch}, batch {self.data.position})"
                 if self.progress.restarts else "fresh")
        stem = ("" if cfg.model.name in self.OWN_STEMS or is_user_model(cfg.model.name) else
                f"{cfg.model.name} with {describe_stem(cfg.model, input_size(cfg.data, self.manifest))}; ")
        return (f"device {device} ({name}); world size {dist.world_size}, backend {dist.backend}; {stem}precision "
                f"{precision_name(self.dtype)}; batch {cfg.data.batch_size} per rank x accum {cfg.train.accum_steps} "
                f"x {dist.world_size} ranks = {effective_batch(cfg, dist.world_size)}; lr {self.lr:g} "
                f"(optim.lr {cfg.optim.lr:g} at base batch {cfg.optim.base_batch}); samples: {counts}; {start}")

    # ---- the run -------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, dist = self.cfg, self.dist
        if self.finished():
            return self.result("done", "already done")
        self.resume()
        if dist.is_main:
            self.checkpointer.fence()
            save_config(cfg, storage.join(cfg.run.dir, "config.yaml"))
            log.info(self.describe())
        # on another layout (world size, workers) the current epoch holds what is left of it
        self.observer.start(to_dict(cfg), sum(self.data.steps_per_epoch(cfg.train.accum_steps)), self.progress.step)
        status, reason = "done", ""
        try:
            while not self.data.done:
                reason = self.train_epoch()
                if reason:
                    status = "stopped"
                    self.save()
                    break
                status = self.end_epoch()
                if status != "done":
                    break
        finally:  # an early stop or an error: shut the next epoch's started workers down
            self.data.stop()
        self.observer.finish(self.progress.step)  # the last epoch's plots are complete when train() returns
        return self.result(status, reason)

    def finished(self) -> bool:
        """A rerun of a run that has trained all its epochs: say so, restore its progress for
        the result, and do not count it as a resume."""
        if not self.checkpointer.resuming or self.checkpointer.saved("data")["epoch"] < self.cfg.train.epochs:
            return False
        url = self.checkpointer.restore()
        if self.dist.is_main:
            log.info("%s is already done: %d epochs, step %d (%s); nothing to train (raise train.epochs to go on)",
                     self.cfg.run.dir, self.data.epoch, self.progress.step, url)
        return True

    def result(self, status: str, reason: str) -> dict:
        best = self.progress.best
        return {"status": status, "reason": reason, "step": self.progress.step, "epoch": self.data.epoch,
                "best": best if math.isfinite(best) else None, "run_id": self.tracker.run_id,
                "restarts": self.progress.restarts}

    def train_epoch(self) -> str:
        """Train from the data's position to the end of its epoch. Returns why it stopped
        early ("signal USR2", "max_steps"), or "" at the end of the epoch."""
        cfg, data, epoch = self.cfg, self.data, self.data.epoch
        accum = cfg.train.accum_steps
        if apply_unfreeze_schedule(self.model, cfg.model.unfreeze_schedule, epoch) and self.dist.is_main:
            log.info("epoch %d: unfroze layers per model.unfreeze_schedule", epoch)
        # DDP is (re)built each epoch: it registers hooks only for parameters that require grad.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DDP(self.compiled, device_ids=device_ids) if self.dist.enabled else self.compiled
        data.start()  # unless the last epoch's end started it already
        self.observer.epoch_started(epoch)
        reason = ""
        try:
            for left in range(data.steps_left(accum), 0, -1):
                micro_batches = [self.micro_batch(next(data), epoch) for _ in range(accum)]
                self.train_step(ddp, micro_batches)
                step = self.progress.step
                if step == cfg.train.max_steps:
                    reason = "max_steps"
                if self.sync_due(step, last=left == 1 or bool(reason)):
                    signalled = self.sync_flags()
                    if step % cfg.train.log_every == 0:
                        self.log_train(epoch)
                    if signalled:
                        reason = f"signal {self.stop.describe()}"
                    if reason:
                        break
                    if step % cfg.train.ckpt_every == 0:
                        self.save()
        finally:  # on an error too: the workers ignore SIGTERM (imgcls.signals), so exit could not end them
            data.stop()  # shut the epoch's workers down
            del ddp
        return reason

    def micro_batch(self, batch: dict, epoch: int) -> MicroBatch:
        """A loader batch as the model's input on the device, mixed when Mixup/CutMix is on."""
        train, position = self.cfg.train, batch["position"]  # checked by the loader: the epoch's batch number
        self.window["bad"] += batch["bad"]
        images = self.data.transform(batch, self.device, self.cfg.model.channels_last)
        labels = batch["label"].to(self.device, non_blocking=True)
        if train.mixup_alpha > 0 or train.cutmix_alpha > 0:
            images, labels_b, lam = mix_batch(images, labels, seed=self.cfg.run.seed, epoch=epoch, position=position,
                                              mixup_alpha=train.mixup_alpha, cutmix_alpha=train.cutmix_alpha)
            return MicroBatch(images, labels, (labels_b, lam))
        return MicroBatch(images, labels)

    def train_step(self, ddp, micro_batches: list[MicroBatch]) -> None:
        """One optimizer step; its loss and accuracy are added to the window on the device."""
        totals = forward_backward(ddp, micro_batches, self.scaler, self.autocast, objective=self.objective,
                                  distributed_enabled=self.dist.enabled)
        norm = clip_grad_norm(self.model, self.optimizer, self.scaler, self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.progress.step += 1
        self.window["totals"] += totals
        self.first_bad_step = first_bad(self.first_bad_step, totals[0], self.progress.step)
        self.note_gradient(norm.to(self.device, torch.float64))
        self.observer.stepped(self.progress.step)

    def note_gradient(self, norm: torch.Tensor) -> None:
        """The step's gradient norm, on the device: the window's sum, count and max of the finite
        ones, and the step of the first non-finite one (under fp16 an overflow is the scaler's
        business: it skips that step and lowers its scale)."""
        if not self.scaler.is_enabled():
            self.first_bad_grad = first_bad(self.first_bad_grad, norm, self.progress.step)
        finite = torch.isfinite(norm)
        counted = torch.where(finite, norm, 0.0)
        grad = self.window["grad"]
        grad[:2] += torch.stack([counted, finite.double()])
        grad[2] = torch.maximum(grad[2], counted)

    def sync_due(self, step: int, last: bool) -> bool:
        train = self.cfg.train
        return last or any(step % every == 0 for every in (train.sync_every, train.log_every, train.ckpt_every))

    def sync_flags(self) -> bool:
        """All ranks agree on the flags, and the host reads them: raises NonFiniteLoss naming
        the first step whose loss (or gradient norm) was not finite; returns whether a stop was
        requested."""
        flags = torch.stack([NO_STEP - self.first_bad_step, NO_STEP - self.first_bad_grad,
                             torch.tensor(float(self.stop.requested), dtype=torch.float64, device=self.device)])
        no_bad_step, no_bad_grad, stop = distributed.all_reduce(flags, "max").tolist()  # max: the earliest bad step
        if max(no_bad_step, no_bad_grad) > 0:  # the earlier of the two: a bad gradient makes a bad loss next
            what, no_bad = max(("loss", no_bad_step), ("gradient norm", no_bad_grad), key=lambda bad: bad[1])
            raise NonFiniteLoss(f"non-finite {what} at step {int(NO_STEP - no_bad)} (epoch {self.data.epoch}); "
                                "the last good checkpoint is kept")
        return stop > 0

    def log_train(self, epoch: int) -> None:
        window = self.window
        loss_sum, correct, seen = distributed.all_reduce(window["totals"].clone()).tolist()
        record = {"epoch": epoch, "train/loss": loss_sum / seen, "train/acc": correct / seen,
                  "train/lr": self.lr * self.scheduler.factor(),  # optim.lr's, scaled (parts: x their multiplier)
                  "train/images_per_s": seen / (time.perf_counter() - window["time"])}
        grad_sum, grad_count, grad_max = window["grad"].tolist()
        if grad_count:  # before clipping; the same on every rank (the gradients are all-reduced)
            record.update({"train/grad_norm": grad_sum / grad_count, "train/grad_norm_max": grad_max})
        if window["bad"]:
            record["data/bad_samples"] = window["bad"]
        self.observer.train_logged(self.progress.step, record)
        self.window = self._new_window()

    def _new_window(self) -> dict:
        return {"totals": torch.zeros(3, dtype=torch.float64, device=self.device), "bad": 0,
                "grad": torch.zeros(3, dtype=torch.float64, device=self.device),
                "time": time.perf_counter()}

    def end_epoch(self) -> str:
        """Validation, early stopping, HPO pruning and the epoch's checkpoint."""
        cfg, progress, epoch = self.cfg, self.progress, self.data.epoch
        self.data.next_epoch()  # its workers start now: the first reads overlap validation and the save
        record = self.validate(epoch + 1)
        improved = False
        if record is not None:
            value = record.get(cfg.train.early_stop_metric, record["val/acc"])
            if "loss" in cfg.train.early_stop_metric:
                value = -value  # lower is better
            improved = value > progress.best
            progress.best, progress.bad_epochs = (value, 0) if improved else (progress.best, progress.bad_epochs + 1)
        prune = torch.zeros(1)
        if record is not None:  # rank 0's callbacks (HPO pruning); others have none
            prune[0] = float(any([callback(record, epoch + 1) for callback in self.epoch_end_callbacks]))
        distributed.all_reduce(prune)  # rank 0 decided; every rank follows
        self.save(best=improved)
        if prune.item() > 0:
            return "pruned"
        if cfg.train.early_stop_patience and progress.bad_epochs >= cfg.train.early_stop_patience:
            return "early_stopped"
        return "done"

    def validate(self, epoch: int) -> dict | None:
        """One view of every val sample (test-time views are for evaluate.py: see train.eval_flip)."""
        if self.val_reader is None:
            return None
        val_model = self.ema.module if self.ema is not None else self.model
        if self.val_reader.multilabel:
            return self.validate_multilabel(val_model, epoch)
        metrics = evaluate(val_model, self.val_reader, self.device, self.autocast, len(self.classes),
                           channels_last=self.cfg.model.channels_last)
        confusion = metrics.pop("confusion")
        record = {"epoch": epoch, **{f"val/{k}": v for k, v in metrics.items()}}
        self.observer.validated(self.progress.step, record, confusion)
        if self.dist.is_main:
            log.info("epoch %d: val acc %.4f loss %.4f (%d samples)", epoch, metrics["acc"], metrics["loss"],
                     metrics["count"])
        return record

    def validate_multilabel(self, val_model, epoch: int) -> dict:
        """mAP and F1 on val; the threshold with the best micro F1 is kept for evaluate and predict."""
        metrics = evaluate_multilabel(val_model, self.val_reader, self.device, self.autocast, len(self.classes),
                                      loss=self.loss_kind, channels_last=self.cfg.model.channels_last)
        metrics.pop("curves")
        self.progress.threshold = metrics["threshold"]
        record = {"epoch": epoch, **{f"val/{k}": v for k, v in metrics.items() if not k.endswith("_per_class")}}
        self.observer.validated(self.progress.step, record)
        if self.dist.is_main:
            log.info("epoch %d: val mAP %.4f micro F1 %.4f at threshold %.3f, exact match %.4f (%d samples)", epoch,
                     metrics["map"], metrics["micro_f1"], metrics["threshold"], metrics["acc"], metrics["count"])
        return record

    def save(self, best: bool = False) -> None:
        """A checkpoint of every part (collective: RNG states are gathered; rank 0 writes)."""
        if self.dist.is_main and not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLoss(f"non-finite weights at step {self.progress.step}: checkpoint not written")
        self.checkpointer.save(self.progress.step, best=best)
