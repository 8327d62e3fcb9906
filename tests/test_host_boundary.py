"""Where a tensor that may live on the GPU reaches numpy, a plot or a file. Every test runs on a
CPU, where .numpy() always works: the rule below and `on_device` make the CUDA failure show here."""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch

from imgcls.metrics import ConfusionMatrix, PrecisionRecallCurves
from tests.conftest import REPO, on_device

LIBRARY = ("imgcls", "shardio", "shards", "jobs", "bench", "scripts")


def test_numpy_is_only_called_on_a_tensor_brought_to_the_host():
    """`x.numpy()` raises for a CUDA tensor: library code writes `x.cpu().numpy()` (a no-op on the
    CPU), so the copy to the host is visible where it happens. No file or name is exempt."""
    offenders = []
    for folder in LIBRARY:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                        and not node.args):
                    receiver = node.func.value
                    to_host = (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute)
                               and receiver.func.attr == "cpu")
                    if not to_host:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_the_stand_in_fails_as_cuda_does():
    t = on_device(torch.arange(4))
    with pytest.raises(TypeError, match="cuda:0"):
        t.sum(0).numpy()
    with pytest.raises(TypeError, match="cuda:0"):
        np.asarray(t + 1)
    assert t.detach().cpu().numpy().tolist() == [0, 1, 2, 3] and t.to("cpu").numpy().sum() == 6


def device_metrics() -> tuple[ConfusionMatrix, PrecisionRecallCurves]:
    torch.manual_seed(0)
    logits, labels = torch.randn(60, 3), torch.arange(60) % 3
    confusion, curves = ConfusionMatrix(3), PrecisionRecallCurves(3, bins=50)
    confusion.update(logits, labels)
    curves.update(logits.softmax(1), labels)
    confusion.matrix, curves.counts = on_device(confusion.matrix), on_device(curves.counts)
    return confusion, curves


def test_evaluation_report_files_from_device_metrics(tmp_path):
    """evaluate_checkpoint's output step with the matrix and the curves still on the device
    (there, they are all-reduced): on main, `confusion.matrix.numpy()` raised after the whole split."""
    from imgcls.evaluation import write_report

    confusion, curves = device_metrics()
    classes = ["a", "b", "c"]
    report = confusion.classification_report(classes) + curves.report(classes)
    result = {**curves.to_json(classes), "per_class": confusion.to_json(classes), "acc": confusion.accuracy,
              "macro_f1": confusion.macro_f1, "balanced_acc": confusion.balanced_accuracy}
    write_report(str(tmp_path), result, report, confusion, curves, classes)
    saved = json.loads((tmp_path / "confusion.json").read_text())
    assert np.array(saved["matrix"]).sum() == 60
    assert json.loads((tmp_path / "metrics.json").read_text())["per_class"]["num_samples"] == 60
    assert (tmp_path / "confusion.png").stat().st_size > 1000 and (tmp_path / "pr_curves.png").stat().st_size > 1000


def test_epoch_plots_take_a_device_matrix(tmp_path):
    from imgcls.observe import EpochPlots

    confusion, _ = device_metrics()
    logged = []
    plots = EpochPlots(str(tmp_path), ["a", "b", "c"], lambda step, name, url: logged.append(step))
    plots.submit([{"step": 1, "train_loss": 1.0}], confusion.matrix, step=1)
    plots.close()
    assert logged == [1] and json.loads((tmp_path / "confusion_val.json").read_text())["matrix"]
