"""The trainer under real torchrun processes (gloo, CPU): exact resume, crash recovery,
non-finite loss, checkpoints on S3, and the distributed maths of accumulation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imgcls import checkpoint
from tests.conftest import build_bands_dataset, torchrun
from tests.wandb_records import logged_steps, run_id

SMALL = [
    "model.name=simple_cnn", "model.width=8", "data.batch_size=16", "data.eval_batch_size=64",
    "data.num_workers=1", "optim.lr=0.05", "optim.base_batch=64", "train.epochs=2",
    "train.accum_steps=2", "train.log_every=2", "train.ckpt_every=5", "train.keep_last=2",
    "track.wandb=disabled", "track.progress=false", "schedule.warmup_epochs=0.2",
    "data.mean=[0.5]", "data.std=[0.25]", "run.deterministic=true",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_bands_dataset(tmp_path_factory.mktemp("data"))


def final_state(run_dir: str) -> dict:
    state, _ = checkpoint.load_latest(run_dir)
    assert state is not None, f"no checkpoint in {run_dir}"
    return state


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "straight")
    out = torchrun([f"data.url={dataset}", f"run.dir={run_dir}", *SMALL])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "done"
    return run_dir, final_state(run_dir)


def test_uninterrupted_run_learns_and_writes_its_run_dir(uninterrupted):
    run_dir, state = uninterrupted
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    val = [r for r in records if "val/acc" in r]
    assert len(val) == 2 and val[-1]["val/acc"] > 0.6  # chance is 0.25
    assert val[-1]["val/count"] == 400  # every val sample exactly once
    assert state["config"]["train"]["accum_steps"] == 2
    assert len(state["rng"]) == 2  # both ranks' RNG states
    for name in ("config.yaml", "training_curves.png", "confusion_val.png"):
        assert Path(run_dir, name).stat().st_size > 0
    assert Path(run_dir, "checkpoints", "best.pt").exists()


def test_stop_mid_epoch_then_resume_is_bitwise_identical(uninterrupted, dataset, tmp_path):
    run_dir = str(tmp_path / "stopped")
    first = torchrun([f"data.url={dataset}", f"run.dir={run_dir}", *SMALL, "train.max_steps=7"])
    assert json.loads(first.stdout.strip().splitlines()[-1])["status"] == "stopped"
    stopped = final_state(run_dir)
    assert stopped["progress"]["step"] == 7 and stopped["data"] == {"epoch": 0, "position": 14}
    torchrun([f"data.url={dataset}", f"run.dir={run_dir}", *SMALL])
    resumed = final_state(run_dir)
    assert resumed["progress"]["restarts"] == 1
    assert_same_weights(resumed["model"], uninterrupted[1]["model"])
    assert resumed["progress"]["step"] == uninterrupted[1]["progress"]["step"]


def test_crash_mid_accumulation_resumes_from_last_checkpoint_bitwise(uninterrupted, dataset, tmp_path):
    run_dir = str(tmp_path / "crashed")
    args = [f"data.url={dataset}", f"run.dir={run_dir}", *SMALL, "track.wandb=offline"]
    # rank 0 dies after 27 micro-batches: step 14 is half accumulated, steps up to 12 were
    # logged, and the last checkpoint is step 10, so steps 11-12 are replayed on resume
    crashed = torchrun(args, env={"IMGCLS_CRASH_AFTER_BATCHES": "27"}, check=False)
    assert crashed.returncode != 0
    assert final_state(run_dir)["progress"]["step"] == 10
    torchrun(args)
    assert_same_weights(final_state(run_dir)["model"], uninterrupted[1]["model"])
    steps = [json.loads(line)["step"] for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and 12 in steps and 42 in steps, "metrics.jsonl went backwards or lost steps"

    # one wandb run across the restart, and its steps never go backwards
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    run = final_state(run_dir)["tracker"]["run_id"]
    assert [f.parent.name.rsplit("-", 1)[1] for f in files] == [run, run]
    assert run_id(files[1]) == run  # the hard-killed attempt may not have flushed its records
    wandb_steps = [s for f in files for s in logged_steps(f)]
    assert wandb_steps == sorted(wandb_steps) and wandb_steps[-1] == 42


def test_truncated_newest_checkpoint_is_skipped(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], run_dir)
    newest = checkpoint.list_checkpoints(str(run_dir))[-1]
    data = Path(newest).read_bytes()
    Path(newest).write_bytes(data[: len(data) // 3])
    state, url = checkpoint.load_latest(str(run_dir))
    assert url != newest and state["progress"]["step"] < uninterrupted[1]["progress"]["step"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(dataset, tmp_path):
    run_dir = str(tmp_path / "nan")
    torchrun([f"data.url={dataset}", f"run.dir={run_dir}", *SMALL, "train.max_steps=5"])
    good = final_state(run_dir)
    # resume with a zero std: every input is inf, so the next step's loss is not finite
    out = torchrun([f"data.url={dataset}", f"run.dir={run_dir}", *SMALL, "data.std=[0.0]"], check=False)
    assert out.returncode != 0
    assert "non-finite loss at step 6" in out.stderr
    after = final_state(run_dir)
    assert after["progress"]["step"] == 5
    assert_same_weights(after["model"], good["model"])


def test_checkpoints_go_to_s3(dataset, s3_bucket):
    run_dir = f"{s3_bucket}/runs/one"
    torchrun([f"data.url={dataset}", f"run.dir={run_dir}", *SMALL, "train.max_steps=3"], nproc=1)
    urls = checkpoint.list_checkpoints(run_dir)
    assert urls and urls[-1].endswith("step-00000003.pt")
    assert checkpoint.load(urls[-1])["progress"]["step"] == 3
