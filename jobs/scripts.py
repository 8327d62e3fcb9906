"""The console scripts of setup.cfg: `imgcls-NAME` runs jobs.NAME.main().

They live in a module of their own: a function `train` in jobs/__init__.py would be
replaced by the submodule jobs.train as soon as that is imported.
"""
from __future__ import annotations

import importlib


def _console_script(name: str):
    """`imgcls-NAME`: runs jobs.NAME.main(). Some mains return their results (a
    dict) for tests and callers; as an exit code that would print the dict and exit 1."""
    def run() -> int:
        result = importlib.import_module(f"jobs.{name}").main()
        return result if isinstance(result, int) else 0
    run.__name__ = run.__qualname__ = name
    return run


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
