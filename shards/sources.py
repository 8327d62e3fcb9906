"""Datasets the writer reads: an image folder, MNIST/Fashion-MNIST IDX, CIFAR pickles, .npz.

Each becomes a `Source`: class names, a stable key and a label per sample, which samples
are the source's own test split, and a loader for one image.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from shardio.format import check_image_size, sanitize_key

DATASETS = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
SHORT_NAMES = {"fashion-mnist": DATASETS / "fashion-mnist", "mnist": DATASETS / "mnist"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass
class Source:
    kind: str                     # idx | folder | cifar10 | cifar100 | npz
    path: str
    name: str
    classes: list[str]
    keys: list[str]
    labels: np.ndarray            # int64, one per sample
    is_test: np.ndarray | None    # bool per sample, when the source has its own test split
    sizes: np.ndarray             # (N, 2) height, width per sample
    channels: int                 # 1 when every image is grayscale, else 3
    load: Callable[[int], np.ndarray | Image.Image]
    files: list[str] | None = field(default=None)  # per sample, to name files in errors
    formats: list[str] | None = field(default=None)  # per file: PIL's format name ("JPEG", ...)
    bad: dict[int, str] = field(default_factory=dict)  # sample -> why its header is unreadable

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "name": self.name}

    def origin(self, i: int) -> str:
        return self.files[i] if self.files else f"sample {self.keys[i]}"


def open_source(spec: str | os.PathLike, workers: int = 1) -> Source:
    """The dataset at `spec`: a short name (fashion-mnist, mnist), a folder or a .npz file."""
    name = None
    if str(spec) in SHORT_NAMES:
        name, path = str(spec), SHORT_NAMES[str(spec)]
        if not path.exists():
            raise FileNotFoundError(f"{name} is not installed at {path} "
                                    f"(Debian: apt-get install dataset-{name})")
    else:
        path = Path(spec).expanduser().absolute()
        if not path.exists():
            raise FileNotFoundError(f"source not found: {path}")
    if path.is_file() and path.suffix == ".npz":
        return _npz(path)
    if path.is_dir():
        if _idx_file(path, IDX_FILES["train"][0]):
            return _idx(path, name)
        if (path / "data_batch_1").is_file():
            return _cifar10(path)
        if (path / "train").is_file() and (path / "meta").is_file():
            return _cifar100(path)
        if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
            return _folder(path, workers)
    raise ValueError(
        f"cannot tell what dataset {path} is: expected a folder of class subfolders, "
        "an MNIST-style IDX folder (train-images-idx3-ubyte.gz, ...), a CIFAR-10/100 "
        "python folder (data_batch_1, ... or train, test, meta), or a .npz file")


def _arrays(kind, path, name, classes, images, labels, test_images=None, test_labels=None):
    """A Source over in-memory (N, H, W[, C]) uint8 arrays, keyed train-000123 / test-000045."""
    parts = [("train", images, labels)]
    if test_images is not None:
        parts.append(("test", test_images, test_labels))
    for split, x, y in parts:
        if np.ndim(y) != 1 or not np.issubdtype(np.asarray(y).dtype, np.integer):
            raise ValueError(f"{path}: {split} labels must be a 1-D integer array, "
                             f"got shape {np.shape(y)}")
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} {split} images but {len(y)} labels")
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[3:] not in ((), (1,), (3,)):
            raise ValueError(f"{path}: {split} images must be uint8 (N, H, W) or (N, H, W, 1|3), "
                             f"got {x.dtype} {x.shape}")
    if test_images is not None and test_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"{path}: test images are {test_images.shape[1:]}, "
                         f"train images {images.shape[1:]}")
    all_images = np.concatenate([x for _, x, _ in parts]) if len(parts) > 1 else images
    if all_images.ndim == 3:
        all_images = all_images[..., None]
    if not len(all_images):
        raise ValueError(f"{path}: no images")
    all_labels = np.concatenate([np.asarray(y) for _, _, y in parts]).astype(np.int64)
    keys = [f"{split}-{i:0{max(6, len(str(len(x) - 1)))}d}"
            for split, x, _ in parts for i in range(len(x))]
    if not classes:
        classes = [str(c) for c in range(int(all_labels.max(initial=-1)) + 1)]
    bad = (all_labels < 0) | (all_labels >= len(classes))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: {keys[i]} has label {all_labels[i]}, "
                         f"outside the {len(classes)} classes")
    is_test = None
    if test_images is not None:
        is_test = np.zeros(len(all_labels), bool)
        is_test[len(images):] = True
    n, h, w, c = all_images.shape
    return Source(kind, str(path), name, list(classes), keys, all_labels, is_test,
                  sizes=np.tile([h, w], (n, 1)), channels=c, load=all_images.__getitem__)


# ---- MNIST / Fashion-MNIST IDX ----

def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    # Header: 0, 0, dtype code 0x08 (uint8), number of dimensions, then big-endian int32 sizes.
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"{path}: not a uint8 IDX file with {ndim} dimensions")
    shape = tuple(int(s) for s in np.frombuffer(data, ">i4", ndim, 4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def _idx(folder: Path, name: str | None) -> Source:
    arrays = {}
    for split, stems in IDX_FILES.items():
        files = [_idx_file(folder, stem) for stem in stems]
        if None in files:
            raise FileNotFoundError(f"{folder}: missing {stems[files.index(None)]}[.gz]")
        images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
        if len(images) != len(labels):
            raise ValueError(f"{files[0]} has {len(images)} images but "
                             f"{files[1]} has {len(labels)} labels")
        arrays[split] = images, labels
    # The folder's name tells Fashion-MNIST from MNIST: both use the same file names.
    name = name or ("fashion-mnist" if "fashion" in folder.name.lower() else "mnist")
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(d) for d in range(10)]
    return _arrays("idx", folder, name, classes, *arrays["train"], *arrays["test"])


# ---- CIFAR python pickles ----

class _DataUnpickler(pickle.Unpickler):
    """Unpickles arrays, lists, dicts, bytes, str and numbers only: a pickle can name any
    callable (os.system...), and a downloaded dataset is not trusted code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in a protocol-2 pickle
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays, lists, "
                                         "dicts, bytes, str and numbers are allowed")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    # The official files are Python 2 pickles: bytes keys. Normalise to str keys.
    with open(path, "rb") as f:
        try:
            d = _DataUnpickler(f, encoding="bytes").load()
        except Exception as e:  # a bad pickle raises many types; the CLI wants one, naming the file
            raise ValueError(f"{path}: not a CIFAR pickle: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR pickle: holds a {type(d).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file missing: {path}")
    d = _unpickle(path)
    data, labels = np.asarray(d["data"], np.uint8), np.asarray(d[label_key])
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    # Rows are 3072 bytes: the red, green and blue 32x32 planes.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cifar10(folder: Path) -> Source:
    batches = [_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    classes = _names(_unpickle(folder / "batches.meta")["label_names"])
    return _arrays("cifar10", folder, "cifar10", classes, images, labels,
                   *_cifar_batch(folder / "test_batch", "labels"))


def _cifar100(folder: Path) -> Source:
    classes = _names(_unpickle(folder / "meta")["fine_label_names"])
    return _arrays("cifar100", folder, "cifar100", classes,
                   *_cifar_batch(folder / "train", "fine_labels"),
                   *_cifar_batch(folder / "test", "fine_labels"))


# ---- .npz ----

def _npz(path: Path) -> Source:
    with np.load(path, allow_pickle=False) as z:  # never unpickle objects from a data file
        arrays = {k: z[k] for k in z.files}

    def pick(*names):
        return next((arrays[n] for n in names if n in arrays), None)

    images, labels = pick("images", "x"), pick("labels", "y")
    if images is None or labels is None:
        raise ValueError(f"{path}: needs arrays 'images' (or 'x') and 'labels' (or 'y'), "
                         f"has {sorted(arrays)}")
    test_images, test_labels = pick("images_test", "x_test"), pick("labels_test", "y_test")
    if (test_images is None) != (test_labels is None):
        raise ValueError(f"{path}: has only one of the test arrays x_test, y_test")
    classes = pick("class_names")
    classes = _names(classes) if classes is not None else None
    return _arrays("npz", path, path.stem, classes, images, labels, test_images, test_labels)


# ---- folder of class subfolders ----

def _folder(root: Path, workers: int) -> Source:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    image_exts = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files, labels, skipped = [], [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                if Path(f).suffix.lower() in image_exts:
                    files.append(os.path.join(dirpath, f))
                    labels.append(label)
                else:
                    skipped.append(f)
    if not files:
        raise ValueError(f"{root}: no image files in its class subfolders {classes}")
    if skipped:
        logging.getLogger("shards").warning(
            "%s: skipped %d files that are not images, e.g. %s", root, len(skipped), skipped[0])

    keys, seen = [], {}
    for f in files:
        key = sanitize_key(os.path.splitext(os.path.relpath(f, root))[0].replace(os.sep, "/"))
        if key in seen:
            raise ValueError(f"{f} and {seen[key]} both map to sample key {key!r}; rename one")
        seen[key] = f
        keys.append(key)

    # Headers only: sizes, modes and formats without decoding, to plan the build. Unreadable
    # headers are collected (the writer reports them with the files that fail to decode).
    with ThreadPoolExecutor(workers) as pool:
        headers = list(pool.map(_image_header, files))
    bad = {i: h for i, h in enumerate(headers) if isinstance(h, str)}
    good = [h for h in headers if not isinstance(h, str)]
    if not good:
        raise ValueError(f"{root}: none of its {len(files)} images can be read, e.g. {headers[0]}")
    headers = [(0, 0, "", "") if isinstance(h, str) else h for h in headers]
    sizes = np.array([(h, w) for h, w, _, _ in headers], np.int64).reshape(-1, 2)
    channels = 1 if all(mode in GRAY_MODES for _, _, mode, _ in good) else 3
    return Source("folder", str(root), root.name, classes, keys, np.array(labels, np.int64), None,
                  sizes, channels, load=lambda i: _open_image(files[i]), files=files,
                  formats=[fmt for _, _, _, fmt in headers], bad=bad)


def _image_header(path: str) -> tuple[int, int, str, str] | str:
    """(height, width, mode, format) from the file's header, or why it cannot be read."""
    try:
        with Image.open(path) as image:
            check_image_size(image.height, image.width)  # before anything decodes it
            return image.height, image.width, image.mode, image.format
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot read image {path}: {e}"


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
