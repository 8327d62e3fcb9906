"""jobs/submit.py on the real local SLURM cluster (slurm/cluster.sh): preemption, time limit,
scancel --signal=USR2, a SIGKILLed rank and --resume. CPU tasks, small shards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imgcls import checkpoint
from tests.conftest import BASE_RUN, REPO, launch
from tests.wandb_records import logged_steps

pytestmark = pytest.mark.slurm


def job_config(dataset: str, run_dir: Path, epochs: int, wandb: str = "offline") -> list[str]:
    return [f"data.url={dataset}", f"run.dir={run_dir}", *BASE_RUN, f"train.epochs={epochs}", "model.width=16",
            "data.batch_size=16", "data.num_workers=1", f"track.wandb={wandb}", "train.ckpt_every=20",
            "run.deterministic=true"]


def submit(*args: str) -> str:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    first = out.stdout.split("\n")[0]
    assert first.startswith("job "), out.stdout
    return first.split()[1]


def status(root: Path) -> list[dict]:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), "list", "--root", str(root), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in lines), default=0)


def attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_state(cluster, job_id: str, states: set, timeout: float) -> str:
    def reached():
        state = cluster.sacct_state(job_id)
        return state if state in states else None
    try:
        return wait_for(reached, timeout, f"job {job_id} to reach {states}", poll=1)
    except TimeoutError:
        raise AssertionError(f"job {job_id} is {cluster.job_state(job_id)}, expected {states}") from None


def job_log(run_dir: Path, job_id: str) -> str:
    """Rank 0's whole stderr log of the job."""
    err = run_dir / "logs" / f"{job_id}_0_log.err"
    return err.read_text() if err.exists() else "(no log)"


def log_tail(run_dir: Path, job_id: str) -> str:
    return job_log(run_dir, job_id)[-3000:]


def final_weights(run_dir: Path) -> dict:
    state, _ = checkpoint.load_latest(str(run_dir))
    return state


def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm_cluster, bands_dataset, tmp_path):
    run_dir = tmp_path / "preempted"
    args = job_config(bands_dataset, run_dir, epochs=12)  # ~1 s per epoch: still running when preempted
    job = submit("--nodes", "2", "--time", "10", *args)
    wait_for(lambda: logged_step(run_dir) >= 20, 120, "the job to train 20 steps")
    urgent = slurm_cluster.sbatch("-p", "urgent", "-N", "4", "--exclusive", "--wrap", "sleep 3")
    assert wait_state(slurm_cluster, str(urgent), {"COMPLETED"}, 120) == "COMPLETED"
    assert wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, 240) == "COMPLETED", \
        log_tail(run_dir, job)

    runs = attempts(run_dir)
    assert len(runs) >= 2 and runs[-1]["restart_count"] >= 1, runs
    state = final_weights(run_dir)
    assert state["progress"]["restarts"] >= 1
    # the same config, uninterrupted, under torchrun: bitwise the same weights
    reference_dir = tmp_path / "reference"
    launch(job_config(bands_dataset, reference_dir, epochs=12, wandb="disabled"))
    reference = final_weights(reference_dir)
    assert state["progress"]["step"] == reference["progress"]["step"]
    for name, tensor in reference["model"].items():
        assert torch.equal(state["model"][name], tensor), f"{name} differs from the uninterrupted run"

    # one wandb run through the requeue, steps never backwards
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) >= 2 and len({f.parent.name.rsplit("-", 1)[1] for f in files}) == 1
    steps = [s for f in files for s in logged_steps(f)]
    assert steps == sorted(steps) and steps[-1] == state["progress"]["step"]

    row = next(r for r in status(tmp_path) if r["run_dir"] == str(run_dir))
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1 and row["step"] == state["progress"]["step"]


def test_time_limit_requeues_and_finishes_on_four_nodes(slurm_cluster, bands_dataset, tmp_path):
    run_dir = tmp_path / "timelimit"
    # USR2 40 s before a 2-minute limit: slurmctld checks limits every 30 s, so it comes 50-80 s
    # after the start; 160 epochs take about 140 s on an idle machine (80 took 70 s: too few)
    job = submit("--nodes", "4", "--time", "2", "--signal-margin", "40",
                 *job_config(bands_dataset, run_dir, epochs=160))
    assert wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 720) == "COMPLETED", \
        log_tail(run_dir, job)
    state = final_weights(run_dir)
    assert state["progress"]["restarts"] >= 1 and state["data"]["epoch"] == 160
    row = next(r for r in status(tmp_path) if r["run_dir"] == str(run_dir))
    assert row["requeues"] >= 1 and row["slurm_restarts"] >= 1 and row["state"] == "COMPLETED"
    assert len({a["host"] for a in attempts(run_dir)}) >= 1
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def rank_pid(job_id: str, rank: int) -> int | None:
    """PID of the training process of `rank` in `job_id` (found by its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_text()
        except OSError:
            continue
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank)
                and "submitit.core._submit" in cmdline and "SLURM_STEP_ID" in env):
            return int(proc.name)
    return None


def test_usr2_requeues_then_a_killed_rank_fails_and_resume_finishes(slurm_cluster, bands_dataset, tmp_path):
    run_dir = tmp_path / "killed"
    job = submit("--nodes", "2", "--time", "10", *job_config(bands_dataset, run_dir, epochs=20))
    wait_for(lambda: logged_step(run_dir) >= 10, 120, "the job to train 10 steps")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env={**os.environ, **slurm_cluster.env})
    # it checkpoints, requeues itself and starts again
    wait_for(lambda: len(attempts(run_dir)) >= 2, 120, "the requeued job to start")
    stopped_at = final_weights(run_dir)["progress"]["step"]
    wait_for(lambda: logged_step(run_dir) >= stopped_at + 45, 120, "the requeued job to pass a periodic checkpoint")

    pid = wait_for(lambda: rank_pid(job, 1), 30, "rank 1's process")
    os.kill(pid, signal.SIGKILL)
    assert wait_state(slurm_cluster, job, {"FAILED", "COMPLETED", "CANCELLED"}, 120) == "FAILED"
    row = next(r for r in status(tmp_path) if r["run_dir"] == str(run_dir))
    assert row["state"] == "FAILED"
    last_good = final_weights(run_dir)["progress"]["step"]
    assert last_good > stopped_at

    # on one node instead of two: the rest of the epoch is read by one rank, elastically
    resumed = submit("--resume", str(run_dir), "--nodes", "1")
    assert resumed != job
    assert wait_state(slurm_cluster, resumed, {"COMPLETED", "FAILED", "CANCELLED"}, 240) == "COMPLETED", \
        log_tail(run_dir, resumed)
    log = job_log(run_dir, resumed)
    assert "world size 1," in log and "samples of it read" in log
    assert json.loads((run_dir / "submit.json").read_text())["slurm"]["nodes"] == 1
    state = final_weights(run_dir)
    assert state["data"]["epoch"] == 20 and state["progress"]["restarts"] >= 2
    assert (run_dir / "code" / "imgcls" / "trainer.py").exists()  # it ran the snapshot


def cancel_job(cluster, how: str, job_id: str, run_dir: Path) -> None:
    if how == "scancel":
        cluster.run("scancel", job_id)
    else:
        out = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), "cancel", str(run_dir)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"cancelled {job_id}" in out.stdout, out.stderr


@pytest.mark.parametrize("how, wandb", [("scancel", "disabled"), ("status.py cancel", "offline")])
def test_cancelled_job_stops_and_stays_cancelled(slurm_cluster, bands_dataset, tmp_path, how, wandb):
    run_dir = tmp_path / "cancelled"
    args = job_config(bands_dataset, run_dir, epochs=40, wandb=wandb)  # with a loader worker: it ignores SIGTERM
    job = submit("--time", "10", *args)
    wait_for(lambda: logged_step(run_dir) >= 10, 120, "the job to train 10 steps")
    cancel_job(slurm_cluster, how, job, run_dir)
    assert wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "CANCELLED"
    # a requeue would restart it within ~10 s (cred_expire=5, sched_interval=2): watch 25 s
    deadline = time.time() + 25
    while time.time() < deadline:
        assert slurm_cluster.sacct_state(job) == "CANCELLED", log_tail(run_dir, job)
        time.sleep(1)
    assert len(attempts(run_dir)) == 1
    # the whole log: wandb's service, ended by the same SIGTERM, adds a traceback at exit
    assert "stopped by signal SIGTERM at step" in job_log(run_dir, job) and "not requeued" in job_log(run_dir, job)
    assert final_weights(run_dir)["progress"]["step"] >= 10  # the last checkpoint, at the stop


def test_cancelled_job_with_loader_workers_stops_cleanly(slurm_cluster, bands_dataset, tmp_path):
    run_dir = tmp_path / "cancelled"
    job = submit("--time", "10", *job_config(bands_dataset, run_dir, epochs=40, wandb="disabled"))  # num_workers=1
    wait_for(lambda: logged_step(run_dir) >= 10, 120, "the job to train 10 steps")
    slurm_cluster.run("scancel", job)
    assert wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "CANCELLED"
    wait_for(lambda: (run_dir / "logs" / f"{job}_0_result.pkl").exists(), 30, "the task's result")
    log = (run_dir / "logs" / f"{job}_0_log.err").read_text()
    assert "stopped by signal SIGTERM" in log and "DataLoader worker" not in log, log[-3000:]


def test_sweep_is_one_job_array_with_a_run_dir_per_task(slurm_cluster, bands_dataset, tmp_path):
    run_dir = tmp_path / "sweep"
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), "--sweep", "model.width=4,8",
                          f"data.url={bands_dataset}", f"run.dir={run_dir}", "train.epochs=1", "data.num_workers=1",
                          "track.wandb=disabled", "track.progress=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    job_ids = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("job ")]
    assert len(job_ids) == 2 and len({j.split("_")[0] for j in job_ids}) == 1  # one array: ID_0, ID_1
    for job_id in job_ids:
        assert wait_state(slurm_cluster, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 180) == "COMPLETED"
    widths = [final_weights(run_dir / f"sweep-{i:03d}")["config"]["model"]["width"] for i in range(2)]
    assert widths == [4, 8]
    rows = status(tmp_path)
    assert sorted(r["job_id"] for r in rows) == sorted(job_ids) and {r["state"] for r in rows} == {"COMPLETED"}


def test_requeued_job_runs_its_snapshot_after_the_checkout_changed(slurm_cluster, bands_dataset, tmp_path):
    """The checkout is a copy of this repo, first on the job's path as an editable install would
    be; after the submit its shardio is broken: the requeued job must not notice."""
    import shutil

    checkout = tmp_path / "checkout"
    for name in ("imgcls", "shardio", "shards", "jobs", "configs", "slurm", "setup.cfg", "pyproject.toml"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, checkout / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(checkout)}
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(checkout / "jobs" / "submit.py"), "--time", "10",
                          *job_config(bands_dataset, run_dir, epochs=12, wandb="disabled")],
                         cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    job = out.stdout.split("\n")[0].split()[1]
    wait_for(lambda: logged_step(run_dir) >= 10, 120, "the job to train 10 steps")

    init = checkout / "shardio" / "__init__.py"
    init.write_text("raise ImportError('the checkout changed after the submit')\n" + init.read_text())
    broken = subprocess.run([sys.executable, "-c", "import shardio"], cwd=tmp_path, env=env, capture_output=True)
    assert broken.returncode != 0  # the checkout's shardio is really broken on the job's path
    slurm_cluster.run("scancel", "--signal=USR2", job)  # checkpoint, requeue, start again
    assert wait_state(slurm_cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, 240) == "COMPLETED", \
        log_tail(run_dir, job)
    assert len(attempts(run_dir)) >= 2
    origins = [line.split("running the code in ", 1)[1] for line in job_log(run_dir, job).splitlines()
               if "running the code in " in line]
    assert origins and set(origins) == {f"{run_dir / 'code'} (imgcls, jobs, shardio, shards)"}, origins
