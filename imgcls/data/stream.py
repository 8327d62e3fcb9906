"""The worker side of reading a split: plan -> read-ahead -> decode -> collate -> uint8 batches.

A `ShardStream` is the IterableDataset a DataLoader forks into its workers. Each worker reads
the plan of its share of the rank's batches (imgcls.data.order for training, whole shards for
evaluation: imgcls.data.eval) from the position it was forked at: resuming at (epoch,
position) skips by the manifest's counts and never decodes a skipped sample, and workers are
rotated so the loader starts with the worker owning `position`.

A worker fetches only its samples' byte ranges, through each shard's index (shardio.shard), in
windows of data.read_window_mb with the next window fetched while the current one is decoded;
each sample is checked against the index's CRC32. A shard that fits in a window is read
whole instead, without its index, when that costs less CPU (shardio.shard.reads_whole): one
request, checked against the manifest's sha256. Its memory follows the window, not the shard.

Batches are uint8 [B,C,H,W] with the crop and flip applied; `transform(batch, device)` turns
them into the model's normalised float input on the training device (imgcls.augment).
Fixed-size data read at its own size keeps the batch-level pad crop; photos (variable size,
or another `data.image_size`) are decoded, cropped and resized per sample in the worker
(`geometry`); a JPEG by simplejpeg, at 1/2, 1/4 or 1/8 size when the crop allows it.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

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
from imgcls.data import order
from imgcls.data.eval import whole_shard_batches, whole_shard_plans
from imgcls.data.manifest import PHOTO_MEMBERS, DataError, geometry, normalization, read_manifest
from imgcls.data.order import Layout, Plan
from imgcls.data.position import DataPosition
from shardio import shard as shardfile
from shardio import storage
from shardio.format import MULTILABEL, decode_label, decode_labels, decode_sample
from shardio.image import Encoded, image_array

log = logging.getLogger(__name__)


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


class ShardStream(IterableDataset):
    """One split of a manifest, as batches for one rank, read by DataLoader workers from the
    position in `state` at the time they are forked (the main process's loader moves it)."""

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
        self.counts = [s["count"] for s in self.shards]
        self.state = DataPosition(self.shards, self.layout, url=cfg.url, split=split)

    # ---- the plan of an epoch -------------------------------------------------------------
    def worker_plans(self, epoch: int, rank: int) -> list[Plan]:
        """Per worker of `rank`: the samples it reads in `epoch`, as [(shard, picks)]."""
        if not self.train:
            return whole_shard_plans(self.counts, rank, self.world_size, self.workers)
        return order.cut(self.counts, self.seed, epoch, self.layout, self.state.remaining(epoch), rank)

    def worker_batches(self, epoch: int, rank: int) -> list[int]:
        if self.train:
            return self.layout.worker_batches(self.state.remaining_count(epoch))
        return whole_shard_batches(self.worker_plans(epoch, rank), self.batch_size)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (equal on every rank when training). For the
        current epoch after an elastic resume: the batches of this layout's segment."""
        if not self.train:
            return sum(self.worker_batches(self.state.epoch if epoch is None else epoch, self.rank))
        return self.state.batches_per_epoch(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch() - (self.state.position if self.train else 0)

    # ---- iteration (inside a DataLoader worker) -------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        worker_id = info.id if info else 0
        if info is None and self.workers > 1:
            raise DataError("ShardReader with num_workers > 1 must be iterated through reader.loader()")
        if info is not None:
            torch.set_num_threads(1)  # workers share the cores with the training processes
            _freeze_inherited_objects()
        epoch, start = self.state.epoch, self.state.position if self.train else 0
        role, positions, done = order.resume_point(self.worker_batches(epoch, self.rank), start, worker_id)
        if not positions:
            return
        plan = order.skip(self.worker_plans(epoch, self.rank)[role], done * self.batch_size)
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
        if not self.train:
            return picks
        return order.shard_permutation(self.seed, epoch, shard_id, self.counts[shard_id])[picks]

    def _reads(self, epoch: int, plan):
        """The plan as reads: (shard, its samples to fetch at once, its index or None: whole)."""
        window = max(1, int(self.cfg.read_window_mb * 1e6))
        for shard_id, picks in plan:
            members = self._members(epoch, shard_id, picks)
            whole = shardfile.reads_whole(len(members), self.shards[shard_id], window)
            index = None if whole else self._index(shard_id)
            if index is None:
                yield shard_id, members, None
                continue
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


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    rows = torch.zeros(len(labels), num_classes)
    for row, indices in zip(rows, labels):
        row[indices] = 1.0
    return rows


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
