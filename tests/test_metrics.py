import json
import math
import os
import time

import pytest
import torch
from PIL import Image

from imgcls.metrics import ConfusionMatrix, PrecisionRecallCurves, topk_correct
from imgcls.plots import plot_confusion_matrix, plot_pr_curves, plot_training_curves

# 4 classes: "c" has a sample but is never predicted, "d" has neither
LABELS = torch.tensor([0, 0, 1, 1, 2])
PREDS = torch.tensor([0, 1, 1, 1, 0])
NAMES = ["a", "b", "c", "d"]


@pytest.fixture
def cm():
    cm = ConfusionMatrix(4)
    cm.update(PREDS, LABELS)
    return cm


def test_matrix_counts(cm):
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert cm.total == 5
    assert cm.support.tolist() == [2, 2, 1, 0]


def test_hand_computed_metrics(cm):
    assert cm.accuracy == pytest.approx(3 / 5)
    assert cm.precision.tolist() == pytest.approx([1 / 2, 2 / 3, 0, 0])
    assert cm.recall.tolist() == pytest.approx([1 / 2, 1, 0, 0])
    assert cm.f1.tolist() == pytest.approx([1 / 2, 4 / 5, 0, 0])
    assert not cm.f1.isnan().any()
    # macro over the classes present in labels or predictions (a, b, c), as sklearn
    assert cm.macro_f1 == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert cm.weighted_f1 == pytest.approx((2 * 1 / 2 + 2 * 4 / 5 + 1 * 0) / 5)
    # mean recall over the classes with labels (a, b, c; d has none), as sklearn's balanced_accuracy_score
    assert cm.balanced_accuracy == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_logits_equal_predictions_and_batches_accumulate():
    logits = torch.nn.functional.one_hot(PREDS, 4).float() * 3 + 0.1 * torch.randn(5, 4)
    by_logits = ConfusionMatrix(4)
    by_logits.update(logits[:2], LABELS[:2])
    by_logits.update(logits[2:], LABELS[2:])
    by_preds = ConfusionMatrix(4)
    by_preds.update(PREDS, LABELS)
    assert torch.equal(by_logits.matrix, by_preds.matrix)


def test_merge_sums_like_all_reduce(cm):
    other = ConfusionMatrix(4)
    other.update(torch.tensor([3, 3]), torch.tensor([3, 2]))
    summed = cm.matrix + other.matrix
    assert torch.equal(cm.merge(other).matrix, summed)
    assert cm.recall[3] == 1.0 and cm.precision[3] == 0.5
    cm.reset()
    assert cm.total == 0 and cm.accuracy == 0.0 and cm.macro_f1 == 0.0


def test_out_of_range_labels_fail():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ConfusionMatrix(4).update(torch.tensor([0]), torch.tensor([4]))


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.2],    # label 1: top-1
                           [0.4, 0.3, 0.2, 0.1],    # label 1: top-2
                           [0.9, 0.0, 0.1, 0.05]])  # label 1: top-4 only
    labels = torch.tensor([1, 1, 1])
    assert topk_correct(logits, labels, (1, 2, 3, 4)).tolist() == [1, 2, 2, 3]
    assert topk_correct(logits, labels, (1, 5)).tolist() == [1, 3]   # k > classes: all
    assert topk_correct(logits, labels, 2).tolist() == [2]
    assert topk_correct(logits, labels).dtype == torch.int64


def test_report_layout_and_notes(cm):
    report = cm.classification_report(NAMES, digits=2)
    lines = report.splitlines()
    # sklearn's layout: a right-aligned header, then one row per class
    assert lines[0] == " " * 14 + "precision    recall  f1-score   support"
    assert lines[1] == ""
    assert lines[2] == "           a       0.50      0.50      0.50         2"
    assert lines[3] == "           b       0.67      1.00      0.80         2"
    assert "    accuracy                           0.60         5" in lines
    assert "   macro avg       0.39      0.50      0.43         5" in lines
    assert "weighted avg       0.47      0.60      0.52         5" in lines
    assert "precision set to 0 for classes never predicted: c, d" in report
    assert "recall set to 0 for classes with no samples: d" in report
    assert "balanced accuracy (mean recall over the labelled classes): 0.50" in report
    assert "nan" not in report.lower()


def test_report_without_undefined_classes_has_no_notes():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    report = cm.classification_report()
    assert "set to 0" not in report and "excludes" not in report
    assert report.splitlines()[2].split() == ["0", "1.0000", "0.5000", "0.6667", "2"]


def test_to_json(cm):
    data = json.loads(json.dumps(cm.to_json(NAMES)))
    assert data["accuracy"] == pytest.approx(0.6)
    assert data["num_samples"] == 5 and data["balanced_accuracy"] == pytest.approx(0.5)
    assert data["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                                      "f1": pytest.approx(0.8), "support": 2, "predicted": 3}
    assert data["per_class"]["d"]["f1"] == 0.0
    assert data["undefined_set_to_zero"] == {"precision": ["c", "d"], "recall": ["d"]}
    assert data["confusion_matrix"][0] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="3 class names"):
        cm.to_json(NAMES[:3])


# ---------------------------------------------------------------- plots


def assert_png(path, min_size=300):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_size
        image.verify()


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, cm, normalize):
    path = tmp_path / "out" / "cm.png"
    plot_confusion_matrix(cm, NAMES, path, normalize=normalize)
    assert_png(path)


def test_plot_confusion_matrix_rejects_wrong_names(tmp_path, cm):
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(cm.matrix, NAMES[:3], tmp_path / "cm.png")


PLOT_1000_CLASSES = """
import json, resource, sys, time
import numpy as np
from imgcls.plots import plot_confusion_matrix
rng = np.random.default_rng(0)
m = rng.poisson(0.02, (1000, 1000))
m[np.arange(1000), np.arange(1000)] += 50
m[17, 912] += 40; m[912, 17] += 35; m[400, 3] += 30   # the confused ones
names = [f"class-{i}" for i in range(1000)]
plot_confusion_matrix(np.eye(3), ["a", "b", "c"], sys.argv[1] + ".warm.png")  # matplotlib's one-time setup
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
drawn = plot_confusion_matrix(m, names, sys.argv[1])
print(json.dumps({"s": time.perf_counter() - start,
                  "mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "drawn": drawn}))
"""


def test_plot_confusion_matrix_at_1000_classes_is_fast_and_small(tmp_path):
    """Beyond 50 classes only the 50 most-confused are drawn: at 1000 classes the PNG takes
    well under 5 s and 300 MB (the full 100-class picture once took 13.8 s and 1.84 GB)."""
    import subprocess
    import sys

    path = tmp_path / "cm.png"
    out = subprocess.run([sys.executable, "-c", PLOT_1000_CLASSES, str(path)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    print(f"1000 classes: {result['s']:.2f} s, peak RSS growth {result['mb']:.0f} MB")
    assert result["s"] < 5 and result["mb"] < 300
    assert len(result["drawn"]) == 50 and {"class-17", "class-912", "class-400", "class-3"} <= set(result["drawn"])
    assert_png(path)


def test_epoch_plots_draw_off_the_training_thread_and_close_waits(tmp_path):
    """submit() hands the drawing to a worker thread and returns; a request still waiting is
    replaced by a newer one; close() waits, and the images are logged in the caller's thread."""
    import threading

    from imgcls.observe import EpochPlots

    logged = []
    plots = EpochPlots(str(tmp_path), [f"c{i}" for i in range(200)],
                       lambda step, name, url: logged.append((step, name, url, threading.current_thread().name)))
    matrix = torch.eye(200, dtype=torch.int64) * 5
    start = time.perf_counter()
    for step in (10, 20, 30):
        plots.submit(training_records(), matrix * step, step)
    submitted = time.perf_counter() - start
    plots.close()
    drawn = time.perf_counter() - start
    assert submitted < 0.5 * drawn, (submitted, drawn)  # the caller did not wait for matplotlib
    assert [entry[0] for entry in logged] in ([10, 30], [30])  # 20 was superseded while 10 was drawn
    assert all(entry[3] == threading.current_thread().name for entry in logged)
    assert json.loads((tmp_path / "confusion_val.json").read_text())["matrix"][0][0] == 150  # the last one
    assert_png(tmp_path / "confusion_val.png")
    assert_png(tmp_path / "training_curves.png")


def training_records():
    records = []
    for step in range(0, 300, 10):
        record = {"step": step, "epoch": step // 100, "train/loss": 2 * math.exp(-step / 100),
                  "train/lr": 0.1 * (1 - step / 300)}
        if step % 100 == 90:
            record.update({"val/loss": record["train/loss"] + 0.1, "val/acc": 0.5 + step / 600})
        records.append(record)
    records.append({"epoch": 3, "test/acc": 0.9})   # no step: ignored
    return records


def test_plot_training_curves_from_records_and_jsonl(tmp_path):
    plot_training_curves(training_records(), tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")

    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in training_records()) + "\n")
    plot_training_curves(str(jsonl), tmp_path / "from_file.png")
    assert_png(tmp_path / "from_file.png")
    with Image.open(tmp_path / "from_file.png") as a, Image.open(tmp_path / "curves.png") as b:
        assert a.size == b.size and a.tobytes() == b.tobytes()


def test_plot_training_curves_with_panels_missing(tmp_path):
    plot_training_curves([{"step": 1, "train/loss": 1.0}], tmp_path / "sparse.png")
    assert_png(tmp_path / "sparse.png")


# ---- precision-recall curves --------------------------------------------------------------
def exact_average_precision(scores, positive) -> float:
    """sklearn's average_precision_score, written out independently: thresholds at every
    distinct score, highest first; AP = sum (R_i - R_(i-1)) * P_i."""
    import numpy as np

    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        recall = (chosen & positive).sum() / positive.sum()
        ap += (recall - previous_recall) * (chosen & positive).sum() / chosen.sum()
        previous_recall = recall
    return ap


def test_pr_curves_hand_computed():
    # class 0 ranks positive, negative, positive, negative: AP = 1/2 * 1 + 1/2 * 2/3
    p0 = torch.tensor([0.95, 0.75, 0.65, 0.25])
    curves = PrecisionRecallCurves(2, bins=10)
    curves.update(torch.stack([p0, 1 - p0], 1), torch.tensor([0, 1, 0, 1]))
    precision, recall, threshold = curves.curve(0)
    assert precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 1 / 2])
    assert recall.tolist() == pytest.approx([1 / 2, 1 / 2, 1, 1])
    assert threshold.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.2])
    assert curves.average_precision.tolist() == pytest.approx([5 / 6, 5 / 6])
    assert curves.support.tolist() == [2, 2]


def test_pr_curves_equal_exact_ap_and_sum_like_all_reduce():
    """Probabilities on bin centres (no two samples share a bin unless their scores are equal):
    AP equals the exact one; batches and per-rank counts summed give the same counts."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, classes, bins = 300, 5, 1000
    labels = torch.from_numpy(rng.integers(0, classes, n))
    logits = torch.from_numpy(rng.normal(size=(n, classes))) + 2 * torch.nn.functional.one_hot(labels, classes)
    probs = ((logits.softmax(1) * bins).floor() + 0.5) / bins
    whole = PrecisionRecallCurves(classes, bins)
    whole.update(probs, labels)
    ranks = [PrecisionRecallCurves(classes, bins) for _ in range(2)]
    for start in range(0, n, 64):  # batches dealt to two "ranks"
        ranks[start // 64 % 2].update(probs[start:start + 64], labels[start:start + 64])
    assert torch.equal(ranks[0].counts + ranks[1].counts, whole.counts)
    exact = [exact_average_precision(probs[:, c], labels == c) for c in range(classes)]
    assert whole.average_precision.tolist() == pytest.approx(exact, abs=1e-12)
    assert 0.5 < whole.mean_average_precision < 1  # informative: neither chance nor perfect


def test_pr_curves_report_and_json_name_every_class():
    curves = PrecisionRecallCurves(3)
    curves.update(torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1]]), torch.tensor([0, 1]))
    data = curves.to_json(["a", "b", "c"])
    assert data["average_precision"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert data["average_precision_undefined"] == ["c"] and data["mean_average_precision"] == 1.0
    report = curves.report(["a", "b", "c"])
    assert "avg prec" in report and "mean AP" in report and report.count("1.0000") == 3


def test_plot_pr_curves_draws_the_lowest_ap_classes_beyond_the_limit(tmp_path):
    import numpy as np

    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.integers(0, 25, 2000))
    # class c gets a signal growing with c: the low classes have the lowest AP
    signal = torch.arange(25, dtype=torch.float64) / 8
    logits = torch.from_numpy(rng.normal(size=(2000, 25))) + signal * torch.nn.functional.one_hot(labels, 25)
    curves = PrecisionRecallCurves(25)
    curves.update(logits.softmax(1), labels)
    names = [f"class{c}" for c in range(25)]
    drawn = plot_pr_curves(curves, names, tmp_path / "pr.png", max_classes=10)
    lowest = sorted(range(25), key=lambda c: curves.average_precision[c].item())[:10]
    assert drawn == [names[c] for c in lowest] and "class0" in drawn and "class24" not in drawn
    assert_png(tmp_path / "pr.png")
    assert plot_pr_curves(curves, names[:], tmp_path / "all.png", max_classes=30) == names
    with pytest.raises(ValueError, match="3 class names for 25 classes"):
        plot_pr_curves(curves, names[:3], tmp_path / "bad.png")


def test_evaluate_reports_average_precision_alone_and_on_two_ranks(bands_checkpoint, noisy_bands_dataset, tmp_path):
    """jobs/evaluate.py on a copy of the bands test split with 30% of the labels randomised (so
    AP is neither 0 nor 1): AP per class in metrics.json and on stdout, equal to the exact AP of
    the model's probabilities, and the same from two torchrun ranks (each with its own shard)."""
    from imgcls.export import read_samples
    from imgcls.inference import load_checkpoint_model
    from imgcls.precision import autocast, resolve_precision
    from tests.conftest import REPO, job, launch

    noisy = noisy_bands_dataset
    stdout, _, result = job("evaluate", bands_checkpoint, "--data", noisy, "--output", str(tmp_path / "one"))
    saved = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert list(saved["average_precision"]) == ["0", "1", "2", "3"]
    assert "avg prec" in stdout and f"{saved['mean_average_precision']:.4f}" in stdout
    assert_png(tmp_path / "one" / "pr_curves.png")

    model, meta = load_checkpoint_model(bands_checkpoint, noisy)
    images, labels = read_samples(meta, "test", data_url=noisy)
    # the precision evaluate runs at (the run's train.precision: bf16 autocast on CPU); fp32
    # logits move the AP by more than the tolerance on some CPUs
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, resolve_precision("auto", cpu))():
        probs = model(torch.from_numpy(images)).float().softmax(1)
    # evaluate bins the scores (1000 bins, summed across ranks): a confident model puts many
    # scores in one bin, so compare with the exact AP of the scores as binned
    binned = (probs.clamp(0, 1) * 1000).floor().clamp(max=999)
    exact = [exact_average_precision(binned[:, c], labels == c) for c in range(4)]
    ap = list(saved["average_precision"].values())
    assert ap == pytest.approx(exact, abs=0.01)
    assert 0.3 < min(ap) and max(ap) < 0.95, "labels too clean or too noisy for AP to tell anything"

    two = launch([bands_checkpoint, "--data", noisy, "--out", str(tmp_path / "two")],  # the old name still works
                 nproc=2, script=REPO / "jobs" / "evaluate.py", check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (json.loads((tmp_path / "two" / "metrics.json").read_text())["average_precision"]
            == saved["average_precision"])


def test_on_batch_sees_each_batch_with_its_labels_under_test_time_views(bands_checkpoint, noisy_bands_dataset):
    """The hook evaluate_checkpoint gives `evaluate`: over 7 batches, with mirror and shifted
    views, the curves equal the exact AP of the test-time-view probabilities, and evaluate's own
    accuracy is that of the same logits."""
    import contextlib

    from imgcls.config import DataConfig
    from imgcls.data import ShardReader
    from imgcls.evaluation import evaluate, tta_logits
    from imgcls.export import read_samples
    from imgcls.inference import load_checkpoint_model

    noisy = noisy_bands_dataset
    model, meta = load_checkpoint_model(bands_checkpoint, noisy)
    reader = ShardReader(DataConfig(url=noisy, eval_batch_size=32, num_workers=0, mean=meta["mean"], std=meta["std"]),
                         "test", train=False)
    curves = PrecisionRecallCurves(4)
    result = evaluate(model, reader, torch.device("cpu"), contextlib.nullcontext, 4, flip=True, shift=True,
                      on_batch=lambda logits, labels: curves.update(logits.softmax(1), labels))
    assert result["count"] == 200 and curves.support.sum() == 200

    images, labels = read_samples(meta, "test", data_url=noisy)
    model.eval()  # evaluate leaves its model in training mode
    with torch.no_grad():
        logits = tta_logits(model, torch.from_numpy(images), flip=True, shift=True)
    probs = logits.softmax(1)
    assert result["acc"] == pytest.approx((logits.argmax(1).numpy() == labels).mean())
    exact = [exact_average_precision(probs[:, c], labels == c) for c in range(4)]
    assert curves.average_precision.tolist() == pytest.approx(exact, abs=0.01)
