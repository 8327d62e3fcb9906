"""Prune a trained model by weight magnitude and fine-tune it, then report accuracy and size.

  python jobs/prune.py runs/fm/checkpoints/best.pt --sparsity 0.5 --method unstructured --epochs 3
  python jobs/prune.py runs/fm/checkpoints/best.pt --sparsity 0.3 --method channel --epochs 3 \\
      --run-dir runs/fm-channel30 optim.lr=0.02

A new run (default RUN_DIR-pruned-METHOD-PERCENT next to the checkpoint's run dir) gets the
checkpoint's config with model.pretrained=CHECKPOINT (for an already pruned checkpoint, its weights
with the zeros baked in, RUN_DIR/start_weights.pt), prune.sparsity/method, train.epochs=N and
the key=value overrides (e.g. a lower optim.lr for fine-tuning). It trains in this process (one
process, imgcls.trainer.train; re-running the command resumes it), with the pruning masks applied
right after the trained weights are loaded, so the zeros stay zero while the rest fine-tunes.

It reports, on --split (default test): the accuracy of the checkpoint's weights ("model", the
weights the fine-tuning starts from, not its EMA), right after pruning, and after fine-tuning
(the final checkpoint, its EMA weights when the run keeps an EMA); the measured sparsity; and
the sizes. Sizes, honestly: the pruned model keeps its dense shapes, so its torch.save file is as
big as the original's. Unstructured zeros only pay off once the file is compressed (we gzip it:
RUN_DIR/pruned_weights.pt.gz) or stored in a sparse format on a runtime that uses it. Channel
pruning zeroes whole filters, which could be removed physically (along with the next layer's
matching inputs); we do not do that, so it too shrinks only the compressed file. The table is
printed and written to RUN_DIR/prune_report.json.
"""
from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import torch

from imgcls import checkpoint
from imgcls.cli import entry_point
from imgcls.config import Config, apply_override, from_dict, to_dict
from imgcls.data import ShardReader, read_manifest
from imgcls.evaluation import evaluate, run_dir_of
from imgcls.models.trained import model_from_state
from imgcls.precision import autocast, resolve_precision
from imgcls.pruning import METHODS, apply_pruning, sparsity_report
from imgcls.tracking import configure_logging
from imgcls.trainer import train
from jobs import ArgumentParser
from shardio import storage


def build_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__)
    p.add_argument("checkpoint", help="a checkpoint file or URL (RUN_DIR/checkpoints/*.pt)")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights (or channels) to zero (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default="unstructured", help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default: %(default)s)")
    p.add_argument("--run-dir", default="", help="default: RUN_DIR-pruned-METHOD-PERCENT")
    p.add_argument("--split", default="test", help="split the accuracies are measured on (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied last, e.g. optim.lr=0.02")
    return p


def parse_args(argv):
    return build_parser().parse_intermixed_args(argv)  # positionals before and after options


def fine_tune_config(args, source: dict):
    data = to_dict(from_dict(source))
    url = args.checkpoint if "://" in args.checkpoint else str(Path(args.checkpoint).resolve())
    run_dir = args.run_dir or f"{run_dir_of(url)}-pruned-{args.method}-{round(args.sparsity * 100)}"
    data["model"].update(pretrained=url, freeze_backbone=False, unfreeze_schedule=[])  # every layer fine-tunes
    data["prune"].update(sparsity=args.sparsity, method=args.method)
    data["train"].update(epochs=args.epochs, max_steps=0)
    data["run"].update(dir=run_dir, name="")
    data["hpo"] = to_dict(Config())["hpo"]  # a sweep trial's checkpoint must not report to its study
    data["track"]["run_id"] = ""
    for override in args.overrides:
        apply_override(data, override)
    return from_dict(data)


def accuracy(model, cfg, split: str, manifest: dict) -> float:
    reader = ShardReader(cfg.data, split, rank=0, world_size=1, train=False, manifest=manifest)
    cpu = torch.device("cpu")
    return evaluate(model, reader, cpu, autocast(cpu, resolve_precision(cfg.train.precision, cpu)),
                    len(manifest["classes"]), flip=cfg.train.eval_flip, shift=cfg.train.eval_shift)["acc"]


def sizes(model) -> tuple[int, int]:
    """(torch.save bytes, gzip -9 bytes) of the model's state_dict."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    raw = buffer.getvalue()
    return len(raw), len(gzip.compress(raw, 9))


@entry_point
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_logging()
    source = checkpoint.load(args.checkpoint)
    cfg = fine_tune_config(args, source["config"])
    manifest = read_manifest(cfg.data.url)

    original, _ = model_from_state(source, manifest, use_ema=False)  # where fine-tuning starts
    if from_dict(source["config"]).prune.sparsity > 0:
        # pruning a pruned run again: load_pretrained reads plain `weight` tensors, not
        # weight_orig/weight_mask, so start from its weights with the zeros baked in
        cfg.model.pretrained = storage.join(cfg.run.dir, "start_weights.pt")
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        storage.write_bytes_atomic(cfg.model.pretrained, buffer.getvalue())
    before = accuracy(original, cfg, args.split, manifest)
    dense_bytes, dense_gz = sizes(original)
    just_pruned = accuracy(apply_pruning(original, cfg.prune), cfg, args.split, manifest)

    result = train(cfg)
    final, final_url = checkpoint.load_latest(cfg.run.dir)
    tuned, weights = model_from_state(final, manifest)  # masks made permanent
    after = accuracy(tuned, cfg, args.split, manifest)
    sparsity = sparsity_report(tuned, cfg.prune.method)
    buffer = io.BytesIO()
    torch.save(tuned.state_dict(), buffer)
    storage.write_bytes_atomic(storage.join(cfg.run.dir, "pruned_weights.pt"), buffer.getvalue())
    storage.write_bytes_atomic(storage.join(cfg.run.dir, "pruned_weights.pt.gz"), gzip.compress(buffer.getvalue(), 9))
    pruned_bytes, pruned_gz = sizes(tuned)

    report = {
        "checkpoint": args.checkpoint, "run_dir": cfg.run.dir, "final_checkpoint": final_url,
        "method": cfg.prune.method, "target_sparsity": cfg.prune.sparsity, "epochs": cfg.train.epochs,
        "train_status": result["status"], "split": args.split,
        "accuracy": {"original": before, "pruned": just_pruned, "fine_tuned": after},
        "fine_tuned_weights": weights,
        "sparsity": {"pruned_layers": sparsity["pruned"], "all_conv_linear": sparsity["overall"],
                     "layers": {k: v["sparsity"] for k, v in sparsity["layers"].items()}},
        "bytes": {"dense": dense_bytes, "dense_gzip": dense_gz, "pruned": pruned_bytes, "pruned_gzip": pruned_gz},
        "channels_removed": False,  # channel pruning zeroes filters; the shapes stay
    }
    storage.write_bytes_atomic(storage.join(cfg.run.dir, "prune_report.json"), json.dumps(report, indent=2).encode())
    print_report(report)
    return report


def print_report(r: dict) -> None:
    acc, size = r["accuracy"], r["bytes"]
    print(f"\n{r['method']} pruning at {r['target_sparsity']:.0%}, {r['epochs']} fine-tuning epochs "
          f"({r['train_status']}), {r['split']} split; run dir {r['run_dir']}")
    rows = [("original checkpoint", acc["original"], size["dense"], size["dense_gzip"]),
            ("pruned, before fine-tuning", acc["pruned"], None, None),
            (f"pruned + fine-tuned ({r['fine_tuned_weights']})", acc["fine_tuned"], size["pruned"],
             size["pruned_gzip"])]
    print(f"{'':34} {'accuracy':>9} {'file bytes':>11} {'gzip bytes':>11}")
    for name, a, raw, gz in rows:
        print(f"{name:34} {a:>9.4f} {raw if raw else '':>11} {gz if gz else '':>11}")
    print(f"sparsity: {r['sparsity']['pruned_layers']:.1%} of the pruned layers' weights, "
          f"{r['sparsity']['all_conv_linear']:.1%} of all conv/linear weights are zero")
    print("the pruned weights keep their dense shapes: only the compressed file shrinks"
          + (" (zeroed channels are not removed)" if r["method"] == "channel" else ""))


if __name__ == "__main__":
    main()
    sys.exit(0)
