"""INT8 post-training quantization: `python jobs/quantize.py CHECKPOINT_OR_ONNX [--calibration-samples N]`.

The code is imgcls/commands/quantize.py (also installed as `imgcls-quantize`); this file keeps
`python jobs/quantize.py` working."""
import sys

from imgcls.commands.quantize import main

if __name__ == "__main__":
    main()
    sys.exit(0)
