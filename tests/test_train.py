"""The trainer under real torchrun processes (gloo, CPU): exact resume, crash recovery,
non-finite loss, checkpoints on S3, and the distributed maths of accumulation."""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgcls import checkpoint
from tests.conftest import (
    EXACT_RUN,
    REPO,
    assert_same_weights,
    build_bands_dataset,
    final_state,
    launch,
    wait_until,
)
from tests.wandb_records import logged_steps, run_id


@pytest.fixture(scope="module")
def uninterrupted(bands_dataset, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "straight")
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "done"
    # rank 0's start-up line says what runs where
    assert out.stderr.count("world size 2") == 1
    assert ("device cpu (CPU); world size 2, backend gloo; precision bf16; batch 16 per rank x accum 2 x 2 ranks "
            "= 64; lr 0.05 (optim.lr 0.05 at base batch 64); samples: train 1400, val 400, test 200; "
            "fresh") in out.stderr
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
    confusion = json.loads(Path(run_dir, "confusion_val.json").read_text())  # the last epoch's, drawn in the background
    assert len(confusion["matrix"]) == 4 and sum(map(sum, confusion["matrix"])) == val[-1]["val/count"]
    assert Path(run_dir, "checkpoints", "best.pt").exists()


def test_stop_mid_epoch_then_resume_is_bitwise_identical(uninterrupted, bands_dataset, tmp_path):
    run_dir = str(tmp_path / "stopped")
    first = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.max_steps=7"])
    assert json.loads(first.stdout.strip().splitlines()[-1])["status"] == "stopped"
    stopped = final_state(run_dir)
    assert stopped["progress"]["step"] == 7
    assert stopped["data"]["epoch"] == 0 and stopped["data"]["position"] == 14 and stopped["data"]["samples"] == 448
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN])
    assert "; resuming at step 7 (epoch 0, batch 14)" in out.stderr
    resumed = final_state(run_dir)
    assert resumed["progress"]["restarts"] == 1
    assert_same_weights(resumed["model"], uninterrupted[1]["model"])
    assert resumed["progress"]["step"] == uninterrupted[1]["progress"]["step"]


def test_crash_mid_accumulation_resumes_from_last_checkpoint_bitwise(uninterrupted, bands_dataset, tmp_path):
    run_dir = str(tmp_path / "crashed")
    args = [f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "track.wandb=offline"]
    # rank 0 dies after 27 micro-batches: step 14 is half accumulated, steps up to 12 were
    # logged, and the last checkpoint is step 10, so steps 11-12 are replayed on resume
    crashed = launch(args, env={"IMGCLS_CRASH_AFTER_BATCHES": "27"}, check=False)
    assert crashed.returncode != 0
    assert final_state(run_dir)["progress"]["step"] == 10
    launch(args)
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


@pytest.mark.parametrize("syncs", [[], ["train.sync_every=4", "train.log_every=100", "train.ckpt_every=100"]],
                         ids=["sync-every-step-2", "sync-at-step-8"])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(bands_dataset, tmp_path, syncs):
    """The flags are read only at sync points, yet the error names the first bad step, and no
    checkpoint is written after it."""
    run_dir = str(tmp_path / "nan")
    launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.max_steps=5"])
    good = final_state(run_dir)
    # resume with a mean past float32's range: every input is -inf, so the next step's loss is not finite
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "data.mean=[3.0e38]", *syncs,
                 "train.allow_config_change=true"], check=False)
    assert out.returncode != 0
    assert "non-finite loss at step 6" in out.stderr
    after = final_state(run_dir)
    assert after["progress"]["step"] == 5
    assert_same_weights(after["model"], good["model"])


def test_checkpoints_go_to_s3(bands_dataset, s3_bucket):
    run_dir = f"{s3_bucket}/runs/one"
    launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.max_steps=3"], nproc=1)
    urls = checkpoint.list_checkpoints(run_dir)
    assert urls and urls[-1].endswith("step-00000003.pt")
    assert checkpoint.load(urls[-1])["progress"]["step"] == 3


def test_evaluate_job_writes_the_report(uninterrupted):
    run_dir, _ = uninterrupted
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), f"{run_dir}/checkpoints/best.pt",
                          "--split", "test"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["count"] == 200 and summary["weights"] == "ema" and summary["acc"] > 0.6
    assert summary["views"] == "image+mirror+shifted"  # the run's test-time augmentation
    assert "precision" in out.stdout and "macro avg" in out.stdout
    eval_dir = Path(run_dir, "eval", "test")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    per_class = metrics["per_class"]["per_class"]
    assert sorted(per_class) == ["0", "1", "2", "3"] and sum(c["support"] for c in per_class.values()) == 200
    assert set(per_class["0"]) >= {"precision", "recall", "f1"}
    confusion = json.loads((eval_dir / "confusion.json").read_text())
    assert sum(map(sum, confusion["matrix"])) == 200
    assert (eval_dir / "confusion.png").stat().st_size > 1000 and (eval_dir / "report.txt").exists()


def test_fp16_adamw_step_schedule_and_progressive_unfreezing(bands_dataset, tmp_path):
    run_dir = tmp_path / "transfer"
    launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.precision=fp16",
           "train.grad_clip=1.0", "optim.name=adamw", "optim.lr=0.01", "schedule.name=step", "schedule.step_epochs=1",
           "model.freeze_backbone=true", "model.unfreeze_schedule=[[1, all]]", "train.keep_last=10",
           "train.ema_decay=0.0"])
    states = [checkpoint.load(url) for url in checkpoint.list_checkpoints(str(run_dir))]
    epoch_end = [s for s in states if s["data"]["position"] == 0]
    first, second = epoch_end[0]["model"], epoch_end[1]["model"]
    torch.manual_seed(0)
    from imgcls.config import from_dict
    from imgcls.models import build_model
    initial = build_model(from_dict(states[0]["config"]).model, 4, 1).state_dict()
    weights = [n for n in first if n.endswith("weight") and not n.startswith("fc.")]
    assert weights
    assert all(torch.equal(first[n], initial[n]) for n in weights), "backbone moved while frozen"
    assert any(not torch.equal(second[n], first[n]) for n in weights), "backbone did not train after unfreezing"
    assert epoch_end[1]["scaler"]["scale"] > 0  # fp16 used a GradScaler
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["val/acc"] > 0.5


def test_early_stopping_on_a_plateau(bands_dataset, tmp_path):
    out = launch([f"data.url={bands_dataset}", f"run.dir={tmp_path / 'plateau'}", *EXACT_RUN, "optim.lr=0.0",
                 "model.norm=none", "train.epochs=4", "train.early_stop_patience=1"], nproc=1)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "early_stopped" and result["epoch"] == 2


def test_mixup_cutmix_focal_class_weights_resume_exactly(bands_dataset, tmp_path):
    mixed = [*EXACT_RUN, "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.focal_gamma=2.0",
             "train.class_weights=balanced"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch([f"data.url={bands_dataset}", f"run.dir={straight}", *mixed])
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *mixed, "train.max_steps=9"])
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *mixed])
    assert_same_weights(final_state(str(stopped))["model"], final_state(str(straight))["model"])
    assert json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["val/acc"] > 0.5


def test_distillation_trains_a_student_through_the_same_trainer_and_resumes(uninterrupted, bands_dataset, tmp_path):
    teacher = f"{uninterrupted[0]}/checkpoints/best.pt"
    student = [*EXACT_RUN, "model.width=4", f"distill.teacher={teacher}", "distill.temperature=3.0",
               "distill.alpha=0.7"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch([f"data.url={bands_dataset}", f"run.dir={straight}", *student])
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *student, "train.max_steps=9"])
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *student])
    assert_same_weights(final_state(str(stopped))["model"], final_state(str(straight))["model"])
    assert final_state(str(straight))["config"]["distill"]["teacher"] == teacher


def test_a_run_that_keeps_dying_before_progress_gives_up(bands_dataset, tmp_path):
    run_dir = tmp_path / "stalled"
    args = [f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.max_requeues=2"]
    launch([*args, "train.max_steps=2"], nproc=1)
    for _attempt in range(3):  # each resumes at step 2 and dies in its first micro-batch
        out = launch(args, nproc=1, env={"IMGCLS_CRASH_AFTER_BATCHES": "1"}, check=False)
        assert out.returncode != 0 and "without progress" not in out.stderr
    out = launch(args, nproc=1, env={"IMGCLS_CRASH_AFTER_BATCHES": "1"}, check=False)
    assert out.returncode != 0 and "resumed 3 times at step 2 without progress" in out.stderr


def test_test_time_augmentation_averages_the_logits_of_the_views(uninterrupted):
    import torch.nn.functional as F

    from imgcls.config import from_dict
    from imgcls.data import ShardReader, read_manifest
    from imgcls.evaluation import evaluate
    from imgcls.models.trained import model_from_state

    run_dir, _ = uninterrupted
    state = checkpoint.load(f"{run_dir}/checkpoints/best.pt")
    cfg = from_dict(state["config"])
    manifest = read_manifest(cfg.data.url)
    model, _ = model_from_state(state, manifest)
    cfg.data.num_workers = 0
    reader = ShardReader(cfg.data, "test", train=False, manifest=manifest)
    batches = list(reader.loader())
    images, labels = torch.cat([reader.transform(b) for b in batches]), torch.cat([b["label"] for b in batches])
    # the views built by hand: the image moved one pixel down-right shows pixel (y-1, x-1) at
    # (y, x), with row and column 0 repeated at the edge; up-left likewise
    rows, cols = torch.arange(images.shape[2]), torch.arange(images.shape[3])
    down_right = images[:, :, (rows - 1).clamp(min=0)][:, :, :, (cols - 1).clamp(min=0)]
    up_left = images[:, :, (rows + 1).clamp(max=len(rows) - 1)][:, :, :, (cols + 1).clamp(max=len(cols) - 1)]
    with torch.no_grad():
        def mirror_mean(x):
            return (model(x) + model(x.flip(3))) / 2
        expected = {"flip": mirror_mean(images),
                    "flip+shift": mirror_mean(images) / 2 + (mirror_mean(up_left) + mirror_mean(down_right)) / 4}
    plain = evaluate(model, reader, torch.device("cpu"), contextlib.nullcontext, 4)
    for name, logits in expected.items():
        got = evaluate(model, reader, torch.device("cpu"), contextlib.nullcontext, 4, flip=True, shift=name != "flip")
        assert got["count"] == plain["count"] == 200
        assert got["acc"] == (logits.argmax(1) == labels).float().mean().item()
        assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert got["loss"] != pytest.approx(plain["loss"], rel=1e-5)  # the other views do count


def test_whitening_init_comes_from_the_first_training_images_and_resumes_exactly(bands_dataset, tmp_path):
    from imgcls.config import from_dict
    from imgcls.data import first_images
    from imgcls.models import build_model

    fast = [*EXACT_RUN, "model.name=fast_cnn", "model.width=8", "model.whiten_images=300", "train.epochs=1"]
    # with lr 0 the weights stay as initialised: on both ranks, the whitening of the first 300 images
    launch([f"data.url={bands_dataset}", f"run.dir={tmp_path / 'frozen'}", *fast, "optim.lr=0.0"])
    frozen = final_state(str(tmp_path / "frozen"))
    cfg = from_dict(frozen["config"])
    torch.manual_seed(cfg.run.seed)
    expected = build_model(cfg.model, 4, 1)
    random_init = expected.blocks[0][0].weight.detach().clone()
    expected.init_whitening(first_images(cfg.data, "train", 300))
    assert not torch.equal(expected.blocks[0][0].weight, random_init)
    parameters = dict(expected.named_parameters())  # (BatchNorm statistics do move)
    assert_same_weights({n: frozen["model"][n] for n in parameters}, parameters)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch([f"data.url={bands_dataset}", f"run.dir={straight}", *fast])
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *fast, "train.max_steps=9"])
    launch([f"data.url={bands_dataset}", f"run.dir={stopped}", *fast])
    assert_same_weights(final_state(str(stopped))["model"], final_state(str(straight))["model"])


def copy_run(run_dir: str, dest) -> str:
    import shutil

    shutil.copytree(run_dir, dest)
    return str(dest)


def test_resuming_with_a_changed_config_is_refused_with_a_diff(uninterrupted, bands_dataset, tmp_path):
    run_dir = copy_run(uninterrupted[0], tmp_path / "changed")
    before = Path(run_dir, "config.yaml").read_text()
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.epochs=3", "optim.lr=0.1",
                 "run.seed=4"], check=False)
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr  # torchrun's summary of rank 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("these keys cannot change mid-run: optim.lr: 0.05 -> 0.1; "
                                 "run.seed: 0 -> 4.") in errors[0]
    assert "train.epochs" not in errors[0] and "train.allow_config_change=true" in errors[0]
    assert Path(run_dir, "config.yaml").read_text() == before
    assert checkpoint.list_checkpoints(run_dir)[-1] == newest


def test_more_epochs_resume_and_forced_changes_are_logged(uninterrupted, bands_dataset, tmp_path):
    run_dir = copy_run(uninterrupted[0], tmp_path / "longer")
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.epochs=3"], nproc=1)
    assert "resuming with a changed config: train.epochs: 2 -> 3" in out.stderr
    assert final_state(run_dir)["data"]["epoch"] == 3

    forced = copy_run(uninterrupted[0], tmp_path / "forced")
    out = launch([f"data.url={bands_dataset}", f"run.dir={forced}", *EXACT_RUN, "train.epochs=3", "optim.lr=0.1",
                 "train.allow_config_change=true"], nproc=1)
    assert "WARNING" in out.stderr and "(train.allow_config_change=true): optim.lr: 0.05 -> 0.1" in out.stderr
    assert final_state(forced)["config"]["optim"]["lr"] == 0.1


def test_rerunning_a_finished_run_says_it_is_done(uninterrupted, bands_dataset, tmp_path):
    run_dir = copy_run(uninterrupted[0], tmp_path / "done")
    steps = checkpoint.list_checkpoints(run_dir)
    out = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "done" and result["reason"] == "already done"
    assert result["step"] == uninterrupted[1]["progress"]["step"] and result["restarts"] == 0
    assert "is already done: 2 epochs" in out.stderr and "resum" not in out.stderr
    assert checkpoint.list_checkpoints(run_dir) == steps and not Path(run_dir, "resumes.jsonl").exists()


def test_the_schedule_is_defined_in_samples_so_another_world_size_keeps_its_place():
    from imgcls.config import Config
    from imgcls.optim import make_optimizer, make_schedule

    cfg = Config()
    cfg.data.batch_size, cfg.optim.lr, cfg.optim.base_batch = 32, 0.1, 64
    cfg.schedule.warmup_epochs, cfg.schedule.min_lr_ratio = 1.0, 0.0
    model = torch.nn.Linear(2, 2)

    def schedule(world_size, steps_per_epoch):
        optimizer = make_optimizer(cfg, model, lr=cfg.optim.lr * 32 * world_size / 64)
        return make_schedule(cfg, optimizer, [steps_per_epoch] * 4, world_size)

    two_ranks = schedule(2, 10)  # 640 samples per epoch, 2560 in all
    assert two_ranks.get_last_lr()[0] == pytest.approx(0.1 * 1 / 10)  # warmup's first step
    for _ in range(25):
        two_ranks.step()
    one_rank = schedule(1, 20)  # the same 640 samples per epoch, in steps of 32
    one_rank.load_state_dict(two_ranks.state_dict())
    # 1600 of 2560 samples, 640 of them warmup: cosine at t = 960 / 1920, times the halved peak
    t = (1600 - 640) / (2560 - 640)
    assert two_ranks.get_last_lr()[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * t)))
    assert one_rank.get_last_lr()[0] == pytest.approx(two_ranks.get_last_lr()[0] / 2)

    legacy = schedule(2, 10)
    legacy.load_state_dict({"last_epoch": 25, "base_lrs": [0.1, 0.1]})  # torch's LambdaLR state
    assert legacy.get_last_lr() == two_ranks.get_last_lr()


def test_logs_off_a_terminal_are_plain_lines_at_a_bounded_rate(bands_dataset, tmp_path):
    """Under SLURM stderr is a file: no tqdm carriage returns, a progress line every
    track.progress_every_s, so a job-day of logs stays small."""
    import re

    from imgcls.config import Config

    out = launch([f"data.url={bands_dataset}", f"run.dir={tmp_path / 'logs'}", *EXACT_RUN, "track.progress=true",
                 "track.progress_every_s=0.2", "train.epochs=3"], nproc=1)
    assert "\r" not in out.stderr
    progress = [line for line in out.stderr.splitlines() if "imgcls.progress" in line]
    assert len(progress) >= 3, out.stderr[-2000:]
    assert all(re.search(r"step \d+/129 \(epoch [123]/3\), loss \d+\.\d{4}, \d+ img/s, ETA \d+m\d\ds$", line)
               for line in progress), progress
    # at the default of one line every 30 s: 120 lines an hour, under 20 kB (tqdm wrote 268 kB in 7.5 minutes)
    assert 3600 / Config().track.progress_every_s * max(len(line) + 1 for line in progress) < 20_000


def test_stopped_on_two_ranks_resumes_on_one_and_reads_the_rest_of_the_epoch(bands_dataset, tmp_path):
    """An elastic resume through the trainer: the epoch is finished on the new layout from the
    samples the two ranks left, at the same place on the learning-rate schedule."""
    run_dir = str(tmp_path / "elastic")
    args = [f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.epochs=1"]
    launch([*args, "train.max_steps=7"])  # 7 steps x 2 ranks x 2 micro-batches x 16 = 448 samples
    out = launch(args, nproc=1)
    assert "at step 7 (epoch 0, 448 samples of it read, batch 0 of this layout)" in out.stderr
    state = final_state(run_dir)
    # 1400 training samples: the rest after 448 is 952, read in steps of 32 (24 left over)
    assert state["data"]["epoch"] == 1 and state["progress"]["step"] == 7 + 952 // 32
    assert state["scheduler"]["samples"] == 448 + 952 // 32 * 32


def test_a_second_job_on_a_run_dir_in_use_is_refused_naming_the_holder(bands_dataset, tmp_path):
    """A resubmit while the first job still runs: one line naming the holder, and the first job
    finishes with its own config and a checkpoint per epoch, untouched."""
    run_dir = tmp_path / "shared"
    first = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.epochs=4"], nproc=1,
                   background=True)
    try:
        wait_until((run_dir / "metrics.jsonl").exists, timeout=120, what="the first job's metrics", proc=first)
        assert (run_dir / "lease.json").exists() and first.poll() is None
        second = launch([f"data.url={bands_dataset}", f"run.dir={run_dir}", *EXACT_RUN, "train.epochs=4", "run.seed=9"],
                        nproc=1, check=False)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode != 0 and len(errors) == 1, second.stderr[-2000:]
        assert f"{run_dir} is in use by job local:" in errors[0] and "(pid " in errors[0]
        assert first.wait(timeout=240) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
        first.wait()
    state = final_state(str(run_dir))
    assert state["data"]["epoch"] == 4 and state["config"]["run"]["seed"] == 0
    assert "seed: 0" in (run_dir / "config.yaml").read_text() and not (run_dir / "lease.json").exists()


def test_shards_rebuilt_under_a_stopped_run_are_refused_not_read_from_its_position(tmp_path):
    """The config still says the same data.url, but the shards there changed: resuming at the
    saved position would quietly continue on another dataset."""
    data = build_bands_dataset(tmp_path / "data")
    run = [f"data.url={data}", f"run.dir={tmp_path / 'run'}", *EXACT_RUN]
    launch([*run, "train.max_steps=3"], nproc=1)
    build_bands_dataset(tmp_path / "data", label_noise=0.2)  # the same URL, other samples
    out = launch(run, nproc=1, check=False)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert f"error: {data}: the 'train' shards differ from the ones this run was reading" in errors[0]
    assert final_state(tmp_path / "run")["progress"]["step"] == 3  # nothing was trained on them
