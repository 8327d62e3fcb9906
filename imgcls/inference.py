"""Run a trained classifier outside the trainer: from a checkpoint, an ONNX file or a TorchScript file.

Every model comes with its metadata (`meta`): class names, input shape and the normalisation
it was trained with, so raw images can be prepared exactly as the shard reader prepares them:

    {"format": "imgcls.model/1", "classes": [...], "image": {"height", "width", "channels"},
     "mean": [...], "std": [...], "model": "simple_cnn", "weights": "ema" | "model",
     "checkpoint": URL, "data_url": URL, "input": "image", "output": "logits"}

An export keeps it beside the file (MODEL.json) and inside it (ONNX metadata_props, a
TorchScript extra file), so either is enough on its own.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

META_FORMAT = "imgcls.model/1"
META_KEY = "imgcls"              # ONNX metadata_props key; TorchScript extra file is META_KEY + ".json"


# ---- metadata -------------------------------------------------------------------------
def sidecar_path(model_path: str | Path) -> Path:
    return Path(f"{model_path}.json")


def write_sidecar(model_path: str | Path, meta: dict) -> Path:
    path = sidecar_path(model_path)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(model_path: str | Path) -> dict:
    """The metadata of an exported model: its sidecar, else what the file itself holds."""
    sidecar = sidecar_path(model_path)
    if sidecar.exists():
        return json.loads(sidecar.read_text())
    if str(model_path).endswith(".onnx"):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
        if META_KEY in props:
            return json.loads(props[META_KEY])
    elif is_torchscript(model_path):
        extra = {META_KEY + ".json": ""}
        load_torchscript(model_path, extra)
        if extra[META_KEY + ".json"]:
            return json.loads(extra[META_KEY + ".json"])
    raise ValueError(f"{model_path}: no metadata (neither {sidecar.name} nor embedded); re-export it "
                     f"with jobs/export.py")


def checkpoint_meta(state: dict, manifest: dict, weights: str, checkpoint_url: str, data_url: str) -> dict:
    from imgcls.config import from_dict

    cfg = from_dict(state["config"])
    image = manifest["image"]
    channels = image["channels"]
    return {
        "format": META_FORMAT,
        "classes": manifest["classes"],
        "image": {"height": image.get("height"), "width": image.get("width"), "channels": channels},
        # the shard reader's normalisation, including its default of 0.5 per channel
        "mean": cfg.data.mean or [0.5] * channels,
        "std": cfg.data.std or [0.5] * channels,
        "model": cfg.model.name,
        "weights": weights,
        "checkpoint": checkpoint_url,
        "data_url": data_url,
        "input": "image",
        "output": "logits",
    }


# ---- models ---------------------------------------------------------------------------
def load_checkpoint_model(checkpoint_url: str, data_url: str = "",
                          use_ema: bool = True) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, meta) for a checkpoint, with the EMA weights when it has them
    (as evaluation does). The class names come from the dataset's manifest."""
    from imgcls import checkpoint
    from imgcls.data import read_manifest
    from imgcls.evaluation import model_from_checkpoint

    state = checkpoint.load(checkpoint_url)
    data_url = data_url or state["config"]["data"]["url"]
    manifest = read_manifest(data_url)
    model, kind = model_from_checkpoint(state, len(manifest["classes"]), manifest["image"]["channels"], use_ema)
    model = model.float()
    return model, checkpoint_meta(state, manifest, kind, checkpoint_url, data_url)


@contextlib.contextmanager
def quiet_torchscript():
    # TorchScript is deprecated upstream (FutureWarning on every call) but still the format
    # libtorch/C++ and mobile runtimes load; ONNX is the project's exchange format.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def load_torchscript(path: str | Path, extra_files: dict | None = None) -> torch.jit.ScriptModule:
    with quiet_torchscript():
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive holds compiled code (`*/code/...`); a torch.save checkpoint does not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def onnx_session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Predictor:
    """logits = predictor(images) on float32 NCHW numpy arrays, normalised as `meta` says."""

    def __init__(self, run, meta: dict, kind: str):
        self.run, self.meta, self.kind = run, meta, kind

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(images, dtype=np.float32))

    @classmethod
    def from_torch(cls, module: torch.nn.Module, meta: dict, kind: str = "pytorch") -> Predictor:
        def run(images):
            with torch.inference_mode():
                return module(torch.from_numpy(images)).float().numpy()
        return cls(run, meta, kind)

    @classmethod
    def from_onnx(cls, path: str | Path, meta: dict | None = None, threads: int = 0) -> Predictor:
        session = onnx_session(path, threads)
        name = session.get_inputs()[0].name
        return cls(lambda images: session.run(None, {name: images})[0], meta or read_meta(path), "onnx")


def open_model(path: str, threads: int = 0, data_url: str = "") -> Predictor:
    """A Predictor for an ONNX file, a TorchScript file or a checkpoint (local path or URL)."""
    if threads:
        torch.set_num_threads(threads)
    if path.endswith(".onnx"):
        return Predictor.from_onnx(path, threads=threads)
    if Path(path).is_file() and is_torchscript(path):
        return Predictor.from_torch(load_torchscript(path), read_meta(path), "torchscript")
    model, meta = load_checkpoint_model(path, data_url)
    return Predictor.from_torch(model, meta)


# ---- images ---------------------------------------------------------------------------
def load_image(path: str | Path, meta: dict) -> np.ndarray:
    """One image file as the model's input [C, H, W] float32: the model's channels (L or RGB),
    its size (bilinear), then /255 and (x - mean) / std, as the shard reader does."""
    from PIL import Image, ImageOps

    image = meta["image"]
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # photos: the orientation the camera meant
        im = im.convert("L" if image["channels"] == 1 else "RGB")
        size = (image["width"], image["height"])
        if None not in size and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        array = np.asarray(im, dtype=np.float32) / 255
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    mean = np.asarray(meta["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["std"], dtype=np.float32)[:, None, None]
    return (array - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ---- timing ---------------------------------------------------------------------------
class TimedCall:
    """fn(x), warmed up; rep() is the mean per-call latency (ms) of one repetition, which runs
    enough calls to last ~min_rep_seconds so timer resolution and per-call jitter average out."""

    def __init__(self, fn, x, min_rep_seconds: float = 0.05):
        self.fn, self.x = fn, x
        start = time.perf_counter()
        for _ in range(3):
            fn(x)
        per_call = (time.perf_counter() - start) / 3
        self.calls = max(1, round(min_rep_seconds / max(per_call, 1e-6)))

    def rep(self) -> float:
        start = time.perf_counter()
        for _ in range(self.calls):
            self.fn(self.x)
        return (time.perf_counter() - start) / self.calls * 1e3


def compare_latency(runners: dict, inputs: list[np.ndarray], reps: int = 20,
                    min_rep_seconds: float = 0.05) -> dict[tuple[str, int], dict]:
    """{(runner name, batch size): latency summary} for every runner on every input batch.
    Repetitions are interleaved (a, b, c, a, b, c, ...) so machine load hits all alike."""
    timers = {(name, len(x)): TimedCall(fn, x, min_rep_seconds) for name, fn in runners.items() for x in inputs}
    ms = {key: [] for key in timers}
    for _ in range(reps):
        for key, timer in timers.items():
            ms[key].append(timer.rep())
    return {key: summarize(values, key[1]) for key, values in ms.items()}


def summarize(ms: list[float], batch: int) -> dict:
    median = statistics.median(ms)
    return {"batch": batch, "median_ms": median, "mean_ms": statistics.fmean(ms),
            "std_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0, "reps": len(ms),
            "images_per_s": batch / median * 1e3}
