"""`index`: DEST/manifest.json for WebDataset shards that another tool wrote (webdataset's
TarWriter, ...), so that imgcls reads them unchanged (docs/design.md).

Each sample must hold KEY.cls (a decimal label) and one image member KEY.jpg, .jpeg, .png or
.webp; other members (.json, .txt) are ignored. When any .cls holds several class indices
("0 2", "3,7"; then an empty one is a sample without a label), the dataset is multi-label
(`task: multilabel`, design.md). The manifest's encoding is "source". Every image is decoded
once, to check it and to count the pixel statistics; any bad sample fails the index, all
named in one error. Like build, index writes timm's _info.json beside the manifest.
"""
from __future__ import annotations

import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from shardio import shard as shardfile
from shardio.format import FORMAT, MULTILABEL, check_key, decode_labels, image_member
from shardio.image import Encoded
from shardio.storage import filesystem, join

from . import __version__
from .progress import Progress
from .sources import GRAY_MODES
from .stats import channel_stats, histogram
from .writer import SPLITS, class_counts, class_warnings, default_workers, write_dataset_files

log = logging.getLogger("shards")
# train-000000.tar, val_3.tar, validation-00.tar, test.tar: the split starts the file name.
_SPLIT_IN_NAME = re.compile(r"(train|validation|valid|val|test)(?![a-z])", re.IGNORECASE)
_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
NO_LABEL = 1 << 62  # labels are checked against the class count once all shards are read


def index(url: str, split: str | None = None, classes: list[str] | None = None,
          workers: int | None = None, progress: bool = True) -> dict:
    """Describe the .tar shards under `url` (any depth) in url/manifest.json; return it.

    A shard's split is `split`, or else the start of its file name (train..., val...,
    valid..., validation..., test...). `classes` names the labels 0, 1, ...; by default
    "0", "1", ... up to the largest label.
    """
    url = str(url).rstrip("/")
    fs, root = filesystem(url)
    fs.invalidate_cache()
    paths = sorted(posixpath.relpath(p, root) for p in fs.find(root) if p.endswith(".tar"))
    if not paths:
        raise FileNotFoundError(f"{url}: no .tar shards under it")
    splits_of = {path: split or split_of(path, url) for path in paths}

    with ThreadPoolExecutor(workers or default_workers()) as pool, \
            Progress(len(paths), "index", progress, unit="shards") as bar:
        shards = []
        for shard in pool.map(lambda p: describe_shard(url, p, splits_of[p] == "train"), paths):
            shards.append(shard)
            bar.update(1)
    _check_samples(url, shards)
    with ThreadPoolExecutor(workers or default_workers()) as pool:  # beside each shard
        list(pool.map(lambda s: shardfile.write_index(join(url, s["path"]), s["index"]), shards))

    multilabel = any(len(labels) > 1 for s in shards for labels in s["labels"])
    if not classes:
        _check_label_range(url, shards)
    num_classes = len(classes) if classes else \
        1 + max((max(labels, default=-1) for s in shards for labels in s["labels"]), default=-1)
    classes = list(classes) if classes else [str(c) for c in range(num_classes)]
    _check_labels(url, shards, num_classes, multilabel)
    sizes = {tuple(wh) for s in shards for wh in s["sizes"]}
    channels = 1 if all(s["gray"] for s in shards) else 3
    fixed = next(iter(sizes)) if len(sizes) == 1 else None
    width, height = fixed if fixed else (None, None)
    image = {"height": height, "width": width, "channels": channels}

    splits = {}
    for name in SPLITS:
        entries = [_entry(s, num_classes, multilabel) for s in shards if splits_of[s["path"]] == name]
        counts = np.sum([e["class_counts"] for e in entries], axis=0, dtype=np.int64) if entries \
            else np.zeros(num_classes, np.int64)
        splits[name] = {"count": sum(e["count"] for e in entries), "class_counts": counts.tolist(),
                        "shards": entries}
    stats_split = "train" if splits["train"]["count"] else max(splits, key=lambda n: splits[n]["count"])
    manifest = {
        "format": FORMAT,
        "tool_version": __version__,
        "source": {"kind": "webdataset", "path": url, "name": posixpath.basename(root)},
        "seed": None,
        "classes": classes,
        **({"task": MULTILABEL} if multilabel else {}),
        "encoding": "source",
        "image": image,
        "stats": _stats([s for s in shards if splits_of[s["path"]] == stats_split], channels, stats_split),
        "splits": splits,
        "warnings": class_warnings(classes, splits, multilabel),
    }
    for message in manifest["warnings"]:
        log.warning("%s", message)
    write_dataset_files(url, manifest)
    log.info("%s: indexed %d samples in %d shards", url, sum(s["count"] for s in splits.values()), len(paths))
    return manifest


def split_of(path: str, url: str) -> str:
    match = _SPLIT_IN_NAME.match(posixpath.basename(path))
    if not match:
        raise ValueError(f"{join(url, path)}: cannot tell its split from the file name "
                         "(train..., val..., test...); pass --split")
    return _SPLIT_NAMES[match[1].lower()]


def describe_shard(url: str, path: str, count_pixels: bool) -> dict:
    """A shard's bytes, sha256, keys, labels (a list of class indices) and [width, height] per
    sample; its bad samples;
    with `count_pixels`, the pixel histograms of its gray ("L") and colour ("RGB") images."""
    shard_url = join(url, path)
    data = shardfile.fetch(shard_url)
    keys, labels, sizes, bad = [], [], [], []
    gray, hist_l, hist_rgb = True, np.zeros((1, 256), np.int64), np.zeros((3, 256), np.int64)
    samples = shardfile.samples(data, None, shard_url)
    for sample in samples:
        key = sample["__key__"]
        try:
            check_key(key)
            ext = image_member(sample, "source")
            label = decode_labels(sample.get("cls"), NO_LABEL)
            width, height, mode, counts = _decode(sample[ext], count_pixels)
        except ValueError as e:
            bad.append(f"{shard_url}: sample {key}: {e}")
            continue
        keys.append(key)
        labels.append(label)
        sizes.append([width, height])
        gray = gray and mode in GRAY_MODES
        if counts is not None:
            if counts.shape[0] == 1:
                hist_l += counts
            else:
                hist_rgb += counts
    firsts = [indices[0] if indices else -1 for indices in labels]  # the index holds one label per sample
    index = None if bad else shardfile.Index.of(data, firsts, sizes)
    return {"path": path, "bytes": len(data), "sha256": index.shard_sha256 if index else None, "keys": keys,
            "labels": labels, "sizes": sizes, "index": index, "bad": bad, "gray": gray, "hist_l": hist_l,
            "hist_rgb": hist_rgb}


def _decode(data: bytes, count_pixels: bool) -> tuple[int, int, str, np.ndarray | None]:
    """(width, height, mode, histogram or None) of an encoded image, decoded in full."""
    try:
        with Encoded(data).pil() as image:  # the one decoder: format sniffed, size checked
            image.load()
            counts = None
            if count_pixels:
                counts = histogram(image.convert("L" if image.mode in GRAY_MODES else "RGB"))
            return image.width, image.height, image.mode, counts
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"cannot decode image: {' '.join(str(e).split())}") from None


def _check_samples(url: str, shards: list[dict]) -> None:
    """One error naming every bad sample and every key that is in two shards."""
    problems = [b for s in shards for b in s["bad"]]
    first: dict[str, str] = {}
    for shard in shards:
        for key in shard["keys"]:
            if key in first:
                problems.append(f"{join(url, shard['path'])}: sample key {key} is also in {first[key]}")
            first.setdefault(key, join(url, shard["path"]))
    if problems:
        for problem in problems:
            log.warning("%s", problem)
        more = f" and {len(problems) - 10} more (all logged above)" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} bad sample(s) under {url}: {'; '.join(problems[:10])}{more}")


def _check_label_range(url: str, shards: list[dict]) -> None:
    """Without --classes the largest label sets the class count: refuse one that makes it far
    wider than the labels in use (a stray `.cls` of 400000 would make a 400,000-way head)."""
    used = {label for s in shards for labels in s["labels"] for label in labels}
    if not used or max(used) < 2 * len(used) + 10:
        return
    shard, key, label = max(((s, k, max(lb)) for s in shards for k, lb in zip(s["keys"], s["labels"]) if lb),
                            key=lambda t: t[2])
    raise ValueError(f"{join(url, shard['path'])}: sample {key}: label {label} would make {label + 1} classes, "
                     f"but only {len(used)} distinct labels are used; fix the label, or pass --classes "
                     "to name every class if the range is meant")


def _check_labels(url: str, shards: list[dict], num_classes: int, multilabel: bool) -> None:
    for shard in shards:
        for key, labels in zip(shard["keys"], shard["labels"]):
            if not labels and not multilabel:
                raise ValueError(f"{join(url, shard['path'])}: sample {key}: empty .cls (no label)")
            label = max(labels, default=0)
            if label >= num_classes:
                raise ValueError(f"{join(url, shard['path'])}: sample {key}: label {label} is outside "
                                 f"the {num_classes} classes given")


def _entry(shard: dict, num_classes: int, multilabel: bool) -> dict:
    if multilabel:
        labels = np.zeros((len(shard["keys"]), num_classes), bool)
        for row, indices in zip(labels, shard["labels"]):
            row[indices] = True
    else:
        labels = np.array([indices[0] for indices in shard["labels"]], np.int64)
    return {"path": shard["path"], "count": len(shard["keys"]), "bytes": shard["bytes"], "sha256": shard["sha256"],
            "class_counts": class_counts(labels, num_classes), "index": shardfile.index_path(shard["path"])}


def _stats(shards: list[dict], channels: int, split: str) -> dict:
    """Gray images count in every colour channel (their RGB conversion repeats the gray value)."""
    hist_l = sum((s["hist_l"] for s in shards), np.zeros((1, 256), np.int64))
    hist = hist_l if channels == 1 else sum((s["hist_rgb"] for s in shards), np.zeros((3, 256), np.int64)) + hist_l
    return channel_stats(hist, split, sum(len(s["keys"]) for s in shards))
