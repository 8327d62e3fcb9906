"""DEST/manifest.json: read (format and path checks) and write (docs/design.md).

The manifest keeps per-shard totals only (path, count, bytes, sha256, class counts, and the
path of the shard's index); what is per sample (offsets, labels, [w, h], checksums) is in
each shard's index (shardio.shard), so the manifest stays small at any sample count.
Manifests written before the indexes existed (per-sample `sizes`, no `index`) still read:
their shards are read whole.
"""
from __future__ import annotations

import json
import re

from . import storage
from .format import FORMAT, check_shard_paths

NAME = "manifest.json"


def url_of(dest: str) -> str:
    return storage.join(dest, NAME)


def read(dest: str, retry_s: float = storage.DEFAULT_RETRY_S) -> dict:
    """The manifest at `dest`. FileNotFoundError (from storage) when there is none; ValueError,
    naming its URL, when it is not JSON, not this format, or names a shard outside `dest`."""
    url = url_of(dest)
    data = storage.read_bytes(url, retry_s)
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{url} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{url}: format {found!r}, expected {FORMAT!r}")
    check_shard_paths(manifest, url)  # no absolute or `..` paths out of the dataset
    return manifest


def write(dest: str, manifest: dict) -> None:
    storage.write_bytes_atomic(url_of(dest), manifest_bytes(manifest))


def shard_entries(manifest: dict) -> list[dict]:
    """Every split's shard entries, in split order."""
    return [shard for split in manifest["splits"].values() for shard in split["shards"]]


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]")
_PAIR_LIST = re.compile(r"\[\s*(\[\d+, \d+\](?:,\s*\[\d+, \d+\])*)\s*\]")


def manifest_bytes(manifest: dict) -> bytes:
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    # Lists of numbers (class counts) and of [w, h] pairs on one line keep the manifest readable.
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m[1])) + "]", text)
    text = _PAIR_LIST.sub(lambda m: "[" + ", ".join(re.split(r"(?<=\]),\s*", m[1])) + "]", text)
    return (text + "\n").encode()
