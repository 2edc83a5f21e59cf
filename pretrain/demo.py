"""`make demo`: distil a ViT-Tiny on CPU from real photographs shipped with scikit-image, then draw the
PCA picture of teacher and student on them.

A five-photo proxy dataset in the spirit of the paper's single-image ablation. TEACHER (default
dinov2_vits14) and TEACHER_CHECKPOINT (environment) pick the teacher. Without a checkpoint the
teacher's official file is taken from torch hub's cache, downloaded there on first use; only when
that fails is the teacher random, and the run says why.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

import models
from common.cli import run
from common.io import prepare_output_dir
from models import TEACHERS
from models.checkpoints import backbone_name
from models.errors import UsageError
from models.teachers import DownloadError, download

from . import main as pretrain_main
from .pca import THRESHOLD, write_pictures

OUT = Path("demo_output")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")  # CC0 / public domain
PCA_SIZE = 448  # the pictures' short side, as in scripts.visualize_pca
# fmt: off
TRAINING = [
    "--student", "vit_tiny", "--input-size", "224", "--batch-size", "4", "--epochs", "5", "--warmup-epochs", "1",
    "--epoch-length", "20", "--lr", "2e-2", "--min-lr", "1e-4", "--num-workers", "0", "--device", "cpu",
    "--precision", "fp32",  # bf16 autocast is slower than fp32 on most CPUs
    "--print-freq", "10",
]
# fmt: on


def write_photos(root: Path) -> None:
    import skimage.data

    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(root / name / f"{name}.jpg", quality=95)


def official_teacher(teacher: str) -> Path | None:
    """The teacher's official file in torch hub's cache, downloaded there on first use; None, with one line
    saying why, when the download fails (no network, an HTTP error)."""
    url = TEACHERS[teacher].url
    try:
        return download(url)  # says "downloading <url> -> <file>" when it fetches
    except DownloadError as e:
        print(
            f"WARNING: no TEACHER_CHECKPOINT and the download of {url} failed ({e.reason}): using a RANDOM {teacher}; "
            "the student learns nothing meaningful",
            flush=True,
        )
        return None


def demo() -> int:
    teacher = os.environ.get("TEACHER") or "dinov2_vits14"
    if teacher not in TEACHERS:
        raise UsageError(f"unknown TEACHER '{teacher}'; choose from {', '.join(TEACHERS)}")
    photos = OUT / "data" / "train"
    try:
        write_photos(photos)
    except (ImportError, OSError) as e:
        raise UsageError(f"cannot write the demo's photos under {OUT / 'data'}: {e}") from None
    checkpoint = os.environ.get("TEACHER_CHECKPOINT") or official_teacher(teacher)
    out = OUT / f"{teacher}_to_vit_tiny"
    argv = ["--data-path", str(OUT / "data"), "--teacher", teacher, *TRAINING, "--output-dir", str(out)]
    if checkpoint:
        print(f"teacher: {teacher} from {checkpoint}", flush=True)
        argv += ["--teacher-checkpoint", str(checkpoint)]
    else:
        argv += ["--random-teacher"]
    # always anew; the last run is replaced once inputs are checked
    rc = pretrain_main.distil(pretrain_main.get_args_parser().parse_args(argv), fresh=True)
    if rc:
        return rc
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    print("\nloss per epoch (total = token + patch + feature):")
    for e in epochs:
        print(
            f"  epoch {e['epoch']}: {e['train_loss']:.4f} = {e['train_loss_token']:.4f} + "
            f"{e['train_loss_patch']:.4f} + {e['train_loss_fea']:.4f}  ({e['images_per_sec']:.1f} img/s)"
        )
    drop = 100 * (1 - epochs[-1]["train_loss"] / epochs[0]["train_loss"])
    print(f"loss fell {drop:.1f}% from the first to the last epoch")
    student = out / "backbone.pth"
    print(f"student backbone: {student}")
    print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}")
    # The PCA picture: the teacher (when real) built as in training, so CLIP's normalisation is honoured.
    nets = [models.create_teacher(teacher, checkpoint)] if checkpoint else []
    names = [backbone_name(checkpoint)] if checkpoint else []
    nets.append(models.load_backbone(student).eval())
    names.append(backbone_name(student))
    pictures = prepare_output_dir(OUT / "pca")
    images = [photos / name / f"{name}.jpg" for name in PHOTOS]
    write_pictures(images, nets, names, out=pictures, size=PCA_SIZE, device=torch.device("cpu"), threshold=THRESHOLD)
    print(f"PCA pictures (input | {' | '.join(names)}), one per photo: {pictures}")
    return 0


def main() -> int:
    return run(demo, during="the demo")


if __name__ == "__main__":
    sys.exit(main())
