"""Top-k counting across ranks, and the results.json + stdout table every eval writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain import distributed as dist_utils


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their target among the top-k scores, for each k (k capped at #classes)."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == targets.view(-1, 1)
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).to(torch.float64)


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """all_reduce(SUM) on the right device for the backend (gloo: CPU, NCCL: the current GPU)."""
    if not dist_utils.is_distributed():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = t.to(dev).clone()
    torch.distributed.all_reduce(t)
    return t.cpu()


def shard(n: int) -> range:
    """This rank's rows of an n-row tensor that every rank holds (each row is counted once)."""
    return range(dist_utils.rank(), n, dist_utils.world_size())


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)


def write_results(output_dir: str | Path, results: dict) -> Path:
    path = Path(output_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return path
