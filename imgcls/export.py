"""Export a checkpoint for deployment and check the export; INT8 post-training quantization.

- `export_checkpoint` writes ONNX (dynamic batch axis) or TorchScript from the checkpoint's
  EMA weights (when it has them) in fp32, with the metadata beside and inside the file (see
  imgcls/inference.py), then loads the file back (onnxruntime, torch.jit.load) and compares
  its logits with the PyTorch model's on real samples of the dataset.
- `quantize_int8` is onnxruntime's static quantization (QDQ, per-channel weights), calibrated
  on samples the caller reads with `read_samples` (typically a seeded draw from the train split).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from imgcls.inference import (META_KEY, Predictor, load_checkpoint_model, load_torchscript, quiet_torchscript,
                              write_sidecar)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
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


def read_samples(meta: dict, split: str, limit: int = 0, data_url: str = "",
                 seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,C,H,W] float32 normalised as in training, labels [N]) of a split, without
    augmentation; the first `limit` (0: all). Manifest order, or with `seed` the training
    reader's seeded order (shards and the samples inside them permuted)."""
    from imgcls.augment import AugmentConfig
    from imgcls.data import DataConfig, DataError, ShardReader

    cfg = DataConfig(url=data_url or meta["data_url"], batch_size=64, eval_batch_size=256, num_workers=0,
                     mean=meta["mean"], std=meta["std"], augment=AugmentConfig(enabled=False))
    reader = ShardReader(cfg, split, train=seed is not None, seed=seed or 0)
    images, labels, count = [], [], 0
    for batch in reader:
        images.append(reader.transform(batch).numpy())
        labels.append(batch["label"].numpy())
        count += len(batch["label"])
        if limit and count >= limit:
            break
    if not count:
        raise DataError(f"{cfg.url}: no samples read from split {split!r}")
    return np.concatenate(images)[:limit or None], np.concatenate(labels)[:limit or None]


def compare(reference: Predictor, candidate: Predictor, images: np.ndarray, batch_size: int = 256) -> dict:
    """Max absolute logit difference and top-1 agreement of two models on the same images."""
    diff, agree = 0.0, 0
    for i in range(0, len(images), batch_size):
        a, b = reference(images[i:i + batch_size]), candidate(images[i:i + batch_size])
        diff = max(diff, float(np.abs(a - b).max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
    return {"samples": len(images), "max_abs_diff": diff, "top1_agreement": agree / len(images)}


def accuracy(predictor: Predictor, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    correct = sum(int((predictor(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def export_checkpoint(checkpoint_url: str, fmt: str = "onnx", out: str | Path = "", data_url: str = "",
                      split: str = "test", check_samples: int = 1000, threads: int = 0) -> dict:
    """Export, load the file back and compare it with the PyTorch model on `check_samples`
    samples of `split` (0: all). Returns the paths and the check's numbers."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model, meta = load_checkpoint_model(checkpoint_url, data_url)
    path = Path(out or default_output(checkpoint_url, fmt))
    if fmt == "onnx":
        export_onnx(model, meta, path)
        loaded = Predictor.from_onnx(path, threads=threads)
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

        def __init__(self):
            self.feeds = iter([{meta["input"]: calibration[i:i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self.feeds, None)

    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph optimisation first, as onnxruntime recommends
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(int8_path), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # a BatchNormalization left unfolded (fast_cnn: conv, maxpool, BN) has 1-D
                        # per-channel scales: axis 0, not the default 1 (which falls back to per-tensor)
                        extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})
    meta = {**meta, "quantization": {"kind": "static int8", "format": "QDQ", "per_channel": True,
                                     "calibration_samples": len(calibration), "from": str(fp32_path)}}
    _set_onnx_metadata(int8_path, meta)
    write_sidecar(int8_path, meta)
    return int8_path
