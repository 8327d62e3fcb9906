"""Stream one split of a shard manifest, per rank and per DataLoader worker, resumably.

The order of an epoch is a function of (seed, epoch) alone (docs/design.md, "Reader order"):
shards are permuted, dealt to ranks, then to workers; each worker shuffles inside a shard and
cuts its stream into batches; the rank's batch sequence interleaves its workers round-robin,
exactly as torch's DataLoader returns them. Every rank yields the same number of batches,
computed from the manifest, so DDP never waits on a rank that ran out of data.

Resuming at (epoch, position) skips whole shards by the manifest's counts and never decodes a
skipped sample; workers are rotated so the loader starts with the worker owning `position`.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgcls import storage
from imgcls.augment import AugmentConfig, augment_batch, draw_params

log = logging.getLogger(__name__)
storage.register_webdataset_handlers()


class DataError(RuntimeError):
    """Bad shard or sample. The message names the shard URL and, where known, the sample key."""


@dataclass
class DataConfig:
    url: str = "data/fashion-mnist"     # the shard dataset root (holds manifest.json); any fsspec URL
    batch_size: int = 128               # per rank, per micro-step
    eval_batch_size: int = 512
    num_workers: int = 2
    max_bad_samples: int = 0            # 0: the first bad sample is an error; N: skip up to N, then fail
    verify_checksums: bool = True       # sha256 of every shard as it is read
    mean: list[float] = field(default_factory=list)   # per channel; empty: 0.5
    std: list[float] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def read_manifest(url: str) -> dict:
    manifest_url = storage.join(url, "manifest.json")
    try:
        return json.loads(storage.read_bytes(manifest_url))
    except FileNotFoundError:
        raise DataError(f"no shard manifest at {manifest_url}: build one with `python -m shards build`") from None


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


# ---- a fast path for plain tars --------------------------------------------------------
# webdataset's tar_file_iterator goes through Python's tarfile, about 20 µs per member: most of
# a worker's time. Shards as shards.format.write_tar (Python's tarfile) or GNU tar write them are
# a run of plain ustar headers, so they are parsed here directly; anything else gives None and
# goes through tar_file_iterator as before. For the tars accepted, the members are exactly the
# ones tar_file_iterator yields (it skips nothing of them: all are regular files, none named
# __*__); tarfile would parse every header field accepted here to the same values.
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_./-]+")
# (offset, width) of the numeric fields tarfile parses: mode, uid, gid, size, mtime, devmajor, devminor.
# Accepted only as written by tarfile/GNU tar: width-1 octal digits, then NUL or space; or a
# first byte NUL (tarfile reads "", i.e. 0: how it writes devmajor/devminor of regular files).
_OCTAL_FIELDS = ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8))


def plain_tar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """[(name, bytes)] of every member of a plain tar, or None when `data` is anything else.

    Plain: every header has a valid (unsigned) checksum, canonical octal numbers, type regular
    file, no ustar prefix, a name of [A-Za-z0-9_./-] not starting with "__" nor ending with "/";
    each member's data and padding is complete; the archive ends with a zero block.
    """
    try:
        n, pos = len(data), 0
        offsets, members = [], []
        while True:
            if pos + 512 > n:
                return None
            end = data.find(b"\0", pos, pos + 100)
            name = data[pos:pos + 100 if end < 0 else end]
            if not name:
                if data.count(0, pos, pos + 512) == 512 and members:
                    break  # end of archive: tarfile stops at the first zero block
                return None
            if not _PLAIN_NAME.fullmatch(name) or name.startswith(b"__") or name.endswith(b"/"):
                return None
            size = int(data[pos + 124:pos + 135], 8)
            start = pos + 512
            pos = start + -(-size // 512) * 512
            if size < 0 or pos > n:
                return None
            offsets.append(start - 512)
            members.append((name.decode("ascii"), data[start:start + size]))
        heads = np.frombuffer(data, np.uint8)[np.asarray(offsets)[:, None] + np.arange(512)]
        digit = (heads >= 0x30) & (heads <= 0x37)
        stop = (heads == 0) | (heads == 0x20)
        ok = (np.isin(heads[:, 156], (0x30, 0)) & (heads[:, 345] == 0)
              & digit[:, 148:154].all(1) & stop[:, 154] & stop[:, 155])
        for at, width in _OCTAL_FIELDS:
            ok &= (digit[:, at:at + width - 1].all(1) & stop[:, at + width - 1]) | (heads[:, at] == 0)
        stored = (heads[:, 148:154].astype(np.int64) - 0x30) @ (8 ** np.arange(5, -1, -1))
        actual = heads.sum(1, dtype=np.int64) - heads[:, 148:156].sum(1, dtype=np.int64) + 8 * 0x20
        if not (ok & (stored == actual)).all():
            return None
        return members
    except Exception:  # never an error of its own: the general reader decides
        return None


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
        self.manifest = manifest or read_manifest(cfg.url)
        if split not in self.manifest["splits"]:
            raise DataError(f"{cfg.url}: split {split!r} not in manifest (has {sorted(self.manifest['splits'])})")
        self.shards = self.manifest["splits"][split]["shards"]
        self.num_classes = len(self.manifest["classes"])
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.workers = max(1, cfg.num_workers)
        image = self.manifest["image"]
        channels = image["channels"]
        self.mean = torch.tensor(cfg.mean or [0.5] * channels).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std or [0.5] * channels).view(1, -1, 1, 1)
        if train and len(self.shards) < world_size * self.workers:
            raise DataError(
                f"{cfg.url}: split {split!r} has {len(self.shards)} shards, fewer than ranks × workers = "
                f"{world_size} × {self.workers}; rebuild with smaller shards or use fewer workers")
        self.epoch, self.position = 0, 0
        if train:
            dropped = self.split_count() - self.world_size * self.batches_per_epoch(0) * self.batch_size
            log.info("%s/%s: %d batches of %d per rank per epoch; %d samples (%.2f%%) dropped as remainder",
                     cfg.url, split, self.batches_per_epoch(0), self.batch_size, dropped,
                     100 * dropped / max(1, self.split_count()))

    # ---- position: the reader's state in a checkpoint -------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    # ---- the plan, from the manifest alone ----------------------------------------------
    def split_count(self) -> int:
        return sum(s["count"] for s in self.shards)

    def worker_shards(self, epoch: int, rank: int) -> list[list[int]]:
        """Shard indices per worker of `rank` for `epoch`."""
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        else:
            order = list(range(len(self.shards)))
        mine = order[rank::self.world_size]
        return [mine[w::self.workers] for w in range(self.workers)]

    def worker_batches(self, epoch: int, rank: int) -> list[int]:
        per_worker = [sum(self.shards[i]["count"] for i in shards) for shards in self.worker_shards(epoch, rank)]
        if self.train:
            return [n // self.batch_size for n in per_worker]
        return [-(-n // self.batch_size) for n in per_worker]  # eval keeps the partial batch

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch: equal on every rank when training."""
        epoch = self.epoch if epoch is None else epoch
        if not self.train:
            return sum(self.worker_batches(epoch, self.rank))
        return min(sum(self.worker_batches(epoch, r)) for r in range(self.world_size))

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
        shards = self.worker_shards(epoch, self.rank)
        counts = self.worker_batches(epoch, self.rank)
        if self.train:
            order = interleave(counts)[:self.batches_per_epoch(epoch)]
        else:
            order = interleave(counts)
        tail = order[start:]
        if not tail:
            return
        first_worker = tail[0][0]
        role = (first_worker + worker_id) % self.workers  # rotation: loader worker 0 owns batch `start`
        positions = {local: start + i for i, (w, local) in enumerate(tail) if w == role}
        if not positions:
            return
        yield from self._batches(epoch, shards[role], min(positions), max(positions) + 1, positions)

    def _batches(self, epoch, shard_ids, first_batch, end_batch, positions):
        bsz = self.batch_size
        begin, end = first_batch * bsz, end_batch * bsz
        total = sum(self.shards[i]["count"] for i in shard_ids)
        end = min(end, total)
        samples, bad, offset = [], 0, 0
        batch_index = first_batch
        for shard_id in shard_ids:
            count = self.shards[shard_id]["count"]
            if offset + count <= begin:           # wholly before the resume point: never opened
                offset += count
                continue
            if offset >= end:
                break
            for sample in self._read_shard(epoch, shard_id, max(0, begin - offset), min(count, end - offset)):
                decoded = self._decode(shard_id, sample)
                if decoded is None:
                    bad += 1
                else:
                    samples.append(decoded)
                if len(samples) + bad == bsz:
                    yield self._collate(epoch, samples, bad, positions[batch_index])
                    samples, bad, batch_index = [], 0, batch_index + 1
            offset += count
        if samples or bad:  # eval's partial last batch
            yield self._collate(epoch, samples, bad, positions.get(batch_index, -1))

    def shard_url(self, shard_id: int) -> str:
        return storage.join(self.cfg.url, self.shards[shard_id]["path"])

    def _read_shard(self, epoch: int, shard_id: int, lo: int, hi: int):
        """Samples lo..hi-1 of the shard in this epoch's order, still encoded."""
        import webdataset as wds

        meta, url = self.shards[shard_id], self.shard_url(shard_id)
        try:
            with wds.gopen(url) as stream:  # fsspec-backed for s3:// etc. (storage.register_webdataset_handlers)
                data = stream.read()
        except FileNotFoundError:
            raise DataError(f"shard {url} is missing") from None
        except Exception as e:
            raise DataError(f"shard {url} could not be read: {e}") from e
        if self.cfg.verify_checksums:
            if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise DataError(f"shard {url} is corrupt: size or sha256 differs from the manifest "
                                f"(run `python -m shards verify {self.cfg.url}`)")
        try:
            plain = plain_tar_members(data)
            if plain is None:  # anything unusual: webdataset's reader, with its own errors
                files = wds.tariterators.tar_file_iterator(io.BytesIO(data))
            else:
                files = ({"fname": name, "data": payload} for name, payload in plain)
            members = ({**m, "__url__": url} for m in files)
            samples = list(wds.tariterators.group_by_keys(members))
        except Exception as e:
            raise DataError(f"shard {url} is not a readable tar: {e}") from e
        if len(samples) != meta["count"]:
            raise DataError(f"shard {url} holds {len(samples)} samples, the manifest says {meta['count']}")
        if self.train:
            perm = np.random.default_rng([self.seed, epoch, shard_id]).permutation(len(samples))
            samples = [samples[i] for i in perm]
        yield from samples[lo:hi]

    def _decode(self, shard_id: int, sample: dict):
        """(key, image HWC uint8, label), or None for a bad sample when skipping is allowed."""
        from shards.format import decode_sample

        try:
            image, label = decode_sample(sample, self.manifest)
        except ValueError as e:
            message = f"shard {sample['__url__']}, {e}"
            if self.cfg.max_bad_samples <= 0:
                raise DataError(message) from None
            self._bad_seen = getattr(self, "_bad_seen", 0) + 1
            log.warning("skipping bad sample (%d so far in this worker): %s", self._bad_seen, message)
            if self._bad_seen > self.cfg.max_bad_samples:
                raise DataError(f"more than data.max_bad_samples={self.cfg.max_bad_samples} bad samples; "
                                f"last: {message}") from None
            return None
        return sample["__key__"], image, label

    def _collate(self, epoch, samples, bad, position):
        keys = [k for k, _, _ in samples]
        images = torch.from_numpy(np.stack([im for _, im, _ in samples])) if samples else \
            torch.zeros((0, *self._shape_hwc()), dtype=torch.uint8)
        images = images.permute(0, 3, 1, 2).float().div_(255)
        if self.train and self.cfg.augment.enabled and samples:
            images = augment_batch(images, draw_params(self.cfg.augment, self.seed, epoch, keys))
        images = (images - self.mean) / self.std
        labels = torch.tensor([lb for _, _, lb in samples], dtype=torch.int64)
        return {"image": images, "label": labels, "key": keys, "position": position, "bad": bad}

    def _shape_hwc(self):
        m = self.manifest["image"]
        return m["height"], m["width"], m["channels"]

    def loader(self) -> DataLoader:
        """A DataLoader over the current (epoch, position). Build a new one each epoch."""
        workers = self.cfg.num_workers
        return DataLoader(self, batch_size=None, num_workers=workers, collate_fn=_as_is,
                          prefetch_factor=4 if workers else None, persistent_workers=False)


def _as_is(batch: dict) -> dict:
    """The loader's collate_fn: batches are ready as they are. (The default, default_convert,
    returns an equal dict after walking every key string of every batch.)"""
    return batch
