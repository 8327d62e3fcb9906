"""Serving throughput and latency: N concurrent HTTP clients against jobs/serve.py, and in-process
batch-1 ONNX Runtime on the same images, in one run; a markdown table.

    .venv/bin/python bench/serve.py                        # the default recipe's model, freshly initialised
    .venv/bin/python bench/serve.py --checkpoint runs/fashion_mnist/checkpoints/best.pt --clients 1 8 32
    .venv/bin/python bench/serve.py --model resnet18        # a model where batching pays

Model: exported to ONNX (as jobs/export.py does) from the checkpoint, or from the model of
--config freshly initialised for 28x28x1 input and 10 classes (see bench/inference.py); the
server serves that ONNX file. Images: PNG files of real test images (checkpoint) or of uniform
noise (fresh model), sent as raw bytes.

- server, C clients: C threads, each with its own keep-alive connection, send --requests
  requests in all, back to back; latency is per request as the client sees it (encode, HTTP,
  decode, batching wait, model), throughput is requests / wall time.
- in-process ORT batch 1: one loop over the same PNG bytes: decode with predict's transform,
  session.run on a batch of 1, softmax; what a script does without a server.
Every configuration runs once per repetition, repetitions interleaved so machine load hits all
alike; reported are mean ± std over repetitions. The clients share the machine with the server
(this bench runs both): on few cores they take CPU from it, so the server numbers are a lower bound.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.inference import fresh_model  # noqa: E402
from imgcls.export import export_onnx, read_samples  # noqa: E402
from imgcls.inference import Predictor, load_checkpoint_model, load_image, softmax  # noqa: E402


def png_bytes(images: np.ndarray, meta: dict) -> list[bytes]:
    """Normalised [N,C,H,W] images back to 8-bit PNG files (in memory)."""
    mean, std = np.asarray(meta["mean"])[:, None, None], np.asarray(meta["std"])[:, None, None]
    files = []
    for image in images:
        pixels = np.clip(np.rint((image * std + mean) * 255), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def in_process(model: Predictor, files: list[bytes], requests: int) -> dict:
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        softmax(model(load_image(io.BytesIO(files[i % len(files)]), model.meta)[None]))
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - start)


def over_http(url: str, files: list[bytes], requests: int, clients: int) -> dict:
    latencies, failures, lock = [], [], threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(index, requests, clients):
                t = time.perf_counter()
                answer = http.post("/predict", content=files[i % len(files)])
                elapsed = time.perf_counter() - t
                with lock:
                    (latencies if answer.status_code == 200 else failures).append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests to {url} failed")
    return summary(latencies, time.perf_counter() - start)


def summary(latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"throughput": len(ms) / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def start_server(model_path: Path, port: int, args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), str(model_path), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                             "--threads", str(args.threads)], cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"jobs/serve.py {model_path} did not come up on port {port}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_sizes(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
              for s in f.samples if not s.labels}
    return values["imgcls_batch_size_sum"], values["imgcls_batch_size_count"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="a trained checkpoint (default: a fresh model)")
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist.yaml"),
                        help="the fresh model's config (default: %(default)s)")
    parser.add_argument("--model", default="", help="fresh model only: another model name (e.g. resnet18)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="default: 1 8 32")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads, server and in-process (default: 1)")
    args = parser.parse_args(argv)

    if args.checkpoint:
        model, meta = load_checkpoint_model(args.checkpoint)
        images, _ = read_samples(meta, "test", 256)
        what = f"{meta['model']} from {args.checkpoint} ({meta['weights']} weights), test images of {meta['data_url']}"
    else:
        model, meta = fresh_model(args.config, args.model)
        images = (np.random.default_rng(0).random((256, 1, 28, 28), dtype=np.float32) - meta["mean"][0]) / meta["std"][0]
        what = f"{meta['model']} from {args.config}, freshly initialised, 28x28x1 uniform-noise PNGs"
    files = png_bytes(images, meta)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, meta, Path(tmp) / "model.onnx")
        baseline = Predictor.from_onnx(onnx_path, meta, args.threads)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(onnx_path, port, args)
        try:
            names = ["in-process ORT batch 1"] + [f"server, {c} client{'s' * (c > 1)}" for c in args.clients]
            runs = {name: [] for name in names}
            batches = {c: [] for c in args.clients}
            over_http(url, files, 50, max(args.clients))  # warm-up: connections, first batches
            in_process(baseline, files, 50)
            for _ in range(args.reps):
                runs[names[0]].append(in_process(baseline, files, args.requests))
                for name, clients in zip(names[1:], args.clients):
                    before = batch_sizes(url)
                    runs[name].append(over_http(url, files, args.requests, clients))
                    after = batch_sizes(url)
                    batches[clients].append((after[0] - before[0]) / (after[1] - before[1]))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"model: {what}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, onnxruntime threads "
          f"{args.threads}; server --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; "
          f"{args.requests} requests per configuration, {args.reps} repetitions, mean ± std\n")
    print("| mode | mean batch | throughput (req/s) | p50 latency (ms) | p99 latency (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, clients in zip(names, [None, *args.clients]):
        r = runs[name]
        batch = f"{statistics.fmean(batches[clients]):.1f}" if clients else "1"
        print(f"| {name} | {batch} | " + " | ".join(
            f"{statistics.fmean(x[k] for x in r):,.1f} ± {statistics.stdev(x[k] for x in r) if len(r) > 1 else 0:,.1f}"
            for k in ("throughput", "p50", "p99")) + " |")


if __name__ == "__main__":
    main()
