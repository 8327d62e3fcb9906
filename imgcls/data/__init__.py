"""Stream one split of a shard manifest, per rank and per DataLoader worker, resumably.

One job per module (docs/design.md, "Reader order"):

- `order`     pure planning: the epoch's sequence G from (seed, epoch), its cut by a `Layout`
              into ranks, workers and batches, what is left after earlier layouts' segments.
- `position`  the checkpoint part: epoch, position, layout, consumed segments, fingerprint.
- `stream`    the worker side: plan -> read-ahead -> decode -> collate -> uint8 batches.
- `loader`    the main-process side: each epoch's DataLoader (`start_epoch`), and the
              `TrainLoader` that owns training's position and hands out its batches.
- `eval`      whole-shard evaluation plans: no order, no state.
- `manifest`  the manifest, the input geometry and the normalisation.
- `reader`    `ShardReader`, the stream with the position's and order's questions answered.
"""
from imgcls.config import DataConfig  # tests/test_shards_photos.py imports it from here
from imgcls.data.eval import whole_shard_batches, whole_shard_plans
from imgcls.data.loader import TrainLoader, make_loader, start_epoch
from imgcls.data.manifest import (
    CROPS,
    PHOTO_MEMBERS,
    DataError,
    geometry,
    input_size,
    normalization,
    read_manifest,
)
from imgcls.data.order import Layout, interleave
from imgcls.data.position import DataPosition, fingerprint
from imgcls.data.reader import ShardReader, first_images
from imgcls.data.stream import ShardStream, encoded, image_tensor, multi_hot

__all__ = [
    "CROPS", "PHOTO_MEMBERS", "DataConfig", "DataError", "DataPosition", "Layout", "ShardReader", "ShardStream",
    "TrainLoader", "encoded", "fingerprint", "first_images", "geometry", "image_tensor", "input_size", "interleave",
    "make_loader", "multi_hot", "normalization", "read_manifest", "start_epoch", "whole_shard_batches",
    "whole_shard_plans",
]
