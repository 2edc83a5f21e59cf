"""ADE20K semantic segmentation on mmsegmentation 1.x (PROTOCOLS D)."""
