"""Checkpoints, storage and the run-dir lease under everyday faults, against real parts:
local files, moto's S3 server behind a proxy that can go down, and real killed processes."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from imgcls import checkpoint
from imgcls.lease import Lease, LeaseHeld
from shardio import storage
from tests.conftest import EXACT_RUN, launch, read_line, start_lease_holder


def make_state(step: int, n: int = 4096) -> dict:
    """A small checkpoint-shaped state whose weights tell the step."""
    return {"model": {"weight": torch.full((n,), float(step))}, "progress": {"step": step}}


def saved_steps(run_dir: str) -> list[int]:
    return [checkpoint.step_of(url) for url in checkpoint.list_checkpoints(run_dir)]


# ---- corrupt checkpoints (issue items 3 and 6) -------------------------------------------
@pytest.fixture(params=["local", "s3"])
def any_run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket')}/runs/one"


def test_bit_flip_in_the_newest_is_skipped_with_a_warning_and_moved_aside(any_run_dir, caplog):
    run_dir = any_run_dir
    for step in (1, 2):
        checkpoint.save(make_state(step), run_dir, step, keep_last=3)
    newest = checkpoint.step_url(run_dir, 2)
    data = bytearray(storage.read_bytes(newest))
    data[len(data) // 2] ^= 0x40  # one bit in the middle of the weights
    storage.write_bytes_atomic(newest, bytes(data))
    with caplog.at_level(logging.WARNING):
        state, url = checkpoint.load_latest(run_dir)
    assert url == checkpoint.step_url(run_dir, 1) and state["progress"]["step"] == 1
    assert any("step-00000002.pt" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert saved_steps(run_dir) == [1]
    assert storage.read_bytes(f"{run_dir}/checkpoints/corrupt/step-00000002.pt") == bytes(data)
    assert storage.exists(f"{run_dir}/checkpoints/corrupt/step-00000002.pt.sha256")


def test_a_checkpoint_matching_its_checksum_loads_and_the_sidecar_is_sha256sum_format(tmp_path):
    run_dir = str(tmp_path / "run")
    url = checkpoint.save(make_state(7), run_dir, 7, keep_last=1, best=True)
    check = subprocess.run(["sha256sum", "-c", "step-00000007.pt.sha256", "best-00000007.pt.sha256"],
                           cwd=tmp_path / "run/checkpoints", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert checkpoint.load(url)["progress"]["step"] == 7


# A real SIGKILL right before each write of a save with a new best (after the last: none).
KILLED_BEST_SAVE = """
import os, signal, sys, torch
from imgcls import checkpoint
from shardio import storage
run_dir, kill_before = sys.argv[1], sys.argv[2]
write = storage.write_bytes_atomic
def write_or_die(url, data, retry_s=storage.DEFAULT_RETRY_S):
    if url.endswith(kill_before):
        os.kill(os.getpid(), signal.SIGKILL)
    write(url, data, retry_s)
storage.write_bytes_atomic = write_or_die
checkpoint.save({"model": {"weight": torch.full((4096,), 2.0)}, "progress": {"step": 2}}, run_dir, 2, 3, best=True)
"""


@pytest.mark.parametrize("kill_before", ["best-00000002.pt", "/best.pt"])
def test_a_kill_while_replacing_best_leaves_the_old_best_or_the_new_one(any_run_dir, kill_before):
    """best.pt used to be overwritten in place after its new sidecar: a kill between the two
    left the old file under the new digest. Now the old best loads until the pointer moves."""
    checkpoint.save(make_state(1), any_run_dir, 1, keep_last=3, best=True)
    out = subprocess.run([sys.executable, "-c", KILLED_BEST_SAVE, any_run_dir, kill_before],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    best = checkpoint.load(f"{any_run_dir}/checkpoints/best.pt")
    assert best["progress"]["step"] == 1 and best["model"]["weight"][0] == 1
    checkpoint.save(make_state(3), any_run_dir, 3, keep_last=3, best=True)  # the next best replaces it
    assert checkpoint.load(f"{any_run_dir}/checkpoints/best.pt")["progress"]["step"] == 3
    names = sorted(p.rsplit("/", 1)[-1] for p in storage.filesystem(any_run_dir)[0].ls(
        storage.filesystem(f"{any_run_dir}/checkpoints")[1], detail=False, refresh=True))
    assert [n for n in names if n.startswith("best")] == ["best-00000003.pt", "best-00000003.pt.sha256", "best.pt"]


def test_empty_high_step_files_never_push_good_checkpoints_out(tmp_path):
    run_dir = str(tmp_path / "run")
    ckpt_dir = tmp_path / "run/checkpoints"
    ckpt_dir.mkdir(parents=True)
    for leftover in ("step-00000900.pt", "step-00000950.pt"):  # what a crash can leave
        (ckpt_dir / leftover).write_bytes(b"")
    for step in range(1, 6):
        checkpoint.save(make_state(step), run_dir, step, keep_last=2)
    assert saved_steps(run_dir) == [4, 5, 900, 950]
    state, url = checkpoint.load_latest(run_dir)  # the empty ones are corrupt: moved aside
    assert state["progress"]["step"] == 5
    assert saved_steps(run_dir) == [4, 5]
    assert sorted(p.name for p in (ckpt_dir / "corrupt").iterdir()) == ["step-00000900.pt", "step-00000950.pt"]


def test_keep_last_larger_than_the_checkpoints_written_keeps_them_all(tmp_path):
    run_dir = str(tmp_path / "run")
    for step in range(1, 6):
        checkpoint.save(make_state(step), run_dir, step, keep_last=10)
    assert saved_steps(run_dir) == [1, 2, 3, 4, 5]


def test_a_truncated_checkpoint_is_corrupt_and_load_names_it(tmp_path):
    run_dir = str(tmp_path / "run")
    url = checkpoint.save(make_state(3), run_dir, 3, keep_last=1)
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 3])
    with pytest.raises(checkpoint.CorruptCheckpoint, match="step-00000003.pt"):
        checkpoint.load(url)


# ---- S3 outages (issue items 2 and 11) ---------------------------------------------------
def test_load_latest_waits_out_a_5s_outage_of_s3(s3_bucket, s3_outage):
    run_dir = f"{s3_bucket}/runs/outage"
    for step in (10, 20):
        checkpoint.save(make_state(step), run_dir, step, keep_last=3)
    s3_outage.outage(5.0)
    start = time.monotonic()
    state, url = checkpoint.load_latest(run_dir, retry_s=30)
    assert url == checkpoint.step_url(run_dir, 20) and state["progress"]["step"] == 20
    assert time.monotonic() - start >= 4.5  # it really waited for the endpoint to come back
    assert saved_steps(run_dir) == [10, 20]  # nothing was taken for corrupt


def test_load_latest_fails_naming_the_url_when_an_outage_outlasts_the_budget(s3_bucket, s3_outage):
    run_dir = f"{s3_bucket}/runs/long-outage"
    checkpoint.save(make_state(10), run_dir, 10, keep_last=3)
    s3_outage.outage(60.0)
    with pytest.raises(storage.StorageUnavailable, match=f"{s3_bucket}/runs/long-outage/checkpoints"):
        checkpoint.load_latest(run_dir, retry_s=2)
    s3_outage.up()
    assert saved_steps(run_dir) == [10]


def test_a_run_resumes_at_its_step_after_an_s3_outage_at_start(bands_dataset, s3_bucket, s3_outage):
    run_dir = f"{s3_bucket}/runs/resume-after-outage"
    args = [f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN]
    launch([*args, "train.max_steps=5"], nproc=1)
    s3_outage.down()  # the resumed job starts while S3 is down ...
    job = launch([*args, "train.max_steps=7"], nproc=1, background=True)
    log = []
    while not any("retrying" in line for line in log):  # ... and stays down until the job has met it
        log.append(read_line(job, timeout=120, stream=job.stderr))
    assert "retrying for up to 60 s (run.storage_retry_s / data.read_retry_s)" in log[-1]  # the knob to turn
    s3_outage.up()
    rest = job.communicate(timeout=300)[1]
    assert job.returncode == 0, rest[-3000:]
    assert rest.count("storage unreachable") == 0 and rest.count("storage reachable again after") == 1, rest[-3000:]
    assert "resumed from" in rest and "step-00000005.pt at step 5" in rest
    assert checkpoint.load_latest(run_dir)[0]["progress"]["step"] == 7


def test_read_bytes_survives_an_outage_shorter_than_its_budget(s3_bucket, s3_outage):
    url = f"{s3_bucket}/data/train-000000.tar"
    storage.write_bytes_atomic(url, b"shard bytes")
    s3_outage.outage(5.0)
    assert storage.read_bytes(url, retry_s=30) == b"shard bytes"


def test_read_bytes_in_a_20s_outage_fails_naming_the_url_after_its_budget(s3_bucket, s3_outage):
    url = f"{s3_bucket}/data/train-000001.tar"
    storage.write_bytes_atomic(url, b"shard bytes")
    s3_outage.outage(20.0)
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=f"{url}: storage unreachable"):
        storage.read_bytes(url, retry_s=3)
    assert time.monotonic() - start < 18  # the budget, not the outage, decided


def test_an_outage_is_one_warning_at_once_and_one_line_when_it_ends(s3_bucket, s3_outage, caplog):
    """Waiting out an outage must not look like a hang: the first failed attempt warns at once
    (the URL, the error, how long retries go on), other retries and callers stay quiet, and the
    recovery says how long it took. Three readers meet the same outage."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    url = f"{s3_bucket}/data/train-000003.tar"
    storage.write_bytes_atomic(url, b"shard bytes")
    caplog.set_level(logging.INFO, logger="shardio.storage")
    s3_outage.outage(15.0)
    start = time.time()
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda _: storage.read_bytes(url, retry_s=60), range(3))) == [b"shard bytes"] * 3
    lines = [(r.created - start, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2, lines
    (warned_at, warning), (_, recovered) = lines
    assert re.fullmatch(rf"{url}: storage unreachable \(\w+: .+\); retrying for up to 60 s \(.+\)", warning), warning
    assert warned_at < 10, "the first failed attempt warns, not the last"  # botocore retries on its own first
    outage = float(re.fullmatch(rf"{url}: storage reachable again after (\d+\.\d) s", recovered)[1])
    assert 13 < outage < 40


def test_read_bytes_retries_5xx_answers(s3_bucket, s3_outage):
    url = f"{s3_bucket}/data/train-000002.tar"
    storage.write_bytes_atomic(url, b"shard bytes")
    s3_outage.down()  # cut the pooled connections, then answer every request with 503
    s3_outage.answer_503 = True
    s3_outage.up()
    with pytest.raises(storage.StorageUnavailable, match="Service Unavailable"):
        storage.read_bytes(url, retry_s=0)  # a 503 counts as transient once botocore gives up
    threading.Timer(3.0, setattr, (s3_outage, "answer_503", False)).start()
    assert storage.read_bytes(url, retry_s=30) == b"shard bytes"


def test_a_missing_file_is_not_retried(s3_bucket):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/nothing-here", retry_s=30)
    assert time.monotonic() - start < 5


# ---- leftovers of killed writers (Low) ---------------------------------------------------
KILLED_LOCAL_WRITER = """
import os, signal, sys
with open(sys.argv[1] + f".tmp-{os.getpid()}", "wb") as f:  # what write_bytes_atomic writes first
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""

KILLED_S3_WRITER = """
import os, signal, sys
import s3fs
f = s3fs.S3FileSystem(skip_instance_cache=True).open(sys.argv[1], "wb", block_size=5 * 2**20)
f.write(b"x" * (6 * 2**20))
f.flush()  # starts the multipart upload and sends part 1
os.kill(os.getpid(), signal.SIGKILL)
"""


def run_killed_writer(code: str, target: str) -> None:
    out = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr


def test_cleanup_removes_temp_files_of_killed_writers(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    run_killed_writer(KILLED_LOCAL_WRITER, str(run_dir / "checkpoints/step-00000005.pt"))
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert len(list(run_dir.glob("checkpoints/*.tmp-*"))) == 1
    removed = storage.cleanup_leftovers(str(run_dir))
    assert len(removed) == 1 and not list(run_dir.glob("checkpoints/*.tmp-*"))
    assert (run_dir / "metrics.jsonl").exists()


def test_cleanup_aborts_unfinished_multipart_uploads_under_the_run_dir_only(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")
    run_killed_writer(KILLED_S3_WRITER, f"{s3_bucket}/runs/a/checkpoints/step-00000005.pt")
    run_killed_writer(KILLED_S3_WRITER, f"{s3_bucket}/runs/other/checkpoints/step-00000005.pt")

    def pending() -> list[str]:
        return sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))

    assert pending() == ["runs/a/checkpoints/step-00000005.pt", "runs/other/checkpoints/step-00000005.pt"]
    removed = storage.cleanup_leftovers(f"{s3_bucket}/runs/a")
    assert len(removed) == 1 and "runs/a/checkpoints/step-00000005.pt" in removed[0]
    assert pending() == ["runs/other/checkpoints/step-00000005.pt"]


# ---- background saves --------------------------------------------------------------------
def test_background_save_writes_the_state_as_it_was_at_the_step(tmp_path):
    run_dir = str(tmp_path / "run")
    state = make_state(1, n=1_000_000)
    saver = checkpoint.BackgroundSaver(run_dir, keep_last=2)
    url = saver.save(state, 1)
    state["model"]["weight"].add_(100.0)  # training goes on while the write is in flight
    state["progress"]["step"] = 2
    saver.wait()
    saved = checkpoint.load(url)
    assert saved["progress"]["step"] == 1 and torch.equal(saved["model"]["weight"], torch.full((1_000_000,), 1.0))


def test_background_write_errors_surface_at_the_next_save_and_at_wait(s3_bucket, s3_outage):
    run_dir = f"{s3_bucket}/runs/bg"
    saver = checkpoint.BackgroundSaver(run_dir, keep_last=2, retry_s=1)
    s3_outage.down()
    saver.save(make_state(1), 1)
    with pytest.raises(checkpoint.CheckpointWriteError, match="step-00000001.pt: background checkpoint write failed"):
        saver.save(make_state(2), 2)  # raises before it starts a write of its own
    saver.wait()  # nothing in flight, nothing left to report
    saver.save(make_state(2), 2)
    with pytest.raises(checkpoint.CheckpointWriteError, match="step-00000002.pt"):
        saver.wait()
    s3_outage.up()
    saver.save(make_state(3), 3)
    saver.wait()
    assert saved_steps(run_dir) == [3]


# ---- one owner per run dir (issue item 5) ------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def lease_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket')}/runs/leased"


def test_a_second_job_is_refused_and_told_who_holds_the_run_dir(lease_dir):
    first = start_lease_holder(lease_dir, "1001", timeout_s=30)
    try:
        assert read_line(first) == "acquired"
        second = start_lease_holder(lease_dir, "1002", timeout_s=30)
        line = read_line(second)
        assert second.wait(timeout=30) == 3
        assert line.startswith("held:") and f"job 1001 on {os.uname().nodename} (pid {first.pid})" in line
    finally:
        first.kill()
        first.wait()


def test_racing_jobs_get_exactly_one_lease(lease_dir):
    start_at = time.time() + 4  # after every racer has imported
    racers = [start_lease_holder(lease_dir, f"job-{i}", timeout_s=30, start_at=start_at) for i in range(3)]
    try:
        lines = [read_line(p) for p in racers]
        assert sorted(line.split(":")[0] for line in lines) == ["acquired", "held", "held"]
    finally:
        for p in racers:
            p.kill()
            p.wait()


def test_a_silent_holders_lease_is_taken_over_after_the_timeout(lease_dir):
    """A holder that stops renewing (frozen here with SIGSTOP; on another node, a lost node)."""
    timeout_s = 6.0
    holder = start_lease_holder(lease_dir, "2001", timeout_s=timeout_s)
    try:
        assert read_line(holder) == "acquired"
        holder.send_signal(signal.SIGSTOP)
        with pytest.raises(LeaseHeld, match="job 2001"):
            Lease(lease_dir, job_id="2002", timeout_s=timeout_s).acquire()
        time.sleep(timeout_s + 0.5)
        lease = Lease(lease_dir, job_id="2002", timeout_s=timeout_s).acquire()
        lease.check()
        lease.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(lease_dir):
    holder = start_lease_holder(lease_dir, "2101", timeout_s=600)
    assert read_line(holder) == "acquired"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = Lease(lease_dir, job_id="2102", timeout_s=600).acquire()  # its pid is gone: no wait
    lease.check()
    lease.release()


# The holder in a new PID namespace (same hostname, as a container with host networking),
# at a pid this namespace does not have.
OTHER_PID_NAMESPACE = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
                       'echo 99999 > /proc/sys/kernel/ns_last_pid && "$0" "$@"')


def test_a_live_holder_in_another_pid_namespace_is_not_taken_for_dead(lease_dir):
    if subprocess.run([*OTHER_PID_NAMESPACE, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a PID namespace here (unshare needs root or user namespaces)")
    holder = start_lease_holder(lease_dir, "2201", timeout_s=600, prefix=OTHER_PID_NAMESPACE)
    try:
        assert read_line(holder) == "acquired"
        with pytest.raises(LeaseHeld, match="job 2201"):  # its pid is not ours to look up: wait
            Lease(lease_dir, job_id="2202", timeout_s=600).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_requeue_of_the_same_job_takes_its_lease_back_at_once(lease_dir):
    holder = start_lease_holder(lease_dir, "3001", timeout_s=60)
    assert read_line(holder) == "acquired"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = Lease(lease_dir, job_id="3001", timeout_s=60).acquire()  # SLURM_JOB_ID is kept on requeue
    lease.check()
    lease.stop()  # requeued again: the record stays, others are still refused
    with pytest.raises(LeaseHeld, match="job 3001"):
        Lease(lease_dir, job_id="3002", timeout_s=60).acquire()


def test_a_frozen_holder_learns_it_lost_the_lease(lease_dir):
    timeout_s = 3.0
    holder = start_lease_holder(lease_dir, "4001", timeout_s=timeout_s)
    try:
        assert read_line(holder) == "acquired"
        holder.send_signal(signal.SIGSTOP)  # a holder paused past the timeout
        time.sleep(timeout_s + 0.5)
        taker = Lease(lease_dir, job_id="4002", timeout_s=timeout_s).acquire()
        holder.send_signal(signal.SIGCONT)
        line = read_line(holder, timeout=30)
        assert line.startswith("lost:") and "job 4002" in line
        taker.check()
        taker.release()
    finally:
        holder.kill()
        holder.wait()


def test_the_shard_reader_reads_through_an_outage_and_names_the_shard_past_its_budget(s3_bucket, s3_outage, tmp_path):
    """Item 11 through the reader: an 8 s outage mid-epoch costs nothing but time; one longer
    than data.read_retry_s fails naming the shard. In-process (num_workers=0): a forked loader
    worker would inherit the proxy's listening socket, which then outlives the outage."""
    import numpy as np

    import shards
    from imgcls.config import DataConfig
    from imgcls.data import DataError, ShardReader

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "src.npz", images=rng.integers(0, 256, (600, 8, 8, 1), dtype=np.uint8),
             labels=np.arange(600) % 3)
    url = f"{s3_bucket}/ds"
    shards.build(str(tmp_path / "src.npz"), url, shard_samples=40, progress=False, workers=1)
    reader = ShardReader(DataConfig(url=url, batch_size=16, num_workers=0, read_retry_s=60), "train")
    batches = iter(reader.loader())
    keys = list(next(batches)["key"])
    s3_outage.outage(8.0)
    keys += [k for batch in batches for k in batch["key"]]
    assert len(keys) == len(set(keys)) == reader.batches_per_epoch() * 16

    impatient = ShardReader(DataConfig(url=url, batch_size=16, num_workers=0, read_retry_s=2), "train")
    batches = iter(impatient.loader())
    next(batches)
    s3_outage.outage(20.0)
    with pytest.raises(DataError, match=rf"shard {url}/train/\S+\.tar could not be read: .*storage unreachable"):
        for _ in batches:
            pass
