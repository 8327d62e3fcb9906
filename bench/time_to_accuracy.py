"""Time to accuracy on Fashion-MNIST: the default recipe against the tutorial baseline, in one run.

    .venv/bin/python bench/time_to_accuracy.py                      # shards in /tmp/fm (built if missing)
    .venv/bin/python bench/time_to_accuracy.py --data DIR -- optim.lr=0.4   # extra overrides for (A)

(A) the default recipe: configs/fashion_mnist.yaml through jobs/train.py under a 2-process
    torchrun (OMP_NUM_THREADS=1), from shards, as the README's main command runs it (only
    run.dir, data.url, train.keep_last and track.* are overridden). Training time is the wall
    clock from launching torchrun (start-up included) to the metrics.jsonl record of each
    epoch's end (after that epoch's validation, which is part of the recipe). After the run,
    every epoch-end checkpoint is evaluated on the official test set with jobs/evaluate.py's
    code (EMA weights and the test-time augmentation of train.eval_flip / train.eval_shift,
    when the recipe uses them); that evaluation is not training time.
(B) the tutorial baseline: TutorialCNN (imgcls.models, `tutorial_cnn`), Adam lr 1e-3, StepLR
    (5 epochs, gamma 0.1), batch 32, random horizontal flips only, 20 epochs, fp32, as a plain
    single-process loop on in-memory tensors with torch's default threads. Like the tutorial it
    trains on the official 60k training set (the shards' train + val splits: A trains on train
    only). Training time is the sum of the epochs' training loops; the test evaluation after
    every epoch is not counted.

Both are evaluated on the official test set (the shards' test split, 10000 images). The machine
is shared: the load average is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BUDGET_S = 300.0        # A's accuracy within this much training time
TARGET_ACC = 0.945      # ... should be at least this
SEEDS_PLATEAU = 0.924   # the tutorial baseline's plateau
TARGET_TIME_S = 40.0    # A should reach SEEDS_PLATEAU within this


def run_a(args, workdir: Path) -> list[dict]:
    """Train the default recipe; [{"epoch", "time", "val", "test"}] per epoch end."""
    from imgcls.evaluation import evaluate_checkpoint

    run_dir = workdir / "a"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "2", "jobs/train.py",
           "--config", args.config, f"data.url={args.data}", f"run.dir={run_dir}", "train.keep_last=100000",
           "track.wandb=disabled", "track.progress=false", *args.overrides]
    print("(A)", " ".join(cmd), flush=True)
    log = workdir / "a.log"
    start = time.time()
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for r in records:
        if "val/acc" not in r:
            continue
        ckpt = run_dir / "checkpoints" / f"step-{r['step']:08d}.pt"
        test = evaluate_checkpoint(str(ckpt), "test", out_dir=str(workdir / "a-eval" / str(r["epoch"])))
        rows.append({"epoch": r["epoch"], "time": r["time"] - start, "val": r["val/acc"], "test": test["acc"]})
    return rows


def load_split(data: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as normalised float32 [N,1,28,28] images and int64 labels."""
    from imgcls.config import Config
    from imgcls.data import ShardReader

    cfg = Config().data
    cfg.url, cfg.eval_batch_size, cfg.num_workers = data, 10000, 0
    cfg.mean, cfg.std = [0.286], [0.353]
    reader = ShardReader(cfg, split, train=False)
    batches = list(reader)
    return torch.cat([reader.transform(b) for b in batches]), torch.cat([b["label"] for b in batches])


def accuracy(model, images, labels) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(images.split(1000), labels.split(1000)))
    model.train()
    return correct / len(labels)


def run_b(args) -> list[dict]:
    """The tutorial loop; [{"epoch", "time", "test"}] per epoch."""
    from imgcls.config import ModelConfig
    from imgcls.models import build_model

    parts = [load_split(args.data, s) for s in ("train", "val")]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_images, test_labels = load_split(args.data, "test")
    print(f"(B) tutorial_cnn on {len(labels)} training images, {torch.get_num_threads()} threads", flush=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tutorial_cnn"), 10, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.1)
    rows, elapsed = [], 0.0
    for epoch in range(args.b_epochs):
        start = time.perf_counter()
        order = torch.randperm(len(labels))
        for index in order.split(32):
            x, y = images[index], labels[index]
            flip = torch.rand(len(y)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        elapsed += time.perf_counter() - start
        rows.append({"epoch": epoch + 1, "time": elapsed, "test": accuracy(model, test_images, test_labels)})
        print(f"(B) epoch {epoch + 1}: {elapsed:.0f} s, test acc {rows[-1]['test']:.4f}", flush=True)
    return rows


def first_reaching(rows: list[dict], acc: float) -> dict | None:
    return next((r for r in rows if r["test"] >= acc), None)


def fmt_time(row: dict | None) -> str:
    return f"{row['time']:.0f} s (epoch {row['epoch']})" if row else "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/fm-54k", help="Fashion-MNIST shards (built here if "
                        "missing, as scripts/quickstart.sh builds them: 54k train, 6k val, 10k test)")
    parser.add_argument("--workdir", default="/tmp/tta", help="run dirs and logs")
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--b-epochs", type=int, default=20)
    parser.add_argument("--only", choices=["a", "b"], help="run only one of the two")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for (A)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not Path(args.data, "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "shards", "build", "fashion-mnist", args.data,
                        "--split", "0.9,0.1,0", "--shard-samples", "1000", "--no-progress"], cwd=REPO, check=True)
    load_start = os.getloadavg()
    a = run_a(args, workdir) if args.only != "b" else []
    b = run_b(args) if args.only != "a" else []
    load_end = os.getloadavg()

    for name, rows in (("A: default recipe (configs/fashion_mnist.yaml, 2-process torchrun)", a),
                       ("B: tutorial baseline (tutorial_cnn, Adam, batch 32, 1 process)", b)):
        if not rows:
            continue
        print(f"\n### {name}\n")
        print("| epoch | training time (s) | test acc |" + (" val acc |" if "val" in rows[0] else ""))
        print("|---:|---:|---:|" + ("---:|" if "val" in rows[0] else ""))
        for r in rows:
            print(f"| {r['epoch']} | {r['time']:.1f} | {100 * r['test']:.2f}% |"
                  + (f" {100 * r['val']:.2f}% |" if "val" in r else ""))

    print("\n### Summary\n")
    print("| | A: default recipe | B: tutorial baseline |")
    print("|---|---:|---:|")
    in_budget = [r for r in a if r["time"] <= BUDGET_S]
    a_budget = f"{100 * in_budget[-1]['test']:.2f}% (epoch {in_budget[-1]['epoch']})" if in_budget else "no epoch"
    b_budget = [r for r in b if r["time"] <= BUDGET_S]
    b_budget = f"{100 * b_budget[-1]['test']:.2f}% (epoch {b_budget[-1]['epoch']})" if b_budget else "no epoch"
    print(f"| test acc at <= {BUDGET_S:.0f} s of training | {a_budget} | {b_budget} |")
    print(f"| time to {100 * SEEDS_PLATEAU:.1f}% test acc | {fmt_time(first_reaching(a, SEEDS_PLATEAU))} "
          f"| {fmt_time(first_reaching(b, SEEDS_PLATEAU))} |")
    if a or b:
        def final(rows):
            return f"{100 * rows[-1]['test']:.2f}% at {rows[-1]['time']:.0f} s" if rows else "-"

        def best(rows):
            if not rows:
                return "-"
            top = max(rows, key=lambda r: r["test"])
            return f"{100 * top['test']:.2f}% at {top['time']:.0f} s (epoch {top['epoch']})"

        def plateau(rows):
            last = [100 * r["test"] for r in rows[-5:]]
            return f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f}%" if len(last) > 1 else "-"

        print(f"| final test acc | {final(a)} | {final(b)} |")
        print(f"| best test acc | {best(a)} | {best(b)} |")
        print(f"| plateau (mean ± std of the last 5 epochs) | {plateau(a)} | {plateau(b)} |")
    if a and b:
        ta, tb = first_reaching(a, SEEDS_PLATEAU), first_reaching(b, SEEDS_PLATEAU)
        if ta and tb:
            print(f"| speed-up to {100 * SEEDS_PLATEAU:.1f}% (B time / A time) "
                  f"| {tb['time'] / ta['time']:.1f}x | 1.0x |")
    print(f"\nload average (1 min) at start {load_start[0]:.1f}, at end {load_end[0]:.1f} on {os.cpu_count()} cores")
    if a:
        reached = first_reaching(a, SEEDS_PLATEAU)
        print(f"targets: A >= {100 * TARGET_ACC:.1f}% within {BUDGET_S:.0f} s: "
              f"{'met' if in_budget and in_budget[-1]['test'] >= TARGET_ACC else 'NOT met'}; "
              f"A reaches {100 * SEEDS_PLATEAU:.1f}% within {TARGET_TIME_S:.0f} s: "
              f"{'met' if reached and reached['time'] <= TARGET_TIME_S else 'NOT met'}")


if __name__ == "__main__":
    main()
