"""Storage errors a user can fix, as one line naming the URL, with what to set.

Every command-line tool (imgcls's jobs, `python -m shards`) prints these the same way:

    if is_storage_error(e):
        print(f"error: {storage_message(e, url)}")

A user can fix: storage that stayed unreachable for the retry budget (`StorageUnavailable`), an
object store that cannot be reached at all, an object store without credentials, a missing
file, denied access. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys

from .storage import StorageUnavailable

CREDENTIALS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (or fsspec config)"
AWS_ENDPOINT = ("that is AWS's own endpoint: for another S3 store (MinIO, Ceph, ...) set AWS_ENDPOINT_URL "
                "(or the endpoint in fsspec config)")
OTHER_ENDPOINT = "is the store running there? Check AWS_ENDPOINT_URL (or the endpoint in fsspec config)"


def is_storage_error(error: BaseException) -> bool:
    return (isinstance(error, (StorageUnavailable, FileNotFoundError, PermissionError))
            or _botocore(error, "NoCredentialsError", "PartialCredentialsError", "ConnectionError"))


def storage_message(error: BaseException, url: str | None = None) -> str:
    """One line for a storage error: where (`url`, else the innermost `url` being read or
    written when it was raised), what happened, and the setting to check for S3."""
    where = url or _url_in_traceback(error)
    if _botocore(error, "NoCredentialsError", "PartialCredentialsError"):
        return f"{where or 'the object store'}: no credentials for the object store: {CREDENTIALS}"
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: no such file or directory"
    if isinstance(error, PermissionError) and error.filename:
        return f"{error.filename}: permission denied"
    text = " ".join((str(error) or type(error).__name__).split())
    if where and where not in text and not getattr(error, "filename", None):
        text = f"{where}: {text}"
    s3 = (where or "").startswith("s3://") or _botocore(error, "BotoCoreError")
    if s3 and isinstance(error, PermissionError):
        text += f"; check the credentials for it: {CREDENTIALS}"
    elif s3 and (isinstance(error, StorageUnavailable) or _botocore(error, "ConnectionError")):
        text += f"; {AWS_ENDPOINT if 'amazonaws.com' in text else OTHER_ENDPOINT}"
    return text


def _botocore(error: BaseException, *names: str) -> bool:
    """`error` is one of botocore's exceptions `names`. botocore is imported only by s3fs: if
    it is not loaded, the error cannot be one of its own."""
    exceptions = sys.modules.get("botocore.exceptions")
    return exceptions is not None and isinstance(error, tuple(getattr(exceptions, n) for n in names))


def _url_in_traceback(error: BaseException) -> str | None:
    """The innermost `url` being read or written when `error` was raised: botocore's errors do
    not name it, and shardio.storage's functions (and their callers) all take one."""
    url, tb = None, error.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get("url")
        if isinstance(value, str) and "://" in value:
            url = value
        tb = tb.tb_next
    return url
