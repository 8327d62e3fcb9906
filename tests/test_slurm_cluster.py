"""The local SLURM cluster (slurm/cluster.sh) is real: nodes, multi-node srun, accounting, preemption."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

try:
    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (repo root on sys.path)
except ImportError:  # plain `pytest`: only tests/ is on sys.path
    from slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def poll(what: str, cond, timeout: float, interval: float = 0.5):
    """Call cond() until it returns something truthy; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(interval)


def test_four_idle_nodes_in_both_partitions(slurm_cluster):
    def idle():
        out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %P %T").stdout.split("\n")
        rows = {tuple(line.split()) for line in out if line.strip()}
        want = {(n, p, "idle") for n in ("n1", "n2", "n3", "n4") for p in ("debug*", "urgent")}
        return rows == want or None
    # Other jobs may still be finishing (e.g. a previous test's); give them a moment.
    poll("4 idle nodes in debug and urgent", idle, timeout=60)


def test_two_node_srun_is_accounted(slurm_cluster, tmp_path: Path):
    out = tmp_path / "hostname.out"
    job = slurm_cluster.sbatch("-N2", "-J", "t-hostname", f"--chdir={tmp_path}", f"--output={out}",
                               "--wrap", "srun hostname; srun printenv SLURM_NODEID")
    slurm_cluster.wait_sacct(job, ("COMPLETED",), timeout=60)
    lines = out.read_text().split()
    assert len(lines) == 4, lines                     # 2 tasks x (hostname, node id)
    assert sorted(lines[2:]) == ["0", "1"], lines      # really ran on two nodes
    nodes = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", str(job), "-o", "NNodes").stdout
    assert nodes.split() == ["2"]


LOW_JOB = """#!/bin/bash
trap 'echo "usr2 $(date +%s)" >> {dir}/usr2' USR2
echo "start restarts=${{SLURM_RESTART_COUNT:-0}}" >> {dir}/starts
# Ignore USR2 beyond noting it: slurmctld kills and requeues us when GraceTime is over.
for i in $(seq 600); do sleep 1; done
"""


def test_urgent_job_preempts_and_requeues_debug_job(slurm_cluster, tmp_path: Path):
    script = tmp_path / "low.sh"
    script.write_text(LOW_JOB.format(dir=tmp_path))
    starts, usr2 = tmp_path / "starts", tmp_path / "usr2"
    low = slurm_cluster.sbatch(
        "-p", "debug", "-N4", "--exclusive", "--requeue", "--signal=B:USR2@60", "--time=10",
        "-J", "t-low", f"--chdir={tmp_path}", f"--output={tmp_path}/low.out", "--open-mode=append",
        str(script))
    try:
        poll("low job started", lambda: starts.exists(), timeout=60)
        urgent = slurm_cluster.sbatch(
            "-p", "urgent", "-N4", "--exclusive", "-J", "t-urgent", f"--chdir={tmp_path}",
            f"--output={tmp_path}/urgent.out", "--wrap", "srun true")
        # Preemption first sends the low job's --signal (USR2) to its batch shell...
        poll("USR2 in the preempted job", lambda: usr2.exists(), timeout=30)
        # ...and GraceTime (15 s) later kills it, so the urgent job runs and the low one requeues.
        slurm_cluster.wait_sacct(urgent, ("COMPLETED",), timeout=60)
        poll("low job restarted after requeue",
             lambda: "restarts=1" in starts.read_text(), timeout=60)
        show = slurm_cluster.run("scontrol", "show", "job", str(low)).stdout
        assert "Restarts=1" in show, show
        assert "Requeue=1" in show, show
        assert starts.read_text().split("\n")[0] == "start restarts=0"
    finally:
        slurm_cluster.scancel(low)
    slurm_cluster.wait_sacct(low, ("CANCELLED",), timeout=30)
