"""Stream one split of a shard manifest, per rank and per DataLoader worker, resumably.

The order of an epoch is a function of (seed, epoch) alone (docs/design.md, "Reader order"):
shards are permuted, each shard's samples are permuted, and the concatenation is the epoch's
sequence G, whatever the world size or worker count. G is cut into equal contiguous ranges,
one per rank, each cut into contiguous ranges per worker; a worker cuts its range into
batches, and the rank's batch sequence interleaves its workers round-robin, exactly as
torch's DataLoader returns them. Every rank yields the same number of batches, computed from
the manifest, so DDP never waits on a rank that ran out of data.

A worker fetches only its samples' byte ranges, through each shard's index (shardio.shard), in
windows of data.read_window_mb with the next window fetched while the current one is decoded;
each sample is checked against the index's CRC32, and a window holding a whole shard is one
request checked against the manifest's sha256. Its memory follows the window, not the shard.

Resuming at (epoch, position) skips by the manifest's counts and never decodes a skipped
sample; workers are rotated so the loader starts with the worker owning `position`. Resuming
under another layout (ranks, workers, batch size) is elastic: the batches read so far are
recorded as a segment, and the rest of G is cut by the new layout.

Batches are uint8 [B,C,H,W] with the crop and flip applied; `reader.transform(batch, device)`
turns them into the model's normalised float input on the training device (imgcls.augment).
Fixed-size data read at its own size keeps the batch-level pad crop; photos (variable size,
or another `data.image_size`) are decoded, cropped and resized per sample in the worker
(`geometry`); a JPEG by simplejpeg, at 1/2, 1/4 or 1/8 size when the crop allows it.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgcls.augment import (
    InputTransform,
    PhotoTransform,
    crop_flip,
    draw_params,
    eval_resize_crop,
    jpeg_scale,
    photometric,
)
from imgcls.config import DataConfig
from imgcls.signals import keep_worker_through_cancel
from shardio import manifest as manifests
from shardio import shard as shardfile
from shardio import storage
from shardio.format import MULTILABEL, decode_label, decode_labels, decode_sample
from shardio.image import Encoded, image_array

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Bad shard or sample. The message names the shard URL and, where known, the sample key."""


def read_manifest(url: str, retry_s: float = storage.DEFAULT_RETRY_S) -> dict:
    if not url:
        raise DataError("data.url is empty: set data.url=PATH_OR_URL, a dataset written by `python -m shards build`")
    try:
        return manifests.read(url, retry_s)
    except FileNotFoundError:
        raise DataError(f"no shard manifest at {manifests.url_of(url)}: build one with "
                        "`python -m shards build`") from None
    except ValueError as e:
        raise DataError(str(e)) from None


def normalization(cfg: DataConfig, manifest: dict) -> tuple[list[float], list[float]]:
    """(mean, std) per channel: the config's, else the manifest's training-split statistics,
    else 0.5 (a manifest written before shards recorded them)."""
    channels = manifest["image"]["channels"]
    stats = manifest.get("stats") or {}
    mean = cfg.mean or stats.get("mean") or [0.5] * channels
    std = cfg.std or stats.get("std") or [0.5] * channels
    return list(mean), list(std)


CROPS = ("auto", "resized", "pad", "none")
PHOTO_MEMBERS = ("jpg", "jpeg", "png", "webp")  # encoded image members, stored as their source


def geometry(cfg: DataConfig, manifest: dict) -> tuple[int, str]:
    """(output side, training crop). Side 0: the dataset's own fixed size, read as it is
    (today's fast path: pad crop on whole batches). Otherwise every image is brought to
    side x side per sample: RandomResizedCrop when training with crop `resized`, the
    evaluation resize + center crop elsewhere (then `pad` shifts and `none` does nothing)."""
    image, crop = manifest["image"], cfg.augment.crop
    if crop not in CROPS:
        raise DataError(f"data.augment.crop={crop!r}: expected one of {', '.join(CROPS)}")
    height, width = image.get("height"), image.get("width")
    if height is None or width is None:
        if cfg.image_size <= 0:
            raise DataError(f"{cfg.url}: images of variable size: set data.image_size (e.g. data.image_size=224)")
        return cfg.image_size, "resized" if crop == "auto" else crop
    native = cfg.image_size <= 0 or (cfg.image_size == height == width)
    if native and crop != "resized":
        return 0, "pad" if crop == "auto" else crop
    if cfg.image_size <= 0 and height != width:
        raise DataError(f"{cfg.url}: a resized crop of {height}x{width} images needs data.image_size")
    return cfg.image_size or height, "resized" if crop == "auto" else crop


def input_size(cfg: DataConfig, manifest: dict) -> int:
    """The side of the model's square input: data.image_size, else the dataset's fixed size."""
    side, _ = geometry(cfg, manifest)
    return side or max(manifest["image"]["height"], manifest["image"]["width"])


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """Round-robin over workers with `counts` batches, skipping exhausted ones:
    the order in which DataLoader returns an IterableDataset's batches. [(worker, local index)]"""
    order, taken = [], [0] * len(counts)
    while len(order) < sum(counts):
        for w, c in enumerate(counts):
            if taken[w] < c:
                order.append((w, taken[w]))
                taken[w] += 1
    return order


@dataclass(frozen=True)
class Layout:
    """How a training sequence is cut: `world_size` equal contiguous rank ranges of whole
    batches, packed from its start (the last length % (world_size * batch_size) samples are
    dropped), each cut into `workers` contiguous ranges of whole batches, balanced."""
    world_size: int
    workers: int
    batch_size: int

    def batches_per_rank(self, length: int) -> int:
        return length // (self.world_size * self.batch_size)

    def worker_batches(self, length: int) -> list[int]:
        n, k = self.batches_per_rank(length), self.workers
        return [n // k + (w < n % k) for w in range(k)]

    def worker_starts(self, length: int, rank: int) -> list[int]:
        """Index in the sequence where each worker of `rank` starts."""
        counts, b = self.worker_batches(length), self.batch_size
        first = rank * self.batches_per_rank(length) * b
        return [first + sum(counts[:w]) * b for w in range(self.workers)]

    def delivered(self, length: int, batches: int) -> list[int]:
        """Batches each worker had delivered once a rank had taken `batches`."""
        taken = [0] * self.workers
        for w, _ in interleave(self.worker_batches(length))[:batches]:
            taken[w] += 1
        return taken

    def consumed(self, length: int, batches: int) -> np.ndarray:
        """Indices into the sequence that all ranks read in their first `batches` batches."""
        b, taken = self.batch_size, self.delivered(length, batches)
        return np.concatenate([np.arange(start, start + n * b, dtype=np.int64)
                               for rank in range(self.world_size)
                               for start, n in zip(self.worker_starts(length, rank), taken)])


def _skip(plan: list[tuple[int, np.ndarray]], n: int) -> list[tuple[int, np.ndarray]]:
    """The plan without its first n samples; shards left with none are dropped (never opened)."""
    out = []
    for shard_id, picks in plan:
        if n >= len(picks):
            n -= len(picks)
            continue
        out.append((shard_id, picks[n:]))
        n = 0
    return out


class _ReadAhead:
    """Fetches a worker's next read (a window of one shard's samples, or a whole shard) in a
    background thread while the current one is decoded, so that waiting for storage (S3
    latency) overlaps with work.

    take() returns (read, fetch(read)) for the next of `reads`, or None after the last; it
    raises what fetching raised, and only then starts on the next read: errors surface at the
    same point of the stream as without read-ahead, and nothing outside `reads` is fetched.
    One read is held ahead, so a worker holds two at most: the one it decodes and the next.
    """

    def __init__(self, fetch, reads):
        self.fetch, self.reads = fetch, iter(reads)
        self.pending = self._start()

    def take(self):
        thread, box = self.pending
        thread.join()
        if "error" in box:
            raise box["error"]
        self.pending = self._start()
        return box["result"]

    def _start(self):
        box: dict = {}

        def run():
            try:  # the next read is planned here too: planning may fetch the shard's index
                read = next(self.reads, None)
                box["result"] = None if read is None else (read, self.fetch(read))
            except BaseException as e:  # re-raised by take(), in the reading thread
                box["error"] = e

        thread = threading.Thread(target=run, name="shard-read-ahead", daemon=True)
        thread.start()
        return thread, box


_frozen_in: int | None = None


def _freeze_inherited_objects() -> None:
    """In a forked worker, once: move the objects inherited from the parent out of the cyclic
    garbage collector's reach (gc.freeze), so the worker's first full collection does not walk,
    and copy-on-write, the whole parent heap: ~0.3 s per worker per epoch with torch loaded.
    Reference counting still frees them; objects the worker creates are collected as usual."""
    global _frozen_in
    if _frozen_in != os.getpid():
        gc.freeze()
        _frozen_in = os.getpid()


class ShardReader(IterableDataset):
    """One split of a manifest, as batches for one rank. Use `loader()` to iterate an epoch."""

    def __init__(self, cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, manifest: dict | None = None):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.seed, self.train = seed, train
        self.manifest = manifest or read_manifest(cfg.url, cfg.read_retry_s)
        if split not in self.manifest["splits"]:
            raise DataError(f"{cfg.url}: split {split!r} not in manifest (has {sorted(self.manifest['splits'])})")
        self.shards = self.manifest["splits"][split]["shards"]
        self.num_classes = len(self.manifest["classes"])
        self.multilabel = self.manifest.get("task") == MULTILABEL  # labels: multi-hot [B, C] float rows
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.workers = max(1, cfg.num_workers)
        self.layout = Layout(world_size, self.workers, self.batch_size)
        self.input_transform = InputTransform(*normalization(cfg, self.manifest))
        self.size, self.crop = geometry(cfg, self.manifest)
        self.augmenting = train and cfg.augment.enabled
        try:
            self.photo = PhotoTransform(cfg.augment, self.size, seed)
            if self.augmenting:
                self.photo.ops.check_shape(*self._shape_hwc()[:2])
        except ValueError as e:  # an unknown auto_augment or augmentation op
            raise DataError(str(e)) from None
        self.epoch, self.position = 0, 0
        self.consumed: list[dict] = []  # earlier layouts' segments of this epoch (elastic resume)
        if train:
            dropped = self.split_count() - self.samples_per_epoch()
            log.info("%s/%s: %d batches of %d per rank per epoch; %d samples (%.2f%%) dropped as remainder",
                     cfg.url, split, self.batches_per_epoch(0), self.batch_size, dropped,
                     100 * dropped / max(1, self.split_count()))

    # ---- position: the reader's state in a checkpoint -------------------------------------
    def state_dict(self) -> dict:
        """`position` counts this layout's batches done on every rank; `consumed` holds the
        segments read under earlier layouts in this epoch; `samples` (all ranks, this epoch)
        is derived, for logs and schedules."""
        return {"epoch": self.epoch, "position": self.position, "layout": asdict(self.layout),
                "consumed": [dict(segment) for segment in self.consumed], "samples": self.samples,
                "shards": self.fingerprint}

    @property
    def fingerprint(self) -> str:
        """The split's identity: a hash of its shards' paths, counts and checksums. A resume on
        shards rebuilt at the same URL would read another dataset from the saved position."""
        shards = [[s["path"], s["count"], s.get("sha256")] for s in self.shards]
        return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state` stopped. Under the same layout (or a state without
        one) the batches are the same; under another, the batches read so far become a
        segment and the rest of the epoch is cut by this reader's layout."""
        if state.get("shards", self.fingerprint) != self.fingerprint:  # absent: saved before it was recorded
            raise DataError(f"{self.cfg.url}: the {self.split!r} shards differ from the ones this run was "
                            "reading (rebuilt or re-indexed at the same URL?): resuming would continue on "
                            "another dataset; start a new run.dir, or point data.url at the original shards")
        saved = Layout(**state.get("layout", asdict(self.layout)))
        epoch, position = int(state["epoch"]), int(state["position"])
        consumed = [dict(segment) for segment in state.get("consumed", [])]
        if saved != self.layout:
            if position:
                consumed.append({**asdict(saved), "batches": position})
            log.info("%s/%s: resuming epoch %d under %s after %s: the rest of the epoch is re-cut",
                     self.cfg.url, self.split, epoch, self.layout, saved)
            position = 0
        self.epoch, self.position, self.consumed = epoch, position, consumed
        # a state the manifest cannot hold is an error here, not in a loader worker
        if self.train and position > self.batches_per_epoch():
            raise DataError(f"{self.cfg.url}: split {self.split!r} cannot hold the checkpoint's {position} "
                            f"batches under {self.layout} (were the shards rebuilt?)")

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Batch `position` of a whole epoch under this layout (earlier segments are cleared)."""
        self.epoch, self.position, self.consumed = epoch, position, []

    @property
    def samples(self) -> int:
        """Samples of the current epoch read by all ranks, over every segment."""
        done = [(s["world_size"] * s["batch_size"], s["batches"]) for s in self.consumed]
        done.append((self.world_size * self.batch_size, self.position))
        return sum(per_batch * batches for per_batch, batches in done)

    # ---- the plan, from the manifest alone ----------------------------------------------
    def split_count(self) -> int:
        return sum(s["count"] for s in self.shards)

    def samples_per_epoch(self) -> int:
        """Samples all ranks read in a whole epoch under this layout (the remainder dropped)."""
        return self.world_size * self.batch_size * self.layout.batches_per_rank(self.split_count())

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def _shard_permutation(self, epoch: int, shard_id: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard_id]).permutation(self.shards[shard_id]["count"])

    def sequence(self, epoch: int) -> list[tuple[int, int]]:
        """The epoch's sample sequence G as (shard index, sample index in the shard's tar),
        independent of ranks, workers and batch size. For checks and tools: it walks every
        sample."""
        return [(shard_id, int(i)) for shard_id in self.shard_order(epoch)
                for i in self._shard_permutation(epoch, shard_id)]

    def remaining(self, epoch: int | None = None) -> np.ndarray:
        """Indices into G that this layout still cuts in `epoch`: all of G, less the samples
        that earlier layouts' segments of the current epoch read; in G order."""
        epoch = self.epoch if epoch is None else epoch
        live = np.arange(self.split_count(), dtype=np.int64)
        for segment in self.consumed if epoch == self.epoch else []:
            layout = Layout(segment["world_size"], segment["workers"], segment["batch_size"])
            if not 0 <= segment["batches"] <= layout.batches_per_rank(len(live)):
                raise DataError(f"{self.cfg.url}: split {self.split!r} cannot hold the checkpoint's "
                                f"{segment['batches']} batches under {layout} (were the shards rebuilt?)")
            live = np.delete(live, layout.consumed(len(live), segment["batches"]))
        return live

    def _remaining_count(self, epoch: int) -> int:
        return len(self.remaining(epoch)) if self.consumed and epoch == self.epoch else self.split_count()

    def _plan(self, epoch: int, indices: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Sorted indices into G as [(shard, indices into the shard's epoch order)]."""
        order = self.shard_order(epoch)
        starts = np.cumsum([0] + [self.shards[i]["count"] for i in order[:-1]])
        which = np.searchsorted(starts, indices, side="right") - 1  # an empty shard is never picked
        cuts = np.flatnonzero(np.diff(which)) + 1
        return [(order[which[run[0]]], indices[run] - starts[which[run[0]]])
                for run in np.split(np.arange(len(indices)), cuts) if len(run)]

    def worker_plans(self, epoch: int, rank: int) -> list[list[tuple[int, np.ndarray]]]:
        """Per worker of `rank`: the samples it reads in `epoch`, as [(shard, picks)]."""
        if not self.train:  # eval: whole shards dealt to ranks, then workers, in manifest order
            mine = list(range(len(self.shards)))[rank::self.world_size]
            return [[(i, np.arange(self.shards[i]["count"])) for i in mine[w::self.workers]]
                    for w in range(self.workers)]
        live = self.remaining(epoch)
        counts, b = self.layout.worker_batches(len(live)), self.batch_size
        return [self._plan(epoch, live[start:start + n * b])
                for start, n in zip(self.layout.worker_starts(len(live), rank), counts)]

    def worker_shards(self, epoch: int, rank: int) -> list[list[int]]:
        """Shard indices per worker of `rank` for `epoch` (a shard straddling two workers' ranges is in both)."""
        return [[shard_id for shard_id, _ in plan] for plan in self.worker_plans(epoch, rank)]

    def worker_batches(self, epoch: int, rank: int) -> list[int]:
        if self.train:
            return self.layout.worker_batches(self._remaining_count(epoch))
        per_worker = [sum(len(picks) for _, picks in plan) for plan in self.worker_plans(epoch, rank)]
        return [-(-n // self.batch_size) for n in per_worker]  # eval keeps the partial batch

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (equal on every rank when training). For the
        current epoch after an elastic resume: the batches of this layout's segment."""
        epoch = self.epoch if epoch is None else epoch
        if not self.train:
            return sum(self.worker_batches(epoch, self.rank))
        return self.layout.batches_per_rank(self._remaining_count(epoch))

    def __len__(self) -> int:
        return self.batches_per_epoch() - (self.position if self.train else 0)

    # ---- iteration (inside a DataLoader worker) -------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker_id = info.id if info else 0
        if info is None and self.workers > 1:
            raise DataError("ShardReader with num_workers > 1 must be iterated through reader.loader()")
        if info is not None:
            torch.set_num_threads(1)  # workers share the cores with the training processes
            _freeze_inherited_objects()
        epoch, start = self.epoch, self.position if self.train else 0
        order = interleave(self.worker_batches(epoch, self.rank))
        tail = order[start:]
        if not tail:
            return
        role = (tail[0][0] + worker_id) % self.workers  # rotation: loader worker 0 owns batch `start`
        positions = [start + i for i, (w, _) in enumerate(tail) if w == role]
        if not positions:
            return
        done = sum(1 for w, _ in order[:start] if w == role)
        plan = _skip(self.worker_plans(epoch, self.rank)[role], done * self.batch_size)
        yield from self._batches(epoch, plan, positions)

    def _batches(self, epoch, plan, positions):
        samples, bad, index = [], 0, 0
        ahead = _ReadAhead(self._fetch, self._reads(epoch, plan))
        for shard_id, picks in plan:
            for sample in self._read_shard(epoch, shard_id, picks, ahead):
                decoded = self._decode(epoch, shard_id, sample)
                if decoded is None:
                    bad += 1
                else:
                    samples.append(decoded)
                if len(samples) + bad == self.batch_size:
                    yield self._collate(epoch, samples, bad, positions[index])
                    samples, bad, index = [], 0, index + 1
        if samples or bad:  # eval's partial last batch
            yield self._collate(epoch, samples, bad, positions[index])

    def shard_url(self, shard_id: int) -> str:
        return storage.join(self.cfg.url, self.shards[shard_id]["path"])

    def _members(self, epoch: int, shard_id: int, picks: np.ndarray) -> np.ndarray:
        """Sample numbers in the shard's tar of `picks`, indices into its order in `epoch`."""
        return self._shard_permutation(epoch, shard_id)[picks] if self.train else picks

    def _reads(self, epoch: int, plan):
        """The plan as reads: (shard, its samples to fetch at once, its index or None: whole)."""
        for shard_id, picks in plan:
            members, index = self._members(epoch, shard_id, picks), self._index(shard_id)
            if index is None:
                yield shard_id, members, None
                continue
            window = max(1, int(self.cfg.read_window_mb * 1e6))
            for part in shardfile.windows(index, members, window):
                yield shard_id, part, index

    def _index(self, shard_id: int) -> shardfile.Index | None:
        """The shard's index, for ranged reads; None (read it whole) without checksums, for a
        manifest written before indexes, or an index that is missing or stale (a warning)."""
        meta, url = self.shards[shard_id], self.shard_url(shard_id)
        if not self.cfg.verify_checksums or "index" not in meta:
            return None
        try:
            index = shardfile.read_index(url, self.cfg.read_retry_s)
        except shardfile.ShardError as e:
            log.warning("%s: reading the shard whole", e)
            return None
        if not index.matches(meta):
            log.warning("%s indexes another shard than the manifest's (stale): reading %s whole; "
                        "`python -m shards index` rewrites the indexes", shardfile.index_path(url), url)
            return None
        return index

    def _fetch(self, read) -> Iterable[dict]:
        """A read's samples, still encoded (lazily: checked and parsed as they are taken)."""
        shard_id, members, index = read
        meta, url = self.shards[shard_id], self.shard_url(shard_id)
        try:
            if index is None:
                samples = shardfile.read(url, meta, self.cfg.read_retry_s, self.cfg.verify_checksums)
                return [samples[i] for i in members.tolist()]
            return shardfile.fetch_members(url, meta, index, members, self.cfg.read_retry_s)
        except shardfile.ShardError as e:
            raise DataError(str(e)) from e

    def _read_shard(self, epoch: int, shard_id: int, picks: np.ndarray, ahead: _ReadAhead | None = None):
        """The samples at `picks` in the shard's order for this epoch, still encoded."""
        if ahead is None:
            ahead = _ReadAhead(self._fetch, self._reads(epoch, [(shard_id, picks)]))
        left = len(picks)
        while left:
            (read_shard, members, _), samples = ahead.take()
            assert read_shard == shard_id, (read_shard, shard_id)
            left -= len(members)
            try:
                yield from samples
            except shardfile.ShardError as e:
                raise DataError(str(e)) from e

    def _decode(self, epoch: int, shard_id: int, sample: dict):
        """(key, image HWC uint8, label), or None for a bad sample when skipping is allowed."""
        try:
            if not self.size:
                image, label = decode_sample(sample, self.manifest)
            else:
                image, label = self._decode_photo(epoch, sample)
        except ValueError as e:
            message = f"shard {self.shard_url(shard_id)}, {e}"
            if self.cfg.max_bad_samples <= 0:
                raise DataError(message) from None
            self._bad_seen = getattr(self, "_bad_seen", 0) + 1
            log.warning("skipping bad sample (%d so far in this worker): %s", self._bad_seen, message)
            if self._bad_seen > self.cfg.max_bad_samples:
                raise DataError(f"more than data.max_bad_samples={self.cfg.max_bad_samples} bad samples; "
                                f"last: {message}") from None
            return None
        return sample["__key__"], image, label

    def _decode_photo(self, epoch: int, sample: dict) -> tuple[torch.Tensor, int]:
        """A sample as CHW uint8 of self.size: RandomResizedCrop and the rest of PhotoTransform
        when training with crop `resized`, else the evaluation resize + center crop.
        ValueError naming the key when it cannot be decoded."""
        key = sample.get("__key__", "?")
        try:
            label = (decode_labels if self.multilabel else decode_label)(sample.get("cls"), self.num_classes)
            image = encoded(sample, self.manifest)
            mode = "L" if self.manifest["image"]["channels"] == 1 else "RGB"
            if not (self.augmenting and self.crop == "resized"):
                array = image.array(mode)
                return eval_resize_crop(torch.from_numpy(array).permute(2, 0, 1), self.size, self.cfg.crop_pct), label
            u, v = self.photo.uniforms(epoch, key)
            box = self.photo.box(image.size, v)
            array = image.array(mode, jpeg_scale(image.size[1], image.size[0], box[2], box[3], self.size))
            return self.photo.apply(array, image.size, box, u, v), label
        except ValueError as e:
            raise ValueError(f"sample {key}: {e}") from None
        except Exception as e:  # PIL raises many types for truncated or corrupt data
            raise ValueError(f"sample {key}: cannot decode image: {e}") from None

    def _collate(self, epoch, samples, bad, position):
        """{"image": uint8 [B,C,H,W] (cropped and flipped; channels-last memory for photos),
        "photometric": the rest of the augmentation for `transform` or None, "label", "key",
        "position", "bad"}."""
        keys = [k for k, _, _ in samples]
        if not samples:
            images = torch.zeros((0, *self._shape_hwc()), dtype=torch.uint8).permute(0, 3, 1, 2)
        elif self.size:  # CHW tensors in channels-last memory (the resize's): stacked as they lie
            images = torch.stack([im.permute(1, 2, 0) for _, im, _ in samples]).permute(0, 3, 1, 2)
        else:
            images = torch.from_numpy(np.stack([im for _, im, _ in samples])).permute(0, 3, 1, 2)
        rest = None
        if self.augmenting and samples:
            params = draw_params(self.cfg.augment, self.seed, epoch, keys, None if self.crop == "pad" else 0)
            if self.crop == "resized":
                params[:, 2] = 0  # flipped per sample, in PhotoTransform
            images, rest = crop_flip(images, params), photometric(params)
            if not self.size and self.photo.has_extras:
                images = torch.stack([self.photo.extras(x, self.photo.uniforms(epoch, key)[1])
                                      for x, key in zip(images, keys)])
        labels = (multi_hot([lb for _, _, lb in samples], self.num_classes) if self.multilabel
                  else torch.tensor([lb for _, _, lb in samples], dtype=torch.int64))
        # photos stay channels-last in memory (no transposing copy); the model takes either
        images = images.contiguous(memory_format=torch.channels_last) if self.size else images.contiguous()
        return {"image": images, "photometric": rest, "label": labels, "key": keys,
                "position": position, "bad": bad}

    def transform(self, batch: dict, device: torch.device | str = "cpu", channels_last: bool = False) -> torch.Tensor:
        """The batch's images as the model's input on `device`: the copy travels as uint8
        (non-blocking from pinned memory), the float work happens there."""
        images = batch["image"].to(device, non_blocking=True)
        return self.input_transform(images, batch["photometric"], channels_last)

    def _shape_hwc(self):
        m = self.manifest["image"]
        if self.size:
            return self.size, self.size, m["channels"]
        return m["height"], m["width"], m["channels"]

    def loader(self, pin_memory: bool = False) -> DataLoader:
        """A DataLoader over the current (epoch, position). Build a new one each epoch.
        `pin_memory` (for CUDA) lets the host-to-device copies run asynchronously."""
        workers = self.cfg.num_workers
        return DataLoader(self, batch_size=None, num_workers=workers, collate_fn=_as_is, pin_memory=pin_memory,
                          worker_init_fn=keep_worker_through_cancel,
                          prefetch_factor=4 if workers else None, persistent_workers=False)


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    rows = torch.zeros(len(labels), num_classes)
    for row, indices in zip(rows, labels):
        row[indices] = 1.0
    return rows


def start_epoch(reader: ShardReader, pin_memory: bool = False):
    """Batches from the reader's current (epoch, position), its loader workers started now:
    they fetch and decode while the caller does other work (the last epoch's validation and
    checkpoint), so the first batch of an epoch does not wait on storage. The DataLoader draws
    its workers' base seed from torch's RNG; that draw is undone, so training's random stream
    is the same whenever the loader starts (the reader's order and augmentation never use it)."""
    with torch.random.fork_rng(devices=[]):
        return iter(reader.loader(pin_memory))


def first_images(cfg: DataConfig, split: str, count: int, manifest: dict | None = None) -> torch.Tensor:
    """The first `count` images of a split in shard order, normalised and not augmented: the
    same on every rank, whatever the world size. Reads only the shards it needs."""
    images, seen = [], 0
    reader = ShardReader(replace(cfg, num_workers=0), split, train=False, manifest=manifest)
    for batch in reader:
        images.append(reader.transform(batch))
        seen += len(batch["image"])
        if seen >= count:
            break
    return torch.cat(images)[:count]


def image_tensor(image: Image.Image, mode: str) -> torch.Tensor:
    """CHW uint8 tensor of a PIL image in `mode`."""
    return torch.from_numpy(image_array(image, mode)).permute(2, 0, 1)


def encoded(sample: dict, manifest: dict) -> Encoded:
    """A sample's image with its header read (shardio.image): its one encoded member, or a
    raw fixed-size one, already decoded."""
    ext = next((e for e in PHOTO_MEMBERS if e in sample), None)
    if ext is None:
        return Encoded.from_array(decode_sample(sample, manifest)[0])
    return Encoded(sample[ext])


def _as_is(batch: dict) -> dict:
    """The loader's collate_fn: batches are ready as they are. (The default, default_convert,
    returns an equal dict after walking every key string of every batch.)"""
    return batch
