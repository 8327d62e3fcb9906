"""Evaluate a checkpoint: `python jobs/evaluate.py RUN_DIR/checkpoints/best.pt --split test`.

Prints accuracy, top-5, macro F1, a per-class report and the average precision per class, and
writes them with the confusion matrix (JSON and PNG) and the per-class precision-recall curves
(pr_curves.png; beyond 20 classes, the 20 with the lowest AP) to RUN_DIR/eval/SPLIT. Also runs
under torchrun (each rank evaluates its own shards).
"""
from __future__ import annotations

import json

from imgcls.cli import entry_point
from imgcls.evaluation import evaluate_checkpoint
from imgcls.tracking import configure_logging
from jobs import ArgumentParser, add_device_argument, add_output_argument


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("checkpoint", help="a checkpoint file or URL (RUN_DIR/checkpoints/*.pt)")
    parser.add_argument("--split", default="test", help="split of the manifest (default: %(default)s)")
    parser.add_argument("--data", default="", help="shard dataset URL (default: the checkpoint's data.url)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    add_output_argument(parser, "output dir (default: RUN_DIR/eval/SPLIT)")
    add_device_argument(parser)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    is_main = configure_logging()
    result = evaluate_checkpoint(args.checkpoint, args.split, args.data, not args.no_ema, args.output,
                                 device=args.device)
    if is_main:
        print(result["report"])
        summary = {k: result[k] for k in ("split", "weights", "views", "count", "acc", "balanced_acc", "top5",
                                            "macro_f1", "mean_average_precision", "map", "micro_f1", "threshold",
                                            "loss", "out_dir")
                   if k in result}  # a multi-label split has no views, balanced accuracy or top-5
        print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
