"""Export a checkpoint for deployment: `python jobs/export.py CHECKPOINT --format onnx|torchscript|tflite [--output PATH]`.

The code is imgcls/commands/export.py (also installed as `imgcls-export`); this file keeps
`python jobs/export.py` working."""
import sys

from imgcls.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
