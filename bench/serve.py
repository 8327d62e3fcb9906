"""Serving throughput and latency: N concurrent HTTP clients against jobs/serve.py (its /predict,
and the Open Inference Protocol through tritonclient), an A/B traffic split between two versions,
and in-process batch-1 ONNX Runtime on the same images, in one run; a markdown table.

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
- tritonclient, C clients: the same, through tritonclient.http (one client per thread), one
  image per request as a binary BYTES tensor to /v2/models/NAME/infer.
- A/B, C clients: /predict against a second server holding a model repository with the same
  model as versions 1 and 2 and `--traffic model=1:0.9,2:0.1`; each request carries its own
  request id, and the row reports the share version 2 answered.
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


def predict_sender(url: str):
    http = httpx.Client(base_url=url, timeout=60)

    def send(data: bytes, i: int) -> str | None:
        answer = http.post("/predict", content=data, headers={"x-request-id": f"user-{i}"})
        return answer.json()["version"] if answer.status_code == 200 else None
    return send, http.close


def triton_sender(url: str):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)

    def send(data: bytes, i: int) -> str | None:
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=object))
        result = client.infer("model", [tensor], outputs=[triton.InferRequestedOutput("top_k")])
        return result.get_response()["model_version"]
    return send, client.close


def over_http(sender, files: list[bytes], requests: int, clients: int) -> dict:
    """C threads, each with its own client from `sender()`, send `requests` in all."""
    latencies, failures, versions, lock = [], [], [], threading.Lock()

    def client(index: int) -> None:
        send, close = sender()
        try:
            for i in range(index, requests, clients):
                t = time.perf_counter()
                version = send(files[i % len(files)], i)
                elapsed = time.perf_counter() - t
                with lock:
                    (latencies if version else failures).append(elapsed)
                    versions.append(version)
        finally:
            close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed")
    return {**summary(latencies, time.perf_counter() - start), "v2_share": versions.count("2") / len(versions)}


def summary(latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"throughput": len(ms) / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def start_server(model_path: Path, port: int, args, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), str(model_path), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                             "--threads", str(args.threads), *extra], cwd=REPO, stdout=subprocess.DEVNULL)
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
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime threads, server and in-process (default: 1)")
    args = parser.parse_args(argv)

    if args.checkpoint:
        model, meta = load_checkpoint_model(args.checkpoint)
        images, _ = read_samples(meta, "test", 256)
        what = f"{meta['model']} from {args.checkpoint} ({meta['weights']} weights), test images of {meta['data_url']}"
    else:
        model, meta = fresh_model(args.config, args.model)
        images = ((np.random.default_rng(0).random((256, 1, 28, 28), dtype=np.float32) - meta["mean"][0])
                  / meta["std"][0])
        what = f"{meta['model']} from {args.config}, freshly initialised, 28x28x1 uniform-noise PNGs"
    files = png_bytes(images, meta)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, meta, Path(tmp) / "model.onnx")
        repo = Path(tmp) / "repo"
        for version in ("1", "2"):
            export_onnx(model, meta, repo / "model" / version / "model.onnx")
        baseline = Predictor.from_onnx(onnx_path, meta, args.threads)
        url, ab_url = (f"http://127.0.0.1:{port}" for port in (free_port(), free_port()))
        servers = [start_server(onnx_path, int(url.rsplit(":", 1)[1]), args),
                   start_server(repo, int(ab_url.rsplit(":", 1)[1]), args, "--traffic", "model=1:0.9,2:0.1",
                                "--poll-s", "0")]
        modes = {"in-process ORT batch 1": None}
        for c in args.clients:
            plural = "s" * (c > 1)
            modes[f"/predict, {c} client{plural}"] = (url, predict_sender, c)
            modes[f"tritonclient, {c} client{plural}"] = (url, triton_sender, c)
            modes[f"A/B 1:0.9,2:0.1 /predict, {c} client{plural}"] = (ab_url, predict_sender, c)
        try:
            runs = {name: [] for name in modes}
            batches = {name: [] for name in modes}
            for server_url in (url, ab_url):  # warm-up: connections, first batches
                over_http(lambda u=server_url: predict_sender(u), files, 50, max(args.clients))
            over_http(lambda: triton_sender(url), files, 50, max(args.clients))
            in_process(baseline, files, 50)
            for _ in range(args.reps):
                for name, mode in modes.items():
                    if mode is None:
                        runs[name].append(in_process(baseline, files, args.requests))
                        continue
                    server_url, sender, clients = mode
                    before = batch_sizes(server_url)
                    runs[name].append(over_http(lambda s=sender, u=server_url: s(u), files, args.requests, clients))
                    after = batch_sizes(server_url)
                    batches[name].append((after[0] - before[0]) / (after[1] - before[1]))
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)

    print(f"model: {what}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, onnxruntime threads "
          f"{args.threads}; server --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; "
          f"{args.requests} requests per configuration, {args.reps} repetitions, mean ± std\n")
    print("| mode | mean batch | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | answered by v2 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        batch = f"{statistics.fmean(batches[name]):.1f}" if batches[name] else "1"
        share = f"{100 * r[0]['v2_share']:.1f}%" if name.startswith("A/B") else ""
        print(f"| {name} | {batch} | " + " | ".join(
            f"{statistics.fmean(x[k] for x in r):,.1f} ± {statistics.stdev(x[k] for x in r) if len(r) > 1 else 0:,.1f}"
            for k in ("throughput", "p50", "p99")) + f" | {share} |")


if __name__ == "__main__":
    main()
