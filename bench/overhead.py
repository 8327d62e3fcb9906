"""Trainer overhead: imgcls.trainer.train against a bare DDP loop, both under 2-process torchrun.

    .venv/bin/python bench/overhead.py                  # 3 interleaved repetitions
    .venv/bin/python bench/overhead.py --reps 5

Same model (configs/fashion_mnist.yaml's), same batches (64 per rank and micro-batch,
2 micro-batches per step: 256 images per optimizer step), bf16 autocast, SGD with Nesterov
momentum, on shards copied to /dev/shm:

(trainer) imgcls.trainer.train with everything on: DDP, accumulation 2 (no_sync), bf16,
          the shard reader with its loader worker (decoding and augmentation), metrics every
          20 steps, the tqdm bar, a checkpoint every 70 steps (to a run dir in /tmp), the
          per-step flags all-reduce. EMA off (the bare loop has none).
(bare)    a hand-written loop: DDP + autocast + SGD over the same batches, read live by the
          same ShardReader and loader worker from the same in-memory (/dev/shm) shards, so
          both pay the same data pipeline and the ratio isolates the trainer's own cost.
          Nothing else.

Both run 160 optimizer steps (less than an epoch: no validation); throughput is timed from
the end of step 20 to the end of step 160 (the trainer's from its metrics.jsonl times). The
time spent in checkpointing (the RNG-state gather and checkpoint.save, timed by wrapping them)
is reported as a share of the trainer's timed window. Repetitions are interleaved (bare,
trainer, bare, trainer, ...) so load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import contextlib
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

STEPS, WARMUP_STEPS, ACCUM, BATCH = 160, 20, 2, 64
CKPT_EVERY, LOG_EVERY = 70, 20
TARGET_RATIO, TARGET_CKPT_SHARE = 0.95, 0.01


def config(data: str, run_dir: str):
    from imgcls.config import load_config

    return load_config(REPO / "configs/fashion_mnist.yaml", [
        f"data.url={data}", f"run.dir={run_dir}", f"data.batch_size={BATCH}", f"train.accum_steps={ACCUM}",
        "train.precision=bf16", f"train.log_every={LOG_EVERY}", f"train.ckpt_every={CKPT_EVERY}",
        f"train.max_steps={STEPS}", "train.ema_decay=0.0", "train.keep_last=3", "track.wandb=disabled",
        "track.progress=true"])


# ---- workers (run under torchrun) ------------------------------------------------------
def worker_trainer(args) -> dict:
    from imgcls import checkpoint
    from imgcls.trainer import train

    spans = []  # (name, start, seconds) of each checkpointing call on this rank

    def timed(fn, name):
        def wrapper(*a, **kw):
            start = time.time()
            try:
                return fn(*a, **kw)
            finally:
                spans.append((name, start, time.time() - start))
        return wrapper

    checkpoint.save = timed(checkpoint.save, "save")
    checkpoint.RNGState.state_dict = timed(checkpoint.RNGState.state_dict, "rng")
    shutil.rmtree(args.run_dir, ignore_errors=True)
    cfg = config(args.data, args.run_dir)
    train(cfg)
    if os.environ["RANK"] != "0":
        return {}
    records = [json.loads(line) for line in Path(args.run_dir, "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "train/loss" in r}
    t0, t1 = times[WARMUP_STEPS], times[STEPS]
    inside = [(name, d) for name, s, d in spans if t0 <= s and s + d <= t1]
    images = (STEPS - WARMUP_STEPS) * BATCH * ACCUM * 2
    return {"images_per_s": images / (t1 - t0), "ckpt_share": sum(d for _, d in inside) / (t1 - t0),
            "saves": sum(name == "save" for name, _ in inside)}


def worker_bare(args) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from imgcls.data import ShardReader, read_manifest
    from imgcls.models import build_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(args.data, args.run_dir)
    manifest = read_manifest(cfg.data.url)
    reader = ShardReader(cfg.data, "train", rank=rank, world_size=world, seed=cfg.run.seed, manifest=manifest)
    loader = iter(reader.loader())  # the trainer's batches, through the same reader, live
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(manifest["classes"]), 1)
    ddp = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for step in range(STEPS):
        if step == WARMUP_STEPS:
            dist.barrier()
            start = time.perf_counter()
        for micro in range(ACCUM):
            batch = next(loader)
            images = reader.transform(batch, "cpu", channels_last=True)
            with ddp.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(ddp(images).float(), batch["label"], label_smoothing=0.1)
                (loss / ACCUM).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    seconds = time.perf_counter() - start
    del loader, ddp
    dist.destroy_process_group()
    return {"images_per_s": (STEPS - WARMUP_STEPS) * BATCH * ACCUM * world / seconds}


# ---- the controller --------------------------------------------------------------------
def launch(mode: str, data: str, workdir: Path, rep: int) -> dict:
    out = workdir / f"{mode}-{rep}.json"
    out.unlink(missing_ok=True)
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", mode, "--data", data, "--run-dir", str(workdir / f"{mode}-run"), "--out", str(out)]
    with open(workdir / f"{mode}-{rep}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    return json.loads(out.read_text())


def mean_std(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/tmp/fm", help="Fashion-MNIST shards (built here if missing)")
    parser.add_argument("--workdir", default="/tmp/overhead")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", choices=["trainer", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_trainer if args.worker == "trainer" else worker_bare)(args)
        if os.environ["RANK"] == "0":
            Path(args.out).write_text(json.dumps(result))
        return

    if not Path(args.source, "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "shards", "build", "fashion-mnist", args.source,
                        "--shard-samples", "2000", "--no-progress"], cwd=REPO, check=True)
    data = "/dev/shm/imgcls-overhead-shards"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(args.source, data)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"bare": [], "trainer": []}
    load_start = os.getloadavg()
    try:
        for rep in range(args.reps):
            for mode in ("bare", "trainer"):
                results[mode].append(launch(mode, data, workdir, rep))
                print(f"rep {rep} {mode}: {results[mode][-1]}", flush=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    load_end = os.getloadavg()

    bare = [r["images_per_s"] for r in results["bare"]]
    trainer = [r["images_per_s"] for r in results["trainer"]]
    ratios = [t / b for t, b in zip(trainer, bare)]
    shares = [r["ckpt_share"] for r in results["trainer"]]
    print(f"\n### Trainer overhead ({args.reps} interleaved repetitions, 2-process torchrun, "
          f"{BATCH}x{ACCUM}x2 = {BATCH * ACCUM * 2} images per step, bf16)\n")
    print("| | images/s (mean ± std) | vs bare |")
    print("|---|---:|---:|")
    print(f"| bare loop (DDP + autocast + SGD, same reader) | {mean_std(bare)} | 1.00 |")
    print(f"| imgcls.trainer.train (everything on) | {mean_std(trainer)} | {mean_std(ratios, digits=3)} |")
    print(f"\ncheckpointing: {mean_std(shares, 100, 2)}% of the trainer's time "
          f"({results['trainer'][0]['saves']} checkpoints in {STEPS - WARMUP_STEPS} steps, one every {CKPT_EVERY})")
    print(f"load average (1 min) at start {load_start[0]:.1f}, at end {load_end[0]:.1f} on {os.cpu_count()} cores")
    print(f"targets: trainer/bare >= {TARGET_RATIO}: "
          f"{'met' if statistics.mean(ratios) >= TARGET_RATIO else 'NOT met'}; checkpoint share <= "
          f"{100 * TARGET_CKPT_SHARE:.0f}%: {'met' if statistics.mean(shares) <= TARGET_CKPT_SHARE else 'NOT met'}")


if __name__ == "__main__":
    main()
