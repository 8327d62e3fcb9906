"""Submit training to SLURM through submitit: `python jobs/submit.py --nodes 4 --gpus-per-node 8 ...`.

Takes the same --config and key=value overrides as jobs/train.py. Preempted or timed-out jobs
checkpoint at the next optimizer step, requeue themselves and resume exactly. Examples:

  python jobs/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 240 run.dir=runs/r18 model.name=resnet18
  python jobs/submit.py --sweep optim.lr=0.05,0.1,0.2 --sweep model.width=32,64 run.dir=runs/sweep1
  python jobs/submit.py --resume runs/r18             # after a hard failure: same config and code
  python jobs/submit.py --cluster local ...            # submitit's local executor, no SLURM
  python jobs/submit.py --cluster debug ...            # in this process: breakpoints work
"""
from __future__ import annotations

import argparse
import json
import sys

from imgcls.cli import entry_point
from imgcls.cluster import submit
from imgcls.config import load_config
from imgcls.tracking import configure_logging, wandb_mode
from jobs import ArgumentParser
from jobs.slurm_args import SLURM_FIELDS, add_slurm_arguments, slurm_options


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options that `argv` names (with --resume: the saved ones to change)."""
    names = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {action.dest for action in parser._actions if names & set(action.option_strings)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__)
    p.add_argument("--config", default="", help="YAML config, e.g. configs/photos.yaml; "
                        "default: none, the neutral defaults in docs/config.md")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, before or after the options, e.g. train.epochs=3")
    add_slurm_arguments(p)
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="grid over values (repeatable): one job array, one run dir per task")
    p.add_argument("--resume", default="", metavar="RUN_DIR",
                   help="resubmit a run with its saved config, code and SLURM options; SLURM options given "
                        "here replace the saved ones (e.g. --nodes 2: the run resumes elastically); default: a new run")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print the results")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    args.given = given_options(p, sys.argv[1:] if argv is None else argv)
    return args


@entry_point
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    cfg = load_config(args.config, args.overrides)
    opts = slurm_options(args)
    changes = {field: getattr(opts, field) for field, dest in SLURM_FIELDS.items() if dest in args.given}
    sub = submit(cfg, opts, cluster=args.cluster, sweeps=args.sweep, resume=args.resume, resume_changes=changes)
    mode = wandb_mode(cfg.track.wandb)
    for job_id, run_dir, log_path, run_id in zip(sub.job_ids, sub.run_dirs, sub.log_paths, sub.run_ids):
        print(f"job {job_id}\n  run dir: {run_dir}\n  log:     {log_path}\n  wandb:   run {run_id} ({mode})"
              + (f"; sync later with `wandb sync {run_dir}/wandb/offline-run-*`" if mode == "offline" else ""))
    result = {"job_ids": sub.job_ids, "run_dirs": sub.run_dirs, "logs": sub.log_paths, "run_ids": sub.run_ids}
    if args.wait:
        outcomes = []
        for job in sub.jobs:
            outcomes.extend(job.results())
        result["results"] = outcomes
        print(json.dumps(outcomes))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
