"""Top-k counting across ranks, the stdout table, and results.json: one schema for every evaluation.

results.json (written by write_results only, atomically):
  task               "linear", "knn", "fine_grained", "segmentation", "depth"
  backbone           {"path": resolved path, "sha256": of the file}
  protocol           the settings that define the numbers (input size, normalisation, global batch, ...)
  metrics            flat {name: value}, e.g. "top-1", "top-1 k=20", "cub200 acc", "mIoU final"
  metric_notes       {name: what the number is of} for some metrics, e.g. the linear probe's best classifier
  unreadable_images  {split: images left out as unreadable}
  timings            {phase: seconds}
  details            task-specific (the 52 classifiers, the C sweeps, the dense runs' iterations, ...)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .io import atomic_write_json, file_sha256


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


SCHEMA = ("task", "backbone", "protocol", "metrics", "metric_notes", "unreadable_images", "timings", "details")


@dataclass
class Results:
    task: str
    backbone: str  # the file; written as {path, sha256}
    protocol: dict
    metrics: dict[str, float]
    unreadable_images: dict[str, int]
    timings: dict[str, float]
    metric_notes: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)


def write_results(output_dir: str | Path, results: Results) -> Path:
    """<output_dir>/results.json in the one schema (SCHEMA's key order)."""
    path = Path(results.backbone).resolve()
    fields = asdict(results) | {"backbone": {"path": str(path), "sha256": file_sha256(path)}}
    return atomic_write_json({key: fields[key] for key in SCHEMA}, Path(output_dir) / "results.json")


class Timer:
    """Seconds per phase for results.json's `timings`: `with timer.phase("features"): ...`; "total" since creation."""

    def __init__(self) -> None:
        self.start, self.seconds = time.perf_counter(), {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        return {name: round(s, 3) for name, s in {**self.seconds, "total": total}.items()}
