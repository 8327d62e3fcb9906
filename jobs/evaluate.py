"""Evaluate a checkpoint: `python jobs/evaluate.py RUN_DIR/checkpoints/best.pt --split test`.

The code is imgcls/commands/evaluate.py (also installed as `imgcls-evaluate`); this file keeps
`python jobs/evaluate.py` working."""
from imgcls.commands.evaluate import main

if __name__ == "__main__":
    main()
