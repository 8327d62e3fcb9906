"""Prune a trained model by weight magnitude and fine-tune it, then report accuracy and size.

The code is imgcls/commands/prune.py (also installed as `imgcls-prune`); this file keeps
`python jobs/prune.py` working."""
import sys

from imgcls.commands.prune import main

if __name__ == "__main__":
    main()
    sys.exit(0)
