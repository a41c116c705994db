"""``python -m lorafleet ...`` and, distributed, ``torchrun --nproc-per-node G -m lorafleet train cfg.yaml``."""

import os
import sys

from .cli import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("lorafleet serve: error: serving under torchrun with more than one rank is not supported yet; "
              "run `lorafleet serve` as one process", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
