"""The environment of the entry points that tests start as child processes (torchrun, sbatch, kill and rerun)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(gpus: bool = False) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH (what was there stays: it may hold packages
    installed with --target), one OpenMP thread, and no visible GPU unless `gpus`: the multi-process
    tests are CPU dry runs (gloo), and on a one-GPU machine every rank would otherwise take cuda:0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env
