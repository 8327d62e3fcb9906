"""The SLURM options shared by jobs/submit.py and jobs/sweep.py (per job, or per trial)."""
from __future__ import annotations

import argparse
import math
import re

from imgcls.cluster import SlurmOptions

TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"  # what sbatch --time takes


def parse_slurm_time(text: str) -> int:
    """A time limit in one of sbatch's forms, in whole minutes (seconds round up, as SLURM's do)."""
    days, dash, clock = text.strip().rpartition("-")
    fields = clock.split(":")
    if not all(re.fullmatch("[0-9]+", f) for f in fields + ([days] if dash else [])) or len(fields) > 3:
        raise argparse.ArgumentTypeError(f"not a SLURM time: {text!r} (use {TIME_FORMS})")
    numbers = [int(f) for f in fields]
    if dash:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = numbers + [0] * (3 - len(numbers))
        hours += 24 * int(days)
    elif len(numbers) == 3:  # HH:MM:SS
        hours, minutes, seconds = numbers
    else:  # MM, MM:SS
        hours, (minutes, seconds) = 0, numbers + [0] * (2 - len(numbers))
    total = (hours * 60 + minutes) * 60 + seconds
    if total == 0:
        raise argparse.ArgumentTypeError(f"the time limit {text!r} is zero (use {TIME_FORMS})")
    return math.ceil(total / 60)


def add_slurm_arguments(p, job_name: str = "imgcls") -> None:
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="slurm; local: submitit's local processes; debug: in this process (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=1, help="default: %(default)s")
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0: CPU tasks (default: %(default)s)")
    p.add_argument("--tasks-per-node", type=int, default=1,
                   help="CPU tasks per node when --gpus-per-node is 0 (default: %(default)s)")
    p.add_argument("--cpus-per-task", type=int, default=1, help="default: %(default)s")
    p.add_argument("--mem-gb", type=float, default=0,
                   help="memory per node in GB; 0: the partition's default (default: %(default)s)")
    p.add_argument("--time", type=parse_slurm_time, default="60", metavar="TIME",
                   help=f"time limit as sbatch takes it: {TIME_FORMS} (default: %(default)s minutes)")
    p.add_argument("--partition", default="", help="default: the cluster's default partition")
    p.add_argument("--account", default="", help="default: your default account")
    p.add_argument("--qos", default="", help="quality of service (default: the account's)")
    p.add_argument("--constraint", default="", help="node features, as sbatch --constraint (default: none)")
    p.add_argument("--exclude", default="", help="nodes not to use, as sbatch --exclude (default: none)")
    p.add_argument("--job-name", default=job_name, help="default: %(default)s")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra sbatch option")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the tasks, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--signal-margin", type=int, default=120,
                   help="seconds of USR2 warning before the time limit (default: %(default)s)")


# SlurmOptions field -> the argparse dest it comes from
SLURM_FIELDS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
                "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "time_min": "time", "partition": "partition",
                "account": "account", "qos": "qos", "constraint": "constraint", "exclude": "exclude",
                "job_name": "job_name", "sbatch": "sbatch", "setup": "setup", "signal_margin_s": "signal_margin"}


def slurm_options(args) -> SlurmOptions:
    sbatch = {}
    for item in args.sbatch:
        key, _, value = item.partition("=")
        sbatch[key.lstrip("-").replace("-", "_")] = value or True
    return SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, exclude=args.exclude,
        job_name=args.job_name, sbatch=sbatch, setup=args.setup, signal_margin_s=args.signal_margin)
