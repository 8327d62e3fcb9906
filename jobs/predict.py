"""Classify image files: `python jobs/predict.py MODEL IMAGES... [--top-k 3] [--batch-size 64]

The code is imgcls/commands/predict.py (also installed as `imgcls-predict`); this file keeps
`python jobs/predict.py` working."""
import sys

from imgcls.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
