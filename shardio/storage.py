"""One place that turns URLs into fsspec filesystems, and reads and writes them safely.

Every URL fsspec knows works: local paths, file://, s3://, gs://, ... The S3 endpoint and
credentials come from the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_PROFILE, ...) or fsspec config; nothing here prints or stores them.

s3fs is not fork-safe: a filesystem created before a DataLoader forks its workers must not
be used inside them. `filesystem()` therefore caches per process id, so each worker opens
its own.

Faults, and what this module promises about them:
- transient errors (refused or reset connections, timeouts, HTTP 5xx) are retried with
  exponential backoff for up to a budget (`retry_s` of read_bytes, exists and
  write_bytes_atomic; `retrying` for anything else), then raise `StorageUnavailable` naming
  the URL. Missing files, denied access and bad requests are
  raised at once: retrying cannot fix them.
- an outage is logged as it happens, so that waiting does not look like a hang: one warning at
  its first failed attempt (the URL, the error, how long retries go on and the setting that
  says so, `RETRY_SETTING`), one line when storage answers again, per process, however many
  calls meet it.
- `write_bytes_atomic`: readers see the old file or the new one, never half of one. Locally
  the temporary file and its directory are fsynced before and after the rename, so a crash of
  the machine cannot leave a renamed but empty file. On object stores one PUT (or one
  completed multipart upload) is atomic by itself.
- `cleanup_leftovers(url)`: removes what killed writers leave under a run dir: `*.tmp-PID`
  files and unfinished S3 multipart uploads.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import threading
import time

import fsspec
import tenacity
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
DEFAULT_RETRY_S = 60.0  # long enough for an endpoint restart or a network blip
# The deadline of one attempt's connect, and of each read of its answer: a hung endpoint (it
# accepts and never answers) used to hold one attempt for minutes (s3fs and botocore retried
# inside it: 25 connections, 414 s with a 5 s budget).
TIMEOUT_S = 10.0
TEMP_FILE = re.compile(r"\.tmp-\d+$")
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "ServiceUnavailable", "InternalError", "Throttling"}
_cache: dict[tuple[int, str, float], fsspec.AbstractFileSystem] = {}
# What sets the retry budget, in the outage warning; a tool with its own option names sets it.
RETRY_SETTING = "the storage retry budget"


class StorageUnavailable(OSError):
    """Storage kept failing with transient errors for the whole retry budget."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for `url`; the filesystem is private to this process. An S3 call
    makes one attempt, bounded by TIMEOUT_S to connect and TIMEOUT_S per read: `retrying` is
    the only retry loop, so a hung endpoint fails within its budget plus one timeout."""
    protocol = _protocol(url)
    key = (os.getpid(), protocol, TIMEOUT_S)
    fs = _cache.get(key)
    if fs is None:
        # skip_instance_cache: never reuse an instance (and its event loop) made before fork
        s3 = protocol in ("s3", "s3a")
        options = {"config_kwargs": {"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                                     "retries": {"max_attempts": 1}}} if s3 else {}
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if s3:
            fs.retries = 1  # no retries inside s3fs (5) and botocore (legacy: 5 more): ours only
        _cache[key] = fs
    return fs, fs._strip_protocol(url)


def _protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/' (posixpath), keeping the protocol of `base`."""
    return posixpath.join(base.rstrip("/"), *parts)


# ---- retries ---------------------------------------------------------------------------
def _transient_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]  # builtins: refused, reset, timed out
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError  # read timeouts, closed connections
        types += [BotoConnectionError, HTTPClientError]
    with contextlib.suppress(ImportError):
        import aiohttp
        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(types)


def is_transient(error: BaseException) -> bool:
    """True for errors that waiting can fix: no connection, a timeout, a 5xx answer."""
    if isinstance(error, _transient_types()):
        return True
    for e in (error, error.__cause__):  # s3fs turns a botocore ClientError into an OSError
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
                return True
    return False


def retrying(fn, url: str, budget_s: float = DEFAULT_RETRY_S):
    """fn(), retried on transient errors with exponential backoff (0.5 s doubling to 8 s)
    until `budget_s` has passed; then StorageUnavailable naming `url`.

    The budget bounds when the last attempt starts; an attempt itself is bounded by
    TIMEOUT_S (see `filesystem`): the call fails within the budget plus one timeout.
    """
    start = time.monotonic()
    retryer = tenacity.Retrying(retry=tenacity.retry_if_exception(is_transient),
                                stop=tenacity.stop_after_delay(budget_s),
                                wait=tenacity.wait_exponential(multiplier=0.5, max=8),
                                before_sleep=lambda attempt: _outage_began(url, attempt, budget_s))
    try:
        result = retryer(fn)
    except tenacity.RetryError as e:
        last = e.last_attempt.exception()
        raise StorageUnavailable(f"{url}: storage unreachable for {time.monotonic() - start:.0f} s "
                                 f"(retry budget {budget_s:g} s): {type(last).__name__}: {last}") from last
    _outage_ended(url)
    return result


# An outage as the log shows it: when it began, per protocol (one endpoint per process).
_outages: dict[str, float] = {}
_outages_lock = threading.Lock()


def _outage_began(url: str, attempt: tenacity.RetryCallState, budget_s: float) -> None:
    with _outages_lock:
        if _protocol(url) in _outages:
            return  # already said: one warning per outage, not per retry or per caller
        _outages[_protocol(url)] = attempt.start_time  # its call's start: botocore retried first
    error = attempt.outcome.exception()
    text = " ".join(str(error).split())
    log.warning("%s: storage unreachable (%s: %s); retrying for up to %g s (%s)",
                url, type(error).__name__, text, budget_s, RETRY_SETTING)


def _outage_ended(url: str) -> None:
    if not _outages:  # the usual case, without taking the lock
        return
    with _outages_lock:
        began = _outages.pop(_protocol(url), None)
    if began is not None:  # a warning too: every rank that warned says it is over
        log.warning("%s: storage reachable again after %.1f s", url, time.monotonic() - began)


# ---- reads and writes ------------------------------------------------------------------
def read_bytes(url: str, retry_s: float = DEFAULT_RETRY_S) -> bytes:
    """The whole file; transient errors are retried for up to `retry_s` (0: no retries)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(posixpath.dirname(path))  # another process may have written it since we listed
    return retrying(lambda: fs.cat_file(path), url, retry_s)


def read_ranges(url: str, ranges: list[tuple[int, int]], retry_s: float = DEFAULT_RETRY_S) -> list[bytes]:
    """The bytes [start, end) of each range of one file (fewer at its end), fetched together
    (concurrently on object stores); transient errors retry the whole call, for up to `retry_s`."""
    fs, path = filesystem(url)
    starts, ends = [start for start, _ in ranges], [end for _, end in ranges]
    return retrying(lambda: fs.cat_ranges([path] * len(ranges), starts, ends, on_error="raise"), url, retry_s)


def exists(url: str, retry_s: float = DEFAULT_RETRY_S) -> bool:
    fs, path = filesystem(url)
    return retrying(lambda: fs.exists(path), url, retry_s)


def write_bytes_atomic(url: str, data: bytes, retry_s: float = DEFAULT_RETRY_S) -> None:
    """Write so that readers never see half a file (see the module docstring); transient
    errors are retried for up to `retry_s` (a PUT of the whole object is idempotent)."""
    fs, path = filesystem(url)
    if is_local(url):
        _write_local_atomic(path, data)
    else:
        retrying(lambda: fs.pipe_file(path, data), url, retry_s)


class WriteConflict(OSError):
    """A conditional PUT whose condition failed: another writer changed the object first."""


def put_if(url: str, data: bytes, etag: str | None, retry_s: float = DEFAULT_RETRY_S) -> str:
    """Object stores (S3): PUT `data` only if the object is still the version `etag` (None: only
    if it does not exist: `If-Match` / `If-None-Match: *`); returns the new ETag, or raises
    WriteConflict naming the URL. AWS S3 and moto honour both conditions."""
    fs, path = filesystem(url)
    bucket, key, _ = fs.split_path(path)
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        response = retrying(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition),
                            url, retry_s)
    except OSError as e:
        if failed_condition(e):
            raise WriteConflict(f"{url}: another writer changed it (a conditional write failed)") from None
        raise
    return response["ETag"]


def failed_condition(error: BaseException) -> bool:
    """412 Precondition Failed, or 409 ConditionalRequestConflict (a concurrent conditional PUT)."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in (409, 412)


def _write_local_atomic(path: str, data: bytes) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:  # a full disk, a quota: say where
            raise type(e)(e.errno, e.strerror, path) from e
        raise
    fsync_dir(parent)


def fsync_dir(path: str) -> None:
    """Make a rename or a new name in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- leftovers of killed writers -------------------------------------------------------
def cleanup_leftovers(url: str) -> list[str]:
    """Remove `*.tmp-PID` files and abort unfinished S3 multipart uploads under `url`.

    Call it only while nothing else writes there (rank 0, at start, holding the run's lease).
    Returns what was removed or aborted.
    """
    fs, path = filesystem(url)
    removed = [p for p in _find(fs, path) if TEMP_FILE.search(p)]
    for p in removed:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(p)
    if "s3" in _protocols(fs):
        removed += _abort_multipart_uploads(fs, path)
    for p in removed:
        log.warning("removed a leftover of a killed writer: %s", p)
    return removed


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _find(fs, path: str) -> list[str]:
    try:
        return fs.find(path)
    except FileNotFoundError:
        return []


def _abort_multipart_uploads(fs, path: str) -> list[str]:
    bucket, prefix, _ = fs.split_path(path)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    aborted, markers = [], {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
        for upload in page.get("Uploads", []):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(f"s3://{bucket}/{upload['Key']} (multipart upload {upload['UploadId']})")
        if not page.get("IsTruncated"):
            return aborted
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
