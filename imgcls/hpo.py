"""Optuna trials as training runs: the trainer reports its validation metric after every
epoch to the trial's study (a real database, e.g. SQLite, shared with jobs/sweep.py) and
stops when the pruner says the trial is not worth finishing."""
from __future__ import annotations


def report(hpo_cfg, value: float, epoch: int) -> bool:
    """Report `value` at `epoch` for the configured trial; True if it should be pruned."""
    import optuna

    study = optuna.load_study(study_name=hpo_cfg.study, storage=hpo_cfg.storage)
    trial = optuna.Trial(study, hpo_cfg.trial_id)
    trial.report(value, step=epoch)
    return trial.should_prune()
