"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1), as s3fs's own tests use."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """Start moto's S3 server on a free loopback port; point the AWS env (and so s3fs) at it.

    The env is inherited by DataLoader workers and by torchrun/srun children.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-print",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the real S3 endpoint; returns 's3://<bucket>'."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


# A tiny, deterministic, 2-epoch run on the bands dataset (CPU, seconds).
SMALL = [
    "model.name=simple_cnn", "model.width=8", "data.batch_size=16", "data.eval_batch_size=64",
    "data.num_workers=1", "optim.lr=0.05", "optim.base_batch=64", "train.epochs=2",
    "train.accum_steps=2", "train.log_every=2", "train.ckpt_every=5", "train.keep_last=2",
    "track.wandb=disabled", "track.progress=false", "schedule.warmup_epochs=0.2",
    "data.mean=[0.5]", "data.std=[0.25]", "run.deterministic=true", "train.ema_decay=0.9",
]


def needs_fashion_mnist():
    return pytest.mark.skipif(
        not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
        reason="Debian package dataset-fashion-mnist is not installed (CI installs it)")


def build_bands_dataset(workdir: Path, n: int = 2000, size: int = 12, reverse: bool = False,
                        classes: int = 4) -> str:
    """A small learnable dataset as shards (~1400 train / 400 val / 200 test, 100 per shard):
    the class (0 to classes-1) is which horizontal band is bright, unchanged by the flip
    augmentation; counted from the top, or from the bottom with `reverse` (another task)."""
    import numpy as np

    import shards

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 100, (n, size, size, 1), dtype=np.uint8)
    band = size // classes
    for i, label in enumerate(labels):
        row = classes - 1 - label if reverse else label
        images[i, row * band:(row + 1) * band] += 120
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "bands.npz"
    np.savez(src, images=images, labels=labels)
    dest = workdir / "bands"
    shards.build(str(src), str(dest), shard_samples=100, progress=False, workers=1)
    return str(dest)


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, check: bool = True, timeout: int = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(REPO / "jobs" / "train.py"), *args]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result
