"""Per-iteration learning-rate schedule (the reference stepped per epoch; PROTOCOLS A defects)."""

from __future__ import annotations

import math


def warmup_cosine(
    base: float, final: float, total_iters: int, *, warmup_iters: int, warmup_start: float
) -> list[float]:
    """Linear warmup from `warmup_start` to `base`, then cosine from `base` to `final`."""
    warmup_iters = min(warmup_iters, total_iters)
    sched = [warmup_start + (base - warmup_start) * i / warmup_iters for i in range(warmup_iters)]
    decay = total_iters - warmup_iters
    sched += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / decay)) for i in range(decay)]
    return sched
