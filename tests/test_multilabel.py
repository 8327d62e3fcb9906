"""The multi-label training and evaluation pieces: sigmoid losses (bce, focal, asl) and their
positive weights, Mixup on multi-hot targets, subset accuracy, and mAP plus per-class P/R/F1,
micro/macro F1 and the val-chosen threshold from the mergeable PR-curve counts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgcls.losses import Objective, mix_batch, multilabel_loss, positive_weights, resolve_loss
from imgcls.metrics import PrecisionRecallCurves
from imgcls.trainer import MicroBatch, correct, forward_backward
from tests.conftest import BASE_RUN, launch

LOGITS = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 3
TARGETS = (torch.rand(16, 5, generator=torch.Generator().manual_seed(1)) < 0.3).float()


def test_sigmoid_losses_against_torch_and_each_other():
    weight = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0])
    reference = F.binary_cross_entropy_with_logits(LOGITS, TARGETS, pos_weight=weight, reduction="sum") / 16
    assert torch.allclose(multilabel_loss(LOGITS, TARGETS, "bce", pos_weight=weight), reference)
    bce = multilabel_loss(LOGITS, TARGETS, "bce")
    assert torch.allclose(multilabel_loss(LOGITS, TARGETS, "focal", focal_gamma=0.0), bce)
    assert torch.allclose(multilabel_loss(LOGITS, TARGETS, "asl", asl_gamma_neg=0, asl_gamma_pos=0, asl_clip=0), bce,
                          atol=1e-5)
    # focusing and the clip shrink the loss of easy negatives: both are below BCE
    assert multilabel_loss(LOGITS, TARGETS, "focal") < bce and multilabel_loss(LOGITS, TARGETS, "asl") < bce


def test_loss_choice_and_positive_weights():
    assert resolve_loss("", "multilabel") == "bce" and resolve_loss("", "") == "ce"
    with pytest.raises(ValueError, match="needs a sigmoid loss"):
        resolve_loss("ce", "multilabel")
    with pytest.raises(ValueError, match="train.loss='hinge'"):
        resolve_loss("hinge")
    assert positive_weights([10, 50, 0], 100).tolist() == [9.0, 1.0, 1.0]


def test_mixup_on_multi_hot_targets_is_the_loss_of_the_mixed_targets():
    images = torch.randn(16, 1, 8, 8)
    mixed, partner, lam = mix_batch(images, TARGETS, seed=0, epoch=0, position=0, mixup_alpha=0.4, cutmix_alpha=0)
    objective = Objective(loss="bce")
    as_pair = objective(LOGITS, mixed, TARGETS, (partner, lam))
    soft = lam * TARGETS + (1 - lam) * partner
    assert torch.allclose(as_pair, multilabel_loss(LOGITS, soft, "bce"), atol=1e-6)
    # a step on multi-hot labels: the loss and subset accuracy come back on the device
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    totals = forward_backward(model, [MicroBatch(images, TARGETS)], torch.amp.GradScaler("cpu", enabled=False),
                              lambda: torch.autocast("cpu", enabled=False), objective=objective)
    assert totals[2] == 16 and 0 <= totals[1] <= 16 and model[1].weight.grad is not None
    assert correct(torch.where(TARGETS > 0, 5.0, -5.0), TARGETS) == 16


def brute_force(scores: np.ndarray, targets: np.ndarray, t: float) -> dict:
    pred = scores >= t
    tp, fp, fn = (pred & targets).sum(0), (pred & ~targets).sum(0), (~pred & targets).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * tp / (2 * tp + fp + fn))
    return {"f1": f1, "micro": 2 * tp.sum() / (2 * tp + fp + fn).sum(), "precision": np.nan_to_num(tp / (tp + fp))}


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """sklearn's average_precision_score: one threshold per distinct score (ties together)."""
    ap, last_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        tp, fp = (positive & (scores >= t)).sum(), (~positive & (scores >= t)).sum()
        recall = tp / positive.sum()
        ap += (recall - last_recall) * tp / (tp + fp)
        last_recall = recall
    return float(ap)


def test_map_f1_and_the_threshold_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    targets = rng.random((300, 4)) < [0.1, 0.3, 0.5, 0.05]
    scores = np.clip(targets * 0.35 + rng.random((300, 4)) * 0.65, 0, 0.999)
    scores = (np.floor(scores * 100) + 0.5) / 100  # one score per bin, so bins lose nothing
    curves = PrecisionRecallCurves(4, bins=100)
    for part in np.array_split(np.arange(300), 3):  # in batches, as evaluation adds them
        curves.update(torch.from_numpy(scores[part]), torch.from_numpy(targets[part]))
    at = curves.at_thresholds()
    for b in (10, 35, 50, 80):
        expected = brute_force(scores, targets, b / 100)
        assert (np.allclose(at["f1"][:, b].numpy(), expected["f1"])
                and np.isclose(float(at["micro_f1"][b]), expected["micro"]))
        assert np.allclose(at["precision"][:, b].numpy(), expected["precision"])
    best = curves.best_threshold()
    micro = [brute_force(scores, targets, b / 100)["micro"] for b in range(100)]
    assert np.isclose(brute_force(scores, targets, best)["micro"], max(micro))
    metrics = curves.multilabel_metrics(best)
    assert np.isclose(metrics["map"], np.mean([average_precision(scores[:, c], targets[:, c]) for c in range(4)]))
    assert metrics["macro_f1"] == pytest.approx(float(np.mean(brute_force(scores, targets, best)["f1"])))
    json.dumps(metrics)


def test_a_sigmoid_loss_trains_single_label_data_with_positive_weights_and_mixup(bands_dataset, tmp_path):
    run_dir = tmp_path / "bce"
    out = launch(["--config", "", f"data.url={bands_dataset}", f"run.dir={run_dir}", *BASE_RUN,
                 "train.epochs=2", "train.loss=asl", "train.class_weights=balanced", "train.mixup_alpha=0.2"],
                 nproc=None)
    assert "positive weights (balanced): 3.33 3.03 2.85 2.83" in out.stderr  # negatives / positives per class
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "val/acc" in r][-1]["val/acc"] > 0.6  # four classes: chance is 0.25


def test_multi_label_shards_train_with_bce_by_default_and_validate_map_and_threshold(multilabel_dataset, tmp_path):
    from imgcls import checkpoint
    from imgcls.config import DataConfig
    from imgcls.data import ShardReader

    reader = ShardReader(DataConfig(url=multilabel_dataset, batch_size=50, num_workers=0), "train")
    batch = next(iter(reader.loader()))
    assert batch["label"].shape == (50, 4) and set(batch["label"].unique().tolist()) == {0.0, 1.0}
    assert (batch["label"].sum(1) > 1).any() and (batch["label"].sum(1) == 0).any()  # several labels, or none

    run_dir = tmp_path / "run"
    out = launch(["--config", "", f"data.url={multilabel_dataset}", f"run.dir={run_dir}", *BASE_RUN,
                 "train.epochs=3", "optim.lr=0.2", "train.mixup_alpha=0.2", "train.class_weights=balanced"], nproc=None)
    assert "val mAP" in out.stderr and "positive weights (balanced)" in out.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val/map" in r][-1]
    assert last["val/map"] > 0.7 and last["val/micro_f1"] > 0.6 and 0 < last["val/threshold"] < 1  # chance: ~0.35
    state = torch.load(checkpoint.list_checkpoints(str(run_dir))[-1], weights_only=False)
    assert state["progress"]["threshold"] == last["val/threshold"]
    with pytest.raises(AssertionError, match="needs a sigmoid loss"):
        launch(["--config", "", f"data.url={multilabel_dataset}", f"run.dir={tmp_path / 'ce'}", *BASE_RUN,
               "train.loss=ce"], nproc=None)


def test_multi_label_evaluate_export_and_predict_every_label_over_the_threshold(multilabel_dataset, tmp_path):
    """evaluate at the val threshold, ONNX export unchanged, predict (on the ONNX file) listing
    every label over the threshold."""
    from imgcls import checkpoint
    from imgcls.export import read_samples
    from imgcls.inference import load_checkpoint_model
    from tests.conftest import job, last_json, save_test_images

    run_dir = tmp_path / "run"
    launch(["--config", "", f"data.url={multilabel_dataset}", f"run.dir={run_dir}", *BASE_RUN,
           "train.epochs=2", "optim.lr=0.2", "train.loss=focal"], nproc=None)
    ckpt = checkpoint.list_checkpoints(str(run_dir))[-1]
    threshold = torch.load(ckpt, weights_only=False)["progress"]["threshold"]
    stdout, _, _ = job("evaluate", ckpt, "--output", str(tmp_path / "eval"))
    assert "avg prec" in stdout and f"at threshold {threshold:.3f}" in stdout
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (saved["task"] == "multilabel" and saved["threshold"] == threshold
            and set(saved["per_class"]) == {"0", "1", "2", "3"})
    assert saved["map"] > 0.6 and 0 <= saved["per_class"]["0"]["f1"] <= 1

    stdout, _, code = job("export", ckpt, "--format", "onnx", "--check-samples", "64", "--threads", "1")
    assert code == 0
    onnx_path = last_json(stdout)["path"]
    model, meta = load_checkpoint_model(ckpt)
    images, labels = read_samples(meta, "test", limit=8)
    paths = save_test_images(tmp_path / "images", images, meta, 8)
    out_json = tmp_path / "pred.json"
    _, _, code = job("predict", onnx_path, *map(str, paths), "--output", str(out_json))
    assert code == 0
    predictions = json.loads(out_json.read_text())["predictions"]
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(images))).numpy()
    for record, p in zip(predictions, probs):
        expected = sorted(int(i) for i in np.flatnonzero(p >= threshold))
        assert sorted(label["index"] for label in record["labels"]) == expected
