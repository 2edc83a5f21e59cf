"""ADE20K segmentation: `python -m segmentation.main CONFIG --backbone PATH` (torchrun for multi-GPU)."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main("segmentation"))
