"""One shard: fetched and verified whole (size, sha256, tar, count), or some of its samples
read by byte range through the shard's index. Used by the reader, `verify` and `index`.

The index (`NAME.idx` beside `NAME.tar`, docs/design.md) holds one record per sample, in tar
order: the byte span of its members (headers included, so the span alone reads back as the
sample), the CRC32 of those bytes, its label and [width, height]. Its header names the
shard's size and sha256, so an index left behind by a rewritten shard is known to be stale.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import storage
from .format import read_tar, read_tar_spans

MAGIC = b"imgcls.shard-index/1\n"
RECORD = np.dtype([("offset", "<u8"), ("size", "<u8"), ("crc32", "<u4"), ("label", "<i8"),
                   ("width", "<u4"), ("height", "<u4")])


class ShardError(ValueError):
    """A shard that is missing, unreadable or not what the manifest or its index says: one
    line naming its URL (and the sample's key when one is to blame)."""


def index_path(shard_path: str) -> str:
    """Where a shard's index lies: beside it, `.tar` replaced by `.idx`."""
    return (shard_path[:-4] if shard_path.endswith(".tar") else shard_path) + ".idx"


@dataclass(frozen=True)
class Index:
    shard_bytes: int
    shard_sha256: str
    records: np.ndarray  # RECORD per sample, in tar order

    @classmethod
    def of(cls, data: bytes, labels, sizes) -> Index:
        """The index of a shard's bytes, with each sample's label and [width, height]."""
        spans = [(start, end) for _, start, end in read_tar_spans(data)]
        if not len(spans) == len(labels) == len(sizes):
            raise ValueError(f"{len(spans)} samples in the tar, {len(labels)} labels, {len(sizes)} sizes")
        records = np.zeros(len(spans), RECORD)
        view = memoryview(data)
        for n, (start, end) in enumerate(spans):
            records[n] = (start, end - start, zlib.crc32(view[start:end]), labels[n], *sizes[n])
        return cls(len(data), hashlib.sha256(data).hexdigest(), records)

    def to_bytes(self) -> bytes:
        header = {"bytes": self.shard_bytes, "sha256": self.shard_sha256, "count": len(self.records)}
        return MAGIC + json.dumps(header).encode() + b"\n" + self.records.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, url: str) -> Index:
        try:
            if not data.startswith(MAGIC):
                raise ValueError(f"does not start with {MAGIC!r}")
            line, _, body = data[len(MAGIC):].partition(b"\n")
            header = json.loads(line)
            if len(body) != header["count"] * RECORD.itemsize:
                raise ValueError(f"{len(body)} bytes of records for {header['count']} samples")
            return cls(int(header["bytes"]), str(header["sha256"]), np.frombuffer(body, RECORD))
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"shard index {url} is not readable: {e}") from None

    def matches(self, entry: dict) -> bool:
        """Whether this indexes the shard the manifest's `entry` describes."""
        return (self.shard_bytes, self.shard_sha256, len(self.records)) == (
            entry["bytes"], entry["sha256"], entry["count"])


def write_index(shard_url: str, index: Index) -> None:
    """Write `index` beside its shard, unless the same bytes are there (a rebuild)."""
    url, data = index_path(shard_url), index.to_bytes()
    try:
        if storage.read_bytes(url, 0) == data:
            return
    except FileNotFoundError:
        pass
    storage.write_bytes_atomic(url, data)


# ---- whole shards ----------------------------------------------------------------------
def fetch(url: str, retry_s: float = storage.DEFAULT_RETRY_S) -> bytes:
    """A shard's (or an index's) bytes; ShardError naming it when it cannot be read."""
    try:
        return storage.read_bytes(url, retry_s)
    except FileNotFoundError:
        raise ShardError(f"shard {url} is missing") from None
    except Exception as e:
        raise ShardError(f"shard {url} could not be read: {e}") from e


def check(data: bytes, entry: dict, url: str) -> None:
    """ShardError unless `data` has the manifest entry's size and sha256."""
    if len(data) != entry["bytes"]:
        raise ShardError(f"shard {url} is corrupt: {len(data)} bytes, the manifest says {entry['bytes']} "
                         "(truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"shard {url} is corrupt: its sha256 differs from the manifest's")


def samples(data: bytes, count: int | None, url: str) -> list[dict]:
    """The shard's samples; ShardError when it is not a tar or (given `count`) holds another count."""
    try:
        found = list(read_tar(data))
    except Exception as e:
        raise ShardError(f"shard {url} is not a readable tar: {e}") from e
    if count is not None and len(found) != count:
        raise ShardError(f"shard {url} holds {len(found)} samples, the manifest says {count}")
    return found


def read(url: str, entry: dict, retry_s: float = storage.DEFAULT_RETRY_S, verify: bool = True) -> list[dict]:
    """Every sample of a shard: fetched whole, size and sha256 checked (`verify`), counted."""
    data = fetch(url, retry_s)
    if verify:
        check(data, entry, url)
    return samples(data, entry["count"], url)


def read_index(url: str, retry_s: float = storage.DEFAULT_RETRY_S) -> Index:
    """The index of the shard at `url` (ShardError when it is missing or unreadable)."""
    where = index_path(url)
    return Index.from_bytes(fetch(where, retry_s), where)


# ---- some samples, by byte range -------------------------------------------------------
def windows(index: Index, members: np.ndarray, max_bytes: int) -> list[np.ndarray]:
    """`members` (sample numbers, in reading order) cut into consecutive runs of at most
    `max_bytes` of samples each (at least one sample): what a reader fetches at once."""
    cuts, total = [], 0
    for n, size in enumerate(index.records["size"][members].tolist()):
        if total and total + size > max_bytes:
            cuts.append(n)
            total = 0
        total += size
    return np.split(members, cuts) if len(members) else []


SLACK = 0.1  # ranged reads may fetch this much more than their samples' bytes, to save requests
# Client CPU of reading a shard through s3fs, measured here against moto (bench/README.md, "Whole
# or ranged"): the loader is CPU-bound, and read-ahead hides latency but not CPU.
REQUEST_S = 1.8e-3  # one ranged request (signing, the HTTP exchange, parsing its answer)
BYTE_S = 2.4e-9     # a byte of a whole read: its transfer and its sha256
MEMBER_S = 9.5e-6   # a sample parsed out of a whole shard's tar


def reads_whole(needed: int, entry: dict, max_bytes: int) -> bool:
    """Whether `needed` samples of the shard the manifest's `entry` describes cost less CPU to
    fetch by reading the shard whole (one request: every byte fetched, hashed and parsed) than
    by range (the index, then about one request per sample), and the shard fits in a window.
    Decided from the manifest alone, before any index is read. A 5 MB shard of 2000 small
    samples reads whole from 17 needed, a 64 MB shard of 580 ImageNet photos from 13% of it;
    shards larger than a window (ImageNet's 140 MB at the default) are always read by range."""
    count = max(1, entry["count"])
    in_vain = (entry["bytes"] * BYTE_S + count * MEMBER_S) * (1 - needed / count)
    return entry["bytes"] <= max_bytes and in_vain <= (needed + 1) * REQUEST_S


def coalesce(starts: np.ndarray, ends: np.ndarray, slack: float = SLACK) -> tuple[list[int], list[int]]:
    """Byte spans (not overlapping) as fewer, sorted ranges: neighbours merged, the smallest gaps
    first, while the gaps fetched stay within `slack` of the spans' own bytes. Adjacent spans
    always merge; every range is a request, so fewer ranges cost less latency."""
    order = np.argsort(starts, kind="stable")
    starts, ends = np.asarray(starts)[order], np.asarray(ends)[order]
    gaps = starts[1:] - ends[:-1]
    by_size = np.argsort(gaps, kind="stable")
    merged = np.zeros(len(gaps), bool)
    merged[by_size[np.cumsum(gaps[by_size]) <= slack * (ends - starts).sum()]] = True
    cuts = np.flatnonzero(~merged) + 1
    return starts[np.r_[0, cuts]].tolist(), ends[np.r_[cuts - 1, len(ends) - 1]].tolist()


@dataclass
class Fetched:
    """Some samples of one shard, fetched by range and still encoded: `samples()` yields them
    in the order asked, each checked against the index's CRC32."""
    url: str
    members: np.ndarray
    views: list[memoryview]
    crc32: np.ndarray

    def samples(self) -> Iterator[dict]:
        for n, view in enumerate(self.views):
            if zlib.crc32(view) != self.crc32[n]:
                raise ShardError(f"shard {self.url} is corrupt: sample {self._key(view, n)} differs from the "
                                 "shard's index (crc32)")
            try:
                sample = next(read_tar(bytes(view)))
            except Exception as e:
                raise ShardError(f"shard {self.url}: sample {self._key(view, n)} is not a readable tar "
                                 f"member: {e}") from e
            self.views[n] = None  # the fetched bytes go once every sample of a range is read
            yield sample

    def _key(self, view: memoryview, n: int) -> str:
        """The sample's key from its tar header when it still reads, else its number in the shard."""
        name = bytes(view[:100]).split(b"\0", 1)[0].decode(errors="replace")
        return name.partition(".")[0] if name and name.isprintable() else f"#{self.members[n]} (of the tar)"


def fetch_members(url: str, entry: dict, index: Index, members: np.ndarray,
                  retry_s: float = storage.DEFAULT_RETRY_S) -> list[dict] | Iterator[dict]:
    """The samples `members` of a shard, in that order. All of them: the shard is fetched whole,
    with its size and sha256 checked, and parsed at once. Some: only their byte ranges,
    neighbours coalesced into one request (`coalesce`), each sample checked against the index's
    CRC32 and parsed as it is taken."""
    if len(members) == len(index.records):
        found = read(url, entry, retry_s)
        return [found[i] for i in members.tolist()]
    records = index.records[members]
    starts, ends = records["offset"].tolist(), (records["offset"] + records["size"]).tolist()
    lows, highs = coalesce(records["offset"], records["offset"] + records["size"])
    try:
        blobs = storage.read_ranges(url, list(zip(lows, highs)), retry_s)
    except FileNotFoundError:
        raise ShardError(f"shard {url} is missing") from None
    except Exception as e:
        raise ShardError(f"shard {url} could not be read: {e}") from e
    for low, high, blob in zip(lows, highs, blobs):
        if len(blob) != high - low:
            raise ShardError(f"shard {url} is corrupt: bytes {low}-{high} are past its end (truncated?)")
    views = []
    for start, end in zip(starts, ends):
        j = bisect.bisect_right(lows, start) - 1
        views.append(memoryview(blobs[j])[start - lows[j]:end - lows[j]])
    return Fetched(url, members, views, records["crc32"]).samples()
