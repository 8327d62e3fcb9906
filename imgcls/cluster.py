"""Running training as SLURM jobs through submitit, with checkpoint-and-requeue.

A preempted or timed-out job gets USR2 (preempt_send_user_signal, `--signal=USR2@N`). The
handler only sets a flag (imgcls.signals); the trainer stops at the next optimizer step on
every rank together, saves a checkpoint and returns "stopped"; then rank 0 requeues the job
and every task exits without a result, so submitit keeps waiting for the requeued run. The
requeued job resumes from that checkpoint: same run dir, same wandb run, same code snapshot.
A cancelled job (scancel, `jobs/status.py cancel`: SIGTERM) also stops with a checkpoint,
but is never requeued: cancel means stop.

Run dir layout: config.yaml, submit.json (how it was submitted, every job id), code/ (the
snapshot the job runs), logs/ (submitit's stdout/stderr per job), attempts.jsonl (one line
per start), checkpoints/, metrics.jsonl, wandb/.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.config import Config, ConfigError, absolute_paths, apply_override, from_dict, save_config, to_dict
from imgcls.distributed import job_port
from imgcls.signals import wants_requeue

log = logging.getLogger(__name__)


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0           # one task per GPU; 0: CPU tasks
    tasks_per_node: int = 1          # used when gpus_per_node is 0
    cpus_per_task: int = 1
    mem_gb: float = 0                # 0: the partition's default
    time_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    job_name: str = "imgcls"
    sbatch: dict = field(default_factory=dict)     # extra #SBATCH key=value
    setup: list = field(default_factory=list)      # shell lines before srun: module load, source venv
    signal_margin_s: int = 120       # USR2 this long before the time limit


class TrainTask:
    """What submitit pickles and runs in every task of the job."""

    def __init__(self, config: dict):
        self.config = config

    def __call__(self) -> dict:
        from imgcls.tracking import configure_logging
        from imgcls.trainer import train

        _export_local_ranks()
        cfg = from_dict(self.config)
        is_main = configure_logging()
        if is_main:
            log.info("running the code in %s", code_origins())
            record_attempt(cfg.run.dir)
        result = train(cfg)
        if result["status"] == "stopped" and wants_requeue(result["reason"]) and "SLURM_JOB_ID" in os.environ:
            if is_main:
                requeue(os.environ["SLURM_JOB_ID"])
            # No result file: submitit keeps waiting for the requeued job.
            sys.exit(0)
        if result["status"] == "stopped" and is_main:
            log.warning("stopped by %s at step %d: not requeued", result["reason"], result["step"])
        return result


def _export_local_ranks() -> None:
    """submitit's local executor starts N tasks without SLURM: give them torchrun's env."""
    if "SLURM_JOB_ID" in os.environ or "RANK" in os.environ:
        return
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # debug executor: in-process, one task
        return
    if env.num_tasks > 1:
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job_port(env.job_id)))


def requeue(job_id: str) -> None:
    """Put this job back in the queue (SLURM kills this run of it). After a preemption with
    PreemptMode=REQUEUE SLURM requeues by itself and this call's refusal is harmless.
    A job cancelled meanwhile stays cancelled: `scontrol requeue` would revive it."""
    state = slurm_job_state(job_id)
    if state == "CANCELLED":
        log.warning("job %s was cancelled: not requeued", job_id)
        return
    out = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True)
    log.warning("requeue job %s: %s", job_id, (out.stdout + out.stderr).strip() or "ok")


def slurm_job_state(job_id: str) -> str:
    """The job's state in slurmctld (RUNNING, CANCELLED, ...); '' when scontrol cannot tell."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"\bJobState=(\w+)", out)
    return match.group(1) if match else ""


def record_attempt(run_dir: str) -> None:
    attempt = {"time": time.time(), "job_id": os.environ.get("SLURM_JOB_ID", ""),
               "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
               "host": os.uname().nodename}
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "attempts.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(attempt) + "\n").encode())  # one append, one line
    finally:
        os.close(fd)


def sweep_grid(sweeps: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1','b=x'], ['a=1','b=y'], ['a=2','b=x'], ['a=2','b=y']]."""
    axes = []
    for sweep in sweeps:
        key, _, values = sweep.partition("=")
        if not key or not values:
            raise ValueError(f"--sweep {sweep!r}: expected key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def make_executor(cluster: str, logs: Path, opts: SlurmOptions):
    import submitit

    executor = submitit.AutoExecutor(folder=str(logs), cluster=None if cluster == "slurm" else cluster)
    tasks = opts.gpus_per_node or opts.tasks_per_node
    params = dict(nodes=opts.nodes, tasks_per_node=tasks, cpus_per_task=opts.cpus_per_task,
                  timeout_min=opts.time_min, name=opts.job_name)
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if cluster == "slurm":
        slurm = dict(partition=opts.partition, account=opts.account, qos=opts.qos,
                     constraint=opts.constraint, exclude=opts.exclude)
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
        # One CPU thread per allotted core, and the same in a torchrun reference run.
        setup = [f"export OMP_NUM_THREADS={opts.cpus_per_task}", *opts.setup]
        params.update(slurm_setup=setup, slurm_signal_delay_s=opts.signal_margin_s,
                      slurm_additional_parameters={"requeue": True, **opts.sbatch})
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    executor.update_parameters(**params)
    return executor


REPO = Path(__file__).resolve().parents[1]
SNAPSHOT_DATA = ("configs", "slurm", "setup.cfg", "pyproject.toml")  # read by the job besides the packages


def installed_packages(repo: Path = REPO) -> list[str]:
    """The top-level packages the project installs: setup.cfg's [options.packages.find] include.
    The snapshot takes them from here, so a package added there is carried by every job."""
    import configparser

    setup = configparser.ConfigParser(interpolation=None)
    setup.read(repo / "setup.cfg")
    include = setup.get("options.packages.find", "include", fallback="").split()
    if not include:  # a job without its packages would run whatever the environment holds
        raise RuntimeError(f"{repo / 'setup.cfg'}: no [options.packages.find] include to snapshot")
    return sorted({pattern.split(".")[0] for pattern in include})


def snapshot_names(repo: Path = REPO) -> list[str]:
    return [*installed_packages(repo), *SNAPSHOT_DATA]


def snapshot_code(run_dir: Path) -> Path:
    """Copy the code as it is now to RUN_DIR/code; the job runs that copy, so editing the
    checkout while a job waits or requeues changes nothing. Kept on --resume."""
    import shutil

    code = run_dir / "code"
    if not code.exists():
        tmp = run_dir / "code.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in snapshot_names():
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif source.exists():
                tmp.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tmp / name)
        tmp.rename(code)
    return code


def code_origins() -> str:
    """'DIR (pkg, pkg, ...)' for each folder the project's packages are imported from: in a job,
    RUN_DIR/code alone; a package from anywhere else would mean mixed code."""
    import importlib

    origins: dict[str, list[str]] = {}
    for name in installed_packages():
        where = str(Path(importlib.import_module(name).__file__).resolve().parents[1])
        origins.setdefault(where, []).append(name)
    return "; ".join(f"{where} ({', '.join(names)})" for where, names in origins.items())


def carry_user_code(code: Path, configs: list[Config]) -> dict[str, str]:
    """model.name=package.module:factory: copy the top-level package (or module file) holding the
    factory into the snapshot, beside imgcls, where the job imports it from (its working
    directory). An installed one (site-packages) is named, not copied: the job's environment has
    it. Returns {top-level module: where it was found}, for submit.json."""
    import importlib.util
    import shutil

    origins = {}
    for name in {c.model.name for c in configs if ":" in c.model.name}:
        top = name.partition(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or not (spec.origin or spec.submodule_search_locations):
            raise ConfigError(f"model.name={name!r}: cannot find module {top!r}; "
                              "put the directory holding it on PYTHONPATH")
        source = Path(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
        origins[top] = str(source)
        target = code / source.name
        if {"site-packages", "dist-packages"} & set(source.parts) or target.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    return origins


@dataclass
class Submission:
    job_ids: list
    run_dirs: list
    log_paths: list
    run_ids: list
    jobs: list = field(default_factory=list, repr=False)


def submit(cfg: Config, opts: SlurmOptions, cluster: str = "slurm", sweeps: list[str] = (),
           resume: str = "", resume_changes: dict | None = None) -> Submission:
    """Submit one training job, or a job array over the sweep grid, and return at once.
    With `resume`, the run's saved options, with `resume_changes` applied (e.g. {"nodes": 2}:
    the reader and the schedule resume elastically on the new number of ranks)."""
    if resume:
        run_dir = Path(resume).resolve()
        info = json.loads((run_dir / "submit.json").read_text())
        opts = dataclasses.replace(SlurmOptions(**info["slurm"]), **(resume_changes or {}))
        cluster = info["cluster"]
        task_dirs = [Path(d) for d in info["run_dirs"]]
        configs = [from_dict(json.loads((d / "config.json").read_text())) for d in task_dirs]
    else:
        if not cfg.data.url:  # refused here, not by every rank of a queued job
            raise ConfigError("data.url is empty: set data.url=PATH_OR_URL, a dataset written by "
                              "`python -m shards build`")
        absolute_paths(cfg)
        run_dir = Path(cfg.run.dir)
        if (run_dir / "submit.json").exists():
            raise FileExistsError(f"{run_dir} already holds a submitted run: use --resume {run_dir}, "
                                  "or another run.dir")
        grid = sweep_grid(list(sweeps))
        configs, task_dirs = [], []
        for i, overrides in enumerate(grid):
            data = to_dict(cfg)
            for override in overrides:
                apply_override(data, override)
            task_cfg = from_dict(data)
            task_dir = run_dir / f"sweep-{i:03d}" if len(grid) > 1 else run_dir
            task_cfg.run.dir = str(task_dir)
            task_cfg.run.name = task_cfg.run.name or f"{opts.job_name}-{task_dir.name}"
            task_cfg.track.run_id = task_cfg.track.run_id or _new_run_id()
            task_dir.mkdir(parents=True, exist_ok=True)
            save_config(task_cfg, str(task_dir / "config.yaml"))  # credentials masked
            write_private(task_dir / "config.json", json.dumps(to_dict(task_cfg)))  # the job's own, in full
            configs.append(task_cfg)
            task_dirs.append(task_dir)

    code = snapshot_code(run_dir)
    user_code = carry_user_code(code, configs)
    executor = make_executor(cluster, run_dir / "logs", opts)
    cwd = Path.cwd()
    os.chdir(code)  # the job's working directory, so `python -m submitit...` imports the snapshot
    try:
        if len(configs) > 1:
            jobs = executor.map_array(_run_task, [to_dict(c) for c in configs])
        else:
            jobs = [executor.submit(_run_task, to_dict(configs[0]))]
    finally:
        os.chdir(cwd)
    info_path = run_dir / "submit.json"
    previous = json.loads(info_path.read_text())["job_ids"] if info_path.exists() else []
    info = {"cluster": cluster, "slurm": vars(opts), "run_dirs": [str(d) for d in task_dirs],
            "job_ids": previous + [str(j.job_id) for j in jobs], "code": str(code),
            **({"user_code": user_code} if user_code else {})}
    write_private(info_path, json.dumps(info, indent=2))  # --setup lines may hold a token
    make_private(run_dir / "logs", SUBMITIT_INPUTS)  # the pickled config and the sbatch script
    return Submission(job_ids=[str(j.job_id) for j in jobs], run_dirs=[str(d) for d in task_dirs],
                      log_paths=[str(j.paths.stdout).replace("%t", "0") for j in jobs],
                      run_ids=[c.track.run_id for c in configs], jobs=jobs)


SUBMITIT_INPUTS = ("*_submitted.pkl", "*_submission.sh")


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner may read: it holds credentials the job needs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def make_private(folder: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.chmod(0o600)


def _run_task(config: dict) -> dict:
    return TrainTask(config)()


def _new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]
