"""INT8 post-training quantization: `python jobs/quantize.py CHECKPOINT_OR_ONNX [--calibration-samples N]`.

A checkpoint is first exported to fp32 ONNX beside it (as jobs/export.py does); an ONNX file
is taken with its metadata (MODEL.json or embedded). onnxruntime's static quantization (QDQ,
per-channel int8 weights, uint8 activations) is calibrated on N samples of the train split in
the training reader's seeded order, without augmentation. Then fp32 and INT8 are compared in
one run: accuracy on the test split, file size, and batch-1 and batch-64 latency
(onnxruntime, repetitions interleaved). Prints a table and writes it as JSON.
Default output: MODEL.int8.onnx (+ .json metadata) and MODEL.int8.quantize.json.

With --tflite, the same table also holds TFLite fp32 and INT8 (litert-torch's static PT2E
quantization, same calibration samples; `pip install -e .[tflite]`), exported from the
checkpoint (an ONNX file's metadata names it): MODEL.tflite and MODEL.int8.tflite. TFLite
graphs have a batch of 1, so their batch-64 latency is 64 calls.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from imgcls.cli import entry_point
from imgcls.export import accuracy, export_checkpoint, export_tflite, quantize_int8, quantize_tflite_int8, read_samples
from imgcls.inference import Predictor, compare_latency, load_checkpoint_model, read_meta
from imgcls.tracking import configure_logging
from jobs import ArgumentParser, add_output_argument

TFLITE_ROWS = ("tflite fp32", "tflite int8")


def tflite_models(meta: dict, fp32_onnx: Path, calibration: np.ndarray, data_url: str) -> dict[str, Path]:
    """TFLite fp32 and static INT8 of the checkpoint the ONNX file was exported from, beside it."""
    model, _ = load_checkpoint_model(meta["checkpoint"], data_url, use_ema=meta["weights"] == "ema")
    fp32, int8 = fp32_onnx.with_suffix(".tflite"), fp32_onnx.with_suffix(".int8.tflite")
    export_tflite(model, meta, fp32)
    quantize_tflite_int8(model, meta, calibration, int8)
    return dict(zip(TFLITE_ROWS, (fp32, int8)))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("model", help="a checkpoint (.pt, file or URL) or an fp32 ONNX export")
    parser.add_argument("--calibration-samples", type=int, default=512, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: %(default)s)")
    parser.add_argument("--data", default="", help="shard dataset URL (default: the model's data_url)")
    parser.add_argument("--test-samples", type=int, default=0,
                        help="test samples for accuracy; 0: all (default: %(default)s)")
    add_output_argument(parser, "INT8 ONNX file (default: MODEL.int8.onnx)")
    parser.add_argument("--report", default="", help="JSON report (default: INT8 file with .quantize.json)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads; 0: its default")
    parser.add_argument("--reps", type=int, default=20, help="latency repetitions (default: %(default)s)")
    parser.add_argument("--tflite", action="store_true", help="also TFLite fp32 and INT8 (litert-torch)")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()

    if args.model.endswith(".onnx"):
        fp32 = Path(args.model)
    else:
        exported = export_checkpoint(args.model, "onnx", data_url=args.data, threads=args.threads)
        fp32 = Path(exported["path"])
        print(f"exported {fp32}: max |logit difference| {exported['max_abs_diff']:.3g} vs PyTorch")
    meta = read_meta(fp32)
    int8 = Path(args.output or fp32.with_suffix(".int8.onnx"))
    calibration, _ = read_samples(meta, "train", args.calibration_samples, args.data, seed=args.seed)
    quantize_int8(fp32, int8, calibration, meta)

    images, labels = read_samples(meta, "test", args.test_samples, args.data)
    paths = {"fp32": fp32, "int8": int8}
    models = {name: Predictor.from_onnx(path, meta, args.threads) for name, path in paths.items()}
    if args.tflite:
        paths.update(tflite_models(meta, fp32, calibration, args.data))
        models.update({name: Predictor.from_tflite(paths[name], meta, args.threads) for name in TFLITE_ROWS})
    batches = [images[np.arange(b) % len(images)] for b in (1, 64)]  # real images; repeated if the split is tiny
    latency = compare_latency(models, batches, args.reps)
    rows = {name: {"path": str(path), "bytes": path.stat().st_size,
                   "accuracy": accuracy(models[name], images, labels, name=name),
                   **{f"batch{b}": latency[name, b] for b in (1, 64)}}
            for name, path in paths.items()}
    result = {"calibration_samples": len(calibration), "test_samples": len(images), "threads": args.threads,
              "accuracy_drop_pp": 100 * (rows["fp32"]["accuracy"] - rows["int8"]["accuracy"]),
              "size_ratio": rows["int8"]["bytes"] / rows["fp32"]["bytes"], **rows}
    if args.tflite:
        result["tflite_accuracy_drop_pp"] = 100 * (rows["tflite fp32"]["accuracy"] - rows["tflite int8"]["accuracy"])
        result["tflite_size_ratio"] = rows["tflite int8"]["bytes"] / rows["tflite fp32"]["bytes"]

    print(f"\n{len(calibration)} calibration samples (train, seed {args.seed}), {len(images)} test samples, "
          f"onnxruntime{'/LiteRT' * args.tflite} threads {args.threads or 'default'}\n")
    print("| model | file | size (MB) | test acc | batch 1 ms: median (mean ± std) "
          "| batch 64 ms: median (mean ± std) | img/s at 64 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        b1, b64 = row["batch1"], row["batch64"]
        print(f"| {name} | {row['path']} | {row['bytes'] / 1e6:.3f} | {100 * row['accuracy']:.2f}% "
              f"| {b1['median_ms']:.3f} ({b1['mean_ms']:.3f} ± {b1['std_ms']:.3f}) "
              f"| {b64['median_ms']:.2f} ({b64['mean_ms']:.2f} ± {b64['std_ms']:.2f}) | {b64['images_per_s']:.0f} |")
    print(f"\naccuracy drop {result['accuracy_drop_pp']:.2f} pp, size x{result['size_ratio']:.2f}, latency x"
          f"{rows['int8']['batch1']['median_ms'] / rows['fp32']['batch1']['median_ms']:.2f} (batch 1), x"
          f"{rows['int8']['batch64']['median_ms'] / rows['fp32']['batch64']['median_ms']:.2f} (batch 64) vs fp32")
    if args.tflite:
        print(f"TFLite: accuracy drop {result['tflite_accuracy_drop_pp']:.2f} pp, "
              f"size x{result['tflite_size_ratio']:.2f}, "
              f"latency x{rows['tflite int8']['batch1']['median_ms'] / rows['tflite fp32']['batch1']['median_ms']:.2f}"
              f" (batch 1) vs TFLite fp32")
    report = Path(args.report or int8.with_suffix(".quantize.json"))
    report.write_text(json.dumps(result, indent=2) + "\n")
    print(f"report: {report}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
