"""Submit training to SLURM through submitit: `python jobs/submit.py --nodes 4 --gpus-per-node 8 ...`.

The code is imgcls/commands/submit.py (also installed as `imgcls-submit`); this file keeps
`python jobs/submit.py` working."""
import sys

from imgcls.commands.submit import main

if __name__ == "__main__":
    main()
    sys.exit(0)
