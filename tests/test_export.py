"""Export and deployment on a model trained once for the session (the bands dataset, one
process): ONNX, TorchScript and TFLite parity with PyTorch, INT8 quantization (ONNX Runtime and
TFLite), and predict on image files."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from imgcls.export import read_samples
from imgcls.inference import load_checkpoint_model, load_torchscript, tflite_metadata
from tests.conftest import job, last_json


@pytest.fixture(scope="module")
def trained(bands_checkpoint) -> str:
    return bands_checkpoint


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
    reference = sidecar["reference"]  # serve's monitoring baseline: the validation split
    assert reference["split"] == "val" and reference["samples"] == 400 and 0.25 < reference["accuracy"] <= 1
    assert 0.04 <= reference["abnormal"]["validation_flagged"] <= 0.06
    props = {p.key: p.value for p in onnx.load(onnx_export["path"]).metadata_props}
    assert json.loads(props["imgcls"]) == sidecar


@pytest.fixture(scope="module")
def torchscript_export(trained) -> tuple[str, dict]:
    stdout, _, code = job("export", trained, "--format", "torchscript", "--check-samples", "0")
    assert code == 0
    return stdout, last_json(stdout)


@pytest.fixture(scope="module")
def tflite_export(trained) -> dict:
    stdout, _, code = job("export", trained, "--format", "tflite", "--check-samples", "0", "--threads", "1")
    assert code == 0 and "top-1 agreement 100.00%" in stdout
    return last_json(stdout)


def test_torchscript_export_loads_back_with_parity(torchscript_export, reference):
    model, meta, images, labels, logits = reference
    stdout, result = torchscript_export
    assert "top-1 agreement 100.00%" in stdout
    assert result["path"].endswith("best.torchscript.pt") and result["samples"] == 200
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0
    extra = {"imgcls.json": ""}
    module = load_torchscript(result["path"], extra)
    assert json.loads(extra["imgcls.json"])["classes"] == ["0", "1", "2", "3"]
    with torch.no_grad():
        out = module(torch.from_numpy(images[:7])).numpy()
    assert np.abs(out - logits[:7]).max() < 1e-4


def test_tflite_export_matches_pytorch_in_the_litert_interpreter_with_metadata(trained, tflite_export, reference):
    from ai_edge_litert.interpreter import Interpreter

    model, meta, images, labels, logits = reference
    assert tflite_export["path"] == trained.removesuffix(".pt") + ".tflite" and tflite_export["weights"] == "ema"
    assert tflite_export["samples"] == 200 and tflite_export["max_abs_diff"] < 1e-4
    assert tflite_export["top1_agreement"] == 1.0

    # our own check, straight through the interpreter: a batch of 1, NCHW, fp32
    interpreter = Interpreter(model_path=tflite_export["path"])
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert list(inp["shape"]) == [1, 1, 12, 12] and inp["dtype"] == np.float32
    for i in range(5):
        interpreter.set_tensor(inp["index"], images[i:i + 1])
        interpreter.invoke()
        assert np.abs(interpreter.get_tensor(out["index"]) - logits[i:i + 1]).max() < 1e-4

    sidecar = json.loads(open(tflite_export["sidecar"]).read())
    assert sidecar["classes"] == ["0", "1", "2", "3"] and sidecar["std"] == [0.25] and sidecar["weights"] == "ema"
    with open(tflite_export["path"], "rb") as f:
        assert tflite_metadata(f.read()) == sidecar


def test_export_fails_beyond_atol(trained, tmp_path):
    stdout, stderr, code = job("export", trained, "--format", "tflite", "--check-samples", "20", "--atol", "1e-12",
                               "--output", str(tmp_path / "strict.tflite"))
    assert code == 1 and last_json(stdout)["max_abs_diff"] > 1e-12
    assert "differs from the PyTorch model by more than --atol 1e-12" in stderr


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


def test_tflite_int8_joins_the_onnx_int8_table(onnx_export, tflite_export, reference):
    from ai_edge_litert.interpreter import Interpreter

    *_, labels, logits = reference
    stdout, _, result = job("quantize", onnx_export["path"], "--calibration-samples", "128", "--reps", "3",
                            "--threads", "1", "--tflite")
    assert all(f"| {name} |" in stdout for name in ("fp32", "int8", "tflite fp32", "tflite int8"))
    fp32, int8 = result["tflite fp32"], result["tflite int8"]
    assert fp32["accuracy"] == (logits.argmax(1) == labels).mean() > 0.9
    assert int8["accuracy"] >= fp32["accuracy"] - 0.02
    assert int8["bytes"] < 0.6 * fp32["bytes"] and result["tflite_size_ratio"] == int8["bytes"] / fp32["bytes"]
    assert int8["batch1"]["median_ms"] > 0 and int8["batch1"]["reps"] == 3
    interpreter = Interpreter(model_path=int8["path"])
    assert interpreter.get_input_details()[0]["dtype"] == np.int8  # fully integer, not just int8 weights
    meta = json.loads(open(int8["path"] + ".json").read())
    assert meta["classes"] == ["0", "1", "2", "3"] and meta["quantization"]["calibration_samples"] == 128


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


@pytest.mark.parametrize("source,output", [("checkpoint", "json"), ("onnx", "csv"), ("tflite", "json")])
def test_predict_classifies_files_and_reports_the_corrupt_one(source, output, trained, onnx_export, tflite_export,
                                                              image_folder, tmp_path):
    folder, known = image_folder
    model = {"checkpoint": trained, "onnx": onnx_export["path"], "tflite": tflite_export["path"]}[source]
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


def test_predict_refuses_a_torchscript_file_named_like_a_checkpoint(torchscript_export, image_folder, tmp_path):
    folder, known = image_folder
    renamed = tmp_path / "best.pt"
    shutil.copy(torchscript_export[1]["path"], renamed)
    image = next(iter(known))
    stdout, stderr, code = job("predict", str(renamed), image)
    assert code == 2 and stdout == ""
    assert stderr.strip().count("\n") == 0, f"not a one-line error: {stderr}"
    assert str(renamed) in stderr and "TorchScript archive, not a checkpoint" in stderr
    # asked for explicitly, the same file loads (its metadata read from the archive, not by running it)
    stdout, _, code = job("predict", str(renamed), image, "--format", "torchscript", "--top-k", "1")
    assert code == 0 and stdout.split("\t")[1].split(" ")[0] == known[image][1]


def test_tflite_export_of_fast_cnn_whose_global_max_pool_litert_cannot_lower(tmp_path):
    """fast_cnn (the default recipe's model) ends in AdaptiveMaxPool2d(1), which litert-torch
    has no lowering for; the export swaps in an equal max over H and W."""
    from imgcls.config import ModelConfig
    from imgcls.export import export_tflite
    from imgcls.inference import META_FORMAT, Predictor
    from imgcls.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="fast_cnn", width=8), 10, 1).eval()
    assert any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in model.modules())
    meta = {"format": META_FORMAT, "classes": [str(i) for i in range(10)], "image": {"height": 28, "width": 28,
            "channels": 1}, "mean": [0.5], "std": [0.5], "input": "image", "output": "logits"}
    path = export_tflite(model, meta, tmp_path / "fast.tflite")
    images = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert np.abs(Predictor.from_tflite(path)(images) - expected).max() < 1e-4
    assert any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in model.modules()), "the model itself was changed"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="checks the CPU fallback")
def test_onnx_on_a_cuda_device_without_onnxruntime_gpu_runs_on_the_cpu_with_one_line(onnx_export, reference, caplog):
    from imgcls.inference import Predictor, onnx_providers

    _, _, images, _, logits = reference
    with caplog.at_level("INFO", logger="imgcls.inference"):
        assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
        assert caplog.records == []
        predictor = Predictor.from_onnx(onnx_export["path"], device=torch.device("cuda"))
    assert [r.getMessage() for r in caplog.records] == [
        f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu: pip install -e "
        ".[deploy-gpu]): the ONNX model runs on the CPU"]
    np.testing.assert_allclose(predictor(images[:8]), logits[:8], atol=1e-4)
