"""The command-line tools, thin entry points over the imgcls library (which parses no command
lines): each module's `main(argv=None)` runs as `python jobs/NAME.py` and as the console
script `imgcls-NAME` (jobs/scripts.py). They import each other (slurm_args) as a package.
Console scripts start with their bin folder, not the working directory, on sys.path, so a
user's own `jobs/` folder cannot shadow this package.
"""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """The tools' parser: the module docstring as written, and a bad option or value as one
    line (`error: ...`, exit code 2, from rank 0 only), as every other user error."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str):
        from imgcls.distributed import env_ranks

        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if env_ranks()[0] == 0 else None)


def add_output_argument(parser, help: str, default: str = "") -> None:
    """--output, the one name every tool uses; --out, its old name, still works (unlisted)."""
    parser.add_argument("--output", default=default, help=help)
    parser.add_argument("--out", dest="output", default=argparse.SUPPRESS, help=argparse.SUPPRESS)



def add_device_argument(parser) -> None:
    """--device, as training's run.device: auto takes the GPU when CUDA is usable; cuda without
    CUDA is a one-line error, not a silent CPU run."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when usable, else the CPU (default: %(default)s)")
