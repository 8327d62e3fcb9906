"""The command-line tools: each module's `main(argv=None)` is one console script
(`imgcls-train` -> imgcls.commands.train:main, see setup.cfg) and one `jobs/NAME.py` file.

They live in the package, under a name of its own, so that a folder called `jobs/` in the
user's working directory cannot shadow them, and so they import each other (slurm_args) as
any module does.
"""
from __future__ import annotations

import argparse
import importlib


def _console_script(name: str):
    """`imgcls-NAME`: runs imgcls.commands.NAME.main(). Some mains return their results (a
    dict) for tests and callers; as an exit code that would print the dict and exit 1."""
    def run() -> int:
        result = importlib.import_module(f"{__name__}.{name}").main()
        return result if isinstance(result, int) else 0
    run.__name__ = run.__qualname__ = name
    return run


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


# The console scripts of setup.cfg, one per jobs/NAME.py.
train = _console_script("train")
submit = _console_script("submit")
evaluate = _console_script("evaluate")
predict = _console_script("predict")
export = _console_script("export")
quantize = _console_script("quantize")
prune = _console_script("prune")
sweep = _console_script("sweep")
status = _console_script("status")
serve = _console_script("serve")
