"""Export and deployment on a model trained once for the module (the bands dataset, one
process): ONNX and TorchScript parity with PyTorch, INT8 quantization, and predict on image files."""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from imgcls.export import read_samples
from imgcls.inference import load_checkpoint_model, load_torchscript
from tests.conftest import REPO, build_bands_dataset

SMALL = [
    "model.name=simple_cnn", "model.width=16", "data.batch_size=32", "data.eval_batch_size=200",
    "data.num_workers=0", "optim.lr=0.05", "optim.base_batch=64", "train.epochs=2",
    "track.wandb=disabled", "track.progress=false", "data.mean=[0.5]", "data.std=[0.25]",
    "train.ema_decay=0.9",
]


def job(name: str, *args: str):
    """(stdout, stderr, return value) of jobs/NAME.py's main(args), run in this process: a new
    interpreter would spend seconds importing torch and onnxruntime for each call."""
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = module.main(list(args))
    return stdout.getvalue(), stderr.getvalue(), result


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """best.pt of a 2-epoch run (EMA weights) on the 4-class bands dataset (200 test samples)."""
    work = tmp_path_factory.mktemp("export")
    data = build_bands_dataset(work / "data")
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--config", "", f"data.url={data}",
                          f"run.dir={work / 'run'}", *SMALL], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"training failed:\n{out.stderr[-3000:]}"
    return str(work / "run" / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def reference(trained):
    """The PyTorch model (EMA weights), its metadata and the test split."""
    model, meta = load_checkpoint_model(trained)
    images, labels = read_samples(meta, "test")
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    return model, meta, images, labels, logits


@pytest.fixture(scope="module")
def onnx_export(trained) -> dict:
    stdout, _, code = job("export", trained, "--format", "onnx", "--check-samples", "0", "--threads", "1")
    assert code == 0
    return last_json(stdout)


def test_onnx_export_matches_pytorch_with_a_dynamic_batch_and_metadata(trained, onnx_export, reference):
    model, meta, images, labels, logits = reference
    assert onnx_export["path"] == trained.removesuffix(".pt") + ".onnx" and onnx_export["weights"] == "ema"
    assert onnx_export["samples"] == 200 and onnx_export["max_abs_diff"] < 1e-4
    assert onnx_export["top1_agreement"] == 1.0

    # our own check: batch 1 and 7 through the same session, against the EMA model
    session = ort.InferenceSession(onnx_export["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for lo, hi in ((0, 1), (1, 8)):  # batches of 1 and 7
        out = session.run(None, {"image": images[lo:hi]})[0]
        assert out.shape == (hi - lo, 4) and np.abs(out - logits[lo:hi]).max() < 1e-4
        assert (out.argmax(1) == logits[lo:hi].argmax(1)).all()
    raw, _ = load_checkpoint_model(trained, use_ema=False)
    with torch.no_grad():
        assert np.abs(raw(torch.from_numpy(images[1:8])).numpy() - logits[1:8]).max() > 1e-3, \
            "the raw weights give the same logits: this test cannot tell that EMA was exported"

    sidecar = json.loads(open(onnx_export["sidecar"]).read())
    assert sidecar["classes"] == ["0", "1", "2", "3"]
    assert sidecar["image"] == {"height": 12, "width": 12, "channels": 1}
    assert sidecar["mean"] == [0.5] and sidecar["std"] == [0.25] and sidecar["weights"] == "ema"
    props = {p.key: p.value for p in onnx.load(onnx_export["path"]).metadata_props}
    assert json.loads(props["imgcls"]) == sidecar


def test_torchscript_export_loads_back_with_parity(trained, reference):
    model, meta, images, labels, logits = reference
    stdout, _, code = job("export", trained, "--format", "torchscript", "--check-samples", "0")
    result = last_json(stdout)
    assert code == 0 and "top-1 agreement 100.00%" in stdout
    assert result["path"].endswith("best.torchscript.pt") and result["samples"] == 200
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0
    extra = {"imgcls.json": ""}
    module = load_torchscript(result["path"], extra)
    assert json.loads(extra["imgcls.json"])["classes"] == ["0", "1", "2", "3"]
    with torch.no_grad():
        out = module(torch.from_numpy(images[:7])).numpy()
    assert np.abs(out - logits[:7]).max() < 1e-4


def test_int8_quantization_keeps_accuracy_and_shrinks_the_file(onnx_export, reference):
    *_, labels, logits = reference
    stdout, _, result = job("quantize", onnx_export["path"], "--calibration-samples", "256", "--reps", "3",
                            "--threads", "1")
    fp32, int8 = result["fp32"], result["int8"]
    assert "| int8 |" in stdout and "| fp32 |" in stdout and last_json(stdout) == result
    assert result["test_samples"] == 200 and result["calibration_samples"] == 256
    assert fp32["accuracy"] == (logits.argmax(1) == labels).mean()  # ONNX fp32 is the PyTorch model
    assert fp32["accuracy"] > 0.9, "the model barely learned: an accuracy drop would mean nothing"
    assert int8["accuracy"] >= fp32["accuracy"] - 0.02  # at most 2 percentage points lost
    assert int8["bytes"] < fp32["bytes"]
    for row in (fp32, int8):
        assert row["batch1"]["median_ms"] > 0 and row["batch64"]["batch"] == 64
    graph = onnx.load(int8["path"]).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in graph.initializer)
    assert json.loads(open(int8["path"] + ".json").read())["classes"] == ["0", "1", "2", "3"]
    assert json.loads(open(int8["path"].removesuffix(".onnx") + ".quantize.json").read()) == result


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, reference):
    """12 test samples as PNGs (half in a subfolder) plus one corrupt file;
    {path: (class name of the label, of the model's top-1)}."""
    model, meta, images, labels, logits = reference
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    known = {}
    for i in range(12):
        pixels = np.rint((images[i, 0] * meta["std"][0] + meta["mean"][0]) * 255).astype(np.uint8)
        path = folder / ("sub" if i % 2 else "") / f"sample{i}.png"
        Image.fromarray(pixels).save(path)
        known[str(path)] = (meta["classes"][labels[i]], meta["classes"][logits[i].argmax()])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    return folder, known


@pytest.mark.parametrize("source,output", [("checkpoint", "json"), ("onnx", "csv")])
def test_predict_classifies_files_and_reports_the_corrupt_one(source, output, trained, onnx_export, image_folder,
                                                              tmp_path):
    folder, known = image_folder
    model = trained if source == "checkpoint" else onnx_export["path"]
    images = [str(folder)] if source == "checkpoint" else [str(folder / "*.png"), str(folder / "sub" / "*.png")]
    dest = tmp_path / f"out.{output}"
    stdout, stderr, code = job("predict", model, *images, "--batch-size", "5", "--top-k", "3",
                               "--output", str(dest), "--threads", "1")
    assert code == 0 and "corrupt.png" in stderr
    assert all(name in stdout for name in known)

    if output == "json":
        rows = json.loads(dest.read_text())["predictions"]
        errors = {r["path"]: r["error"] for r in rows if "error" in r}
        top = {r["path"]: [t["class"] for t in r["top_k"]] for r in rows if "top_k" in r}
        probs = [[t["prob"] for t in r["top_k"]] for r in rows if "top_k" in r]
    else:
        with open(dest, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]
            rows = list(reader)
        errors = {r["path"]: r["error"] for r in rows if r["error"]}
        top = {r["path"]: [r[f"class_{k}"] for k in (1, 2, 3)] for r in rows if not r["error"]}
        probs = [[float(r[f"prob_{k}"]) for k in (1, 2, 3)] for r in rows if not r["error"]]
    assert list(errors) == [str(folder / "corrupt.png")] and errors[str(folder / "corrupt.png")]
    assert set(top) == set(known)
    assert all(p == sorted(p, reverse=True) and 0 < sum(p) <= 1 + 1e-6 for p in probs)
    # the files decode to exactly the test tensors, so the top-1 is the model's own prediction
    assert all(top[path][0] == pred for path, (_, pred) in known.items())
    assert sum(top[path][0] == label for path, (label, _) in known.items()) >= 10


def test_predict_fails_only_when_no_image_is_readable(onnx_export, image_folder):
    folder, _ = image_folder
    _, stderr, code = job("predict", onnx_export["path"], str(folder / "corrupt.png"), str(folder / "missing.png"))
    assert code == 1
    assert "corrupt.png" in stderr and "missing.png" in stderr
