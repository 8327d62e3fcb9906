"""Runs: their state, progress and metrics; for submitted runs, their SLURM state and logs.

The code is imgcls/commands/status.py (also installed as `imgcls-status`); this file keeps
`python jobs/status.py` working."""
from imgcls.commands.status import main

if __name__ == "__main__":
    main()
