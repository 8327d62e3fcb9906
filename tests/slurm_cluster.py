"""Session fixture `slurm_cluster`: the real local SLURM cluster of slurm/cluster.sh.

Use it from a conftest with `from tests.slurm_cluster import slurm_cluster  # noqa: F401`
(or `pytest_plugins = ["tests.slurm_cluster"]` in the root conftest). It skips when we are not
root or there is no apt-get (the script installs Debian's packages and starts root daemons),
starts the cluster (idempotent: a running cluster is reused and left running), exports
SLURM_CONF in os.environ (inherited by submitit, sbatch, srun...), and at session end stops
the cluster only if this fixture was the one that started it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path                      # slurm.conf; os.environ["SLURM_CONF"] points at it
    state_dir: Path                 # $IMGCLS_SLURM_DIR: etc/, log/, spool/, run/, mysql/, munge/
    started_here: bool              # True: this session started it and will stop it
    partitions: tuple[str, ...] = ("debug", "urgent")
    default_partition: str = "debug"    # low priority, preemptible (requeue, GraceTime 15 s)
    urgent_partition: str = "urgent"    # high priority: preempts jobs in `debug`
    nodes: tuple[str, ...] = ("n1", "n2", "n3", "n4")
    env: dict = field(default_factory=dict)   # {"SLURM_CONF": ...} for subprocesses

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, sacct, scontrol...) against this cluster."""
        return subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def sbatch(self, *args: str) -> int:
        """`sbatch --parsable ARGS...`; returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job_id: int | str) -> str:
        """The job's state from slurmctld (squeue), else from accounting (sacct); '' if unknown."""
        q = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        if q.returncode == 0 and q.stdout.strip():
            return q.stdout.split()[0]
        return self.sacct_state(job_id)

    def sacct_state(self, job_id: int | str) -> str:
        """The job's state in accounting (e.g. COMPLETED, CANCELLED, PREEMPTED); '' if not yet there."""
        r = self.run("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State", check=False)
        lines = [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def wait_sacct(self, job_id: int, states=("COMPLETED",), timeout: float = 60) -> str:
        """Poll sacct until the job reaches a terminal state; fail unless it is one of `states`."""
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                    "BOOT_FAIL", "DEADLINE"} | set(states)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sacct_state(job_id)
            if state in terminal:
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout}s\n"
                               + self.run("scontrol", "show", "job", str(job_id), check=False).stdout)
        assert state in states, f"job {job_id} ended {state}, expected one of {states}"
        return state

    def scancel(self, *job_ids: int) -> None:
        self.run("scancel", *map(str, job_ids), check=False)


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local SLURM cluster needs root (apt-get install, daemons, /etc/hosts)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "the local SLURM cluster needs Debian's apt-get to install slurm/munge/mariadb"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state_dir = Path(os.environ.get("IMGCLS_SLURM_DIR", "/tmp/imgcls-slurm"))
    env = {**os.environ, "IMGCLS_SLURM_DIR": str(state_dir)}
    # status: 0 = all daemons running, 1 = some, 3 = none. Own it only if nothing was running.
    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    started_here = status.returncode == 3
    # A cold start installs packages (apt may wait up to 300 s for its lock).
    start = subprocess.run(["bash", str(CLUSTER_SH), "start"], env=env, capture_output=True,
                           text=True, timeout=900)
    if start.returncode != 0:
        pytest.fail(f"slurm/cluster.sh start failed (rc={start.returncode}); logs in "
                    f"{state_dir}/log\n{start.stdout}\n{start.stderr}", pytrace=False)
    conf = state_dir / "etc" / "slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf, state_dir=state_dir, started_here=started_here,
                           env={"SLURM_CONF": str(conf)})
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started_here:
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=env, capture_output=True,
                           timeout=180)
