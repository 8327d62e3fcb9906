"""Knowledge distillation: a student trained with and without a teacher, in one run.

    .venv/bin/python bench/distillation.py --teacher runs/fashion_mnist/checkpoints/best.pt

Both students use the same config, seed and data (2-process torchrun through jobs/train.py);
the only difference is distill.teacher. Prints test accuracy for the teacher and both students.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import add_output_argument  # noqa: E402


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out.stdout


def test_accuracy(checkpoint: str) -> float:
    out = run([sys.executable, "jobs/evaluate.py", checkpoint, "--split", "test"])
    return json.loads(out.strip().splitlines()[-1])["acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/fashion_mnist/checkpoints/best.pt")
    p.add_argument("--config", default="configs/fashion_mnist.yaml")
    add_output_argument(p, "folder of the runs", default="runs/bench_distillation")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("student", nargs="*", default=["model.name=tutorial_cnn", "train.epochs=3"],
                   help="overrides that make the student (default: %(default)s)")
    args = p.parse_args()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "jobs/train.py",
                "--config", args.config, "track.wandb=disabled", "track.progress=false", *args.student]
    rows = [("teacher", args.teacher, test_accuracy(args.teacher))]
    for name, extra in (("student alone", []),
                        ("student + teacher", [f"distill.teacher={args.teacher}",
                                               f"distill.temperature={args.temperature}",
                                               f"distill.alpha={args.alpha}"])):
        run_dir = f"{args.output}/{name.replace(' ', '_').replace('+', 'with')}"
        run([*torchrun, f"run.dir={run_dir}", *extra])
        rows.append((name, f"{run_dir}/checkpoints/best.pt", test_accuracy(f"{run_dir}/checkpoints/best.pt")))
    print(f"student: {' '.join(args.student)}; T={args.temperature}, alpha={args.alpha}\n")
    print("| model | test accuracy | checkpoint |\n|---|---:|---|")
    for name, ckpt, acc in rows:
        print(f"| {name} | {100 * acc:.2f}% | {ckpt} |")
    print(f"\ndistillation gain: {100 * (rows[2][2] - rows[1][2]):+.2f} points")


if __name__ == "__main__":
    main()
