"""Runs submitted with jobs/submit.py: their SLURM state, progress, metrics and logs.

The code is imgcls/commands/status.py (also installed as `imgcls-status`); this file keeps
`python jobs/status.py` working."""
import sys

from imgcls.commands.status import main

if __name__ == "__main__":
    main()
