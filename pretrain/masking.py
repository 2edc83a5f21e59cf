"""Which patches the student's masked view hides (PROTOCOLS A, "Masking")."""

from __future__ import annotations

import torch


def make_masks(
    batch_size: int,
    num_patches: int,
    mask_probability: float,
    mask_ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, N) bool. The first int(p * B) samples are masked (no shuffling), the rest are not.

    Masked sample i hides exactly int(N * r_i) patches at uniformly random positions, with r_i
    stratified over linspace(lo, hi) across the masked samples (all equal for a single ratio).
    """
    masks = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    n_masked = int(mask_probability * batch_size)
    lo, hi = mask_ratio
    ratios = [lo + (hi - lo) * i / max(n_masked - 1, 1) for i in range(n_masked)]
    for i, r in enumerate(ratios):
        k = int(num_patches * r)
        masks[i, torch.randperm(num_patches, generator=generator)[:k]] = True
    return masks
