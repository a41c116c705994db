"""``python -m lorafleet ...`` (and ``torchrun --nproc-per-node G -m lorafleet train cfg.yaml``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
