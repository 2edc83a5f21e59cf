"""Download official teacher files into torch hub's cache, where pretraining finds them without
--teacher-checkpoint. Run it where there is network (a cluster's login node) before jobs that have none:

python -m scripts.fetch_teachers dinov2_vitl14 clip_vitb16

The cache is torch hub's ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by default): set the
same TORCH_HOME for the jobs. A file already there is kept. DINOv3's files are gated by Meta: download them
yourself and pass --teacher-checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from common.cli import ArgumentParser, run
from models import TEACHERS
from models.errors import UsageError
from models.teachers import download


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Fetch teachers into torch hub's cache")
    p.add_argument("teachers", nargs="+", metavar="NAME", help=f"one or more of: {', '.join(TEACHERS)}")
    return p


def fetch(args: argparse.Namespace) -> None:
    unknown = [n for n in args.teachers if n not in TEACHERS]
    if unknown:
        raise UsageError(f"unknown teacher {', '.join(unknown)}; choose from {', '.join(TEACHERS)}")
    for name in args.teachers:
        print(f"{name}: {download(TEACHERS[name].url)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(fetch, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
