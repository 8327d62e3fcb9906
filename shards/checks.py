"""Reading a built dataset back: `load_manifest`, `verify` and `inspect`."""
from __future__ import annotations

import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from shardio import manifest as manifests
from shardio import shard as shardfile
from shardio.format import EXTENSIONS, decode_sample, image_member, read_tar
from shardio.storage import filesystem, join

from .progress import Progress

log = logging.getLogger("shards")


def load_manifest(dest: str) -> dict:
    try:
        return manifests.read(dest)
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest at {manifests.url_of(dest)}") from None


def verify(dest: str, deep: bool = False, workers: int | None = None, progress: bool = False) -> list[str]:
    """Problems found at `dest` (empty when all is well), each naming the shard's full URL.

    Checks every shard's size, sha256 and sample count against the manifest, its index
    against the shard (offsets and CRC32s), that each sample has exactly a .cls and an image
    member, and that keys are unique. `deep` also decodes every image and label and checks
    per-class counts and the index's labels and image sizes;
    `progress` shows how far it is (a bar on a terminal, else log lines).
    """
    dest = str(dest).rstrip("/")
    try:
        manifest = load_manifest(dest)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    filesystem(dest)[0].invalidate_cache()  # DEST may have changed since this process looked
    problems = _manifest_problems(manifest)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    results = []
    with ThreadPoolExecutor(workers) as pool, \
            Progress(sum(s["count"] for s in shards), "verify", progress and deep) as bar:
        for shard, result in zip(shards, pool.map(lambda s: _check_shard(dest, s, manifest, deep), shards)):
            results.append(result)
            bar.update(shard["count"])
    first_seen: dict[str, str] = {}
    for shard, (shard_problems, keys) in zip(shards, results):
        problems += shard_problems
        url = join(dest, shard["path"])
        for key in keys:
            if key in first_seen:
                problems.append(f"{url}: sample key {key} is also in {first_seen[key]}")
            first_seen.setdefault(key, url)
    return problems


def _manifest_problems(manifest: dict) -> list[str]:
    problems = []
    for name, split in manifest["splits"].items():
        count = sum(s["count"] for s in split["shards"])
        counts = np.sum([s["class_counts"] for s in split["shards"]], axis=0, dtype=np.int64)
        if count != split["count"] or (count and counts.tolist() != split["class_counts"]):
            problems.append(f"manifest: split {name} says {split['count']} samples "
                            f"but its shards add up to {count}, or class counts disagree")
    return problems


def _check_shard(dest: str, shard: dict, manifest: dict, deep: bool) -> tuple[list[str], list[str]]:
    url = join(dest, shard["path"])
    try:
        data = shardfile.fetch(url)
        shardfile.check(data, shard, url)
        index = shardfile.read_index(url) if "index" in shard else None
    except shardfile.ShardError as e:
        return [str(e)], []
    if index is not None and not index.matches(shard):  # the reader reads such a shard whole
        log.warning("%s indexes another shard than the manifest's (stale): readers read %s whole; "
                    "`python -m shards index` rewrites the indexes", shardfile.index_path(url), url)
        index = None
    problems, keys = _index_problems(data, index, url), []
    counts = np.zeros(len(manifest["classes"]), np.int64)
    sizes = shard.get("sizes") if index is None else index.records[["width", "height"]].tolist()
    labels = None if index is None else index.records["label"].tolist()
    try:
        for sample in read_tar(data):
            keys.append(sample["__key__"])
            problem = _members_problem(sample, manifest["encoding"])
            if problem:
                problems.append(f"{url}: sample {sample['__key__']} {problem}")
            elif deep:
                try:
                    image, label = decode_sample(sample, manifest)
                    counts[label] += 1
                    _check_size(image, sizes, len(keys) - 1, sample["__key__"])
                    # multi-label: the first
                    indexed = (label[0] if label else -1) if isinstance(label, list) else label
                    if labels is not None and len(keys) <= len(labels) and labels[len(keys) - 1] != indexed:
                        problems.append(f"{url}: sample {sample['__key__']}: label {label}, the index says "
                                        f"{labels[len(keys) - 1]}")
                except ValueError as e:
                    problems.append(f"{url}: {e}")
    except (tarfile.TarError, ValueError) as e:
        return [f"{url}: not a readable tar: {e}"], keys
    if len(keys) != shard["count"]:
        problems.append(f"{url}: {len(keys)} samples, the manifest says {shard['count']}")
    elif deep and not problems and counts.tolist() != shard["class_counts"]:
        problems.append(f"{url}: class counts {counts.tolist()} differ from the manifest's "
                        f"{shard['class_counts']}")
    return problems, keys


def _index_problems(data: bytes, index: shardfile.Index | None, url: str) -> list[str]:
    """Whether the index's offsets and CRC32s are the shard's."""
    if index is None:
        return []
    records = index.records
    try:
        again = shardfile.Index.of(data, records["label"], records[["width", "height"]].tolist()).records
    except ValueError as e:
        return [f"{url}: {e}"]
    if not np.array_equal(again, records):
        return [f"{shardfile.index_path(url)}: offsets or CRC32s differ from the shard's"]
    return []


def _members_problem(sample: dict, encoding: str) -> str | None:
    """Why a sample's members are wrong (a .cls and one image member), or None."""
    members = sorted(set(sample) - {"__key__"})
    if encoding != "source":
        ext = EXTENSIONS[encoding]
        return None if members == sorted(["cls", ext]) else f"has members {members}, expected cls and {ext}"
    if "cls" not in sample:
        return f"has members {members}, expected cls and an image"
    try:
        image_member(sample, encoding)
    except ValueError as e:
        return str(e)
    return None


def _check_size(image: np.ndarray, sizes: list | None, n: int, key: str) -> None:
    """ValueError when a decoded image is not the index's (or an older manifest's) [width,
    height] for the shard's n-th sample."""
    if sizes is None:
        return
    size = list(sizes[n]) if n < len(sizes) else None
    if [image.shape[1], image.shape[0]] != size:
        raise ValueError(f"sample {key}: image is {image.shape[1]}x{image.shape[0]} (WxH), "
                         f"the shard's index says {size}")


def inspect(dest: str) -> str:
    """A text summary: source, image format, samples and shards per split, class histogram."""
    dest = str(dest).rstrip("/")
    m = load_manifest(dest)
    src, image, splits = m["source"], m["image"], m["splits"]
    size = ("variable size" + _size_range(dest, splits) if image["height"] is None
            else f"{image['height']}x{image['width']}")
    quality = f" (quality {m['jpeg_quality']})" if m["encoding"] == "jpeg" else ""
    lines = [
        f"{dest}",
        f"source: {src['name']} ({src['kind']}, {src['path']}), seed {m['seed']}, "
        f"shards {m['tool_version']}",
        f"images: {size}, {image['channels']} channel(s), {m['encoding']} encoding{quality}",
        "",
    ]
    lines += _table(["split", "samples", "shards", "bytes"],
                    [[name, s["count"], len(s["shards"]),
                      _human(sum(x["bytes"] for x in s["shards"]))] for name, s in splits.items()])
    lines.append("")
    names = list(splits)
    rows = [[cls] + [splits[n]["class_counts"][c] for n in names]
            + [sum(splits[n]["class_counts"][c] for n in names)]
            for c, cls in enumerate(m["classes"])]
    rows.append(["total"] + [splits[n]["count"] for n in names]
                + [sum(splits[n]["count"] for n in names)])
    lines += _table(["class"] + names + ["total"], rows)
    if m.get("stats"):
        s = m["stats"]
        lines += ["", f"pixel mean {s['mean']}, std {s['std']} (of {s['split']}, in [0, 1])"]
    if m.get("skipped"):
        lines += [f"skipped {m['skipped']['count']} bad image file(s), e.g. {m['skipped']['files'][0]}"]
    if m.get("warnings"):
        lines += ["", "warnings:"] + [f"  - {w}" for w in m["warnings"]]
    return "\n".join(lines)


def _size_range(dest: str, splits: dict) -> str:
    """" (WxH 40x40 to 300x300)": the smallest and largest width and height, from the shards'
    indexes (an older manifest's `sizes`)."""
    def sizes_of(shard: dict) -> list:
        if "index" not in shard:
            return shard.get("sizes", [])
        return shardfile.read_index(join(dest, shard["path"])).records[["width", "height"]].tolist()

    with ThreadPoolExecutor() as pool:
        sizes = np.array([wh for found in pool.map(sizes_of, [x for s in splits.values() for x in s["shards"]])
                          for wh in found])
    if not len(sizes):
        return ""
    low, high = sizes.min(axis=0), sizes.max(axis=0)
    return f" (WxH {low[0]}x{low[1]} to {high[0]}x{high[1]})"


def _table(header: list, rows: list[list]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
