"""``python -m lorafleet ...`` and, distributed, ``torchrun --nproc-per-node G -m lorafleet train|rl|serve ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
