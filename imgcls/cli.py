"""What every entry point in jobs/ shares: a user's mistake is one line, a bug keeps its traceback.

    @entry_point
    def main(argv=None): ...

A user error (a config typo, a missing file or shard, a device that is not there, a run dir
another job holds or took over, a full disk or quota, storage that stays unreachable, an object
store without credentials) prints `error: <message>` once, from rank 0, and exits with code 2,
as the shards CLI does. Under
torchrun the message also goes to torch's error file (torch's @record), so torchrun's summary
names it instead of `error_file: <N/A>`. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
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
from imgcls.lease import LeaseHeld, LeaseLost
from imgcls.models import UnknownModel
from shardio import storage
from shardio.errors import is_storage_error, storage_message

USER_ERRORS = (ConfigError, DataError, DeviceError, LeaseHeld, LeaseLost, UntrustedFormatError, UnknownModel)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or is_storage_error(error) or disk_full(error)


def disk_full(error: BaseException) -> bool:
    """A write that failed for want of space or quota (a checkpoint, metrics): the user frees it."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def message(error: Exception) -> str:
    if is_storage_error(error):
        return storage_message(error)
    return " ".join(str(error).split())


def entry_point(main):
    @record
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        storage.RETRY_SETTING = "run.storage_retry_s / data.read_retry_s"  # named in outage warnings
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
