"""Classify image files: `python jobs/predict.py MODEL IMAGES... [--top-k 3] [--batch-size 64]
[--output out.json|out.csv]`.

MODEL is a checkpoint (.pt, file or URL; class names from its dataset's manifest), or an ONNX
(.onnx), TorchScript (.torchscript.pt) or TFLite (.tflite) export, with their metadata
(MODEL.json or embedded). The format comes from --format or the file name, never from the
contents: any other name is read as a checkpoint, with torch.load(weights_only=True), and a
TorchScript archive named like a checkpoint (say best.pt) is refused rather than executed.
TorchScript, ONNX and TFLite files are programs: use only ones from a trusted source. IMAGES are files,
folders (searched recursively for image files) or globs. Each image is converted to the model's
channels (L or RGB), resized to its input size and normalised with the saved mean/std, as in
training. Prints the top-k classes with probabilities, batch by batch; --output writes JSON or
CSV (by extension). An unreadable image is reported by name (on stderr and as an `error` in the
output) and the rest go on; the exit code is 1 only when no image could be read.
"""
from __future__ import annotations

import csv
import glob
import json
import sys
from pathlib import Path

import numpy as np

from imgcls.cli import entry_point
from imgcls.inference import MODEL_FORMATS, class_probs, labels_over, load_image, open_model, top_classes
from jobs import ArgumentParser, add_device_argument


def image_files(args: list[str]) -> list[str]:
    """Files as given, image files under folders (recursively, sorted), glob matches (sorted).
    A name that matches nothing is kept, to be reported as unreadable."""
    from PIL import Image

    extensions = set(Image.registered_extensions())
    files = []
    for arg in args:
        if Path(arg).is_dir():
            files += sorted(str(p) for p in Path(arg).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif glob.has_magic(arg):
            files += sorted(p for p in glob.glob(arg, recursive=True) if Path(p).is_file()) or [arg]
        else:
            files.append(arg)
    return list(dict.fromkeys(files))  # in order, once each


def predict(model, files: list[str], top_k: int, batch_size: int) -> list[dict]:
    classes = model.meta["classes"]
    results = []
    for start in range(0, len(files), batch_size):
        batch, inputs = [], []
        for path in files[start:start + batch_size]:
            try:
                inputs.append(load_image(path, model.meta))
                batch.append({"path": path})
            except Exception as e:  # PIL raises many kinds for missing, truncated or foreign files
                print(f"error: cannot read {path}: {e}", file=sys.stderr)
                results.append({"path": path, "error": str(e)})
        if not inputs:
            continue
        probs = class_probs(model(np.stack(inputs)), model.meta)
        for record, p in zip(batch, probs):
            record["top_k"] = top_classes(p, classes, top_k)
            if model.meta.get("task") == "multilabel":  # every label over the threshold chosen on val
                record["labels"] = labels_over(p, classes, model.meta["threshold"])
            print(record["path"] + "\t" + ", ".join(f"{t['class']} ({t['prob']:.3f})" for t in record["top_k"]))
            results.append(record)
    order = {path: i for i, path in enumerate(files)}
    return sorted(results, key=lambda r: order[r["path"]])


def write_output(path: str, results: list[dict], model_path: str, top_k: int) -> None:
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            columns = [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("class", "prob")]
            writer.writerow(["path", *columns, "error"])
            for r in results:
                tops = [v for t in r.get("top_k", []) for v in (t["class"], f"{t['prob']:.6f}")]
                writer.writerow([r["path"], *tops, *[""] * (2 * top_k - len(tops)), r.get("error", "")])
    elif path.endswith(".json"):
        Path(path).write_text(json.dumps({"model": model_path, "predictions": results}, indent=2) + "\n")
    else:
        raise ValueError(f"--output {path}: use a .json or .csv file name")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("model", help="checkpoint (.pt), ONNX (.onnx), TorchScript (.torchscript.pt) or TFLite "
                                      "(.tflite) export; exports only from a trusted source")
    parser.add_argument("images", nargs="+", help="image files, folders or globs")
    parser.add_argument("--top-k", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--output", default="",
                        help="write the predictions to a .json or .csv file (default: print them only)")
    parser.add_argument("--data", default="", help="checkpoints only: shard dataset URL for the class names "
                                                   "(default: the checkpoint's data.url)")
    parser.add_argument("--threads", type=int, default=0, help="torch/onnxruntime/LiteRT threads; 0: their default")
    add_device_argument(parser)
    parser.add_argument("--format", choices=MODEL_FORMATS, default="",
                        help="the model's format (default: from its name; torchscript runs the file's code)")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output and not args.output.endswith((".json", ".csv")):
        parser.error("--output must end in .json or .csv")
    files = image_files(args.images)
    if not files:
        parser.error("no image files found")
    model = open_model(args.model, args.threads, args.data, args.format, args.device)
    results = predict(model, files, args.top_k, args.batch_size)
    if args.output:
        write_output(args.output, results, args.model, min(args.top_k, len(model.meta["classes"])))
    read = sum("top_k" in r for r in results)
    print(f"{read} of {len(results)} images classified with {args.model}"
          + (f"; {len(results) - read} unreadable" if read < len(results) else ""), file=sys.stderr)
    return 0 if read else 1


if __name__ == "__main__":
    sys.exit(main())
