"""Runs submitted with jobs/submit.py: their SLURM state, progress, metrics and logs.

  python jobs/status.py [list] [--root runs]     # one line per run
  python jobs/status.py tail RUN_DIR [-n 40]     # the end of the run's newest log (rank 0)
  python jobs/status.py cancel RUN_DIR           # scancel its job(s)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from imgcls import checkpoint
from imgcls.cli import entry_point
from imgcls.commands import ArgumentParser
from imgcls.jsonl import read_jsonl


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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("command", nargs="?", default="list", choices=("list", "tail", "cancel"),
                        help="list the runs, tail a run's log, or cancel its job (default: %(default)s)")
    parser.add_argument("run_dir", nargs="?", help="for tail and cancel")
    parser.add_argument("--root", default="runs", help="where to look for submitted runs (list; default: %(default)s)")
    parser.add_argument("-n", type=int, default=40, help="lines for tail (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "list":
        rows = [describe(*run) for run in find_runs(Path(args.root))]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'run dir':40} {'job':>10} {'state':12} {'requeues':>8} {'step':>7} {'epoch':>5} {'loss':>7} {'val acc':>7}  log")
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
