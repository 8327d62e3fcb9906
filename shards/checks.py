"""Reading a built dataset back: `load_manifest`, `verify` and `inspect`."""
from __future__ import annotations

import hashlib
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from shardio.format import EXTENSIONS, FORMAT, check_shard_paths, decode_sample, read_tar
from shardio.storage import filesystem, join, read_bytes


def load_manifest(dest: str) -> dict:
    url = join(dest, "manifest.json")
    try:
        manifest = json.loads(read_bytes(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest at {url}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{url} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    check_shard_paths(manifest, url)
    return manifest


def verify(dest: str, deep: bool = False, workers: int | None = None) -> list[str]:
    """Problems found at `dest` (empty when all is well), each naming the shard's full URL.

    Checks every shard's size, sha256 and sample count against the manifest, that each sample
    has exactly a .cls and an image member, and that keys are unique. `deep` also decodes
    every image and label and checks per-class counts.
    """
    dest = str(dest).rstrip("/")
    try:
        manifest = load_manifest(dest)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    filesystem(dest)[0].invalidate_cache()  # DEST may have changed since this process looked
    problems = _manifest_problems(manifest)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda s: _check_shard(dest, s, manifest, deep), shards))
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
        data = read_bytes(url)
    except FileNotFoundError:
        return [f"{url}: missing"], []
    if len(data) != shard["bytes"]:
        return [f"{url}: {len(data)} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced)"], []
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        return [f"{url}: sha256 does not match the manifest (corrupt)"], []

    ext = EXTENSIONS[manifest["encoding"]]
    problems, keys = [], []
    counts = np.zeros(len(manifest["classes"]), np.int64)
    try:
        for sample in read_tar(data):
            keys.append(sample["__key__"])
            members = sorted(set(sample) - {"__key__"})
            if members != sorted(["cls", ext]):
                problems.append(f"{url}: sample {sample['__key__']} has members {members}, "
                                f"expected cls and {ext}")
            elif deep:
                try:
                    counts[decode_sample(sample, manifest)[1]] += 1
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


def inspect(dest: str) -> str:
    """A text summary: source, image format, samples and shards per split, class histogram."""
    dest = str(dest).rstrip("/")
    m = load_manifest(dest)
    src, image, splits = m["source"], m["image"], m["splits"]
    size = ("variable size" if image["height"] is None
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
    if m.get("warnings"):
        lines += ["", "warnings:"] + [f"  - {w}" for w in m["warnings"]]
    return "\n".join(lines)


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
