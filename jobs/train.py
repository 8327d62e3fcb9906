"""Train a classifier: `python jobs/train.py [--config FILE] [key=value ...]`.

The code is imgcls/commands/train.py (also installed as `imgcls-train`); this file keeps
`python jobs/train.py` working."""
import sys

from imgcls.commands.train import main

if __name__ == "__main__":
    main()
    sys.exit(0)
