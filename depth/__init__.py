"""NYU-Depth V2 monocular depth on mmsegmentation 1.x (PROTOCOLS E)."""
