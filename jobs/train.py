"""Train a classifier: `python jobs/train.py [--config FILE] [key=value ...]`.

Launch with plain python (one process), `torchrun --nproc-per-node N jobs/train.py ...`, or
`srun python jobs/train.py ...` (one task per GPU; ranks come from the SLURM env).
Re-running with the same run.dir resumes from its newest good checkpoint.
"""
from __future__ import annotations

import json
import sys

from imgcls.cli import entry_point
from imgcls.config import config_yaml, load_config
from imgcls.tracking import configure_logging
from imgcls.trainer import train
from jobs import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--config", default="", help="YAML config, e.g. configs/photos.yaml; "
                        "default: none, the neutral defaults in docs/config.md")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, before or after the options, e.g. train.epochs=3")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return {}
    is_main = configure_logging()
    result = train(cfg)
    if is_main:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
