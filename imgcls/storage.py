"""One place that turns URLs into fsspec filesystems.

Every URL fsspec knows works: local paths, file://, s3://, gs://, ... The S3 endpoint and
credentials come from the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_PROFILE, ...) or fsspec config; nothing here prints or stores them.

s3fs is not fork-safe: a filesystem created before a DataLoader forks its workers must not
be used inside them. `filesystem()` therefore caches per process id, so each worker opens
its own.
"""
from __future__ import annotations

import os
import posixpath

import fsspec

_cache: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for `url`; the filesystem is private to this process."""
    protocol, _ = fsspec.core.split_protocol(url)
    protocol = protocol or "file"
    key = (os.getpid(), protocol)
    fs = _cache.get(key)
    if fs is None:
        # skip_instance_cache: never reuse an instance (and its event loop) made before fork
        fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        _cache[key] = fs
    return fs, fs._strip_protocol(url)


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/' (posixpath), keeping the protocol of `base`."""
    return posixpath.join(base.rstrip("/"), *parts)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write under a temporary name, then move into place: readers never see half a file.

    On object stores the final PUT is itself atomic; the temporary object is removed by mv.
    """
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def register_webdataset_handlers() -> None:
    """Let webdataset.gopen open every fsspec protocol (webdataset 1.0.2 has no s3://)."""
    from webdataset import gopen_schemes  # the package re-exports gopen() over the module name

    def gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
        fs, path = filesystem(url)
        return fs.open(path, mode)

    for protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory"):
        gopen_schemes[protocol] = gopen_fsspec
