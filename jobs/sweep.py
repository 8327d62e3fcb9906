"""Optuna hyperparameter sweep: every trial is a training run, as a SLURM job through submitit or locally.

The code is imgcls/commands/sweep.py (also installed as `imgcls-sweep`); this file keeps
`python jobs/sweep.py` working."""
import sys

from imgcls.commands.sweep import main

if __name__ == "__main__":
    main()
    sys.exit(0)
