"""jobs/submit.py without SLURM: submitit's debug (in-process) and local executors, sweeps,
the code snapshot; and the pure helpers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgcls.cluster import sweep_grid
from imgcls.distributed import expand_hostlist, job_port
from tests.conftest import BASE_RUN, REPO

TINY = [*BASE_RUN, "data.num_workers=1"]  # a loader worker, as on a cluster


def submit(*args):
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), *args, "--wait"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


def test_debug_cluster_runs_in_process(bands_dataset, tmp_path):
    stdout, results = submit("--cluster", "debug", f"data.url={bands_dataset}", f"run.dir={tmp_path / 'run'}", *TINY)
    assert results[0]["status"] == "done" and results[0]["step"] > 0
    assert "run dir: " in stdout and "wandb:" in stdout


def test_local_cluster_two_tasks_ddp_from_the_code_snapshot(bands_dataset, tmp_path):
    run_dir = tmp_path / "run"
    _, results = submit("--cluster", "local", "--tasks-per-node", "2", f"data.url={bands_dataset}",
                        f"run.dir={run_dir}", *TINY)
    assert [r["status"] for r in results] == ["done", "done"]
    assert results[0]["step"] == results[1]["step"] > 0
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*_0_log.err"))
    # every package from the snapshot, none from the checkout (PYTHONPATH names it in the job too)
    assert f"running the code in {run_dir / 'code'} (imgcls, jobs, shardio, shards)\n" in logs
    with pytest.raises(AssertionError, match="already holds a submitted run"):
        submit("--cluster", "local", f"data.url={bands_dataset}", f"run.dir={run_dir}", *TINY)


def test_sweep_gives_each_task_its_own_run_dir(bands_dataset, tmp_path):
    run_dir = tmp_path / "sweep"
    stdout, results = submit("--cluster", "local", "--sweep", "optim.lr=0.01,0.3", f"data.url={bands_dataset}",
                             f"run.dir={run_dir}", *TINY)
    assert stdout.count("job ") == 2 and len(results) == 2
    for i, lr in enumerate(["0.01", "0.3"]):
        config = (run_dir / f"sweep-{i:03d}" / "config.yaml").read_text()
        assert f"lr: {lr}" in config
        assert (run_dir / f"sweep-{i:03d}" / "checkpoints").is_dir()


def test_snapshot_carries_every_package_setup_cfg_installs(tmp_path):
    from setuptools import find_packages

    from imgcls.cluster import installed_packages, snapshot_code

    installed = {name.split(".")[0]
                 for name in find_packages(str(REPO), include=["imgcls*", "shards*", "shardio*", "jobs"])}
    assert set(installed_packages()) == installed and "shardio" in installed
    code = snapshot_code(tmp_path)
    for name in installed:
        assert (code / name / "__init__.py").exists(), name
    assert (code / "shardio" / "storage.py").exists() and (code / "setup.cfg").exists()


def test_sweep_grid_and_hostlists():
    assert sweep_grid(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]
    assert sweep_grid([]) == [[]]
    with pytest.raises(ValueError, match="key=v1,v2"):
        sweep_grid(["a"])
    assert expand_hostlist("n[1-3,7],gpu-a[01-02],login") == ["n1", "n2", "n3", "n7", "gpu-a01", "gpu-a02", "login"]


def test_job_ports_stay_below_the_ephemeral_ports():
    """Every task derives the rendezvous port from the job id; a port in the kernel's ephemeral
    range can be held by any outgoing connection on the node (EADDRINUSE, seen in CI)."""
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {job_port(job_id) for job_id in range(0, 4_194_304, 997)} | {job_port("18326"), job_port("18326_3")}
    assert 1024 <= min(ports) and max(ports) < low
    assert job_port("18326_3") == job_port(18326)  # an array task rendezvous with its job's
