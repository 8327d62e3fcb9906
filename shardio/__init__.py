"""The shard format and storage, below both `imgcls` (the reader) and `shards` (the writer).

- `shardio.format`: one sample on disk (image encoding, labels, keys, the tar container).
- `shardio.storage`: URL -> fsspec filesystem, atomic writes, retries on transient errors.
- `shardio.errors`: storage errors a user can fix, as the one line every CLI prints.
"""
