"""`build`: a source dataset -> shards and DEST/manifest.json (docs/design.md).

Split rule: the split is stratified per class, `round(n * fraction)` samples of each class
for val and test, the rest for train. When the source has its own test split (IDX t10k,
CIFAR test, npz x_test) that is the test split, unchanged, and val takes
val / (train + val) of each class of the source's train part, so train:val keeps the
configured ratio (0.7,0.2,0.1 -> 2/9 of train becomes val).

Rebuilds are idempotent: the same source and options give byte-identical shards, and a shard
already at DEST with the same size and sha256 is not uploaded again. The manifest is written
last, so readers never see a manifest naming shards that are not there yet. Files under
DEST/<split>/ that the new manifest does not name (shards of an earlier, different build) are
left in place and listed in a warning: readers only read the shards the manifest names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from shardio.format import ENCODINGS, FORMAT, check_key, encode_image, tar_size, write_tar
from shardio.storage import filesystem, join, write_bytes_atomic

from . import __version__
from .sources import Source, open_source

log = logging.getLogger("shards")

SPLITS = ("train", "val", "test")
DEFAULT_SHARD_BYTES = 64 * 10**6
IMBALANCE = 0.7  # warn when one class is more than this share of a split
CHUNK = 256      # samples per encoding task: big enough to amortise the task overhead


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def build(source: str | os.PathLike, dest: str | os.PathLike, *,
          split: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0, encoding: str = "raw",
          jpeg_quality: int = 90, shard_bytes: int | None = None,
          shard_samples: int | None = None, workers: int | None = None,
          resize: tuple[int, int] | None = None, channels: int | None = None,
          progress: bool = True) -> dict:
    """Write `source` as shards under `dest` and return the manifest (also at dest/manifest.json).

    Shards are cut at `shard_samples` samples or about `shard_bytes` bytes, whichever comes
    first (default 64 MB). `channels` 1 or 3 forces grayscale or RGB; by default images
    stay grayscale when all of them are. `resize` is (height, width).
    """
    fractions = check_fractions(split)
    _check_options(encoding, jpeg_quality, shard_bytes, shard_samples, resize, channels)
    if shard_bytes is None and shard_samples is None:
        shard_bytes = DEFAULT_SHARD_BYTES
    workers = workers or default_workers()
    dest = str(dest).rstrip("/")

    src = open_source(source, workers)
    for key in src.keys:
        check_key(key)
    image = _image_meta(src, encoding, resize, channels)
    size = None if image["height"] is None else (image["height"], image["width"])
    indices = assign_splits(src.labels, src.is_test, len(src.classes), fractions, seed)

    def encode(chunk: np.ndarray) -> list[tuple[str, int, str, bytes]]:
        out = []
        for i in chunk:
            array = _conform(src.load(i), image["channels"], size)
            ext, data = encode_image(array, encoding, jpeg_quality)
            out.append((src.keys[i], int(src.labels[i]), ext, data))
        return out

    def put(path: str, samples: list) -> tuple[dict, bool]:
        data = write_tar(samples)
        digest = hashlib.sha256(data).hexdigest()
        written = not _same_file(join(dest, path), len(data), digest)
        if written:
            write_bytes_atomic(join(dest, path), data)
        counts = np.bincount([s[1] for s in samples], minlength=len(src.classes))
        return {"path": path, "count": len(samples), "bytes": len(data), "sha256": digest,
                "class_counts": counts.tolist()}, written

    filesystem(dest)[0].invalidate_cache()  # another process may have changed DEST
    splits, written = {}, 0
    total = sum(len(v) for v in indices.values())
    pool = ThreadPoolExecutor(workers)
    try:
        with tqdm(total=total, unit="img", desc="shards", disable=not progress) as bar:
            for name in SPLITS:
                samples = _in_order(pool, encode, indices[name], ahead=2 * workers)
                results = _put_all(pool, put, name, _cut(samples, shard_samples, shard_bytes),
                                   2 * workers, bar)
                written += sum(w for _, w in results)
                counts = np.bincount(src.labels[indices[name]], minlength=len(src.classes))
                splits[name] = {"count": len(indices[name]), "class_counts": counts.tolist(),
                                "shards": [entry for entry, _ in results]}
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # stop at the first error
        raise
    pool.shutdown()

    manifest = {
        "format": FORMAT,
        "tool_version": __version__,
        "source": src.describe(),
        "seed": seed,
        "split_fractions": list(fractions),
        "classes": src.classes,
        "encoding": encoding,
        **({"jpeg_quality": jpeg_quality} if encoding == "jpeg" else {}),
        "image": image,
        "splits": splits,
        "warnings": class_warnings(src.classes, splits),
    }
    for message in manifest["warnings"]:
        log.warning("%s", message)
    _warn_stale(dest, manifest)
    write_bytes_atomic(join(dest, "manifest.json"), manifest_bytes(manifest))
    n_shards = sum(len(s["shards"]) for s in splits.values())
    log.info("%s: %d samples in %d shards (%d uploaded, %d already up to date)",
             dest, total, n_shards, written, n_shards - written)
    return manifest


def _check_options(encoding, jpeg_quality, shard_bytes, shard_samples, resize, channels):
    if encoding not in ENCODINGS:
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


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]")


def manifest_bytes(manifest: dict) -> bytes:
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    # Lists of numbers (class counts) on one line keep the manifest readable.
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m[1])) + "]", text)
    return (text + "\n").encode()


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
    """Sample indices per split: stratified by class, each split shuffled (seeded)."""
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


def class_warnings(classes: list[str], splits: dict) -> list[str]:
    """Imbalance (one class > 70% of a split) and classes absent from a non-empty split."""
    messages = []
    for name, split in splits.items():
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


def _image_meta(src: Source, encoding: str, resize, channels) -> dict:
    if resize is not None:
        height, width = (int(v) for v in resize)
    else:
        height, width = (int(v) for v in src.sizes[0])
        differ = np.flatnonzero((src.sizes != src.sizes[0]).any(axis=1))
        if differ.size:
            if encoding == "raw":
                i = int(differ[0])
                raise ValueError(
                    f"raw encoding needs every image the same size, but {src.origin(i)} is "
                    f"{src.sizes[i][0]}x{src.sizes[i][1]} and {src.origin(0)} is "
                    f"{height}x{width}; resize them (--resize HxW) or use --encoding png")
            height = width = None  # png/jpeg keep each image's own size
    return {"height": height, "width": width, "channels": channels or src.channels}


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


def _in_order(pool: ThreadPoolExecutor, encode, indices: np.ndarray, ahead: int) -> Iterator:
    """encode() over chunks of `indices` on the pool, at most `ahead` chunks in flight, in order."""
    pending: deque = deque()
    for start in range(0, len(indices), CHUNK):
        pending.append(pool.submit(encode, indices[start:start + CHUNK]))
        if len(pending) >= ahead:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


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
             ahead: int, bar: tqdm) -> list[tuple[dict, bool]]:
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
    named = {posixpath.join(root, s["path"])
             for split in manifest["splits"].values() for s in split["shards"]}
    stale = sorted(p for name in SPLITS for p in fs.find(posixpath.join(root, name))
                   if p not in named)
    if stale:
        shown = ", ".join(fs.unstrip_protocol(p) for p in stale[:10])
        more = f" and {len(stale) - 10} more" if len(stale) > 10 else ""
        log.warning("%d files under %s are not in the new manifest (left in place; readers only "
                    "read the manifest's shards): %s%s", len(stale), dest, shown, more)
