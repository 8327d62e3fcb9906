"""Shard writer: image datasets -> WebDataset tar shards + manifest.json (docs/design.md).

    python -m shards build SOURCE DEST [options]      (SOURCE: folders, a label file, arrays; any URL)
    python -m shards build --labels FILE.csv DEST [options]
    python -m shards verify DEST [--deep]
    python -m shards inspect DEST
    python -m shards index URL [--split S] [--classes A,B,...]   (shards another tool wrote)
"""
__version__ = "0.1.0"

from shardio.format import decode_image, decode_sample, encode_image  # noqa: E402

from .checks import inspect, load_manifest, verify  # noqa: E402
from .index import index  # noqa: E402
from .writer import build  # noqa: E402

__all__ = ["build", "verify", "inspect", "index", "load_manifest",
           "decode_image", "decode_sample", "encode_image", "__version__"]
