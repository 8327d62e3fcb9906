"""The command-line tools: each module's `main(argv=None)` is one console script
(`imgcls-train`, see imgcls/commands/scripts.py) and one `jobs/NAME.py` file.

They live in the package, under a name of its own, so that a folder called `jobs/` in the
user's working directory cannot shadow them, and so they import each other (slurm_args) as
any module does.
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

