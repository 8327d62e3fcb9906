"""How long a checkpoint blocks training: synchronous save against BackgroundSaver, to S3.

    .venv/bin/python bench/checkpoint_io.py                 # 100M parameters, 3 repetitions
    .venv/bin/python bench/checkpoint_io.py --params 25e6 --reps 5

The state is a ResNet-like dict of float32 tensors holding `--params` parameters in total
(100M: 400 MB), written to a moto S3 server started here on 127.0.0.1 (the endpoint the
tests use), keep_last=2 as in training. In each repetition, interleaved so machine load hits
both alike:

(sync)        checkpoint.save(state, ...): serialise, upload, verify, prune. Training is
              blocked for all of it.
(background)  BackgroundSaver.save(state, ...): training is blocked for the copy of the
              state to host memory only; serialise, upload, verify and prune run in a
              thread. `durable` is the time until wait() returns: the earliest the next
              checkpoint may start without blocking.

Reported: mean ± std over the repetitions of the blocked time of each, the background's
time to durable, and the ratio blocked(background) / blocked(sync) against the target
(<= 10%). The background write is not free: it competes with training for CPU (and the
GIL) while it runs, so a stand-in training step (matmuls) is timed idle and during the write.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_RATIO = 0.10
TENSOR_PARAMS = 4_000_000  # ~ the largest ResNet-50 layer (2048x2048 conv in fp32: 4.2M)


# ---- a real S3 endpoint ----------------------------------------------------------------
def start_moto(log_dir: str) -> subprocess.Popen:
    """moto's S3 server on a free loopback port; the AWS env (and so s3fs) points at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(os.path.join(log_dir, "moto.log"), "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"moto did not listen on 127.0.0.1:{port}") from None
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return proc


def make_state(params: int) -> dict:
    import torch

    sizes = [TENSOR_PARAMS] * (params // TENSOR_PARAMS) + ([params % TENSOR_PARAMS] if params % TENSOR_PARAMS else [])
    model = {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
    return {"model": model, "progress": {"step": 0}, "config": {"model": {"name": "bench"}}}


# ---- one measurement each ----------------------------------------------------------------
def time_sync(state: dict, run_dir: str, step: int) -> float:
    from imgcls import checkpoint

    start = time.perf_counter()
    checkpoint.save(state, run_dir, step, keep_last=2)
    return time.perf_counter() - start


def fake_step(x):
    """A stand-in for a training step's CPU work (the GIL is released inside matmul)."""
    for _ in range(4):
        x = (x @ x).tanh_()
    return x


def step_time(x, seconds: float = 1.0) -> float:
    """Mean time of fake_step over `seconds` on an idle process."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fake_step(x)
        n += 1
    return (time.perf_counter() - start) / n


def time_background(saver, state: dict, step: int, x) -> tuple[float, float, float]:
    """(blocked, durable, step time while the write runs): training goes on after save()."""
    start = time.perf_counter()
    saver.save(state, step)
    blocked = time.perf_counter() - start
    n, work_start = 0, time.perf_counter()
    while saver.busy:
        fake_step(x)
        n += 1
    work = (time.perf_counter() - work_start) / max(n, 1)
    saver.wait()
    return blocked, time.perf_counter() - start, work


def summary(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:.3f} ± {spread * scale:.3f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import s3fs
    import torch

    from imgcls import checkpoint

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        moto = start_moto(tmp)
        try:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            state = make_state(int(args.params))
            size_mb = sum(t.numel() * t.element_size() for t in state["model"].values()) / 2**20
            sync_dir, bg_dir = f"s3://{bucket}/sync", f"s3://{bucket}/background"
            saver = checkpoint.BackgroundSaver(bg_dir, keep_last=2)
            x = torch.randn(256, 256) / 16
            time_sync(state, sync_dir, 0)  # warm-up: connections, the bucket, allocator
            time_background(saver, state, 0, x)
            sync, blocked, durable, idle_step, busy_step = [], [], [], [], []
            for rep in range(1, args.reps + 1):
                sync.append(time_sync(state, sync_dir, rep))
                idle_step.append(step_time(x))
                b, d, w = time_background(saver, state, rep, x)
                blocked.append(b)
                durable.append(d)
                busy_step.append(w)
                print(f"rep {rep}: sync {sync[-1]:.3f} s | background blocked {b:.3f} s, durable {d:.3f} s | "
                      f"step {idle_step[-1] * 1e3:.1f} ms idle, {w * 1e3:.1f} ms during the write", flush=True)
        finally:
            moto.terminate()
            moto.wait(timeout=30)

    ratio = statistics.mean(blocked) / statistics.mean(sync)
    print(f"\nstate: {args.params / 1e6:.0f}M float32 parameters ({size_mb:.0f} MB) to moto S3 on 127.0.0.1; "
          f"{args.reps} interleaved repetitions after a warm-up")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print("| save | training blocked | until durable |")
    print("| --- | --- | --- |")
    print(f"| synchronous `checkpoint.save` | {summary(sync)} | (same) |")
    print(f"| `BackgroundSaver.save` | {summary(blocked)} | {summary(durable)} |")
    print(f"a stand-in training step (4 matmuls 256x256, 1 thread): {summary(idle_step, 1e3, 'ms')} idle, "
          f"{summary(busy_step, 1e3, 'ms')} while the background write runs")
    print(f"blocked ratio background/sync: {ratio:.1%} (target <= {TARGET_RATIO:.0%}): "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
