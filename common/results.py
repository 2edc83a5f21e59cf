"""Top-k counting across ranks, and the results.json + stdout table every eval writes."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import atomic_write_json


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their target among the top-k scores, for each k (k capped at #classes)."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == targets.view(-1, 1)
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).to(torch.float64)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)


def write_results(output_dir: str | Path, results: dict) -> Path:
    return atomic_write_json(results, Path(output_dir) / "results.json")
