"""Distributed evaluation, and the report `jobs/evaluate.py` writes for a checkpoint."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from imgcls import distributed
from imgcls.data import ShardReader
from imgcls.metrics import ConfusionMatrix, PrecisionRecallCurves
from imgcls.precision import autocast, resolve_precision
from imgcls.progress import TaskProgress
from shardio import storage


def evaluate(model, reader: ShardReader, device, autocast, num_classes: int, *, flip: bool = False,
             shift: bool = False, channels_last: bool = False, on_batch=None) -> dict:
    """Each rank reads its own shards, every sample of the split exactly once, with no
    collective per batch (ranks may hold unequal shares); the sums are reduced at the end.
    The sums stay on the device until then. `flip` and `shift` average the logits over
    test-time views (see `tta_logits`); `on_batch(logits, labels)` sees every batch (the
    precision-recall curves collect their scores with it)."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-5 correct, count
    k = min(5, num_classes)
    with torch.no_grad():
        for batch in reader.loader(pin_memory=device.type == "cuda"):
            images = reader.transform(batch, device, channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast():
                logits = tta_logits(model, images, flip=flip, shift=shift)
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
            totals[2] += len(labels)
            confusion.update(logits, labels)
            if on_batch is not None:
                on_batch(logits, labels)
    model.train()
    distributed.all_reduce(totals)
    distributed.all_reduce(confusion.matrix)
    count = max(1.0, totals[2].item())
    return {"loss": totals[0].item() / count, "acc": confusion.accuracy, "balanced_acc": confusion.balanced_accuracy,
            "top5": totals[1].item() / count,
            "macro_f1": confusion.macro_f1, "count": int(totals[2].item()), "confusion": confusion}


def evaluate_multilabel(model, reader: ShardReader, device, autocast, num_classes: int, *, threshold: float = -1.0,
                        loss: str = "bce", channels_last: bool = False) -> dict:
    """A multi-label split: the sigmoid loss, mAP, subset accuracy ("acc": every label right), and
    per-class precision/recall/F1 and micro/macro F1 at `threshold` (< 0: the one with the best
    micro F1 on this split, as validation chooses it). Every rank reads its own shards; the PR
    counts and sums are reduced at the end, as in `evaluate`."""
    from imgcls.losses import multilabel_loss

    model.eval()
    curves = PrecisionRecallCurves(num_classes, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, exact matches at 0.5, count
    with torch.no_grad():
        for batch in reader.loader(pin_memory=device.type == "cuda"):
            images = reader.transform(batch, device, channels_last)
            targets = batch["label"].to(device, non_blocking=True)
            with autocast():
                logits = model(images).float()
            totals[0] += multilabel_loss(logits, targets, loss) * len(targets)
            totals[1] += ((logits > 0) == targets.bool()).all(1).sum()
            totals[2] += len(targets)
            curves.update(torch.sigmoid(logits), targets)
    model.train()
    distributed.all_reduce(totals)
    distributed.all_reduce(curves.counts)
    count = max(1.0, totals[2].item())
    chosen = curves.best_threshold() if threshold < 0 else threshold
    return {"loss": totals[0].item() / count, "acc": totals[1].item() / count, "count": int(totals[2].item()),
            **curves.multilabel_metrics(chosen), "curves": curves}


def tta_logits(model, images: torch.Tensor, *, flip: bool = False, shift: bool = False) -> torch.Tensor:
    """fp32 logits averaged over test-time views, as airbench does: with `flip`, the image and
    its mirror image; with `shift`, half of that plus a quarter each for the same views of the
    image moved one pixel up-left and one down-right (edge pixels repeated)."""
    def views(x):
        logits = model(x).float()
        return (logits + model(x.flip(3)).float()) / 2 if flip else logits

    logits = views(images)
    if shift:
        h, w = images.shape[-2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
        logits = logits / 2 + (views(padded[..., :h, :w]) + views(padded[..., 2:, 2:])) / 4
    return logits


def run_dir_of(checkpoint_url: str) -> str:
    """RUN_DIR for RUN_DIR/checkpoints/step-N.pt."""
    return checkpoint_url.rsplit("/", 2)[0]


def evaluate_checkpoint(checkpoint_url: str, split: str = "test", data_url: str = "", use_ema: bool = True,
                        out_dir: str = "", device: str = "auto") -> dict:
    """Evaluate a checkpoint on a split; rank 0 writes report.txt, metrics.json, confusion.json,
    confusion.png and pr_curves.png to OUT_DIR (default RUN_DIR/eval/SPLIT). The report and
    metrics.json hold the average precision per class. Works under torchrun or alone; `device`
    as jobs/evaluate.py's --device (auto: this rank's GPU when CUDA is usable)."""
    from imgcls.models.trained import load_model

    dist = distributed.init_distributed(device, device_key="--device ")
    trained = load_model(checkpoint_url, dist.device, use_ema=use_ema, data_url=data_url)
    model, weights, cfg, state, classes = trained.model, trained.weights, trained.config, trained.state, trained.classes
    manifest = trained.manifest
    reader = ShardReader(cfg.data, split, rank=dist.rank, world_size=dist.world_size, train=False, manifest=manifest)
    precision = resolve_precision(cfg.train.precision, dist.device)
    if reader.multilabel:
        return _multilabel_checkpoint(model, reader, state, cfg, dist, autocast(dist.device, precision), classes,
                                      out_dir or storage.join(run_dir_of(checkpoint_url), "eval", split),
                                      {"checkpoint": checkpoint_url, "split": split, "weights": weights})
    curves = PrecisionRecallCurves(len(classes), device=dist.device)
    mine = sum(s["count"] for s in reader.shards[dist.rank::dist.world_size])  # rank 0's share is shown
    progress = TaskProgress(f"evaluate {split}", mine, every_s=cfg.track.progress_every_s) if dist.is_main else None

    def on_batch(logits, labels):
        curves.update(logits.float().softmax(1), labels)
        if progress is not None:
            progress.update(len(labels))

    metrics = evaluate(model, reader, dist.device, autocast(dist.device, precision), len(classes),
                       flip=cfg.train.eval_flip, shift=cfg.train.eval_shift, on_batch=on_batch)
    if progress is not None:
        progress.close()
    distributed.all_reduce(curves.counts)
    confusion = metrics.pop("confusion")
    report = confusion.classification_report(classes) + "\n" + curves.report(classes)
    views = ["image"] + ["mirror"] * cfg.train.eval_flip + ["shifted"] * cfg.train.eval_shift
    result = {"checkpoint": checkpoint_url, "split": split, "weights": weights, "views": "+".join(views),
              **metrics, **curves.to_json(classes), "per_class": confusion.to_json(classes)}
    if dist.is_main:
        out = out_dir or storage.join(run_dir_of(checkpoint_url), "eval", split)
        write_report(out, result, report, confusion, curves, classes)
        result["out_dir"] = out
        result["report"] = report
    del model, trained
    distributed.shutdown()
    return result


def write_report(out: str, result: dict, report: str, confusion, curves, classes: list[str]) -> None:
    """report.txt, metrics.json, confusion.json, confusion.png and pr_curves.png in OUT (any URL).
    The confusion matrix and the curves may still be on the device: each leaves it here."""
    from imgcls.plots import plot_confusion_matrix, plot_pr_curves

    storage.write_bytes_atomic(storage.join(out, "report.txt"), report.encode())
    storage.write_bytes_atomic(storage.join(out, "metrics.json"), json.dumps(result, indent=2).encode())
    storage.write_bytes_atomic(storage.join(out, "confusion.json"), json.dumps(
        {"classes": classes, "matrix": confusion.matrix.cpu().tolist()}).encode())
    plot_confusion_matrix(confusion, classes, storage.join(out, "confusion.png"))
    plot_pr_curves(curves, classes, storage.join(out, "pr_curves.png"))


def _multilabel_checkpoint(model, reader, state, cfg, dist, autocast_ctx, classes, out: str, head: dict) -> dict:
    """evaluate_checkpoint for a multi-label split: mAP, and per-class AP, precision, recall and F1
    at the threshold chosen on val (saved in the checkpoint), macro and micro F1."""
    from imgcls.losses import resolve_loss

    threshold = state["progress"].get("threshold", 0.5)
    metrics = evaluate_multilabel(model, reader, dist.device, autocast_ctx, len(classes), threshold=threshold,
                                  loss=resolve_loss(cfg.train.loss, "multilabel"),
                                  channels_last=cfg.model.channels_last)
    curves = metrics.pop("curves")
    per_class = {name: {"average_precision": ap, "precision": p, "recall": r, "f1": f, "support": n}
                 for name, ap, p, r, f, n in zip(classes, curves.average_precision.tolist(),
                                                 metrics.pop("precision_per_class"), metrics.pop("recall_per_class"),
                                                 metrics.pop("f1_per_class"), curves.support.tolist())}
    width = max(9, *(len(str(c)) for c in classes))
    lines = [f"{'':>{width}}  {'avg prec':>9}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}", ""]
    lines += [f"{name:>{width}}  {v['average_precision']:>9.4f}  {v['precision']:>9.4f}  {v['recall']:>9.4f}  "
              f"{v['f1']:>9.4f}  {v['support']:>9}" for name, v in per_class.items()]
    lines += ["", f"mAP {metrics['map']:.4f}; at threshold {metrics['threshold']:.3f}: micro F1 "
                  f"{metrics['micro_f1']:.4f}, macro F1 {metrics['macro_f1']:.4f}, exact match {metrics['acc']:.4f}"]
    report = "\n".join(lines) + "\n"
    result = {**head, "task": "multilabel", **metrics, "per_class": per_class}
    if dist.is_main:
        storage.write_bytes_atomic(storage.join(out, "report.txt"), report.encode())
        storage.write_bytes_atomic(storage.join(out, "metrics.json"), json.dumps(result, indent=2).encode())
        result.update(out_dir=out, report=report)
    del model
    distributed.shutdown()
    return result

