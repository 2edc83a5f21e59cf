"""`make demo`: distil a ViT-Tiny on CPU from real photographs shipped with scikit-image.

A five-photo proxy dataset in the spirit of the paper's single-image ablation. TEACHER and
TEACHER_CHECKPOINT (environment) pick a real teacher; without a checkpoint the teacher is random,
and the run says so.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image

from models import TEACHERS

from . import main as pretrain_main

OUT = Path("demo_output")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")  # CC0 / public domain


def write_photos(root: Path) -> None:
    import skimage.data

    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(root / name / f"{name}.jpg", quality=95)


def main() -> int:
    teacher = os.environ.get("TEACHER") or "dinov2_vits14"
    checkpoint = os.environ.get("TEACHER_CHECKPOINT") or None
    if teacher not in TEACHERS:
        print(f"error: unknown TEACHER '{teacher}'; choose from {', '.join(TEACHERS)}", file=sys.stderr)
        return 2
    try:
        write_photos(OUT / "data" / "train")
    except (ImportError, OSError) as e:
        print(f"error: cannot write the demo's photos under {OUT / 'data'}: {e}", file=sys.stderr)
        return 2
    out = OUT / f"{teacher}_to_vit_tiny"
    # fmt: off
    argv = [
        "--data-path", str(OUT / "data"), "--teacher", teacher, "--student", "vit_tiny",
        "--input-size", "224", "--batch-size", "4", "--epochs", "5", "--warmup-epochs", "1",
        "--epoch-length", "20", "--lr", "2e-2", "--min-lr", "1e-4", "--num-workers", "0", "--device", "cpu",
        "--precision", "fp32",  # bf16 autocast is slower than fp32 on most CPUs
        "--print-freq", "10", "--output-dir", str(out),
    ]
    # fmt: on
    if checkpoint:
        argv += ["--teacher-checkpoint", checkpoint]
    else:
        print(
            f"WARNING: no TEACHER_CHECKPOINT given: {teacher} is RANDOMLY INITIALISED, so this demo distils "
            "noise. Pass TEACHER_CHECKPOINT=/path/to/official/file for a real teacher.",
            flush=True,
        )
        argv += ["--random-teacher"]
    rc = pretrain_main.main(argv, fresh=True)  # always anew; the last run is replaced once inputs are checked
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
    print(f"student backbone: {out / 'backbone.pth'}")
    print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
