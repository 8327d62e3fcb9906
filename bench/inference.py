"""Inference latency and throughput: eager PyTorch, TorchScript, ONNX Runtime fp32 and INT8, and
with --tflite LiteRT fp32 and INT8, in one run, printed as a markdown table per thread count.

    .venv/bin/python bench/inference.py                    # the default recipe's model, freshly initialised
    .venv/bin/python bench/inference.py --checkpoint runs/fashion_mnist/checkpoints/best.pt
    .venv/bin/python bench/inference.py --threads 1 2 --reps 30

Model: the checkpoint's (EMA weights when it has them, as jobs/export.py exports), or the model
of --config (default configs/fashion_mnist.yaml) freshly initialised for Fashion-MNIST's 28x28x1
input and 10 classes; latency does not depend on the weights' values, and the output says which.
TorchScript, ONNX fp32 and INT8 (and TFLite fp32 and INT8) are the files jobs/export.py and
jobs/quantize.py write (to a temporary directory), loaded back as a deployment would load them.
TFLite graphs have a batch of 1: a larger batch is that many interpreter calls. Inputs are real test images
of the checkpoint's dataset (INT8 calibrated on 512 train samples, seeded), or for the fresh
model standard-normal noise (calibration too).

Timing: torch.set_num_threads(T) and onnxruntime intra_op_num_threads=T (inter-op 1). Every
backend takes and returns numpy arrays. After a warm-up, a repetition runs enough calls to last
~50 ms and gives the mean per-call latency; repetitions of all backends and batch sizes are
interleaved so machine load hits them alike. Reported: median and mean ± std over repetitions,
throughput (batch / median) and the speed-up over eager (eager median / median).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from imgcls.export import (  # noqa: E402
    export_onnx,
    export_tflite,
    export_torchscript,
    quantize_int8,
    quantize_tflite_int8,
    read_samples,
)
from imgcls.inference import META_FORMAT, Predictor, compare_latency, load_checkpoint_model, load_torchscript  # noqa: E402

BACKENDS = ("eager PyTorch", "TorchScript", "ONNX Runtime fp32", "ONNX Runtime INT8")
TFLITE_BACKENDS = ("LiteRT fp32", "LiteRT INT8")


def fresh_model(config: str, model_name: str = "") -> tuple[torch.nn.Module, dict]:
    """The model of `config` (or `model_name` with that config's other settings), freshly
    initialised for 28x28x1 input and 10 classes."""
    from imgcls.config import load_config
    from imgcls.models import build_model

    cfg = load_config(config)
    cfg.model.pretrained = ""
    cfg.model.name = model_name or cfg.model.name
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1).eval()
    meta = {"format": META_FORMAT, "classes": [str(i) for i in range(10)],
            "image": {"height": 28, "width": 28, "channels": 1}, "mean": cfg.data.mean or [0.5],
            "std": cfg.data.std or [0.5], "model": cfg.model.name, "weights": "fresh", "checkpoint": "",
            "data_url": "", "input": "image", "output": "logits"}
    return model, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="a trained checkpoint (default: a fresh model)")
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist.yaml"),
                        help="the fresh model's config (default: %(default)s)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default: 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="default: 1 64")
    parser.add_argument("--reps", type=int, default=20, help="repetitions (default: %(default)s)")
    parser.add_argument("--tflite", action="store_true", help="also LiteRT fp32 and INT8 (litert-torch)")
    args = parser.parse_args(argv)
    backends = BACKENDS + TFLITE_BACKENDS * args.tflite

    if args.checkpoint:
        model, meta = load_checkpoint_model(args.checkpoint)
        what = f"{meta['model']} from {args.checkpoint} ({meta['weights']} weights), test images of {meta['data_url']}"
        images, _ = read_samples(meta, "test", max(args.batch_sizes))
        calibration, _ = read_samples(meta, "train", 512, seed=0)
    else:
        model, meta = fresh_model(args.config)
        what = (f"{meta['model']} from {args.config}, freshly initialised (not trained), 28x28x1 input, "
                f"10 classes, standard-normal inputs")
        rng = np.random.default_rng(0)
        images = rng.standard_normal((max(args.batch_sizes), 1, 28, 28), dtype=np.float32)
        calibration = rng.standard_normal((512, 1, 28, 28), dtype=np.float32)
    params = sum(p.numel() for p in model.parameters())
    batches = [images[np.arange(b) % len(images)] for b in args.batch_sizes]

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8, script = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx"), Path(tmp, "model.torchscript.pt")
        export_onnx(model, meta, fp32)
        quantize_int8(fp32, int8, calibration, meta)
        export_torchscript(model, meta, script)
        tflite, tflite_int8 = Path(tmp, "model.tflite"), Path(tmp, "model.int8.tflite")
        if args.tflite:
            export_tflite(model, meta, tflite)
            quantize_tflite_int8(model, meta, calibration, tflite_int8)
        print(f"model: {what}; {params:,} parameters")
        print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
              f"{args.reps} repetitions of >= 50 ms each")
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = dict(zip(BACKENDS, (
                Predictor.from_torch(model, meta),
                Predictor.from_torch(load_torchscript(script), meta),
                Predictor.from_onnx(fp32, meta, threads),
                Predictor.from_onnx(int8, meta, threads))))
            if args.tflite:
                runners.update(zip(TFLITE_BACKENDS, (Predictor.from_tflite(tflite, meta, threads),
                                                     Predictor.from_tflite(tflite_int8, meta, threads))))
            latency = compare_latency(runners, batches, args.reps)
            print(f"\n### {threads} thread{'s' if threads > 1 else ''} "
                  f"(torch, onnxruntime{' and LiteRT' * args.tflite})\n")
            print("| backend | batch | median ms | mean ± std ms | img/s | speed-up vs eager |")
            print("|---|---:|---:|---:|---:|---:|")
            for batch in args.batch_sizes:
                eager = latency[BACKENDS[0], batch]["median_ms"]
                for name in backends:
                    r = latency[name, batch]
                    print(f"| {name} | {batch} | {r['median_ms']:.3f} | {r['mean_ms']:.3f} ± {r['std_ms']:.3f} "
                          f"| {r['images_per_s']:,.0f} | {eager / r['median_ms']:.2f}x |")


if __name__ == "__main__":
    main()
