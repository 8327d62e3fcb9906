"""Issue 23's faults against real parts: the run dir fenced by its lease (a real frozen and
thawed training process, moto S3), metrics on S3 in segments, a full tmpfs while
checkpointing, and user-fixable mistakes as one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imgcls import tracking
from imgcls.config import ConfigError, TrackConfig, load_config
from imgcls.lease import Lease, LeaseLost
from shardio import storage

from .conftest import BASE_RUN, REPO, launch, wait_until

TRACK = TrackConfig(wandb="disabled", progress=False)


# ---- metrics on object storage: segments, fenced ------------------------------------------
def test_metrics_on_s3_are_segments_whose_put_does_not_grow_with_the_run(s3_bucket, monkeypatch):
    monkeypatch.setattr(tracking, "SEGMENT_RECORDS", 10)
    run_dir = f"{s3_bucket}/runs/seg"
    tracker = tracking.Tracker(TRACK, run_dir, enabled=True)
    tracker.start({})
    fs, _ = storage.filesystem(run_dir)
    for step in range(35):
        tracker.log(step, {"train/loss": 1.0 / (step + 1)})
        written = tracking.segment_urls(run_dir)[-1]
        assert len(storage.read_bytes(written).splitlines()) <= 10  # what this log PUT
    assert len(tracking.segment_urls(run_dir)) == 4
    assert [r["step"] for r in tracking.read_metrics(run_dir)] == list(range(35))
    assert not fs.exists(storage.filesystem(f"{run_dir}/metrics.jsonl")[1])


def test_a_stale_writer_on_s3_cannot_write_into_the_new_holders_metrics(s3_bucket):
    """A holder frozen past its lease, then thawed: its next PUT is conditional on the segment
    it wrote, which the new holder sealed, so it fails and the old holder stops."""
    run_dir = f"{s3_bucket}/runs/stale"
    old = tracking.Tracker(TRACK, run_dir, enabled=True)
    old.start({})
    for step in range(5):
        old.log(step, {"train/loss": 1.0})
    new = tracking.Tracker(TRACK, run_dir, enabled=True)
    new.start({})  # a resume from a checkpoint at step 3: steps 3 and 4 are not logged again
    for step in range(3, 8):
        new.log(step, {"train/loss": 0.5})
    with pytest.raises(LeaseLost, match="another job writes its metrics now"):
        old.log(5, {"train/loss": 1.0})
    assert [r["step"] for r in tracking.read_metrics(run_dir)] == list(range(8))


def test_a_thawed_training_holder_stops_with_one_line_and_writes_nothing(tmp_path, bands_dataset):
    """A trainer frozen past its lease timeout, then thawed after another job took the run dir:
    it used to append older steps to the new holder's metrics.jsonl."""
    run_dir = tmp_path / "run"
    args = [*BASE_RUN, f"data.url={bands_dataset}", f"run.dir={run_dir}", "train.epochs=100",
            "train.log_every=1", "run.lease_timeout_s=2"]
    proc = launch(args, nproc=None, background=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, timeout=120,
                   what="3 metrics lines", proc=proc)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        taker = Lease(str(run_dir), job_id="taker", timeout_s=2).acquire()
        before = metrics.read_bytes()
        proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=60)
        taker.release()
    finally:
        proc.kill()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "the lease was taken over by job taker" in stderr.strip().splitlines()[-1]
    assert metrics.read_bytes() == before  # nothing written after the takeover


# ---- a full disk while checkpointing -------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_is_one_line(small_tmpfs, bands_dataset):
    (small_tmpfs / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 1024))  # ~64 kB left
    run_dir = small_tmpfs / "run"
    out = launch([*BASE_RUN, f"data.url={bands_dataset}", f"run.dir={run_dir}", "model.width=32"], nproc=None,
                 check=False, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "No space left on device" in line and str(run_dir) in line, out.stderr[-3000:]


# ---- user-fixable mistakes: one line naming the key or file ----------------------------------
@pytest.mark.parametrize("override, words", [
    ("data.batch_size=0", "data.batch_size=0: must be at least 1"),
    ("train.accum_steps=0", "train.accum_steps=0: must be at least 1"),
    ("train.log_every=0", "train.log_every=0: must be at least 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1: must be a finite number, 0 or more"),
    ("run.lease_timeout_s=-5", "run.lease_timeout_s=-5.0: must be above 0"),
    ("data.num_workers=-1", "data.num_workers=-1: must be 0 or more"),
    ("data.mean=[.nan, 0.5, 0.5]", "data.mean=[nan, 0.5, 0.5]: must be finite numbers"),
    ("train.epochs=!!python/object/apply:os.system [true]", "override 'train.epochs=!!python/object/apply"),
])
def test_out_of_range_and_unsafe_values_are_refused_naming_the_key(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_an_include_loop_and_a_yaml_constructor_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\ntrain:\n  epochs: 2\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: include loop: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: !!python/object/apply:os.system ['echo pwned']\n")
    out = launch(["--config", str(bad)], nproc=None, check=False, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "pwned" not in out.stdout, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: config file {bad}: not valid YAML")


def test_status_runs_skips_an_unreadable_config_with_a_note(tmp_path):
    for name, config in (("good", "train:\n  epochs: 3\n"), ("bad", "train: [epochs: !!python/name:os.system\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(config)
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 5, "train/loss": 0.5}) + "\n")
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), "--runs", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("good ") and "0/3" in line for line in lines), out.stdout
    assert any(line.startswith("bad ") for line in lines), out.stdout
    assert any(line.strip().startswith(f"note: {tmp_path / 'bad' / 'config.yaml'} skipped") for line in lines)


# ---- a hung storage endpoint ----------------------------------------------------------------
HUNG_READ = """
import sys, time
from shardio import storage
storage.TIMEOUT_S = 2.0
start = time.monotonic()
try:
    storage.read_bytes("s3://bucket/data/train-000000.tar", retry_s=3)
except storage.StorageUnavailable as e:
    print(f"{time.monotonic() - start:.1f}", e)
"""


def test_a_hung_endpoint_fails_within_the_budget_plus_one_timeout_naming_the_url(hung_endpoint):
    """An endpoint that accepts and never answers, with a 3 s budget: the read used to hang for
    minutes inside one attempt (s3fs and botocore retrying at 15 s read timeouts)."""
    url, accepted = hung_endpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    out = subprocess.run([sys.executable, "-c", HUNG_READ], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    seconds, message = out.stdout.split(" ", 1)
    assert float(seconds) <= 3 + 2 + 2, out.stdout  # the budget, one timeout, scheduling slack
    assert message.startswith("s3://bucket/data/train-000000.tar: storage unreachable"), message
    assert 1 <= len(accepted) <= 3
