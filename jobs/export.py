"""Export a checkpoint for deployment:
`python jobs/export.py CHECKPOINT --format onnx|torchscript|tflite [--output PATH]`.

Exports the EMA weights when the checkpoint has them, in fp32; ONNX gets a dynamic batch axis,
TFLite (litert-torch; `pip install -e .[tflite]`) a batch of 1. The class names, input shape and
normalisation go beside the model (PATH.json) and inside it (ONNX metadata_props, a TorchScript
extra file, a TFLite metadata entry). The export is then loaded back (onnxruntime,
torch.jit.load, the LiteRT interpreter) and compared with the PyTorch model on the dataset's
test samples: the maximum absolute logit difference and the top-1 agreement are printed, and
the job fails when the difference exceeds --atol. The metadata also records the model's
behaviour on the validation split (accuracy, predicted-class and confidence distributions,
the abnormal-input threshold) for jobs/serve.py's monitoring. Default PATH: beside the checkpoint
(best.pt -> best.onnx, best.torchscript.pt, best.tflite).

The exported files are programs for their runtimes: hand them on, and load them, only from a
trusted source (see imgcls/inference.py).
"""
from __future__ import annotations

import json
import sys

from imgcls.cli import entry_point
from imgcls.export import FORMATS, export_checkpoint
from imgcls.tracking import configure_logging
from jobs import ArgumentParser, add_output_argument


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("checkpoint", help="a checkpoint file or URL (RUN_DIR/checkpoints/*.pt)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="default: %(default)s")
    add_output_argument(parser, "output file (default: beside the checkpoint)")
    parser.add_argument("--data", default="", help="shard dataset URL (default: the checkpoint's data.url)")
    parser.add_argument("--split", default="test", help="split checked against (default: %(default)s)")
    parser.add_argument("--check-samples", type=int, default=1000,
                        help="samples checked; 0: all (default: %(default)s)")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="max abs logit difference allowed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime/LiteRT threads; 0: its default")
    parser.add_argument("--reference-split", default="val",
                        help="split whose accuracy, class and confidence distributions the metadata records "
                             "for serve's monitoring; '' to skip (default: %(default)s)")
    parser.add_argument("--reference-samples", type=int, default=5000,
                        help="samples of --reference-split; 0: all (default: %(default)s)")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    result = export_checkpoint(args.checkpoint, args.format, args.output, args.data, args.split, args.check_samples,
                               args.threads, args.reference_split, args.reference_samples)
    result.pop("meta")
    print(f"exported {result['weights']} weights to {result['path']} ({result['bytes'] / 1e6:.2f} MB), "
          f"metadata in {result['sidecar']}")
    print(f"check on {result['samples']} {result['split']} samples: max |logit difference| "
          f"{result['max_abs_diff']:.3g}, top-1 agreement {100 * result['top1_agreement']:.2f}%")
    print(json.dumps(result))
    if result["max_abs_diff"] > args.atol:
        print(f"error: the export differs from the PyTorch model by more than --atol {args.atol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
