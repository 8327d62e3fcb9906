"""Export a checkpoint for deployment and check the export; INT8 post-training quantization.

- `export_checkpoint` writes ONNX (dynamic batch axis), TorchScript or TFLite (batch 1) from
  the checkpoint's EMA weights (when it has them) in fp32, with the metadata beside and inside
  the file (see imgcls/inference.py), then loads the file back (onnxruntime, torch.jit.load,
  the LiteRT interpreter) and compares its logits with the PyTorch model's on real samples of
  the dataset.
- `quantize_int8` is onnxruntime's static quantization (QDQ, per-channel weights), calibrated
  on samples the caller reads with `read_samples` (typically a seeded draw from the train split).
- `quantize_tflite_int8` is litert-torch's static PT2E quantization (per-channel int8 weights,
  int8 activations, integer input and output), calibrated the same way.

TFLite needs the optional extra `pip install -e .[tflite]` (litert-torch, ai-edge-litert):
imported only when a TFLite file is written or read.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from imgcls.inference import (
    META_KEY,
    TORCHSCRIPT_SUFFIX,
    Predictor,
    load_checkpoint_model,
    load_torchscript,
    quiet_torchscript,
    tflite_with_metadata,
    write_sidecar,
)
from imgcls.progress import TaskProgress

FORMATS = ("onnx", "torchscript", "tflite")
SUFFIXES = {"onnx": ".onnx", "torchscript": TORCHSCRIPT_SUFFIX, "tflite": ".tflite"}
OPSET = 17  # QDQ per-channel needs >= 13; 17 is read by every current runtime


def default_output(checkpoint_url: str, fmt: str) -> Path:
    """Beside a local checkpoint (best.pt -> best.onnx), else in the current directory."""
    name = checkpoint_url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".pt") + SUFFIXES[fmt]
    return Path(name) if "://" in checkpoint_url else Path(checkpoint_url).with_name(name)


def _example_input(meta: dict) -> torch.Tensor:
    image = meta["image"]
    if image["height"] is None or image["width"] is None:
        raise ValueError("the dataset has no fixed image size (manifest image.height/width); cannot export")
    return torch.zeros(1, image["channels"], image["height"], image["width"])


def _set_onnx_metadata(path: Path, meta: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    for prop in [p for p in proto.metadata_props if p.key == META_KEY]:
        proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_onnx(model: torch.nn.Module, meta: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript-based exporter, deprecated (it warns) but complete: the dynamo one,
        # the default, needs onnxscript, which this project does not install
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (_example_input(meta),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[meta["input"]], output_names=[meta["output"]],
                          dynamic_axes={meta["input"]: {0: "batch"}, meta["output"]: {0: "batch"}})
    _set_onnx_metadata(path, meta)
    write_sidecar(path, meta)
    return path


def export_torchscript(model: torch.nn.Module, meta: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), quiet_torchscript():
        # traced (our models have no data-dependent control flow; the check below would catch
        # it), then frozen: BatchNorm folded into the convolutions, weights inlined
        module = torch.jit.freeze(torch.jit.trace(model, _example_input(meta)))
        torch.jit.save(module, str(path), _extra_files={META_KEY + ".json": json.dumps(meta)})
    write_sidecar(path, meta)
    return path


@contextlib.contextmanager
def _quiet_conversion():
    """litert-torch prints a progress tree and logs every lowered op on the root logger at INFO."""
    import litert_torch

    litert_torch.config.show_progress = False
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    root.addFilter(_not_training_mode_warning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter from torch.export and jax
            yield
    finally:
        root.removeFilter(_not_training_mode_warning)
        root.setLevel(level)


def _not_training_mode_warning(record: logging.LogRecord) -> bool:
    # a PT2E-quantized graph cannot be switched by .eval() (it raises) and so still reports
    # training mode; move_exported_model_to_eval has already given it eval behaviour
    return not record.getMessage().startswith("Your model is converted in training mode")


class _GlobalMaxPool(torch.nn.Module):
    """AdaptiveMaxPool2d(1) as a max over H and W: the same numbers, and an op litert-torch
    lowers (it has no lowering for aten.adaptive_max_pool2d; fast_cnn ends with one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3), keepdim=True)


def litert_compatible(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every global AdaptiveMaxPool2d replaced by `_GlobalMaxPool`."""
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if (isinstance(module, torch.nn.AdaptiveMaxPool2d) and not module.return_indices
                and module.output_size in (1, (1, 1))):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, _GlobalMaxPool())
    return model


def _litert_convert(model: torch.nn.Module, example: torch.Tensor, **kwargs) -> bytes:
    import litert_torch

    with _quiet_conversion():
        return litert_torch.convert(model, (example,), **kwargs).model_content()


def _write_tflite(flatbuffer: bytes, meta: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tflite_with_metadata(flatbuffer, meta))
    write_sidecar(path, meta)
    return path


def export_tflite(model: torch.nn.Module, meta: dict, path: str | Path) -> Path:
    """fp32 TFLite with a batch of 1, the layout of the PyTorch model (NCHW input)."""
    return _write_tflite(_litert_convert(litert_compatible(model).eval(), _example_input(meta)), meta, path)


def quantize_tflite_int8(model: torch.nn.Module, meta: dict, calibration: np.ndarray, path: str | Path) -> Path:
    """Static INT8 TFLite through litert-torch's PT2E quantizer: per-channel symmetric int8
    weights, int8 activations observed on `calibration` (normalised images [N,C,H,W])."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    example = _example_input(meta)
    with _quiet_conversion():
        prepared = prepare_pt2e(torch.export.export(litert_compatible(model).eval(), (example,)).module(), quantizer)
        move_exported_model_to_eval(prepared)
        with torch.no_grad(), TaskProgress("TFLite calibration", len(calibration)) as progress:
            for image in calibration:  # batch 1, the shape the graph was exported with
                prepared(torch.from_numpy(image[None]))
                progress.update(1)
        quantized = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=False))
    flatbuffer = _litert_convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    meta = {**meta, "quantization": {"kind": "static int8", "format": "TFLite (litert-torch PT2E)",
                                     "per_channel": True, "calibration_samples": len(calibration)}}
    return _write_tflite(flatbuffer, meta, path)


def read_samples(meta: dict, split: str, limit: int = 0, data_url: str = "",
                 seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,C,H,W] float32 normalised as in training, labels [N]) of a split, without
    augmentation; the first `limit` (0: all). Manifest order, or with `seed` the training
    reader's seeded order (shards and the samples inside them permuted)."""
    from imgcls.config import AugmentConfig, DataConfig
    from imgcls.data import DataError, ShardReader

    cfg = DataConfig(url=data_url or meta["data_url"], batch_size=64, eval_batch_size=256, num_workers=0,
                     mean=meta["mean"], std=meta["std"], augment=AugmentConfig(enabled=False),
                     image_size=meta.get("image_size", 0), crop_pct=meta.get("crop_pct", 0.875))
    reader = ShardReader(cfg, split, train=seed is not None, seed=seed or 0)
    images, labels, count = [], [], 0
    with TaskProgress(f"read {split} samples", min(limit or reader.split_count(), reader.split_count())) as progress:
        for batch in reader:
            images.append(reader.transform(batch).cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
            count += len(batch["label"])
            progress.update(len(batch["label"]))
            if limit and count >= limit:
                break
    if not count:
        raise DataError(f"{cfg.url}: no samples read from split {split!r}")
    return np.concatenate(images)[:limit or None], np.concatenate(labels)[:limit or None]


def compare(reference: Predictor, candidate: Predictor, images: np.ndarray, batch_size: int = 256) -> dict:
    """Max absolute logit difference and top-1 agreement of two models on the same images."""
    diff, agree = 0.0, 0
    with TaskProgress(f"check {candidate.kind} against {reference.kind}", len(images)) as progress:
        for i in range(0, len(images), batch_size):
            a, b = reference(images[i:i + batch_size]), candidate(images[i:i + batch_size])
            diff = max(diff, float(np.abs(a - b).max()))
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            progress.update(len(a))
    return {"samples": len(images), "max_abs_diff": diff, "top1_agreement": agree / len(images)}


def accuracy(predictor: Predictor, images: np.ndarray, labels: np.ndarray, batch_size: int = 256,
             name: str = "") -> float:
    correct = 0
    with TaskProgress(f"{name or predictor.kind} accuracy", len(images)) as progress:
        for i in range(0, len(images), batch_size):
            correct += int((predictor(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
            progress.update(len(images[i:i + batch_size]))
    return correct / len(images)


def validation_reference(model: torch.nn.Module, meta: dict, split: str, limit: int, data_url: str = "") -> dict:
    """The model's reference behaviour on `limit` samples of `split` (0: all), for serve's
    live monitoring (imgcls/reference.py)."""
    from imgcls.reference import reference_behaviour

    images, labels = read_samples(meta, split, limit, data_url)
    predictor = Predictor.from_torch(model, meta)
    logits = np.concatenate([predictor(images[i:i + 256]) for i in range(0, len(images), 256)])
    return reference_behaviour(logits, labels, split)


def export_checkpoint(checkpoint_url: str, fmt: str = "onnx", out: str | Path = "", data_url: str = "",
                      split: str = "test", check_samples: int = 1000, threads: int = 0,
                      reference_split: str = "val", reference_samples: int = 5000) -> dict:
    """Export, load the file back and compare it with the PyTorch model on `check_samples`
    samples of `split` (0: all). The metadata records the model's behaviour on
    `reference_samples` of `reference_split` (meta["reference"]; skipped with a warning when
    the dataset has no such split). Returns the paths and the check's numbers."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model, meta = load_checkpoint_model(checkpoint_url, data_url)
    from imgcls.data import read_manifest

    if reference_split in read_manifest(data_url or meta["data_url"])["splits"]:
        meta["reference"] = validation_reference(model, meta, reference_split, reference_samples, data_url)
    elif reference_split:
        logging.getLogger(__name__).warning("no %r split in %s: the export records no reference behaviour",
                                            reference_split, data_url or meta["data_url"])
    path = Path(out or default_output(checkpoint_url, fmt))
    if fmt == "onnx":
        export_onnx(model, meta, path)
        loaded = Predictor.from_onnx(path, threads=threads)
    elif fmt == "tflite":
        export_tflite(model, meta, path)
        loaded = Predictor.from_tflite(path, threads=threads)
    else:
        export_torchscript(model, meta, path)
        loaded = Predictor.from_torch(load_torchscript(path), meta, "torchscript")
    images, _ = read_samples(meta, split, check_samples, data_url)
    check = compare(Predictor.from_torch(model, meta), loaded, images)
    return {"format": fmt, "path": str(path), "sidecar": f"{path}.json", "bytes": path.stat().st_size,
            "weights": meta["weights"], "split": split, **check, "meta": meta}


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray, meta: dict) -> Path:
    """Static INT8 quantization: QDQ format, per-channel int8 weights, uint8 activations with
    MinMax ranges from `calibration` (normalised images [N,C,H,W])."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        """One feed per batch of 64, then None."""

        def __init__(self, progress: TaskProgress):
            self.feeds = iter([{meta["input"]: calibration[i:i + 64]} for i in range(0, len(calibration), 64)])
            self.progress = progress

        def get_next(self):
            feed = next(self.feeds, None)
            if feed is not None:
                self.progress.update(len(feed[meta["input"]]))  # counted as handed out; each is run before the next
            return feed

    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph optimisation first, as onnxruntime recommends
        quant_pre_process(str(fp32_path), str(prepared))
        with TaskProgress("ONNX calibration", len(calibration)) as progress:
            quantize_static(str(prepared), str(int8_path), Calibration(progress), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            # a BatchNormalization left unfolded (fast_cnn: conv, maxpool, BN) has 1-D
                            # per-channel scales: axis 0, not the default 1 (which falls back to per-tensor)
                            extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})
    meta = {**meta, "quantization": {"kind": "static int8", "format": "QDQ", "per_channel": True,
                                     "calibration_samples": len(calibration), "from": str(fp32_path)}}
    _set_onnx_metadata(int8_path, meta)
    write_sidecar(int8_path, meta)
    return int8_path
