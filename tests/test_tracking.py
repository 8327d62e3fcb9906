"""metrics.jsonl and wandb under everyday faults: a torn line, a node without internet."""
from __future__ import annotations

import json
import socket
import time

from imgcls import hpo
from imgcls.tracking import wandb_mode
from tests.conftest import BASE_RUN, free_port, launch
from tests.wandb_records import logged_steps


def test_torn_metrics_line_is_skipped_and_reported_on_resume(bands_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.url={bands_dataset}", f"run.dir={run_dir}", *BASE_RUN]
    launch(args, nproc=None)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    with open(metrics, "a") as f:
        f.write('{"step": 99, "train/lo')  # an append cut short by a kill
    assert hpo.best_value(str(run_dir), "val/acc") is not None  # the readers skip it too

    resumed = launch([*args, "train.epochs=2"], nproc=None)
    assert f"{metrics}: skipped 1 line(s) that are not JSON records (a torn write?): line {len(lines) + 1}" \
        in resumed.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # all whole again
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and records[-1]["epoch"] == 2 and len(records) > len(lines)


def test_wandb_auto_checks_that_the_server_answers(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    start = time.monotonic()
    assert wandb_mode("auto") == "offline" and time.monotonic() - start < 3
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("online") == "online"


def test_wandb_auto_with_a_key_but_no_server_trains_offline(bands_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",
           "WANDB_INIT_TIMEOUT": "20"}  # today's failure (going online) then ends in 20 s
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *BASE_RUN, "track.wandb=auto"], nproc=None,
                 env=env)
    assert "is not reachable: logging offline" in out.stderr
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1 and logged_steps(files[0])[-1] == json.loads(out.stdout.splitlines()[-1])["step"]
