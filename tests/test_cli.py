"""The entry points as a user meets them: --help for each, and a user's mistake as one line
(`error: ...`, exit code 2) with no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

JOBS = ["train", "submit", "evaluate", "export", "quantize", "predict", "prune", "sweep", "status", "serve"]


def job(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", JOBS)
def test_every_job_has_help(name):
    out = job(name, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]


@pytest.mark.parametrize("name, args, line", [
    ("train", ["optim.lrr=3"], "error: unknown config key 'optim.lrr'; valid keys here: ['base_batch', 'lr', "),
    ("train", ["train.epochs=many"], "error: train.epochs: expected int, got 'many'"),
    ("evaluate", ["/nonexistent/best.pt"], "error: /nonexistent/best.pt: no such file or directory"),
    ("export", ["/nonexistent/best.pt"], "error: /nonexistent/best.pt: no such file or directory"),
])
def test_a_users_mistake_is_one_line(name, args, line):
    out = job(name, *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr
