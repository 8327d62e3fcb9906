"""Run a trained classifier outside the trainer: from a checkpoint, an ONNX, a TorchScript or a TFLite file.

Every model comes with its metadata (`meta`): class names, input shape and the normalisation
it was trained with, so raw images can be prepared exactly as the shard reader prepares them:

    {"format": "imgcls.model/1", "classes": [...], "image": {"height", "width", "channels"},
     "mean": [...], "std": [...], "model": "simple_cnn", "weights": "ema" | "model",
     "checkpoint": URL, "data_url": URL, "input": "image", "output": "logits",
     "image_size": S, "crop_pct": 0.875}

`image` is the model's input size. `image_size` and `crop_pct`, present when the reader brings
images to S x S (photos), mean: resize the shorter side to S / crop_pct, then center-crop S
(imgcls.augment.eval_resize_crop, the reader's own evaluation transform); without them an
image is resized to `image` (fixed-size data).

An export keeps it beside the file (MODEL.json) and inside it (ONNX metadata_props, a
TorchScript extra file, a TFLite metadata entry), so either is enough on its own.

Trust: a checkpoint is read with torch.load(weights_only=True) and can hold only tensors and
plain data. TorchScript, ONNX and TFLite files are programs for their runtimes (TorchScript
even holds Python-like code): load them only from a trusted source. So `open_model` picks the
format from the name and never from the contents: `.onnx`, `.tflite`, `.torchscript.pt` (what
jobs/export.py writes) or an explicit `fmt="torchscript"`; anything else is a checkpoint, and a
TorchScript archive passed as one (say renamed best.pt) is refused, not executed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from shardio.image import MAX_PIXELS, Encoded, image_array

log = logging.getLogger(__name__)

META_FORMAT = "imgcls.model/1"
# ONNX metadata_props / TFLite metadata name; the TorchScript extra file is META_KEY + ".json"
META_KEY = "imgcls"
TORCHSCRIPT_SUFFIX = ".torchscript.pt"
MODEL_FORMATS = ("checkpoint", "onnx", "torchscript", "tflite")
_CPU = torch.device("cpu")  # the default `device` (immutable, so shared safely)


class UntrustedFormatError(ValueError):
    """A file whose format would run code, given where a checkpoint was expected."""


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
    elif str(model_path).endswith(".tflite"):
        embedded = tflite_metadata(Path(model_path).read_bytes())
        if embedded is not None:
            return embedded
    elif is_torchscript(model_path):
        # straight from the zip: torch.jit.load would deserialise the archive's code first
        with zipfile.ZipFile(model_path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + META_KEY + ".json")]
            if names:
                return json.loads(archive.read(names[0]))
    raise ValueError(f"{model_path}: no metadata (neither {sidecar.name} nor embedded); re-export it "
                     f"with jobs/export.py")


def tflite_with_metadata(flatbuffer: bytes, meta: dict) -> bytes:
    """The TFLite model with `meta` as JSON in its metadata entry META_KEY (replacing one there)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = META_KEY, len(model.buffers) - 1
    model.metadata = [m for m in model.metadata or [] if m.name != META_KEY.encode()] + [entry]
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_metadata(flatbuffer: bytes) -> dict | None:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == META_KEY.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


def checkpoint_meta(state: dict, manifest: dict, weights: str, checkpoint_url: str, data_url: str) -> dict:
    from imgcls.config import from_dict
    from imgcls.data import geometry, normalization

    cfg = from_dict(state["config"])
    image = manifest["image"]
    channels = image["channels"]
    mean, std = normalization(cfg.data, manifest)
    size, _ = geometry(cfg.data, manifest)
    height, width = (size, size) if size else (image.get("height"), image.get("width"))
    resize = {"image_size": size, "crop_pct": cfg.data.crop_pct} if size else {}
    return {
        "format": META_FORMAT,
        "classes": manifest["classes"],
        "image": {"height": height, "width": width, "channels": channels},
        **resize,
        "mean": mean,  # the shard reader's normalisation
        "std": std,
        "model": cfg.model.name,
        "weights": weights,
        "checkpoint": checkpoint_url,
        "data_url": data_url,
        "input": "image",
        "output": "logits",
        # multi-label: a sigmoid per class, and the probability threshold chosen on val
        **({"task": "multilabel", "threshold": state["progress"].get("threshold", 0.5)}
           if manifest.get("task") == "multilabel" else {}),
    }


# ---- models ---------------------------------------------------------------------------
def load_checkpoint_model(checkpoint_url: str, data_url: str = "",
                          use_ema: bool = True) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, meta) for a checkpoint, with the EMA weights when it has them
    (as evaluation does). The class names come from the dataset's manifest."""
    from imgcls.models.trained import load_model

    refuse_torchscript(checkpoint_url)
    try:
        trained = load_model(checkpoint_url, use_ema=use_ema, data_url=data_url)
    except RuntimeError as e:  # a remote TorchScript archive: torch's own refusal is a page long
        if "TorchScript" in str(e):
            raise UntrustedFormatError(_torchscript_refusal(checkpoint_url)) from None
        raise
    meta = checkpoint_meta(trained.state, trained.manifest, trained.weights, checkpoint_url, trained.config.data.url)
    return trained.model.float(), meta


@contextlib.contextmanager
def quiet_torchscript():
    # TorchScript is deprecated upstream (FutureWarning on every call) but still the format
    # libtorch/C++ and mobile runtimes load; ONNX is the project's exchange format.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def _torchscript_refusal(path: str) -> str:
    return (f"{path}: a TorchScript archive, not a checkpoint; it would run code when loaded. If it comes "
            f"from a trusted source, pass --format torchscript (or name it *{TORCHSCRIPT_SUFFIX})")


def refuse_torchscript(path: str) -> None:
    if Path(path).is_file() and is_torchscript(path):
        raise UntrustedFormatError(_torchscript_refusal(path))


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


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime's CUDA execution provider for a CUDA device when it has one (the
    onnxruntime-gpu wheel, `pip install -e .[deploy-gpu]`), else the CPU, said in one log line."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    log.warning("onnxruntime %s has no CUDAExecutionProvider (install onnxruntime-gpu: pip install -e .[deploy-gpu]): "
                "the ONNX model runs on the CPU", ort.__version__)
    return ["CPUExecutionProvider"]


def onnx_session(path: str | Path, threads: int = 0, device: torch.device = _CPU):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=onnx_providers(device))


class Predictor:
    """logits = predictor(images) on float32 NCHW numpy arrays, normalised as `meta` says."""

    def __init__(self, run, meta: dict, kind: str):
        self.run, self.meta, self.kind = run, meta, kind

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(images, dtype=np.float32))

    @classmethod
    def from_torch(cls, module: torch.nn.Module, meta: dict, kind: str = "pytorch",
                   device: torch.device = _CPU) -> Predictor:
        module = module.to(device)

        def run(images):
            with torch.inference_mode():
                return module(torch.from_numpy(images).to(device)).float().cpu().numpy()
        return cls(run, meta, kind)

    @classmethod
    def from_onnx(cls, path: str | Path, meta: dict | None = None, threads: int = 0,
                  device: torch.device = _CPU) -> Predictor:
        session = onnx_session(path, threads, device)
        name = session.get_inputs()[0].name
        return cls(lambda images: session.run(None, {name: images})[0], meta or read_meta(path), "onnx")

    @classmethod
    def from_tflite(cls, path: str | Path, meta: dict | None = None, threads: int = 0) -> Predictor:
        """The LiteRT interpreter. The graph has a fixed batch of 1 (litert-torch cannot lower
        our models with a dynamic batch), so a batch runs image by image; an INT8 model with
        integer input/output is fed and read through its scale and zero point."""
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=threads or None)
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

        def run_one(image: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(inp["index"], _quantize(image[None], inp))
            interpreter.invoke()
            return _dequantize(interpreter.get_tensor(out["index"]), out)[0]

        return cls(lambda images: np.stack([run_one(x) for x in images]), meta or read_meta(path), "tflite")


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return y
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def model_format(path: str, fmt: str = "") -> str:
    """The format of a model file: `fmt` when given, else by name only (see the module docstring)."""
    if fmt:
        if fmt not in MODEL_FORMATS:
            raise ValueError(f"unknown model format {fmt!r}; choose one of {', '.join(MODEL_FORMATS)}")
        return fmt
    for name, suffix in (("onnx", ".onnx"), ("tflite", ".tflite"), ("torchscript", TORCHSCRIPT_SUFFIX)):
        if path.endswith(suffix):
            return name
    return "checkpoint"


def open_model(path: str, threads: int = 0, data_url: str = "", fmt: str = "", device: str = "cpu") -> Predictor:
    """A Predictor for a checkpoint (local path or URL), an ONNX, a TorchScript or a TFLite file,
    on `device` (auto | cpu | cuda, as a tool's --device; TFLite runs on the CPU).
    The format comes from `fmt` or the file name (see the module docstring), never from the contents."""
    from imgcls.distributed import resolve_device

    if threads:
        torch.set_num_threads(threads)
    fmt = model_format(path, fmt)
    where = resolve_device(device, key="--device ")
    if fmt == "onnx":
        return Predictor.from_onnx(path, threads=threads, device=where)
    if fmt == "tflite":
        if where.type == "cuda":
            log.warning("the LiteRT interpreter runs on the CPU: --device %s does not apply to a TFLite model", device)
        return Predictor.from_tflite(path, threads=threads)
    if fmt == "torchscript":
        return Predictor.from_torch(load_torchscript(path), read_meta(path), "torchscript", where)
    model, meta = load_checkpoint_model(path, data_url)
    return Predictor.from_torch(model, meta, device=where)


# ---- images ---------------------------------------------------------------------------
def load_image(path, meta: dict, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image (a file name or a binary file object) as the model's input [C, H, W] float32
    (`model_input`). Decoded by the reader's one decoder (shardio.image): JPEG, PNG and WebP
    only, sniffed from the bytes (UnsupportedFormat otherwise: serve answers 415), a header
    above `max_pixels` refused before decoding."""
    if hasattr(path, "read"):
        data = path.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    # no EXIF rotation: the reader trains on the pixels as stored (as torchvision's and
    # timm's loaders do), so predict must see them the same way
    return model_input(Encoded(data, max_pixels).array(model_mode(meta)), meta)


def model_mode(meta: dict) -> str:
    return "L" if meta["image"]["channels"] == 1 else "RGB"


def model_input(pixels: np.ndarray, meta: dict) -> np.ndarray:
    """HWC uint8 pixels in the model's mode as its input [C, H, W] float32: its size (the
    reader's evaluation resize and center crop when meta has image_size, else bilinear to
    `image`), then /255 and (x - mean) / std, as the shard reader does."""
    from PIL import Image

    from imgcls.augment import eval_resize_crop

    image = meta["image"]
    size = (image["width"], image["height"])
    if meta.get("image_size"):  # the reader's evaluation transform, on the same uint8 tensor
        tensor = eval_resize_crop(torch.from_numpy(pixels).permute(2, 0, 1), meta["image_size"], meta["crop_pct"])
        pixels = tensor.permute(1, 2, 0).cpu().numpy()
    elif None not in size and pixels.shape[1::-1] != size:
        pil = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        pixels = image_array(pil.resize(size, Image.BILINEAR), model_mode(meta))
    array = pixels.astype(np.float32).transpose(2, 0, 1) / 255
    mean = np.asarray(meta["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["std"], dtype=np.float32)[:, None, None]
    return (array - mean) / std


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """The k most probable classes of one image, most probable first."""
    best = np.argsort(-probs)[:min(k, len(classes))]
    return [{"class": classes[i], "index": int(i), "prob": float(probs[i])} for i in best]


def labels_over(probs: np.ndarray, classes: list[str], threshold: float) -> list[dict]:
    """Multi-label: every class whose probability reaches `threshold`, most probable first."""
    chosen = [i for i in np.argsort(-probs) if probs[i] >= threshold]
    return [{"class": classes[i], "index": int(i), "prob": float(probs[i])} for i in chosen]


def class_probs(logits: np.ndarray, meta: dict) -> np.ndarray:
    """Softmax over the classes, or a sigmoid per class for a multi-label model."""
    if meta.get("task") == "multilabel":
        return np.exp(-np.logaddexp(0, -logits))  # the sigmoid, without overflow
    return softmax(logits)


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
