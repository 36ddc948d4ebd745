"""Check and measure the GPU path in one command: `PYTHONPATH=src python scripts/gpu_check.py --data DIR --out DIR`."""

import sys

from cnnlab.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
