"""The console scripts of setup.cfg: one per jobs/ tool plus imgcls-shards, each a real
callable; installed for real (pip, into a temporary folder) they run from any directory,
even one holding a user's `jobs/` and `shards/` folders."""
from __future__ import annotations

import configparser
import importlib
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_jobs_tool_and_shards_has_a_console_script():
    tools = {p.stem for p in (REPO / "jobs").glob("*.py")} - {"__init__", "scripts", "slurm_args"}
    assert set(console_scripts()) == {f"imgcls-{t}" for t in tools} | {"imgcls-shards"}


@pytest.mark.parametrize("script, target", sorted(console_scripts().items()))
def test_each_console_script_names_an_importable_callable(script, target):
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), target


def test_installed_scripts_run_from_a_folder_with_jobs_and_shards_in_it(tmp_path):
    source = tmp_path / "src"
    for name in ("imgcls", "shards", "shardio", "jobs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "work"
    for folder in ("jobs", "shards", "runs"):  # a user's folders, natural names
        (work / folder).mkdir(parents=True)
    (work / "jobs" / "train.py").write_text("raise SystemExit('the user file ran')\n")
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy only, not the checkout
    for script, expected in (("imgcls-train", "--print-config"), ("imgcls-shards", "build"),
                             ("imgcls-status", "--runs")):
        out = subprocess.run([str(target / "bin" / script), "--help"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {script} ") and expected in out.stdout, \
            out.stderr[-2000:]
    imported = subprocess.run([sys.executable, "-c", "import jobs.train as t; print(t.__file__)"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert imported.stdout.startswith(str(target)), imported.stderr[-2000:]


def test_a_command_returning_its_results_exits_0(tmp_path):
    """imgcls-train's main returns a dict: the script must not turn it into exit code 1."""
    out = subprocess.run([sys.executable, "-c", "import sys; from jobs.scripts import train; sys.exit(train())",
                          "--print-config", "train.epochs=2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "epochs: 2" in out.stdout, out.stderr[-2000:]
