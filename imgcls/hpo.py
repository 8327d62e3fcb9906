"""Optuna trials as training runs: the trainer reports its validation metric after every
epoch to the trial's study (a real database, e.g. SQLite, shared with jobs/sweep.py) and
stops when the pruner says the trial is not worth finishing.

The search space lives in the config, `hpo.space`, one entry per config key:

    hpo:
      space:
        optim.lr: {type: float, low: 0.01, high: 0.5, log: true}   # optional: step
        train.epochs: {type: int, low: 2, high: 6}                   # optional: step, log
        model.width: {type: categorical, choices: [16, 32]}
      metric: val/acc            # a metrics.jsonl key; "loss" in the name means lower is better

The pruner's settings are stored in the study (user attr "pruner") by jobs/sweep.py, so every
trial process prunes with the same rule as the sweep that created it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from imgcls.jsonl import read_jsonl

log = logging.getLogger(__name__)

TYPES = ("float", "int", "categorical")


def storage(url: str):
    """The optuna storage at `url`. SQLite waits up to a minute for a lock (trials report
    from other processes while the sweep asks and tells) instead of failing at once."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(settings: dict | None):
    """MedianPruner: prune a trial whose best value so far is worse than the median of the
    completed trials at the same epoch, once `n_startup_trials` have completed and from epoch
    `n_warmup_steps` on (steps are epochs, starting at 1)."""
    import optuna

    settings = settings or {}
    return optuna.pruners.MedianPruner(n_startup_trials=settings.get("n_startup_trials", 2),
                                       n_warmup_steps=settings.get("n_warmup_steps", 1))


def load_study(study_name: str, url_or_storage):
    """The study, with the pruner its sweep stored in it."""
    import optuna

    store = storage(url_or_storage) if isinstance(url_or_storage, str) else url_or_storage
    attrs = store.get_study_user_attrs(store.get_study_id_from_name(study_name))
    return optuna.load_study(study_name=study_name, storage=store, pruner=make_pruner(attrs.get("pruner")))


def report(hpo_cfg, value: float, epoch: int) -> bool:
    """Report `value` at `epoch` for the configured trial; True if it should be pruned."""
    import optuna

    store = storage(hpo_cfg.storage)
    if store.get_trial(hpo_cfg.trial_id).state.is_finished():
        # the sweep gave up on it (a restarted sweep marks leftover RUNNING trials FAIL): stop
        log.warning("trial %d of study %s is already finished: stopping", hpo_cfg.trial_id, hpo_cfg.study)
        return True
    trial = optuna.Trial(load_study(hpo_cfg.study, store), hpo_cfg.trial_id)
    trial.report(value, step=epoch)
    return bool(trial.should_prune())  # optuna may return numpy.bool_


class OptunaPruning:
    """An epoch-end callback for the trainer's rank 0: reports the val record's `hpo.metric`
    to the configured trial and says whether to stop (the pruner's verdict)."""

    def __init__(self, hpo_cfg):
        self.hpo_cfg = hpo_cfg

    def __call__(self, record: dict, epoch: int) -> bool:
        return report(self.hpo_cfg, record[self.hpo_cfg.metric], epoch)


def direction(metric: str) -> str:
    """Same convention as train.early_stop_metric: losses are minimised, the rest maximised."""
    return "minimize" if "loss" in metric else "maximize"


def check_space(space: dict, config: dict) -> None:
    """Fail before any trial runs: every key must be a config key, every spec well formed."""
    if not space:
        raise ValueError("hpo.space is empty: nothing to search (see imgcls/hpo.py for the format)")
    for key, spec in space.items():
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"hpo.space: {key!r} is not a config key")
            node = node[part]
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in TYPES:
            raise ValueError(f"hpo.space.{key}: type must be one of {TYPES}, got {spec!r}")
        needed = ("choices",) if kind == "categorical" else ("low", "high")
        missing = [n for n in needed if n not in spec]
        if missing:
            raise ValueError(f"hpo.space.{key}: {kind} needs {', '.join(missing)}")


def suggest(trial, space: dict) -> dict:
    """{config key: value} drawn by `trial` from `space` (the parameter names are the keys)."""
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False),
                                              step=spec.get("step"))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False),
                                            step=spec.get("step", 1))
        else:
            params[key] = trial.suggest_categorical(key, spec["choices"])
    return params


def set_key(config: dict, key: str, value) -> None:
    """config["a"]["b"] = value for key "a.b" (a value, not YAML text: 1e-05 stays a float)."""
    *parents, leaf = key.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def best_value(run_dir: str, metric: str) -> float | None:
    """The best `metric` over the run's metrics.jsonl records (None if never logged)."""
    values = []
    for record in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        value = record.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values.append(float(value))
    if not values:
        return None
    return (min if direction(metric) == "minimize" else max)(values)
