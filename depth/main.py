"""NYU-Depth V2: `python -m depth.main CONFIG --backbone PATH` (torchrun for multi-GPU)."""

import sys

from segmentation.runner import main

if __name__ == "__main__":
    sys.exit(main("depth"))
