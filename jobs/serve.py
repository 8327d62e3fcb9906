"""Serve a classifier over HTTP: `python jobs/serve.py MODEL [--port 8000] [--max-batch 32] [--max-wait-ms 5] [--top-k 3]`.

The code is imgcls/commands/serve.py (also installed as `imgcls-serve`); this file keeps
`python jobs/serve.py` working."""
import sys

from imgcls.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
