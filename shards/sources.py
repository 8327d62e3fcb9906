"""Datasets the writer reads: image files (class folders, pre-split folders or a label file,
at any fsspec URL), MNIST/Fashion-MNIST IDX, CIFAR pickles, .npz.

Each becomes a `Source`: class names, a stable key and a label per sample, which samples
are the source's own test split (or its own train/val/test split), and a loader for one image.

Image files are found in one of three layouts (`layout`):
- class folders: ROOT/<class>/**/*.jpg;
- pre-split folders: ROOT/train/<class>/..., ROOT/val/<class>/... (or valid/, validation/),
  ROOT/test/<class>/...: the folders are the splits, and the classes are train's;
- a label file (.csv or .tsv): `path,label[,split]` rows, paths relative to the file; a
  header naming a `labels` column instead makes a multi-label source (class names separated
  by spaces, as multi-label Kaggle sets ship).
Files on an object store are listed once and read directly, in parallel, with the storage
retries (shardio.storage); nothing is staged to local disk.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import pickle
import posixpath
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from shardio.format import check_image_size, sanitize_key
from shardio.storage import filesystem, is_local, read_bytes, retrying

DATASETS = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
SHORT_NAMES = {"fashion-mnist": DATASETS / "fashion-mnist", "mnist": DATASETS / "mnist"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
SPLITS = ("train", "val", "test")
# Folder names (and label-file split values) that name a split; any case.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LABEL_FILES = (".csv", ".tsv")
HEADER_BYTES = 1 << 16  # read first from an object store for an image's header: most fit
HEADER_BATCH = 1024     # header reads per batch of concurrent requests to an object store


@dataclass
class Source:
    kind: str                     # idx | folder | cifar10 | cifar100 | npz
    path: str
    name: str
    classes: list[str]
    keys: list[str]
    labels: np.ndarray            # int64, one per sample; multi-label: bool (N, classes) multi-hot
    is_test: np.ndarray | None    # bool per sample, when the source has its own test split
    sizes: np.ndarray             # (N, 2) height, width per sample
    channels: int                 # 1 when every image is grayscale, else 3
    load: Callable[[int], np.ndarray | Image.Image]
    files: list[str] | None = field(default=None)  # per sample, to name files in errors
    formats: list[str] | None = field(default=None)  # per file: PIL's format name ("JPEG", ...)
    bad: dict[int, str] = field(default_factory=dict)  # sample -> why its header is unreadable
    splits: np.ndarray | None = None  # int8 per sample, an index into SPLITS: the source's own split
    layout: str | None = None  # image files: "class folders", "pre-split folders" or "label file"

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def describe(self) -> dict:
        layout = {"layout": self.layout} if self.layout else {}
        return {"kind": self.kind, "path": self.path, "name": self.name, **layout}

    def origin(self, i: int) -> str:
        return self.files[i] if self.files else f"sample {self.keys[i]}"


def open_source(spec: str | os.PathLike, workers: int = 1, pool: Executor | None = None) -> Source:
    """The dataset at `spec`: a short name (fashion-mnist, mnist), a folder, a label file
    (.csv/.tsv) or a .npz file. Image folders and label files may be at any fsspec URL.
    `pool` (worker processes) reads local image headers; else `workers` threads do."""
    name = None
    workers = pool or workers
    if str(spec).lower().endswith(LABEL_FILES):
        return _label_file(_absolute(str(spec)), workers)
    if not is_local(str(spec)):
        return _folder(str(spec).rstrip("/"), workers)
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
            return _folder(str(path), workers)
    raise ValueError(
        f"cannot tell what dataset {path} is: expected a folder of class subfolders, "
        "pre-split folders (train/<class>/, val/<class>/, ...), a label file (.csv, .tsv), "
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


# ---- image files: class folders, pre-split folders, a label file ----

def _absolute(url: str) -> str:
    return str(Path(url).expanduser().absolute()) if "://" not in url else url


def _image_exts() -> set[str]:
    return {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _walk_order(rel: str) -> list[tuple[int, str]]:
    """Sort key giving os.walk's top-down order with sorted names: a folder's files, then its
    subfolders' (the order samples were always numbered in, so splits stay the same)."""
    parts = rel.split("/")
    return [(1, p) for p in parts[:-1]] + [(0, parts[-1])]


def _listing(fs, base: str) -> list[str]:
    """The files under `base`, relative to it, without hidden ones, in walk order. One
    recursive listing: on an object store, a few paginated requests."""
    files = (posixpath.relpath(path, base) for path in fs.find(base))
    return sorted((f for f in files if not any(part.startswith(".") for part in f.split("/"))),
                  key=_walk_order)


def _subfolders(fs, path: str) -> list[str]:
    """The names of the folders in `path` (empty ones too), without hidden ones."""
    names = (posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
             if e["type"] == "directory")
    return sorted(n for n in names if not n.startswith("."))


def _folder(root: str, workers: int | Executor) -> Source:
    """Class folders, or pre-split folders when the root's folders are named like splits."""
    fs, base = filesystem(root)
    fs.invalidate_cache()  # this process may have listed it before it changed
    folders, files = _subfolders(fs, base), _listing(fs, base)
    named = [f for f in folders if f.lower() in SPLIT_NAMES]
    if named:
        return _pre_split(fs, root, base, files, folders, named, workers)
    classes = folders
    groups = {cls: (None, c) for c, cls in enumerate(classes)}  # top folder -> (split, label)
    picked, labels, splits, skipped = _group_files(files, groups, 1)
    return _image_files("folder", root, classes, [_url(fs, base, f) for f in picked], labels,
                        None, "class folders", skipped, workers)


def _pre_split(fs, root: str, base: str, files: list[str], folders: list[str], named: list[str],
               workers: int | Executor) -> Source:
    others = [f for f in folders if f not in named]
    if others:
        raise ValueError(
            f"{root}: folders {', '.join(named)} are named like splits but {', '.join(others[:3])} "
            "are not: for pre-split folders put every class folder under train/ (and val/, test/); "
            f"if they are all classes, rename {', '.join(named)} or list the images in a label "
            "file (--labels FILE.csv)")
    by_split: dict[str, str] = {}
    for folder in named:
        split = SPLIT_NAMES[folder.lower()]
        if split in by_split:
            raise ValueError(f"{root}: both {by_split[split]}/ and {folder}/ are the {split} split; "
                             "merge them or remove one")
        by_split[split] = folder
    if "train" not in by_split:
        raise ValueError(f"{root}: pre-split folders {', '.join(named)} without train/: the classes "
                         "come from train/<class>/")
    loose = [f for f in files if f.count("/") == 1]
    if loose:
        raise ValueError(f"{root}: {loose[0]} is directly in a split folder, not in a class folder: "
                         "pre-split folders hold train/<class>/*.jpg; if train, val, test are "
                         "your classes, rename those folders or use a label file (--labels FILE.csv)")
    class_folders = {split: _subfolders(fs, posixpath.join(base, folder))
                     for split, folder in by_split.items()}
    classes = class_folders["train"]
    nested = [f"{by_split[s]}/{c}" for s, cs in class_folders.items() for c in cs
              if c.lower() in SPLIT_NAMES]
    if nested:
        raise ValueError(f"{root}: class folder {nested[0]} is named like a split: if the splits are "
                         f"one level down, give {root}/{nested[0].split('/')[0]} as SOURCE; else "
                         "rename that class folder")
    unknown = [f"{by_split[s]}/{c}" for s, cs in class_folders.items() for c in cs
               if c not in classes]
    if unknown:
        raise ValueError(f"{root}: classes only in val or test, not in train: {', '.join(unknown[:10])}"
                         f"{' ...' if len(unknown) > 10 else ''}; the classes come from train/ "
                         "(add their train images, or remove those folders)")
    groups = {f"{folder}/{cls}": (SPLITS.index(split), c)
              for split, folder in sorted(by_split.items(), key=lambda kv: SPLITS.index(kv[0]))
              for c, cls in enumerate(classes)}
    picked, labels, splits, skipped = _group_files(files, groups, 2)
    return _image_files("folder", root, classes, [_url(fs, base, f) for f in picked],
                        labels, splits, "pre-split folders", skipped, workers)


def _group_files(files: list[str], groups: dict[str, tuple[int | None, int]], depth: int):
    """The image files of each group (the folder `depth` levels down), in the groups' order,
    with their labels and splits, and the names of the files that are not images."""
    exts, members, skipped = _image_exts(), {g: [] for g in groups}, []
    for f in files:
        group = "/".join(f.split("/")[:depth])
        if group in members and f.count("/") >= depth:
            if posixpath.splitext(f)[1].lower() in exts:
                members[group].append(f)
            else:
                skipped.append(posixpath.basename(f))
    picked = [f for g in groups for f in members[g]]
    labels = [groups[g][1] for g in groups for _ in members[g]]
    splits = [groups[g][0] for g in groups for _ in members[g]]
    return picked, labels, None if splits and splits[0] is None else splits, skipped


def _url(fs, base: str, rel: str) -> str:
    """A file's name as the writer reads and reports it: a local path, or a URL."""
    path = posixpath.join(base, rel)
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# ---- label files ----

LABEL_COLUMNS = ("path", "label", "split")  # the columns, in this order when there is no header


def _label_file(url: str, workers: int | Executor) -> Source:
    """`path,label[,split]` rows (a header naming the columns is optional); paths relative to
    the file. A header's `labels` column (instead of `label`) holds several class names per row,
    separated by spaces (empty: no label): a multi-label source. Every bad row (missing file,
    empty label, unknown split, ...) is reported at once."""
    fs, path = filesystem(url)
    base = posixpath.dirname(path)
    rows, bad, multilabel = _label_rows(url, read_file(url).decode("utf-8-sig"))
    resolved = {}
    for row in rows:
        if "://" in row["path"]:
            bad.append(f"line {row['line']}: {row['path']}: must be relative to the label file")
            continue
        full = posixpath.normpath(posixpath.join(base, row["path"]))
        if full in resolved:
            first = resolved[full]["line"]
            bad.append(f"line {row['line']}: {row['path']} is listed twice (also line {first})")
            continue
        if posixpath.splitext(full)[1].lower() not in _image_exts():
            bad.append(f"line {row['line']}: {row['path']} is not an image file")
            continue
        resolved[full] = row
    present = _existing(fs, list(resolved))
    for full, row in list(resolved.items()):
        if full not in present:
            bad.append(f"line {row['line']}: {row['path']}: no such file")
            del resolved[full]
    if bad:
        bad.sort(key=lambda b: int(b.split(":")[0].split()[1]))
        for why in bad:
            logging.getLogger("shards").warning("%s: %s", url, why)
        more = f" and {len(bad) - 10} more (all logged above)" if len(bad) > 10 else ""
        raise ValueError(f"{len(bad)} bad row(s) in {url}: {'; '.join(bad[:10])}{more}; "
                         "fix or remove them")
    if not resolved:
        raise ValueError(f"{url}: no rows")
    rows = list(resolved.values())
    has_splits = rows[0]["split"] is not None
    names = {n for r in rows if not has_splits or r["split"] == "train" for n in r["labels"]}
    classes = sorted(names, key=lambda n: (0, int(n), n) if n.isdigit() else (1, 0, n))
    if has_splits:
        unknown = sorted({n for r in rows for n in r["labels"]} - names)
        if unknown:
            raise ValueError(f"{url}: classes only in val or test rows, not in train: "
                             f"{', '.join(unknown[:10])}; the classes come from the train rows")
    index = {name: c for c, name in enumerate(classes)}
    if multilabel:
        labels = np.zeros((len(rows), len(classes)), bool)
        for i, r in enumerate(rows):
            labels[i, [index[n] for n in r["labels"]]] = True
    else:
        labels = np.array([index[r["labels"][0]] for r in rows], np.int64)
    files = [_url(fs, "", full) for full in resolved]
    splits = [SPLITS.index(r["split"]) for r in rows] if has_splits else None
    return _image_files("labels", url, classes, files, labels, splits, "label file", [], workers,
                        key_root=_url(fs, base, ""))


def _label_rows(url: str, text: str) -> tuple[list[dict], list[str], bool]:
    """({line, path, labels, split} per row, bad rows, whether the file is multi-label).
    `labels` is a tuple of class names: one, or for a `labels` column any number (duplicates
    are bad rows)."""
    delimiter = "\t" if url.lower().endswith(".tsv") else ","
    table = [(n, cells) for n, cells in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1)
             if any(c.strip() for c in cells)]
    if not table:
        raise ValueError(f"{url}: empty label file; expected path{delimiter}label rows")
    header = [c.strip().lower() for c in table[0][1]]
    if "path" in header:
        if ("label" in header) == ("labels" in header):
            raise ValueError(f"{url}: the header {','.join(header)} needs one 'label' column (one class "
                             "per image) or one 'labels' column (class names separated by spaces)")
        columns, table = header, table[1:]
    elif len(header) in (2, 3):
        columns = list(LABEL_COLUMNS[:len(header)])
    else:
        raise ValueError(f"{url}: line {table[0][0]} has {len(header)} columns; expected "
                         f"path{delimiter}label[{delimiter}split] rows, or a header naming the columns")
    multilabel = "labels" in columns
    rows, bad = [], []
    for line, cells in table:
        if len(cells) != len(columns):
            bad.append(f"line {line}: {len(cells)} columns, expected {len(columns)} ({','.join(columns)})")
            continue
        row = dict(zip(columns, (c.strip() for c in cells)))
        labels = tuple(row["labels"].split()) if multilabel else (row["label"],) if row["label"] else ()
        split = SPLIT_NAMES.get(row["split"].lower()) if "split" in row else None
        if not row.get("path"):
            bad.append(f"line {line}: empty path")
        elif not labels and not multilabel:
            bad.append(f"line {line}: {row['path']}: empty label")
        elif len(set(labels)) < len(labels):
            bad.append(f"line {line}: {row['path']}: a class is listed twice in {row['labels']!r}")
        elif "split" in row and split is None:
            bad.append(f"line {line}: {row['path']}: split {row['split']!r} is not train, val, "
                       "valid, validation or test")
        else:
            rows.append({"line": line, "path": row["path"], "labels": labels, "split": split})
    return rows, bad, multilabel


def _existing(fs, paths: list[str]) -> set[str]:
    """Which of `paths` are files: one listing of their common folder on an object store."""
    if not paths:
        return set()
    if isinstance(fs, LocalFileSystem):
        return {p for p in paths if os.path.isfile(p)}
    common = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    return set(fs.find(common)) & set(paths)


# ---- the source of image files, whatever the layout ----

def _image_files(kind: str, root: str, classes: list[str], files: list[str], labels: list[int] | np.ndarray,
                 splits: list[int] | None, layout: str, skipped: list[str], workers: int | Executor,
                 key_root: str | None = None) -> Source:
    if not files:
        raise ValueError(f"{root}: no image files in its class folders {classes}")
    if skipped:
        logging.getLogger("shards").warning(
            "%s: skipped %d files that are not images, e.g. %s", root, len(skipped), skipped[0])
    key_root = key_root or root
    keys, seen = [], {}
    for f in files:
        key = sanitize_key(posixpath.splitext(posixpath.relpath(f, key_root))[0])
        if key in seen:
            raise ValueError(f"{f} and {seen[key]} both map to sample key {key!r}; rename one")
        seen[key] = f
        keys.append(key)

    # Headers only: sizes, modes and formats without decoding, to plan the build. Unreadable
    # headers are collected (the writer reports them with the files that fail to decode).
    headers = _image_headers(files, workers)
    bad = {i: h for i, h in enumerate(headers) if isinstance(h, str)}
    good = [h for h in headers if not isinstance(h, str)]
    if not good:
        raise ValueError(f"{root}: none of its {len(files)} images can be read, e.g. {headers[0]}")
    headers = [(0, 0, "", "") if isinstance(h, str) else h for h in headers]
    sizes = np.array([(h, w) for h, w, _, _ in headers], np.int64).reshape(-1, 2)
    channels = 1 if all(mode in GRAY_MODES for _, _, mode, _ in good) else 3
    name = posixpath.basename(root.rstrip("/"))
    if kind == "labels":
        name = posixpath.basename(posixpath.dirname(root)) or posixpath.splitext(name)[0]
    labels = labels if isinstance(labels, np.ndarray) else np.array(labels, np.int64)
    return Source(kind, root, name, classes, keys, labels, None,
                  sizes, channels, load=lambda i: open_image(files[i]), files=files,
                  formats=[fmt for _, _, _, fmt in headers], bad=bad,
                  splits=None if splits is None else np.array(splits, np.int8), layout=layout)


def read_file(path: str) -> bytes:
    """A file's bytes: a local path, or a URL read with the storage retries."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    return read_bytes(path)


def read_files(paths: list[str], end: int | None = None) -> list[bytes]:
    """The files' bytes (up to byte `end`), in order. From an object store, one batch of
    concurrent requests on the filesystem's event loop, retried as a whole on transient errors."""
    if not paths or "://" not in paths[0]:
        return [read_file(p) if end is None else _read_head(p, end) for p in paths]
    fs, _ = filesystem(paths[0])
    keys = [fs._strip_protocol(p) for p in paths]
    if end is None:
        found = retrying(lambda: fs.cat(keys, on_error="raise"), paths[0])
        return [found[k] for k in keys]
    starts, ends = [0] * len(keys), [end] * len(keys)
    return retrying(lambda: fs.cat_ranges(keys, starts, ends, on_error="raise"), paths[0])


def _read_head(path: str, end: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(end)


def _image_headers(files: list[str], workers: int | Executor) -> list[tuple[int, int, str, str] | str]:
    """_image_header of each file: locally on `workers` (threads, or a pool of processes).
    From an object store, the first HEADER_BYTES of each file first, in batches, and whole
    files only for the few whose header is longer."""
    if "://" not in files[0]:
        if isinstance(workers, Executor):
            return list(workers.map(_image_header, files, chunksize=HEADER_BATCH))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(_image_header, files))
    headers: list = []
    for start in range(0, len(files), HEADER_BATCH):
        batch = files[start:start + HEADER_BATCH]
        heads = read_files(batch, HEADER_BYTES)
        headers += [_image_header(path, head) for path, head in zip(batch, heads)]
    return headers


def _image_header(path: str, head: bytes | None = None) -> tuple[int, int, str, str] | str:
    """(height, width, mode, format) from the file's header (`head`: its first bytes, when
    already read), or why it cannot be read."""
    try:
        if head is None:
            return _header(path)
        try:
            return _header(io.BytesIO(head))
        except Exception:
            if len(head) < HEADER_BYTES:
                raise  # that was the whole file
            return _header(io.BytesIO(read_bytes(path)))
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot read image {path}: {e}"


def _header(file) -> tuple[int, int, str, str]:
    with Image.open(file) as image:
        check_image_size(image.height, image.width)  # before anything decodes it
        return image.height, image.width, image.mode, image.format


def open_image(path: str, data: bytes | None = None) -> Image.Image:
    """The decoded image of a file (`data`: its bytes, when already read)."""
    try:
        with Image.open(io.BytesIO(read_file(path) if data is None else data)) as image:
            image.load()
            return image
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
