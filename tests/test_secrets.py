"""Credentials stay out of what a run saves or sends: config.yaml, checkpoints, wandb,
submit.json. The config in memory keeps them: a trial must still reach its database."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from imgcls import checkpoint
from imgcls.config import load_config, redacted, save_config
from tests.conftest import BASE_RUN, REPO, launch

SECRET = "s3cr3t-PW"
DATABASE = f"postgresql://alice:{SECRET}@db.example:5432/optuna"


def files_holding(folder: Path, text: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_redacted_masks_url_passwords_and_named_secrets_only():
    data = {"hpo": {"storage": DATABASE, "study": "s"}, "setup": [f"export WANDB_API_KEY={SECRET}", "module load cuda"],
            "data": {"url": "s3://bucket/shards?token=" + SECRET}, "extra": {"db_password": SECRET}, "n": 3}
    safe = redacted(data)
    assert SECRET not in json.dumps(safe)
    assert safe["hpo"] == {"storage": "postgresql://alice:***@db.example:5432/optuna", "study": "s"}
    assert safe["setup"] == ["export WANDB_API_KEY=***", "module load cuda"] and safe["n"] == 3
    assert data["hpo"]["storage"] == DATABASE  # a copy: the original keeps the password
    assert redacted({"u": "postgresql://alice:p@ss@db/x"})["u"] == "postgresql://alice:***@db/x"


def test_save_config_masks_and_the_config_in_memory_keeps_the_password(tmp_path):
    cfg = load_config(None, [f"hpo.storage={DATABASE}"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert SECRET not in (tmp_path / "config.yaml").read_text()
    assert cfg.hpo.storage == DATABASE


def test_a_submitted_run_keeps_credentials_out_of_its_files(bands_dataset, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "submit.py"), "--cluster", "debug", "--wait",
                          "--setup", f"export WANDB_API_KEY={SECRET}", f"data.url={bands_dataset}",
                          f"run.dir={run_dir}", *BASE_RUN, "track.wandb=offline", f"hpo.storage={DATABASE}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert SECRET not in out.stdout + out.stderr
    # the files the job itself needs keep the secrets, readable by their owner only
    for name in ("submit.json", "config.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o600, name
    assert SECRET in (run_dir / "submit.json").read_text()  # --resume reruns the setup lines
    holders = files_holding(run_dir, SECRET)
    assert sorted(holders) == sorted(str(run_dir / n) for n in ("submit.json", "config.json")), holders
    assert "alice:***@db.example" in (run_dir / "config.yaml").read_text()
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert b"alice:***@db.example" in wandb_file.read_bytes()  # wandb got the config, masked


def test_checkpoints_hold_the_masked_config(bands_dataset, tmp_path):
    run_dir = tmp_path / "run"
    launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *BASE_RUN, f"hpo.storage={DATABASE}"], nproc=None)
    state, _ = checkpoint.load_latest(str(run_dir))
    assert state["config"]["hpo"]["storage"] == "postgresql://alice:***@db.example:5432/optuna"
