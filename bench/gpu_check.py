"""The GPU check: one command that tells whether training runs on a GPU, correctly and fast.

    bash bench/gpu_check_prepare.sh            # here, with internet: the wheels the device lacks
    python bench/gpu_check.py                  # on a CUDA machine (see "Time budget")
    python bench/gpu_check.py --device cpu     # the same checks, small, on CPU (in the test suite)

On a lent GPU machine (a Python 3.12 venv with torch, torchvision, matplotlib, onnx and
onnxruntime; no internet), carry `.gpu-wheels` (tenacity and simplejpeg, written by
bench/gpu_check_prepare.sh, whose header has the one command to run there and says how the
wheel set was found). wandb is disabled and the data are local files.

Time budget. A GPU machine is lent for about 15 minutes in all, its start included, so the
check must fit 8 minutes on one H100 with its preparation (installing the two wheels, seconds;
writing the data, ~30 s), leaving room for a rerun. Estimated, not yet measured on a GPU:
12 processes, each starting torch and CUDA (~5-10 s) and training for seconds:
train ~60 s, resume ~30 s (the bf16 torchrun training run is its uninterrupted run), speed
~90 s, deploy ~30 s: about 5 minutes. The sizes below keep
it there: 3000 images at 32 px for the correctness checks, one repetition of each speed run
of 60 steps (the first 10 not timed). A run that nears 8 minutes: cut speed_steps first.

Every check runs the real entry points (jobs/train.py under python and under torchrun,
jobs/evaluate.py, jobs/export.py) on synthetic shards written to /dev/shm:

1. train  - one process and torchrun with one process, in bf16 and in fp16; the torchrun runs
            join a process group at world size 1 (run.always_init_group), so the NCCL+gloo
            group and its CPU collectives really run. Each must learn (val acc over chance).
2. resume - stopped at a step, then resumed, with run.deterministic=true: bitwise-equal
            weights to an uninterrupted run.
3. speed  - images/s of the trainer against a bare loop (autocast + SGD + channels_last over
            the same shard reader) on a ResNet-50 at 224 px (CPU: a ResNet-18 at 32 px), bf16,
            on synthetic images already decoded at 224 px in shards in /dev/shm (in memory);
            the trainer with train.sync_every=1 (a host sync per step) against the default;
            and the input path a user meets: the full trainer on source-JPEG shards (photo-
            sized, ~500x375, ~80 KB at quality 90), decoded and RandomResizedCrop'd to 224 px
            in data.num_workers = cores - 1 loader workers, against the same run on the
            in-memory images. That ratio says whether the input path feeds the GPU.
            Target: trainer >= 0.95x bare. Every speed run uses cores - 1 workers.
4. deploy - jobs/evaluate.py and jobs/export.py --format onnx on a checkpoint trained here.

Prints one line per check and a summary table; writes everything to OUT/gpu_check.json.
Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jobs import add_output_argument  # noqa: E402

TARGET_RATIO = 0.95
CORES = os.cpu_count() or 2
TRAIN_RUNS = [("bf16", "python"), ("bf16", "torchrun"), ("fp16", "python"), ("fp16", "torchrun")]
# Per device: the dataset and the runs (CPU: small enough for the test suite; fp16 autocast is
# emulated there, slowly, so it runs once, under torchrun).
SIZES = {
    "cuda": dict(train_runs=TRAIN_RUNS, check_px=32, classes=10, check_samples=3000, check_batch=64, check_epochs=2,
                 check_workers=4, speed_model="resnet50", speed_px=224, speed_batch=96, speed_warmup=10,
                 speed_steps=60, reps=1, jpeg_side=500),
    "cpu": dict(train_runs=[run for run in TRAIN_RUNS if run != ("fp16", "python")], check_px=16, classes=4,
                check_samples=480, check_batch=32, check_epochs=2, check_workers=1, speed_model="resnet18",
                speed_px=32, speed_batch=8, speed_warmup=2, speed_steps=6, reps=1, jpeg_side=48),
}
SPEED_WORKERS = max(1, CORES - 1)  # the training process needs a core too


# ---- data ------------------------------------------------------------------------------
def band_images(rng, n: int, height: int, width: int, classes: int, smooth: bool = False):
    """(images [n, h, w, 3] uint8, labels): class c brightens one of `classes` horizontal bands
    of the red channel, on uniform noise; `smooth`: on a bicubic-upscaled colour field with
    mild noise instead, which JPEG compresses as it does a photo (~80 KB at 500x375, q90)."""
    import numpy as np
    from PIL import Image

    labels = rng.integers(0, classes, n)
    if smooth:
        fields = [np.asarray(Image.fromarray(rng.integers(0, 200, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC)) for _ in range(n)]
        noise = rng.integers(-24, 25, (n, height, width, 3), dtype=np.int16)
        images = np.clip(np.stack(fields).astype(np.int16) + noise, 0, 200).astype(np.uint8)
    else:
        images = rng.integers(0, 128, (n, height, width, 3), dtype=np.uint8)
    band = max(1, height // classes)
    for c in range(classes):
        images[labels == c, c * band:(c + 1) * band, :, 0] += 55 if smooth else 127
    return images, labels


def synthetic_shards(dest: Path, n: int, px: int, classes: int = 10, seed: int = 0,
                     splits=(0.8, 0.1, 0.1)) -> str:
    """Learnable RGB images (band_images) as raw shards: decoded already, read at their size."""
    import numpy as np

    import shards

    images, labels = band_images(np.random.default_rng(seed), n, px, px, classes)
    dest.mkdir(parents=True, exist_ok=True)
    np.savez(dest / "src.npz", images=images, labels=labels)
    shards.build(str(dest / "src.npz"), str(dest / "shards"), split=splits, shard_samples=max(64, n // 32),
                 progress=False, workers=min(4, CORES // 2))
    (dest / "src.npz").unlink()
    return str(dest / "shards")


def jpeg_shards(dest: Path, n: int, side: int, classes: int = 10, seed: int = 0) -> str:
    """n photo-sized JPEG files (quality 90, side x 3/4 side, either way round) as shards that
    keep each file's bytes, all in the train split: the reader decodes every one in its
    workers, as it does real photos."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    import shards

    folder = dest / "jpeg"
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)

    def write(chunk: int) -> None:
        local = np.random.default_rng([seed, chunk])
        wide = chunk % 4 != 0  # 3 in 4 landscape, as photos mostly are
        h, w = (side * 3 // 4, side) if wide else (side, side * 3 // 4)
        images, labels = band_images(local, 32, h, w, classes, smooth=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(folder / f"c{label}" / f"{chunk:04d}-{i:02d}.jpg", quality=90)

    chunks = -(-n // 32)
    with ThreadPoolExecutor(CORES) as pool:
        list(pool.map(write, range(chunks)))
    shards.build(str(folder), str(dest / "shards"), split=(1.0, 0.0, 0.0), encoding="source",
                 shard_samples=max(32, n // (2 * SPEED_WORKERS)), progress=False, workers=min(8, CORES // 2))
    shutil.rmtree(folder)
    return str(dest / "shards")


# ---- running the entry points ------------------------------------------------------------
def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}


def run(cmd: list[str], log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n# exit {out.returncode} after {time.perf_counter() - start:.1f}s\n"
                   f"{out.stdout}\n{out.stderr}")
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({out.returncode}); see {log}:\n{out.stderr[-2000:]}")
    return out


def train_cmd(launcher: str, overrides: list[str]) -> list[str]:
    script = str(REPO / "jobs" / "train.py")
    if launcher == "python":
        return [sys.executable, script, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", script,
            *overrides, "run.always_init_group=true"]


def base_overrides(data: str, run_dir: Path, device: str, sizes: dict) -> list[str]:
    return [f"data.url={data}", f"run.dir={run_dir}", f"run.device={device}", "model.name=simple_cnn",
            "model.width=16", f"data.batch_size={sizes['check_batch']}", "data.eval_batch_size=256",
            f"data.num_workers={sizes['check_workers']}", "data.mean=[0.3,0.25,0.25]", "data.std=[0.2,0.2,0.2]",
            "optim.lr=0.2", f"train.epochs={sizes['check_epochs']}", "train.log_every=5", "train.ckpt_every=1000",
            "track.wandb=disabled", "track.progress=false", "model.channels_last=true"]


def final_checkpoint(run_dir: Path) -> dict:
    from imgcls import checkpoint

    state, _ = checkpoint.load_latest(str(run_dir))
    if state is None:
        raise RuntimeError(f"no checkpoint in {run_dir}")
    return state


def startup_line(out: subprocess.CompletedProcess) -> str:
    return next((line.split(": ", 1)[-1] for line in out.stderr.splitlines() if "world size" in line), "")


# ---- the checks --------------------------------------------------------------------------
# The bf16 torchrun training run is also the resume check's uninterrupted run: one process less.
RESUME_OVERRIDES = ["run.deterministic=true", "train.ckpt_every=7"]


def check_training(data: str, work: Path, device: str, sizes: dict) -> list[dict]:
    rows = []
    for precision, launcher in sizes["train_runs"]:
        run_dir = work / f"train-{precision}-{launcher}"
        extra = RESUME_OVERRIDES if (precision, launcher) == ("bf16", "torchrun") else []
        out = run(train_cmd(launcher, [*base_overrides(data, run_dir, device, sizes),
                                       f"train.precision={precision}", *extra]), work / f"{run_dir.name}.log")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        acc = [r["val/acc"] for r in records if "val/acc" in r][-1]
        line = startup_line(out)
        backend_ok = ("nccl" in line if device == "cuda" else "gloo" in line) if launcher == "torchrun" else True
        ok = result["status"] == "done" and acc > 0.5 and f"device {device}" in line and backend_ok
        rows.append({"check": f"train {precision} {launcher}", "ok": ok, "val_acc": acc, "startup": line})
    return rows


def check_resume(data: str, work: Path, device: str, sizes: dict) -> dict:
    import torch

    def args(run_dir: Path) -> list[str]:
        return [*base_overrides(data, run_dir, device, sizes), "train.precision=bf16", *RESUME_OVERRIDES]

    straight, stopped = work / "train-bf16-torchrun", work / "resume-stopped"
    if not (straight / "checkpoints").is_dir():  # --only resume: no training run to compare with
        straight = work / "resume-straight"
        run(train_cmd("torchrun", args(straight)), work / "resume-straight.log")
    run(train_cmd("torchrun", [*args(stopped), "train.max_steps=9"]), work / "resume-stop.log")
    run(train_cmd("torchrun", args(stopped)), work / "resume-resume.log")
    a, b = final_checkpoint(straight), final_checkpoint(stopped)
    differing = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    return {"check": "stop + resume bitwise", "ok": not differing and b["progress"]["restarts"] == 1,
            "step": b["progress"]["step"], "differing_tensors": differing[:5]}


def check_deploy(work: Path) -> list[dict]:
    ckpt = work / "train-bf16-torchrun" / "checkpoints" / "best.pt"
    out = run([sys.executable, str(REPO / "jobs" / "evaluate.py"), str(ckpt), "--split", "test"], work / "evaluate.log")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [{"check": "evaluate", "ok": summary["acc"] > 0.5, "test_acc": summary["acc"], "count": summary["count"]}]
    out = run([sys.executable, str(REPO / "jobs" / "export.py"), str(ckpt), "--format", "onnx",
               "--check-samples", "256"], work / "export.log")
    export = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({"check": "export onnx", "ok": export["max_abs_diff"] <= 1e-3,
                 "max_abs_diff": export["max_abs_diff"], "top1_agreement": export["top1_agreement"]})
    return rows


# ---- speed: trainer against a bare loop, each in its own process ----------------------------
def speed_config(data: str, run_dir: str, device: str, sizes: dict, sync_every: int, jpeg: bool = False):
    from imgcls.config import load_config

    photos = [f"data.image_size={sizes['speed_px']}", "data.augment.crop=resized"] if jpeg else []
    return load_config(None, [
        f"data.url={data}", f"run.dir={run_dir}", f"run.device={device}", f"model.name={sizes['speed_model']}",
        "model.small_stem=false", "model.channels_last=true", f"data.batch_size={sizes['speed_batch']}",
        f"data.num_workers={SPEED_WORKERS}", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
        "train.precision=bf16", "train.epochs=1", f"train.max_steps={sizes['speed_steps']}",
        f"train.log_every={sizes['speed_warmup']}", "train.ckpt_every=100000", "train.ema_decay=0",
        f"train.sync_every={sync_every}", "track.wandb=disabled", "track.progress=false", *photos])


SPEED_MODES = ("bare", "trainer", "sync1", "jpeg")


def speed_worker(mode: str, data: str, run_dir: str, device: str, sizes: dict) -> float:
    """images/s from the end of the warm-up to the last step. `data` is the in-memory shards,
    or for mode jpeg the source-JPEG ones."""
    if mode == "bare":
        return bare_loop(speed_config(data, run_dir, device, sizes, 1), sizes)
    from imgcls.trainer import train

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = speed_config(data, run_dir, device, sizes, 1 if mode == "sync1" else cfg_default_sync(), jpeg=mode == "jpeg")
    train(cfg)
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "train/loss" in r}
    warm, last = sizes["speed_warmup"], max(times)
    return (last - warm) * sizes["speed_batch"] / (times[last] - times[warm])


def cfg_default_sync() -> int:
    from imgcls.config import Config

    return Config().train.sync_every


def bare_loop(cfg, sizes: dict) -> float:
    import torch
    import torch.nn.functional as F

    from imgcls.data import ShardReader, read_manifest
    from imgcls.distributed import init_distributed
    from imgcls.models import build_model

    device = init_distributed(cfg.run.device).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    manifest = read_manifest(cfg.data.url)
    reader = ShardReader(cfg.data, "train", seed=cfg.run.seed, manifest=manifest)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(manifest["classes"]), 3).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = iter(reader.loader(pin_memory=device.type == "cuda"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(cfg.train.max_steps):
        if step == sizes["speed_warmup"]:
            sync()
            start = time.perf_counter()
        batch = next(batches)
        images = reader.transform(batch, device, channels_last=True)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return (cfg.train.max_steps - sizes["speed_warmup"]) * cfg.data.batch_size / (time.perf_counter() - start)


def check_speed(data: str, jpeg_data: str, work: Path, device: str, sizes: dict) -> list[dict]:
    rates: dict[str, list[float]] = {mode: [] for mode in SPEED_MODES}
    for rep in range(sizes["reps"]):
        for mode in rates:  # interleaved, so load from elsewhere hits all alike
            source, run_dir = jpeg_data if mode == "jpeg" else data, work / f"speed-{mode}"
            if device == "cpu":  # nothing to keep apart on a CPU, where every process start costs seconds
                rates[mode].append(speed_worker(mode, source, str(run_dir), device, sizes))
                continue
            out = work / f"speed-{mode}-{rep}.json"
            run([sys.executable, __file__, "--worker", mode, "--data", source, "--device", device,
                 "--run-dir", str(run_dir), "--worker-out", str(out)], work / f"speed-{mode}-{rep}.log")
            rates[mode].append(json.loads(out.read_text())["images_per_s"])
    mean = {m: statistics.fmean(v) for m, v in rates.items()}
    ratio = mean["trainer"] / mean["bare"]
    px = sizes["speed_px"]
    # on CPU the run is a few seconds long: the ratio is reported, the target is bench/overhead.py's
    return [{"check": f"speed {sizes['speed_model']} {px}px bf16",
             "ok": ratio >= TARGET_RATIO or device == "cpu",
             "bare_images_per_s": rates["bare"], "trainer_images_per_s": rates["trainer"],
             "trainer_vs_bare": ratio},
            {"check": "sync every step (train.sync_every=1)", "ok": True, "sync1_images_per_s": rates["sync1"],
             "sync1_vs_default": mean["sync1"] / mean["trainer"], "default_sync_every": cfg_default_sync()},
            # a measurement, not a pass/fail: below TARGET_RATIO the input path is what limits training
            {"check": f"input: {px}px from source JPEGs, RandomResizedCrop in {SPEED_WORKERS} workers, "
                      f"vs in-memory", "ok": True, "jpeg_images_per_s": rates["jpeg"],
             "in_memory_images_per_s": rates["trainer"], "jpeg_vs_in_memory": mean["jpeg"] / mean["trainer"],
             "input_feeds_the_model": mean["jpeg"] / mean["trainer"] >= TARGET_RATIO, "num_workers": SPEED_WORKERS}]


# ---- main --------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
            "cpus": os.cpu_count()}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported(), driver_capability=torch.cuda.get_device_capability(0))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    add_output_argument(p, "where the logs and gpu_check.json go (default: a temp dir)")
    p.add_argument("--only", default="train,resume,speed,deploy", help="comma-separated checks to run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = SIZES[args.device]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: as in every process it starts
    if args.worker:
        rate = speed_worker(args.worker, args.data, args.run_dir, args.device, sizes)
        Path(args.worker_out).write_text(json.dumps({"images_per_s": rate}))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but CUDA is not usable here (use --device cpu)", file=sys.stderr)
        return 2
    out = Path(args.output or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-data-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    only = set(args.only.split(","))
    report = {"environment": environment(args.device), "sizes": sizes, "checks": []}
    print(json.dumps(report["environment"]), flush=True)
    began = time.perf_counter()
    try:
        data = synthetic_shards(scratch / "check", sizes["check_samples"], sizes["check_px"], sizes["classes"])
        steps = {"train": lambda: check_training(data, out, args.device, sizes),
                 "resume": lambda: [check_resume(data, out, args.device, sizes)],
                 "deploy": lambda: check_deploy(out)}
        if "speed" in only:
            speed_n = sizes["speed_batch"] * (sizes["speed_steps"] + 1)
            speed_data = synthetic_shards(scratch / "speed", speed_n, sizes["speed_px"], splits=(1.0, 0.0, 0.0))
            jpeg_data = jpeg_shards(scratch / "speed-jpeg", speed_n, sizes["jpeg_side"])
            steps["speed"] = lambda: check_speed(speed_data, jpeg_data, out, args.device, sizes)
        for name in ("train", "resume", "speed", "deploy"):
            if name not in only:
                continue
            start = time.perf_counter()
            try:
                rows = steps[name]()
            except Exception as e:  # a failed check is reported, and the others still run
                rows = [{"check": name, "ok": False, "error": str(e)[-1500:]}]
            for row in rows:
                row["seconds"] = round(time.perf_counter() - start, 1)
                print(("PASS " if row["ok"] else "FAIL ") + json.dumps(row), flush=True)
            report["checks"] += rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - began, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print("\n| check | ok | numbers |\n|---|:---:|---|")
    for row in report["checks"]:
        numbers = {k: v for k, v in row.items() if k not in ("check", "ok", "startup")}
        print(f"| {row['check']} | {'yes' if row['ok'] else 'NO'} | {json.dumps(numbers)} |")
    print(f"\n{report['seconds']} s in all; logs and gpu_check.json in {out}")
    return 0 if all(row["ok"] for row in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
