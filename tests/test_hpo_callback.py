"""The trainer's epoch-end pruning callback against a real optuna study (no SLURM, no training)."""
import optuna
from optuna.trial import TrialState

from imgcls import hpo
from imgcls.config import HPOConfig


def test_optuna_pruning_prunes_a_bad_trial_and_keeps_a_good_one(tmp_path):
    # a storage URL, as jobs/sweep.py passes it to a trial through cfg.hpo (an in-memory SQLite
    # database would not be shared between the storages hpo.report opens)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=hpo.storage(url), direction="maximize")
    study.set_user_attr("pruner", {"n_startup_trials": 2, "n_warmup_steps": 1})
    for value in (0.9, 0.8):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: value, 2: value}))
    bad, good = study.ask(), study.ask()

    def pruning(trial):
        return hpo.OptunaPruning(HPOConfig(storage=url, study="s", trial_id=trial._trial_id, metric="val/acc"))

    assert pruning(bad)({"epoch": 1, "val/acc": 0.1, "val/loss": 2.0}, 1) is True
    assert pruning(good)({"epoch": 1, "val/acc": 0.95, "val/loss": 0.1}, 1) is False
    trials = hpo.load_study("s", url).trials
    assert trials[bad.number].intermediate_values == {1: 0.1}
    assert trials[good.number].intermediate_values == {1: 0.95}
    assert trials[good.number].state == TrialState.RUNNING
