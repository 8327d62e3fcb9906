"""What every entry point in jobs/ shares: a user's mistake is one line, a bug keeps its traceback.

    @entry_point
    def main(argv=None): ...

A user error (a config typo, a missing file or shard, a device that is not there, a run dir
another job holds, storage that stays unreachable, an object store without credentials) prints
`error: <message>` once, from rank 0, and exits with code 2, as the shards CLI does. Under
torchrun the message also goes to torch's error file (torch's @record), so torchrun's summary
names it instead of `error_file: <N/A>`. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import record

from imgcls.config import ConfigError
from imgcls.data import DataError
from imgcls.distributed import DeviceError, env_ranks
from imgcls.inference import UntrustedFormatError
from imgcls.lease import LeaseHeld
from imgcls.models import UnknownModel
from shardio.storage import StorageUnavailable

USER_ERRORS = (ConfigError, DataError, DeviceError, LeaseHeld, StorageUnavailable, UntrustedFormatError,
               UnknownModel, FileNotFoundError)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or _missing_credentials(error)


def message(error: Exception) -> str:
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: no such file or directory"
    if _missing_credentials(error):
        return (f"{_url_in_traceback(error)}: no credentials for the object store: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (or fsspec config)")
    text = " ".join(str(error).split())
    if isinstance(error, StorageUnavailable) and text.startswith("s3://"):
        if "amazonaws.com" in text:
            text += ("; that is AWS's own endpoint: for another S3 store (MinIO, Ceph, ...) set AWS_ENDPOINT_URL "
                     "(or the endpoint in fsspec config)")
        else:
            text += "; is the store running there? Check AWS_ENDPOINT_URL (or the endpoint in fsspec config)"
    return text


def _missing_credentials(error: BaseException) -> bool:
    """botocore found no (or half the) credentials. botocore is imported only by s3fs: if it
    is not loaded, the error cannot be one of its own."""
    exceptions = sys.modules.get("botocore.exceptions")
    return exceptions is not None and isinstance(error, (exceptions.NoCredentialsError,
                                                         exceptions.PartialCredentialsError))


def _url_in_traceback(error: BaseException) -> str:
    """The innermost `url` being read or written when `error` was raised: botocore's
    credential errors do not name it, and shardio.storage's functions all take one."""
    url, tb = "object store", error.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get("url")
        if isinstance(value, str) and "://" in value:
            url = value
        tb = tb.tb_next
    return url


def entry_point(main):
    @record
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:
            if not is_user_error(e):
                raise
            if env_ranks()[0] == 0:
                print(f"error: {message(e)}", file=sys.stderr)
            _write_error_file(message(e))
            sys.exit(2)
    return wrapper


def _write_error_file(message: str) -> None:
    """torch's error file with the message in place of a traceback (torchrun prints it)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": f"error: {message}", "timestamp": str(int(time.time()))}}}, f)
