"""Which patches the student's masked view hides (PROTOCOLS A, "Masking")."""

from __future__ import annotations

import torch


def make_masks(
    batch_size: int,
    num_patches: int,
    mask_probability: float,
    *,
    mask_ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, N) bool. The first int(p * B) samples are masked (no shuffling), the rest are not.

    Masked sample i hides exactly int(N * r_i) patches at uniformly random positions. For a range
    the ratios are stratified as in the reference: r_i is uniform in the i-th of the n_masked equal
    strata of [lo, hi] (edges linspace(lo, hi, n_masked + 1)); a single ratio (lo == hi) draws nothing.
    """
    masks = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    n_masked = int(mask_probability * batch_size)
    lo, hi = mask_ratio
    for i in range(n_masked):
        r = lo
        if hi > lo:
            a, b = lo + (hi - lo) * i / n_masked, lo + (hi - lo) * (i + 1) / n_masked
            r = a + (b - a) * torch.rand((), generator=generator, dtype=torch.float64).item()
        k = int(num_patches * r)
        masks[i, torch.randperm(num_patches, generator=generator)[:k]] = True
    return masks
