"""jobs/sweep.py: Optuna sweeps whose trials are training runs on submitit's local executor and
on the real local SLURM cluster, stored in a SQLite study that a re-run resumes; pruning of bad
trials through the trainer's per-epoch report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from imgcls import hpo
from imgcls.config import HPOConfig, load_config
from tests.conftest import REPO
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

FINISHED = {TrialState.COMPLETE, TrialState.PRUNED}


def tiny_config(path: Path, dataset: str, space: dict, epochs: int = 2) -> str:
    config = {
        "data": {"url": dataset, "batch_size": 32, "eval_batch_size": 200, "num_workers": 0,
                 "mean": [0.5], "std": [0.25]},
        "model": {"name": "simple_cnn", "width": 4},
        "optim": {"lr": 0.1, "base_batch": 64},
        "train": {"epochs": epochs, "log_every": 10, "ckpt_every": 1000},
        "track": {"wandb": "disabled", "progress": False},
        "hpo": {"metric": "val/acc", "space": space},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


SPACE = {"optim.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
         "model.width": {"type": "categorical", "choices": [4, 8]}}


def sweep(*args: str, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def load(sweep_dir: Path) -> optuna.Study:
    return hpo.load_study(sweep_dir.name, f"sqlite:///{sweep_dir / 'study.db'}")


def check_best_is_printed(stdout: str, study: optuna.Study) -> None:
    best = study.best_trial
    run_dir = best.user_attrs["run_dir"]
    assert f"best trial {best.number}: val/acc = {best.value:.4f}" in stdout
    assert f"run dir:   {run_dir}" in stdout and f"config:    {run_dir}/config.yaml" in stdout
    config = load_config(f"{run_dir}/config.yaml")
    assert config.optim.lr == best.params["optim.lr"] and config.model.width == best.params["model.width"]
    assert " ".join(best.user_attrs["overrides"]) in stdout


def test_local_sweep_finishes_its_trials_and_a_rerun_resumes_it(small_bands_dataset, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["--config", tiny_config(tmp_path / "tiny.yaml", small_bands_dataset, SPACE), "--cluster", "local",
               "--parallel", "2", "--sweep-dir", str(sweep_dir), "--poll", "0.5"]
    stdout = sweep(*command, "--n-trials", "3")
    study = load(sweep_dir)
    assert len(study.trials) == 3 and {t.state for t in study.trials} <= FINISHED
    check_best_is_printed(stdout, study)
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir.parent == sweep_dir and (run_dir / "checkpoints").is_dir()
        config = load_config(run_dir / "config.yaml")
        assert (config.hpo.study, config.hpo.trial_id) == (study.study_name, trial._trial_id)
        assert len(trial.intermediate_values) >= 1  # reported after every epoch
    logs = "".join(p.read_text() for p in (sweep_dir / "logs").glob("*_0_log.err"))
    assert f"running the code in {sweep_dir / 'code'}" in logs
    assert json.loads((sweep_dir / "sweep.json").read_text())["best"]["number"] == study.best_trial.number

    # A sweep process killed mid-trial leaves a RUNNING trial: the re-run marks it FAIL, and
    # with --n-trials 4 runs exactly one new trial.
    before = {t.number: (t.state, t.value) for t in study.trials}
    study.ask()
    stdout = sweep(*command, "--n-trials", "4")
    trials = load(sweep_dir).trials
    assert {t.number: (t.state, t.value) for t in trials[:3]} == before
    assert trials[3].state == TrialState.FAIL
    assert len(trials) == 5 and trials[4].state in FINISHED
    assert any(line.split()[:2] == ["4", trials[4].state.name] for line in stdout.splitlines())  # the table
    assert "best trial" in stdout


def test_a_bad_trial_is_pruned_after_its_first_epoch(small_bands_dataset, tmp_path):
    """Two earlier trials reached val/acc 0.9 at every epoch; a trial with lr 0 stays near
    chance (0.25), so the MedianPruner stops it at the end of epoch 1 of 3."""
    sweep_dir = tmp_path / "pruning"
    sweep_dir.mkdir()
    study = optuna.create_study(study_name="pruning", storage=hpo.storage(f"sqlite:///{sweep_dir / 'study.db'}"),
                                direction="maximize")
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.9, 2: 0.9, 3: 0.9}))
    config = tiny_config(tmp_path / "bad.yaml", small_bands_dataset,
                         {"optim.lr": {"type": "categorical", "choices": [0.0]}}, epochs=3)
    stdout = sweep("--config", config, "--cluster", "local", "--sweep-dir", str(sweep_dir), "--n-trials", "3",
                   "--pruner-startup-trials", "2", "--pruner-warmup-epochs", "1", "--poll", "0.5")
    trial = load(sweep_dir).trials[2]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    assert trial.intermediate_values[1] < 0.6
    assert trial.user_attrs["status"] == "pruned"
    records = [json.loads(line) for line in (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records if "val/acc" in r] == [1]  # the trainer stopped there
    assert "PRUNED" in stdout


def test_failed_trials_are_told_fail_and_the_sweep_goes_on_until_max_failures(small_bands_dataset, tmp_path):
    sweep_dir = tmp_path / "failing"
    space = {"data.batch_size": {"type": "categorical", "choices": [100000]}}
    config = tiny_config(tmp_path / "bad.yaml", small_bands_dataset, space)
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", config, "--cluster", "local",
                          "--sweep-dir", str(sweep_dir), "--n-trials", "3", "--parallel", "2", "--max-failures", "2",
                          "--poll", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0 and "2 trials failed (--max-failures 2)" in out.stderr
    trials = load(sweep_dir).trials
    # the first failure did not stop it; a trial still running at the second is cancelled and FAIL too
    assert len(trials) >= 2 and {t.state for t in trials} == {TrialState.FAIL}
    # a value the config accepts, which the run refuses (an out-of-choice one is refused at load)
    assert sum("batches of 100000" in t.user_attrs.get("error", "") for t in trials) == 2


def test_report_asks_the_stored_pruner_and_stops_finished_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=hpo.storage(url), direction="maximize")
    study.set_user_attr("pruner", {"n_startup_trials": 1, "n_warmup_steps": 2})
    study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.9, 2: 0.9}))
    bad, good, abandoned = study.ask(), study.ask(), study.ask()

    def config(trial):
        return HPOConfig(storage=url, study="s", trial_id=trial._trial_id)

    assert hpo.report(config(bad), 0.3, 1) is False  # epoch 1 < n_warmup_steps
    assert hpo.report(config(bad), 0.3, 2) is True
    assert hpo.report(config(good), 0.95, 2) is False
    study.tell(abandoned, state=TrialState.FAIL)
    assert hpo.report(config(abandoned), 0.95, 1) is True
    assert hpo.load_study("s", url).trials[bad.number].intermediate_values == {1: 0.3, 2: 0.3}


@pytest.mark.slurm
def test_sweep_on_the_slurm_cluster(slurm_cluster, small_bands_dataset, tmp_path):  # noqa: F811
    sweep_dir = tmp_path / "slurm-sweep"
    stdout = sweep("--config", tiny_config(tmp_path / "tiny.yaml", small_bands_dataset, SPACE), "--cluster", "slurm",
                   "--n-trials", "3", "--parallel", "3", "--time", "10", "--sweep-dir", str(sweep_dir))
    study = load(sweep_dir)
    assert len(study.trials) == 3 and {t.state for t in study.trials} <= FINISHED
    check_best_is_printed(stdout, study)
    for trial in study.trials:
        job_id = trial.user_attrs["job_id"]
        # a trial is told to the study just before its job's batch script exits: wait for accounting
        assert slurm_cluster.wait_sacct(job_id) == "COMPLETED"
        assert f"running the code in {sweep_dir / 'code'}" in (sweep_dir / "logs" / f"{job_id}_0_log.err").read_text()
