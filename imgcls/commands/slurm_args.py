"""The SLURM options shared by jobs/submit.py and jobs/sweep.py (per job, or per trial)."""
from __future__ import annotations

from imgcls.cluster import SlurmOptions


def add_slurm_arguments(p, job_name: str = "imgcls") -> None:
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (0: CPU tasks)")
    p.add_argument("--tasks-per-node", type=int, default=1, help="CPU tasks per node when --gpus-per-node is 0")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=float, default=0)
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--constraint", default="")
    p.add_argument("--exclude", default="")
    p.add_argument("--job-name", default=job_name)
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra sbatch option")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the tasks, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--signal-margin", type=int, default=120, help="seconds of USR2 warning before the time limit")


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
