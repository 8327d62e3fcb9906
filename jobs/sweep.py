"""Optuna hyperparameter sweep: every trial is a training run, as a SLURM job through submitit or locally.

  python jobs/sweep.py --config configs/sweep_example.yaml --n-trials 12 --parallel 4 \\
      --cluster slurm --partition gpu --gpus-per-node 1 --time 60 [key=value ...]
  python jobs/sweep.py ... --cluster local     # submitit's local executor: trials as local processes
  python jobs/sweep.py ... --cluster debug     # one trial at a time in this process (breakpoints work)

The search space is `hpo.space` in the config and the objective `hpo.metric` (see imgcls/hpo.py).
Up to --parallel trials run at once: the sweep asks the study for a trial, submits it, and asks
for the next one as soon as one finishes. Each trial reports its metric after every epoch and
stops early when the MedianPruner says so (told PRUNED); a finished trial is told the best value
of the metric in its metrics.jsonl; a trial whose job fails is told FAIL and the sweep goes on
(until --max-failures in one invocation).

Sweep dir (--sweep-dir, default the config's run.dir): study.db (the study, SQLite, unless
--storage names another database), code/ (the code snapshot every trial runs), logs/
(submitit's), trial-NNNN/ (one run dir per trial, with its config.yaml), sweep.json (summary).

Resume: re-run the same command (--n-trials may grow). COMPLETE and PRUNED trials count toward
--n-trials, FAIL ones do not. Trials still RUNNING in the study were left by a sweep process that
died: they are marked FAIL (a job of theirs that still runs stops at its next epoch end, when it
finds its trial finished) and new trials take their place. Run one sweep process per study. The
code snapshot is kept, so a resumed sweep runs the same code; delete SWEEP_DIR/code to take a new one.

SQLite is fine for a few parallel trials (one short write per epoch per trial); for many, or when
the sweep dir is on NFS, pass a server database, e.g. --storage postgresql://host/db.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from imgcls import hpo
from imgcls.cli import entry_point
from imgcls.cluster import SUBMITIT_INPUTS, _run_task, make_executor, make_private, snapshot_code
from imgcls.config import absolute_paths, from_dict, load_config, redact_text, save_config, to_dict
from imgcls.tracking import configure_logging
from jobs import ArgumentParser
from jobs.slurm_args import add_slurm_arguments, slurm_options

log = logging.getLogger("sweep")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__)
    p.add_argument("--config", default="configs/sweep_example.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every trial")
    p.add_argument("--n-trials", type=int, default=12,
                   help="finished (COMPLETE or PRUNED) trials to reach (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=4, help="trials running at once (default: %(default)s)")
    p.add_argument("--sweep-dir", default="", help="default: the config's run.dir")
    p.add_argument("--storage", default="", help="optuna storage URL (default: sqlite:///SWEEP_DIR/study.db)")
    p.add_argument("--study-name", default="", help="default: the sweep dir's name")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: run.seed)")
    p.add_argument("--pruner-startup-trials", type=int, default=2,
                   help="no pruning until this many trials completed (default: %(default)s)")
    p.add_argument("--pruner-warmup-epochs", type=int, default=1,
                   help="no pruning before this epoch (default: %(default)s: from the first epoch's end)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="stop after this many failed trials (default: --n-trials)")
    p.add_argument("--poll", type=float, default=2.0,
                   help="seconds between checks of the running jobs (default: %(default)s)")
    add_slurm_arguments(p, job_name="imgcls-sweep")  # per trial, as in jobs/submit.py
    return p


def parse_args(argv):
    return build_parser().parse_intermixed_args(argv)  # positionals before and after options


class Sweep:
    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        self.dir = Path(args.sweep_dir or cfg.run.dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = args.storage or f"sqlite:///{self.dir / 'study.db'}"
        self.name = args.study_name or self.dir.name
        self.metric = cfg.hpo.metric
        pruner = {"n_startup_trials": args.pruner_startup_trials, "n_warmup_steps": args.pruner_warmup_epochs}
        self.study = optuna.create_study(study_name=self.name, storage=hpo.storage(self.url),
                                         direction=hpo.direction(self.metric), pruner=hpo.make_pruner(pruner),
                                         load_if_exists=True)
        self.study.set_user_attr("pruner", pruner)  # trial processes prune with the same rule
        # Seeded by how many trials exist, so a resumed sweep does not redraw the first points;
        # constant_liar keeps parallel asks from proposing the same point.
        seed = (cfg.run.seed if args.seed is None else args.seed) + len(self.study.trials)
        self.study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        self.running = {}  # trial number -> (trial, job, run dir)

    def finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def fail_leftovers(self) -> None:
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("trial %d was left RUNNING by an earlier sweep process: marking it FAIL", trial.number)
            self.study.tell(trial.number, state=TrialState.FAIL)

    def submit(self, executor, code: Path) -> None:
        trial = self.study.ask()
        params = hpo.suggest(trial, self.cfg.hpo.space)
        data = to_dict(self.cfg)
        for key, value in params.items():
            hpo.set_key(data, key, value)
        run_dir = self.dir / f"trial-{trial.number:04d}"
        data["run"].update(dir=str(run_dir), name=f"{self.name}-trial-{trial.number}")
        # the trial's storage id (optuna has no public accessor; numbers restart per study)
        data["hpo"].update(storage=self.url, study=self.name, trial_id=trial._trial_id)
        try:
            cfg = from_dict(data)  # checks the drawn values' types against the config
        except Exception:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(run_dir / "config.yaml"))
        cwd = os.getcwd()
        os.chdir(code)  # the job's working directory: it imports the snapshot
        try:
            job = executor.submit(_run_task, to_dict(cfg))
        finally:
            os.chdir(cwd)
        make_private(self.dir / "logs", SUBMITIT_INPUTS)  # the pickled config holds hpo.storage in full
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", [f"{k}={v}" for k, v in params.items()])
        trial.set_user_attr("job_id", str(job.job_id))
        log.info("trial %d: job %s, %s, run dir %s", trial.number, job.job_id, " ".join(
            f"{k}={v}" for k, v in params.items()), run_dir)
        self.running[trial.number] = (trial, job, run_dir)

    def tell(self, number: int) -> TrialState:
        trial, job, run_dir = self.running.pop(number)
        try:
            result = job.results()[0]  # rank 0's
        except Exception as e:  # the job raised, was cancelled or died
            log.error("trial %d failed: %s", number, str(e).strip()[-2000:])
            trial.set_user_attr("error", str(e).strip()[-2000:])
            self.study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        trial.set_user_attr("status", result["status"])
        if result["status"] == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)  # its value: the last one reported
            log.info("trial %d pruned after epoch %d", number, result["epoch"])
            return TrialState.PRUNED
        value = hpo.best_value(str(run_dir), self.metric)
        if value is None:
            log.error("trial %d logged no %s (no val split?)", number, self.metric)
            self.study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        self.study.tell(trial, value)
        log.info("trial %d: %s = %.4f", number, self.metric, value)
        return TrialState.COMPLETE

    def run(self, executor, code: Path) -> None:
        args = self.args
        parallel = 1 if args.cluster == "debug" else args.parallel  # debug runs a job when polled
        max_failures = args.max_failures or args.n_trials
        done, failures = self.finished(), 0
        try:
            while done + len(self.running) < args.n_trials or self.running:
                while len(self.running) < parallel and done + len(self.running) < args.n_trials:
                    self.submit(executor, code)
                ended = [n for n, (_, job, _) in self.running.items() if job.done()]
                if not ended:
                    time.sleep(args.poll)
                for number in ended:
                    state = self.tell(number)
                    done += state != TrialState.FAIL
                    failures += state == TrialState.FAIL
                if failures >= max_failures:
                    raise RuntimeError(f"{failures} trials failed (--max-failures {max_failures}): "
                                       f"see their logs in {self.dir / 'logs'}")
        finally:
            for trial, job, _ in self.running.values():  # interrupted: nothing should keep running
                job.cancel(check=False)
                self.study.tell(trial, state=TrialState.FAIL)

    def summary(self) -> dict:
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            trials.append({"number": t.number, "state": t.state.name, "value": t.value,
                           "epochs": len(t.intermediate_values), "overrides": t.user_attrs.get("overrides", []),
                           "run_dir": t.user_attrs.get("run_dir", "")})
        best = None
        if self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            b = self.study.best_trial
            run_dir = b.user_attrs.get("run_dir", "")  # none for a trial added to the study by hand
            best = {"number": b.number, "value": b.value, "overrides": b.user_attrs.get("overrides", []),
                    "run_dir": run_dir, "config": str(Path(run_dir) / "config.yaml") if run_dir else ""}
        return {"study": self.name, "storage": redact_text(self.url), "metric": self.metric,
                "direction": self.study.direction.name.lower(), "trials": trials, "best": best}


def print_summary(summary: dict) -> None:
    print(f"\nstudy {summary['study']} ({summary['storage']}), {summary['direction']} {summary['metric']}")
    print(f"{'trial':>5}  {'state':<8} {'value':>8} {'epochs':>6}  overrides")
    for t in summary["trials"]:
        value = f"{t['value']:.4f}" if t["value"] is not None else "-"
        print(f"{t['number']:>5}  {t['state']:<8} {value:>8} {t['epochs']:>6}  {' '.join(t['overrides'])}")
    best = summary["best"]
    if best is None:
        print("no completed trial yet")
        return
    print(f"\nbest trial {best['number']}: {summary['metric']} = {best['value']:.4f}\n"
          f"  overrides: {' '.join(best['overrides'])}\n  config:    {best['config']}\n  run dir:   {best['run_dir']}")


@entry_point
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we log each trial ourselves
    cfg = load_config(args.config, args.overrides)
    hpo.check_space(cfg.hpo.space, to_dict(cfg))
    absolute_paths(cfg)  # trials run from the code snapshot
    sweep = Sweep(args, cfg)
    sweep.fail_leftovers()
    log.info("sweep dir %s, study %s: %d of %d trials finished", sweep.dir, sweep.name, sweep.finished(),
             args.n_trials)
    code = snapshot_code(sweep.dir)
    executor = make_executor(args.cluster, sweep.dir / "logs", slurm_options(args))
    sweep.run(executor, code)
    summary = sweep.summary()
    (sweep.dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
