"""`build`: a source dataset -> shards and DEST/manifest.json (docs/design.md).

Split rule: a source that comes split (pre-split folders, a label file with a split column)
keeps its splits unless `split` is given. Otherwise the split is stratified per class,
`round(n * fraction)` samples of each class for val and test, the rest for train. When the
source has its own test split (IDX t10k, CIFAR test, npz x_test) that is the test split,
unchanged, and val takes val / (train + val) of each class of the source's train part, so
train:val keeps the configured ratio (0.7,0.2,0.1 -> 2/9 of train becomes val). A source's own test folder or
test rows count as its test split here. A multi-label source is stratified by each sample's
first class (lowest index; samples without a label form one more group).

Workers: image files' headers are read, and the files checked and encoded, in worker
processes (shards/workers.py); array sources (IDX, CIFAR, npz) are encoded in threads.
Shards are assembled, hashed and written by a thread pool in this process, in `_put_shard`:
the one place a shard's bytes go to DEST.

Rebuilds are idempotent: the same source and options give byte-identical shards, and a shard
already at DEST with the same size and sha256 is not uploaded again. The manifest is written
last, so readers never see a manifest naming shards that are not there yet. Files under
DEST/<split>/ that the new manifest does not name (shards of an earlier, different build) are
left in place and listed in a warning: readers only read the shards the manifest names.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from shardio import shard as shardfile
from shardio.format import ENCODINGS, FORMAT, MULTILABEL, check_key, decode_image, encode_image, tar_size, write_tar
from shardio.manifest import shard_entries
from shardio.manifest import write as write_manifest
from shardio.storage import filesystem, join, write_bytes_atomic

from . import __version__
from .progress import Progress
from .sources import SPLITS, Source, open_image, open_source, read_files
from .stats import channel_stats, histogram
from .workers import worker_pool

log = logging.getLogger("shards")

DEFAULT_SPLIT = (0.7, 0.2, 0.1)
DEFAULT_SHARD_BYTES = 64 * 10**6
IMBALANCE = 0.7  # warn when one class is more than this share of a split
CHUNK = 256      # samples per encoding task: big enough to amortise the task overhead
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored byte for byte, as KEY.<ext>
LOSSY = ("jpg", "webp")
REENCODED_AS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}  # when downscaled; other formats: png
SKIPPED_LISTED = 100  # bad files named in the manifest (all are logged)
WORKER_DIED = ("a build worker process died: out of memory, or, when shards.build is called from a "
               "script, the script does not guard its top level with if __name__ == '__main__': "
               "(the worker processes import it)")


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def build(source: str | os.PathLike, dest: str | os.PathLike, *,
          split: Sequence[float] | None = None, seed: int = 0, encoding: str | None = None,
          jpeg_quality: int = 90, shard_bytes: int | None = None,
          shard_samples: int | None = None, workers: int | None = None,
          resize: tuple[int, int] | None = None, channels: int | None = None,
          max_side: int | None = None, skip_bad: bool = False, progress: bool = True) -> dict:
    """Write `source` as shards under `dest` and return the manifest (also at dest/manifest.json).

    `split` (train, val, test fractions) re-splits; None keeps a split source's own splits
    and splits any other 0.7, 0.2, 0.1. Shards are cut at `shard_samples` samples or about
    `shard_bytes` bytes, whichever comes first (default 64 MB). `channels` 1 or 3 forces
    grayscale or RGB; by default images stay grayscale when all of them are. `resize` is
    (height, width); `max_side` downscales the images whose longer side is above it.
    `encoding` None: "source" (keep each file's bytes) for a folder of images of different
    sizes, else "raw". Every image file is decoded first; bad ones fail the build, all named
    in one error, or with `skip_bad` are left out. With `workers` > 1, image files are read in
    worker processes (shards/workers.py): a calling script needs `if __name__ == "__main__":`.
    """
    fractions = check_fractions(split) if split is not None else None
    _check_options(encoding, jpeg_quality, shard_bytes, shard_samples, resize, channels, max_side)
    if shard_bytes is None and shard_samples is None:
        shard_bytes = DEFAULT_SHARD_BYTES
    workers = workers or default_workers()
    dest = str(dest).rstrip("/")

    processes = worker_pool(workers)  # started on first use: by image files only
    pool = io_pool = None
    try:  # every pool is shut down at the first error, even one in open_source
        src = open_source(source, workers, processes)
        for key in src.keys:
            check_key(key)
        if fractions is None and src.splits is None:
            fractions = DEFAULT_SPLIT
        sizes = stored_sizes(src.sizes, resize, max_side)
        encoding = encoding or default_encoding(src, sizes, max_side)
        if encoding == "source" and not src.files:
            raise ValueError(f"{src.path}: encoding 'source' keeps image files' bytes, but a {src.kind} "
                             "source has no image files; use raw, png or jpeg")
        channels = channels or src.channels
        image = _image_meta(src, encoding, sizes, channels)
        keep = _keeps_bytes(src, encoding, sizes)
        if fractions is None:
            indices = given_splits(src.splits, seed)
        else:
            indices = assign_splits(strata(src), _own_test(src), len(src.classes) + src.multilabel,
                                    fractions, seed)
        if src.layout:  # image files: say which layout was recognised (array sources have one)
            log.info("%s", layout_line(src, fractions))

        pool = processes if src.files and processes else ThreadPoolExecutor(workers)
        io_pool = ThreadPoolExecutor(workers)
        bad, kept_hist = _check_files(pool, src, indices["train"], keep, channels, 2 * workers, progress)
        indices = _leave_out(bad, indices, src, skip_bad)
        how = (encoding, channels, jpeg_quality)

        def encode(chunk: np.ndarray) -> Future:
            return pool.submit(_encode_all, [_item(src, i, keep[i], sizes[i]) for i in chunk], how)

        def put(path: str, samples: list) -> tuple[dict, bool]:
            return _put_shard(dest, path, samples, len(src.classes), src.multilabel)

        filesystem(dest)[0].invalidate_cache()  # another process may have changed DEST
        splits, written, hist = {}, 0, kept_hist
        total = sum(len(v) for v in indices.values())
        with Progress(total, "shards", progress) as bar:
            for name in SPLITS:
                samples = itertools.chain.from_iterable(_in_order(encode, indices[name], 2 * workers))
                if name == "train":
                    samples = _tally(samples, hist)
                results = _put_all(io_pool, put, name, _cut(samples, shard_samples, shard_bytes),
                                   2 * workers, bar)
                written += sum(w for _, w in results)
                splits[name] = {"count": len(indices[name]),
                                "class_counts": class_counts(src.labels[indices[name]], len(src.classes)),
                                "shards": [entry for entry, _ in results]}
    except BaseException as e:
        for p in (pool, io_pool, processes):
            if p is not None:
                p.shutdown(wait=True, cancel_futures=True)  # stop at the first error
        if isinstance(e, BrokenProcessPool):
            raise RuntimeError(WORKER_DIED) from e
        raise
    for p in (pool, io_pool, processes):
        if p is not None:
            p.shutdown()

    manifest = {
        "format": FORMAT,
        "tool_version": __version__,
        "source": src.describe(),
        "seed": seed,
        "split_fractions": list(fractions) if fractions else None,  # None: the source's own splits
        "classes": src.classes,
        **({"task": MULTILABEL} if src.multilabel else {}),
        "encoding": encoding,
        **({"jpeg_quality": jpeg_quality} if encoding == "jpeg" else {}),
        **({"max_side": max_side} if max_side else {}),
        "image": image,
        "stats": channel_stats(hist, "train", len(indices["train"])),
        "splits": splits,
        **({"skipped": _skipped(src, bad)} if bad else {}),
        "warnings": class_warnings(src.classes, splits, src.multilabel),
    }
    for message in manifest["warnings"]:
        log.warning("%s", message)
    _warn_stale(dest, manifest)
    write_dataset_files(dest, manifest)
    n_shards = sum(len(s["shards"]) for s in splits.values())
    log.info("%s: %d samples in %d shards (%d uploaded, %d already up to date)",
             dest, total, n_shards, written, n_shards - written)
    return manifest


def _put_shard(dest: str, path: str, samples: list, num_classes: int,
               multilabel: bool = False) -> tuple[dict, bool]:
    """Write one shard (unless DEST already holds these bytes) and its index beside it (offsets,
    labels, sizes, CRCs): its manifest entry, and whether it was written. Everything written
    beside a shard belongs here. A multi-label sample's label is its multi-hot row; its .cls
    lists the indices ("0 2"), and its index record holds the first (-1: none)."""
    labels = np.array([s[1] for s in samples])
    texts = [" ".join(map(str, np.flatnonzero(s[1]))) if multilabel else s[1] for s in samples]
    data = write_tar((s[0], text, *s[2:4]) for s, text in zip(samples, texts))
    firsts = [int(np.flatnonzero(row)[0]) if row.any() else -1 for row in labels] if multilabel else labels
    index = shardfile.Index.of(data, firsts, [s[4] for s in samples])
    written = not _same_file(join(dest, path), len(data), index.shard_sha256)
    if written:
        write_bytes_atomic(join(dest, path), data)
    shardfile.write_index(join(dest, path), index)
    entry = {"path": path, "count": len(samples), "bytes": len(data), "sha256": index.shard_sha256,
             "class_counts": class_counts(labels, num_classes), "index": shardfile.index_path(path)}
    return entry, written


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class; for multi-hot rows (N, classes), each class's positives."""
    if labels.ndim == 2:
        return labels.sum(0, dtype=np.int64).tolist()
    return np.bincount(labels.astype(np.int64), minlength=num_classes).tolist()


def strata(src: Source) -> np.ndarray:
    """The group each sample is stratified in: its label; a multi-label sample's first class,
    or len(classes) when it has none."""
    if not src.multilabel:
        return src.labels
    return np.where(src.labels.any(1), src.labels.argmax(1), len(src.classes))


TIMM_INFO = "_info.json"


def write_dataset_files(dest: str, manifest: dict) -> None:
    """timm's _info.json, then manifest.json (last: its presence means the dataset is complete)."""
    write_bytes_atomic(join(dest, TIMM_INFO), json.dumps(timm_info(manifest), indent=2).encode() + b"\n")
    write_manifest(dest, manifest)


def timm_info(manifest: dict) -> dict:
    """timm's dataset info (timm.data.readers.reader_wds), so `create_dataset("wds/NAME",
    root=DEST, split="train")` reads our shards: per split its shards and their sample counts."""
    return {"name": manifest["source"]["name"],
            "splits": {name: {"name": name, "num_samples": split["count"],
                              "filenames": [s["path"] for s in split["shards"]],
                              "shard_lengths": [s["count"] for s in split["shards"]]}
                       for name, split in manifest["splits"].items()}}


def layout_line(src: Source, fractions: Sequence[float] | None) -> str:
    """What build recognised, e.g. "layout: pre-split folders (train 9469, val 3925); 10 classes"."""
    what = src.layout
    if src.splits is not None:
        counts = np.bincount(src.splits, minlength=len(SPLITS))
        what += " (" + ", ".join(f"{name} {n}" for name, n in zip(SPLITS, counts) if n) + ")"
        if fractions is not None:
            what += ", re-split " + ",".join(f"{f:g}" for f in fractions)
    return f"layout: {what}; {len(src.classes)} classes"


def default_encoding(src: Source, sizes: np.ndarray, max_side: int | None) -> str:
    """"source" for image files of different sizes (or when --max-side is given): their own
    bytes are the smallest lossless copy; "raw" for fixed-size images and array sources."""
    good = _good(src)
    if src.files and (max_side or (sizes[good] != sizes[good[0]]).any()):
        return "source"
    return "raw"


def stored_sizes(sizes: np.ndarray, resize: tuple[int, int] | None, max_side: int | None) -> np.ndarray:
    """(N, 2) height, width of each image as written: `resize`, or scaled down so that its
    longer side is at most `max_side`."""
    if resize is not None:
        return np.tile(np.array(resize, np.int64), (len(sizes), 1))
    if not max_side:
        return sizes
    scale = np.minimum(1.0, max_side / np.maximum(sizes.max(axis=1), 1))
    return np.where(scale[:, None] < 1, np.maximum(1, np.rint(sizes * scale[:, None])), sizes).astype(np.int64)


def _good(src: Source) -> np.ndarray:
    return np.array([i for i in range(len(src.keys)) if i not in src.bad], np.int64)


def _keeps_bytes(src: Source, encoding: str, sizes: np.ndarray) -> np.ndarray:
    """Per sample: stored byte for byte (encoding "source", a JPEG/PNG/WebP file not downscaled)."""
    if encoding != "source":
        return np.zeros(len(src.keys), bool)
    return np.array([fmt in KEPT_FORMATS for fmt in src.formats]) & (sizes == src.sizes).all(axis=1)


def _check_files(pool, src: Source, train: np.ndarray, keep: np.ndarray, channels: int,
                 ahead: int, progress: bool) -> tuple[dict[int, str], np.ndarray]:
    """Decode every image file once, before anything is written: {sample: why} for the bad
    ones (unreadable headers included), and the pixel histogram of the train files that are
    stored byte for byte (the others are counted as they are encoded)."""
    hist = np.zeros((channels, 256), np.int64)
    bad = dict(src.bad)
    if not src.files:
        return bad, hist
    in_train = np.zeros(len(src.keys), bool)
    in_train[train] = True
    mode = "L" if channels == 1 else "RGB"

    def check(chunk: np.ndarray) -> Future:
        files = [src.files[i] for i in chunk]
        return pool.submit(_check_all, files, [bool(in_train[i] and keep[i]) for i in chunk], mode, channels)

    todo = _good(src)
    with Progress(len(todo), "check", progress) as bar:
        chunks = _in_order(check, todo, ahead)
        for start, (whys, counts) in zip(range(0, len(todo), CHUNK), chunks):
            bad.update({int(todo[start + n]): why for n, why in enumerate(whys) if why})
            hist += counts
            bar.update(len(whys))
    return bad, hist


def _check_all(files: list[str], count: list[bool], mode: str, channels: int) -> tuple[list, np.ndarray]:
    """_check_file of each file (run in a worker): why each is bad (None: good), and the
    summed histogram of the ones to `count` (one array back, not one per image)."""
    hist, whys = np.zeros((channels, 256), np.int64), []
    for path, data, n in zip(files, read_files(files), count):
        why, counts = _check_file(path, data, mode, n)
        whys.append(why)
        if counts is not None:
            hist += counts
    return whys, hist


def _check_file(path: str, data: bytes, mode: str, count: bool) -> tuple[str | None, np.ndarray | None]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes it all: a truncated or corrupt file fails here
            return None, histogram(image.convert(mode)) if count else None
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot decode image {path}: {' '.join(str(e).split())}", None


def _leave_out(bad: dict[int, str], indices: dict[str, np.ndarray], src: Source,
               skip_bad: bool) -> dict[str, np.ndarray]:
    """`indices` without the bad samples when `skip_bad`; else one error naming them all."""
    if not bad:
        return indices
    reasons = [bad[i] for i in sorted(bad)]
    for reason in reasons:
        log.warning("%s", reason)
    if not skip_bad:
        more = f" and {len(reasons) - 10} more (all logged above)" if len(reasons) > 10 else ""
        raise ValueError(f"{len(reasons)} bad image file(s) in {src.path}: {'; '.join(reasons[:10])}{more}; "
                         "fix or remove them, or pass --skip-bad to leave them out")
    log.warning("%s: left out %d bad image file(s) (--skip-bad)", src.path, len(reasons))
    out = np.array(sorted(bad), np.int64)
    return {name: idx[~np.isin(idx, out)] for name, idx in indices.items()}


def _skipped(src: Source, bad: dict[int, str]) -> dict:
    root = posixpath.dirname(src.path) if src.kind == "labels" else src.path
    return {"count": len(bad),
            "files": [posixpath.relpath(src.files[i], root) for i in sorted(bad)[:SKIPPED_LISTED]]}


def _item(src: Source, i: int, keep: bool, size: np.ndarray) -> tuple:
    """What a worker needs to encode sample i: the file's name, or the image itself (arrays)."""
    image = src.files[i] if src.files else src.load(i)
    fmt = src.formats[i] if src.formats else None
    label = src.labels[i] if src.multilabel else int(src.labels[i])
    return src.keys[i], label, (int(size[0]), int(size[1])), bool(keep), fmt, image


def _encode_all(items: list[tuple], how: tuple[str, int, int]) -> list[tuple]:
    """_encode of each item (run in a worker); files are read first, in parallel when remote."""
    files = [image for *_, image in items if isinstance(image, str)]
    data = iter(read_files(files))
    return [_encode(*item, next(data) if isinstance(item[5], str) else None, *how) for item in items]


def _encode(key: str, label: int | np.ndarray, size: tuple[int, int], keep: bool, fmt: str | None,
            image, data: bytes | None, encoding: str, channels: int, quality: int
            ) -> tuple[str, int, str, bytes, tuple[int, int], np.ndarray | None]:
    """(key, label, member extension, bytes, (width, height), pixel histogram or None when
    the source bytes are kept: _check_files counted those). `image` is a file's name (its
    bytes in `data`) or an array."""
    wh = (size[1], size[0])
    if keep:
        return key, label, KEPT_FORMATS[fmt], data, wh, None
    array = _conform(open_image(image, data) if data is not None else image, channels, size)
    if encoding == "source":  # a downscaled or non-JPEG/PNG/WebP file: re-encoded once
        encoding = REENCODED_AS.get(fmt, "png")
    ext, data = encode_image(array, encoding, quality)
    if ext in LOSSY:  # the statistics are of the pixels a reader decodes
        array = decode_image(data, ext, {"channels": channels})
    return key, label, ext, data, wh, histogram(array)


def _tally(samples: Iterator[tuple], hist: np.ndarray) -> Iterator[tuple]:
    """The samples, unchanged, adding their pixel histograms to `hist` on the way."""
    for sample in samples:
        if sample[5] is not None:
            hist += sample[5]
        yield sample


def _check_options(encoding, jpeg_quality, shard_bytes, shard_samples, resize, channels, max_side):
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg quality must be in 1..100, got {jpeg_quality}")
    for name, value in (("shard_bytes", shard_bytes), ("shard_samples", shard_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if resize is not None and (len(resize) != 2 or min(resize) < 1):
        raise ValueError(f"resize must be (height, width) with positive sizes, got {resize}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if max_side is not None and resize is not None:
        raise ValueError("give resize (every image to one size) or max_side (downscale the big ones), not both")


def given_splits(splits: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Sample indices per split as the source gives them, each split shuffled (seeded)."""
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(np.flatnonzero(splits == n)) for n, name in enumerate(SPLITS)}


def _own_test(src: Source) -> np.ndarray | None:
    """The source's own test samples, which a re-split keeps as the test split."""
    if src.is_test is not None:
        return src.is_test
    if src.splits is not None and (src.splits == SPLITS.index("test")).any():
        return src.splits == SPLITS.index("test")
    return None


def check_fractions(split: Sequence[float]) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] == 0 \
            or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be train,val,test: three non-negative numbers "
                         f"summing to 1 with train > 0, e.g. 0.7,0.2,0.1; got {split!r}")
    return fractions


def assign_splits(labels: np.ndarray, is_test: np.ndarray | None, num_classes: int,
                  fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Sample indices per split: stratified by class (`labels`: a group per sample, below
    `num_classes`), each split shuffled (seeded)."""
    train, val, test = fractions
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {name: [] for name in SPLITS}
    if is_test is None:
        pool = np.ones(len(labels), bool)
    else:  # the source's own test split stays the test split
        pool = ~is_test
        parts["test"].append(np.flatnonzero(is_test))
        val, test = val / (train + val), 0.0
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(pool & (labels == c)))
        n_val = int(len(members) * val + 0.5)
        n_test = min(int(len(members) * test + 0.5), len(members) - n_val)
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val:n_val + n_test])
        parts["train"].append(members[n_val + n_test:])
    # Global shuffle: every shard is a random sample of its split.
    return {name: rng.permutation(np.concatenate(p)) if p else np.zeros(0, np.int64)
            for name, p in parts.items()}


def class_warnings(classes: list[str], splits: dict, multilabel: bool = False) -> list[str]:
    """Imbalance (one class > 70% of a split; not for multi-label, whose classes overlap) and
    classes absent from a non-empty split."""
    messages = []
    for name, split in splits.items() if not multilabel else ():
        counts, total = split["class_counts"], split["count"]
        top = int(np.argmax(counts)) if counts else 0
        if len(classes) > 1 and total and counts[top] > IMBALANCE * total:
            messages.append(f"class {classes[top]!r} is {counts[top] / total:.0%} of {name} "
                            f"({counts[top]} of {total} samples)")
    for c, cls in enumerate(classes):
        missing = [name for name, s in splits.items() if s["count"] and not s["class_counts"][c]]
        if missing:
            messages.append(f"class {cls!r} has no samples in {' or '.join(missing)}")
    return messages


def _image_meta(src: Source, encoding: str, sizes: np.ndarray, channels: int) -> dict:
    """The manifest's "image": one height and width when every (readable) image has them."""
    good = _good(src)
    height, width = (int(v) for v in sizes[good[0]])
    differ = good[(sizes[good] != sizes[good[0]]).any(axis=1)]
    if differ.size:
        if encoding == "raw":
            i = int(differ[0])
            raise ValueError(
                f"raw encoding needs every image the same size, but {src.origin(i)} is "
                f"{sizes[i][0]}x{sizes[i][1]} and {src.origin(int(good[0]))} is {height}x{width}; "
                "resize them (--resize HxW), or leave --encoding out to keep each file's bytes")
        height = width = None  # source/png/jpeg keep each image's own size
    return {"height": height, "width": width, "channels": channels}


def _conform(image: np.ndarray | Image.Image, channels: int, size) -> np.ndarray:
    """HWC uint8 with `channels` channels and, when given, `size` (height, width)."""
    if isinstance(image, np.ndarray):
        if image.shape[2] == channels and (size is None or image.shape[:2] == size):
            return image
        image = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def _in_order(submit: Callable[[np.ndarray], Future], indices: np.ndarray, ahead: int) -> Iterator:
    """The result of submit() for each chunk of `indices`, at most `ahead` chunks in flight, in order."""
    pending: deque = deque()
    for start in range(0, len(indices), CHUNK):
        pending.append(submit(indices[start:start + CHUNK]))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _cut(samples: Iterator, max_samples: int | None, max_bytes: int | None) -> Iterator[list]:
    shard, size = [], 0
    for sample in samples:
        grow = tar_size(len(sample[3]))
        if shard and ((max_samples and len(shard) >= max_samples)
                      or (max_bytes and size + grow > max_bytes)):
            yield shard
            shard, size = [], 0
        shard.append(sample)
        size += grow
    if shard:
        yield shard


def _put_all(pool: ThreadPoolExecutor, put, split: str, shards: Iterator[list],
             ahead: int, bar: Progress) -> list[tuple[dict, bool]]:
    """put() every shard of a split on the pool, at most `ahead` in flight; results in order."""
    pending: deque = deque()
    results = []
    for n, shard in enumerate(shards):
        pending.append(pool.submit(put, f"{split}/{split}-{n:06d}.tar", shard))
        while pending and (len(pending) > ahead or pending[0].done()):
            results.append(pending.popleft().result())
            bar.update(results[-1][0]["count"])
    while pending:
        results.append(pending.popleft().result())
        bar.update(results[-1][0]["count"])
    return results


def _same_file(url: str, size: int, digest: str) -> bool:
    """Whether `url` already holds exactly these bytes (size first: it costs no download)."""
    fs, path = filesystem(url)
    try:
        if fs.info(path)["size"] != size:
            return False
        return hashlib.sha256(fs.cat_file(path)).hexdigest() == digest
    except FileNotFoundError:
        return False


def _warn_stale(dest: str, manifest: dict) -> None:
    fs, root = filesystem(dest)
    fs.invalidate_cache()
    named = {posixpath.join(root, path) for s in shard_entries(manifest) for path in (s["path"], s["index"])}
    stale = sorted(p for name in SPLITS for p in fs.find(posixpath.join(root, name))
                   if p not in named)
    if stale:
        shown = ", ".join(fs.unstrip_protocol(p) for p in stale[:10])
        more = f" and {len(stale) - 10} more" if len(stale) > 10 else ""
        log.warning("%d files under %s are not in the new manifest (left in place; readers only "
                    "read the manifest's shards): %s%s", len(stale), dest, shown, more)
