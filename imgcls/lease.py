"""One owner per run dir: a lease, `RUN_DIR/lease.json`, renewed by a heartbeat thread.

    lease = Lease(run_dir, timeout_s=120).acquire()   # LeaseHeld (naming the holder) if taken
    ...
    lease.check()          # before each checkpoint write: LeaseLost if another job took over
    lease.release()        # the run is finished: the next job may start at once
    lease.stop()           # requeue: keep the record, so only this job (same id) takes it back

The record holds the holder's job id, host, pid, a random token, and when it was acquired
and last renewed (unix seconds). A lease is taken:
- when there is none;
- from the same job id (SLURM_JOB_ID, or IMGCLS_JOB_ID): a requeued job takes its lease back
  at once. Two runs started by hand inside one SLURM allocation share a job id: pass job_id;
- from any job once it has not been renewed for `timeout_s` (a frozen holder, a lost node);
- at once from a holder on this host whose process is gone (SIGKILLed, crashed): the record
  names the process beyond (host, pid), by the boot id, the PID-namespace inode and the
  process start time, so a holder in another PID namespace under the same hostname
  (containers with host networking) or a reused pid is never taken for a dead one; such a
  holder is taken over only at the renewal deadline, as etcd and Kubernetes leases are.
  Staleness compares the holder's clock with ours: node clocks must agree (NTP) to well
  within `timeout_s`.

What is guaranteed, and how:
- On S3 every write of the lease is a conditional PUT: `If-None-Match: *` creates it,
  `If-Match: <ETag read>` replaces it (AWS S3 and moto honour both). Of two jobs that race
  for the same lease, exactly one PUT succeeds; the other gets 412 and refuses, naming the
  winner. After each write the record is read back and its token compared, so a store that
  ignored the conditions would still be caught by the loser at acquire or, at the latest, at
  its next renewal.
- On a local (or NFS) dir the same read-decide-write runs under an flock (`filelock`) on
  `lease.json.lock`, and the record is replaced by an fsynced atomic rename.
- A holder learns that it lost the lease at its next renewal (every `heartbeat_s`), or when it
  could not renew for `timeout_s`; `check()` then raises LeaseLost. A lease is not a fence: a
  holder frozen for longer than `timeout_s` may write once more before it notices, which is
  why the trainer calls `check()` right before each write.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import fsspec.asyn

from shardio import storage

log = logging.getLogger(__name__)
LEASE_FILE = "lease.json"
DEFAULT_TIMEOUT_S = 120.0


class LeaseHeld(RuntimeError):
    """Another live job holds the run dir."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over, or could not be renewed for the timeout."""


class _Conflict(Exception):
    """The lease changed between our read and our write."""


def default_job_id() -> str:
    job = os.environ.get("IMGCLS_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return job or f"local:{socket.gethostname()}:{os.getpid()}"


def describe(record: dict) -> str:
    age = time.time() - record["renewed"]
    return f"job {record['job_id']} on {record['host']} (pid {record['pid']}), renewed {age:.0f} s ago"


def is_live(record: dict, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether a lease record's holder may still be running: renewed within `timeout_s`, and
    not a process known to be gone on this host."""
    return time.time() - record["renewed"] <= timeout_s and not _dead_here(record)


class Lease:
    def __init__(self, run_dir: str, job_id: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 heartbeat_s: float | None = None):
        self.run_dir, self.url = run_dir, storage.join(run_dir, LEASE_FILE)
        self.job_id = job_id or default_job_id()
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s or timeout_s / 5
        self.token = uuid.uuid4().hex
        self._store = _S3Store(self.url) if _is_s3(self.url) else _LocalStore(self.url)
        self._acquired = 0.0
        self._renewed = 0.0  # monotonic time of our last successful write
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking and giving back ----------------------------------------------------------
    def acquire(self) -> Lease:
        """Take the lease or raise LeaseHeld naming the holder; then start the heartbeat."""
        with self._lock:
            current, version = self._store.read()
            if current is not None and not self._may_take(current):
                raise LeaseHeld(f"{self.run_dir} is in use by {describe(current)}; a lease not renewed "
                                f"for {self.timeout_s:g} s is taken over (lease file {self.url})")
            if current is not None:
                log.warning("%s: taking over the lease of %s", self.run_dir, describe(current))
            self._acquired = time.time()
            try:
                self._write(version)
            except _Conflict:
                winner, _ = self._store.read()
                raise LeaseHeld(f"{self.run_dir} was taken at the same moment by "
                                f"{describe(winner) if winner else 'another job'} (lease file {self.url})") from None
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _may_take(self, current: dict) -> bool:
        return (current["job_id"] == self.job_id  # a requeue of this job
                or time.time() - current["renewed"] > self.timeout_s  # a dead holder, a lost node
                or _dead_here(current))  # a killed process on this host: no need to wait



    def stop(self) -> None:
        """Stop renewing, keep the record: a requeue of this job takes it back, others wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self.stop()
        with self._lock:
            current, version = self._store.read()
            if current is not None and current["token"] == self.token:
                self._store.delete(version)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- holding -------------------------------------------------------------------------
    def check(self) -> None:
        """Raise LeaseLost unless this job still holds the lease."""
        if not self._lost and time.monotonic() - self._renewed > self.timeout_s:
            with contextlib.suppress(Exception):  # the heartbeat is overdue (frozen?): ask now
                self.renew()
        if self._lost:
            raise LeaseLost(self._lost)
        silent = time.monotonic() - self._renewed
        if silent > self.timeout_s:
            raise LeaseLost(f"{self.run_dir}: the lease could not be renewed for {silent:.0f} s "
                            f"(timeout {self.timeout_s:g} s); another job may have taken over")

    def renew(self) -> None:
        """Write a fresh `renewed` time if the lease is still ours; else mark it lost."""
        with self._lock:
            current, version = self._store.read()
            if current is None or current["token"] != self.token:
                self._lost = (f"{self.run_dir}: the lease was taken over by "
                              f"{describe(current) if current else 'nobody (deleted)'}")
                return
            try:
                self._write(version)
            except _Conflict:
                winner, _ = self._store.read()
                self._lost = (f"{self.run_dir}: the lease was taken over by "
                              f"{describe(winner) if winner else 'another job'}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and not self._lost:
            try:
                self.renew()
            except Exception as e:  # an outage: check() reports it once it outlasts the timeout
                log.warning("%s: could not renew the lease: %s", self.url, e)
        if self._lost:
            log.error("%s", self._lost)

    def _write(self, version) -> None:
        """Write our record over `version` (None: create); then read it back to be sure."""
        record = {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(), **identity(),
                  "token": self.token, "acquired": self._acquired, "renewed": time.time()}
        with contextlib.suppress(_Conflict):  # maybe a retried PUT whose first try went through
            storage.retrying(lambda: self._store.swap(version, record), self.url)
        back, _ = self._store.read()
        if back != record:
            raise _Conflict()
        self._renewed = time.monotonic()


# ---- who holds it ------------------------------------------------------------------------
def identity(pid: int | None = None) -> dict:
    """What names a process beyond (host, pid): a pid means something only in one PID
    namespace on one boot, and its start time tells a reused pid. None where /proc lacks it."""
    pid = pid or os.getpid()
    return {"boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(),
            "start_time": _start_time(pid)}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Clock ticks after boot when `pid` started (/proc/PID/stat field 22); None: no such process."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _dead_here(record: dict) -> bool:
    """The holder ran in this host's boot and PID namespace, and its process is gone (killed,
    crashed) or its pid is now another process's. Anything we cannot tell: not dead."""
    mine = identity()
    if (record.get("host") != socket.gethostname() or None in mine.values()
            or record.get("boot_id") != mine["boot_id"] or record.get("pid_ns") != mine["pid_ns"]):
        return False
    return _start_time(int(record["pid"])) != record.get("start_time")


# ---- where the record lives ------------------------------------------------------------


def _is_s3(url: str) -> bool:
    return fsspec.core.split_protocol(url)[0] in ("s3", "s3a")


class _LocalStore:
    """The record in a local file; compare-and-swap under an flock on a lock file beside it."""

    def __init__(self, url: str):
        from filelock import FileLock

        self.path = storage.filesystem(url)[1]
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._flock = FileLock(self.path + ".lock", timeout=60)

    def read(self) -> tuple[dict | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            return None, None
        return record, record["token"]

    def swap(self, version: str | None, record: dict) -> None:
        with self._flock:
            if self.read()[1] != version:
                raise _Conflict()
            storage.write_bytes_atomic(self.path, json.dumps(record).encode())

    def delete(self, version: str | None) -> None:
        with self._flock:
            if self.read()[1] == version:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)


class _S3Store:
    """The record in an S3 object; compare-and-swap with conditional PUTs on its ETag."""

    def __init__(self, url: str):
        self.url = url
        self.fs, path = storage.filesystem(url)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def read(self) -> tuple[dict | None, str | None]:
        try:
            body, etag = storage.retrying(lambda: fsspec.asyn.sync(self.fs.loop, self._get), self.url)
        except FileNotFoundError:
            return None, None
        return json.loads(body), etag

    async def _get(self) -> tuple[bytes, str]:
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:  # the body and the ETag of one version of the object
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    def swap(self, version: str | None, record: dict) -> None:
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                                       Body=json.dumps(record).encode(), **condition)
        except (FileExistsError, OSError) as e:
            if storage.failed_condition(e):
                raise _Conflict() from e
            raise

    def delete(self, version: str | None) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self.bucket}/{self.key}")
