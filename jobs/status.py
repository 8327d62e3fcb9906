"""Runs: their state, progress and metrics; for runs submitted with jobs/submit.py, their
SLURM state and logs.

  python jobs/status.py [list] [--root runs]     # one line per submitted run
  python jobs/status.py --runs DIR_OR_URL        # every run dir under it, however it was started
  python jobs/status.py tail RUN_DIR [-n 40]     # the end of the run's newest log (rank 0)
  python jobs/status.py cancel RUN_DIR           # scancel its job(s)

--runs finds run dirs by what training leaves in them (metrics.jsonl, lease.json,
checkpoints/step-N.pt), so it sees runs started with plain python, torchrun, srun or sbatch,
on a local path or an object store. A run is `running` while its lease is live (renewed in
the run's run.lease_timeout_s by a process that is not known to be gone), `finished` once it has validated
all its train.epochs, `stopped` before that (max_steps, early stop, a signal, a crash), and
`ended` when it has no val split to tell.
"""
from __future__ import annotations

import json
import posixpath
import subprocess
import sys
from pathlib import Path

import yaml

from imgcls import checkpoint
from imgcls.cli import entry_point
from imgcls.jsonl import read_jsonl
from imgcls.lease import DEFAULT_TIMEOUT_S, LEASE_FILE, is_live
from imgcls.tracking import read_metrics
from jobs import ArgumentParser
from shardio import storage


def sacct_state(job_id: str) -> str:
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no sacct)"
    return out[-1] if out else "unknown"


def find_runs(root: Path) -> list[tuple[Path, dict, int]]:
    """(task run dir, its submit.json, task index) for every submitted run under root."""
    runs = []
    for info_path in sorted(root.glob("**/submit.json")):
        info = json.loads(info_path.read_text())
        for index, run_dir in enumerate(info["run_dirs"]):
            runs.append((Path(run_dir), info, index))
    return runs


def job_id_of(info: dict, index: int) -> str:
    """The newest job id of task `index` (array tasks are JOB_INDEX)."""
    newest = info["job_ids"][-1] if len(info["run_dirs"]) == 1 else info["job_ids"][-len(info["run_dirs"]) + index]
    return newest


def describe(run_dir: Path, info: dict, index: int) -> dict:
    job_id = job_id_of(info, index)
    attempts = read_jsonl(run_dir / "attempts.jsonl")
    records = read_jsonl(run_dir / "metrics.jsonl")
    ckpts = checkpoint.list_checkpoints(str(run_dir))
    last_train = next((r for r in reversed(records) if "train/loss" in r), {})
    last_val = next((r for r in reversed(records) if "val/acc" in r), {})
    logs_dir = Path(info["run_dirs"][0]).parent / "logs" if len(info["run_dirs"]) > 1 else run_dir / "logs"
    return {
        "run_dir": str(run_dir), "job_id": job_id, "state": sacct_state(job_id),
        "requeues": max(0, len(attempts) - 1),
        "slurm_restarts": max((a.get("restart_count", 0) for a in attempts), default=0),
        "step": int(checkpoint.STEP_FILE.search(ckpts[-1]).group(1)) if ckpts else 0,
        "epoch": last_val.get("epoch", last_train.get("epoch", 0)),
        "train_loss": last_train.get("train/loss"), "val_acc": last_val.get("val/acc"),
        "log": str(logs_dir / f"{job_id}_0_log.out"), "err": str(logs_dir / f"{job_id}_0_log.err"),
    }


# ---- any run dir, however it was started ----------------------------------------------
RUN_FILES = ("metrics.jsonl", LEASE_FILE)  # not config.yaml: wandb keeps one of its own


def find_run_dirs(root: str) -> list[str]:
    """Run dirs at or under `root` (a path or URL): dirs holding metrics.jsonl, lease.json or
    checkpoints/step-N.pt."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        raise FileNotFoundError(2, "no such directory", root)
    found = set()
    for name in fs.find(path):
        parent, base = posixpath.split(name)
        if base in RUN_FILES:
            found.add(parent)
        elif posixpath.basename(parent) == "metrics" and base.endswith(".jsonl"):  # segments (object stores)
            found.add(posixpath.dirname(parent))
        elif checkpoint.STEP_FILE.fullmatch(base) and posixpath.basename(parent) == "checkpoints":
            found.add(posixpath.dirname(parent))
    local = storage.is_local(root)
    return sorted(run if local else fs.unstrip_protocol(run) for run in found)


def run_state(run_dir: str) -> dict:
    records = read_metrics(run_dir)
    config_url, lease_url = storage.join(run_dir, "config.yaml"), storage.join(run_dir, LEASE_FILE)
    config, note = _read_config(config_url)
    epochs = (config or {}).get("train", {}).get("epochs")
    validated = [r for r in records if "val/acc" in r]
    done = max((r["epoch"] for r in validated), default=0)  # a val record's epoch: epochs completed
    lease = json.loads(storage.read_bytes(lease_url)) if storage.exists(lease_url) else None
    if lease is not None and is_live(lease, (config or {}).get("run", {}).get("lease_timeout_s", DEFAULT_TIMEOUT_S)):
        state = "running"
    elif not validated:
        state = "ended"
    else:
        state = "finished" if epochs is not None and done >= epochs else "stopped"
    last_train = next((r for r in reversed(records) if "train/loss" in r), {})
    return {"run_dir": run_dir, "name": (config or {}).get("run", {}).get("name") or posixpath.basename(run_dir),
            "state": state, "epoch": done, "epochs": epochs, "step": records[-1]["step"] if records else 0,
            "train_loss": last_train.get("train/loss"),
            "best_val_acc": max((r["val/acc"] for r in validated), default=None), "note": note}


def _read_config(url: str) -> tuple[dict, str]:
    """(the run's config, "") or ({}, why it was skipped): one bad run dir never hides the others."""
    if not storage.exists(url):
        return {}, ""
    try:
        config = yaml.safe_load(storage.read_bytes(url))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return {}, f"{url} skipped: not valid YAML ({' '.join(str(e).split())[:120]})"
    if not isinstance(config, dict):
        return {}, f"{url} skipped: not a mapping"
    return config, ""


def print_run_states(rows: list[dict]) -> None:
    print(f"{'name':24} {'state':9} {'epoch':>7} {'step':>7} {'loss':>7} {'best acc':>8}  run dir")
    for r in rows:
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"
        best = f"{r['best_val_acc']:.4f}" if r["best_val_acc"] is not None else "-"
        epoch = f"{r['epoch']}/{r['epochs'] if r['epochs'] is not None else '?'}"
        print(f"{r['name'][:24]:24} {r['state']:9} {epoch:>7} {r['step']:>7} {loss:>7} {best:>8}  {r['run_dir']}")
        if r["note"]:
            print(f"  note: {r['note']}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("command", nargs="?", default="list", choices=("list", "tail", "cancel"),
                        help="list the runs, tail a run's log, or cancel its job (default: %(default)s)")
    parser.add_argument("run_dir", nargs="?", help="for tail and cancel")
    parser.add_argument("--root", default="runs", help="where to look for submitted runs (list; default: %(default)s)")
    parser.add_argument("-n", type=int, default=40, help="lines for tail (default: %(default)s)")
    parser.add_argument("--runs", default="", metavar="DIR_OR_URL",
                        help="list every run dir under this path or URL, submitted or not (default: only "
                             "submitted runs, under --root)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.runs:
        rows = [run_state(run) for run in find_run_dirs(args.runs)]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_run_states(rows)
        return rows
    if args.command == "list":
        rows = [describe(*run) for run in find_runs(Path(args.root))]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'run dir':40} {'job':>10} {'state':12} {'requeues':>8} {'step':>7} {'epoch':>5} {'loss':>7} "
                  f"{'val acc':>7}  log")
            for r in rows:
                loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"
                acc = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "-"
                print(f"{r['run_dir']:40} {r['job_id']:>10} {r['state']:12} {r['requeues']:>8} {r['step']:>7} "
                      f"{r['epoch']:>5} {loss:>7} {acc:>7}  {r['log']}")
        return rows

    if not args.run_dir:
        parser.error(f"{args.command} needs RUN_DIR")
    run_dir = Path(args.run_dir).resolve()
    matches = [run for run in find_runs(run_dir) if run[0] == run_dir] or find_runs(run_dir)
    if not matches:
        sys.exit(f"error: no submitted run (submit.json) at {run_dir}")
    if args.command == "tail":
        row = describe(*matches[0])
        for name in ("err", "log"):
            path = Path(row[name])
            if path.exists():
                print(f"==> {path} <==")
                print("\n".join(path.read_text(errors="replace").splitlines()[-args.n:]))
        return [row]
    job_ids = sorted({job_id_of(info, index).split("_")[0] for _, info, index in matches})
    subprocess.run(["scancel", *job_ids], check=True)
    print(f"cancelled {' '.join(job_ids)}")
    return [{"cancelled": job_ids}]


if __name__ == "__main__":
    main()
