"""The DINOv2/Proteus PCA picture of one or more backbones, one PNG per image: input | backbone 1 | ...,
each panel under its name (the backbone's folder and file name).

python -m scripts.visualize_pca --backbone out/s/backbone.pth --backbone dinov2_vitb14_pretrain.pth \
    --images photos/ --output-dir pca/

Each image is resized (bicubic) to --input-size on its short side, the long side keeping the aspect
ratio, both rounded to a multiple of the patch size; the final-norm patch tokens are reduced as in
`pretrain/pca.py`, which draws the picture for this script and the demo (first component thresholded
for the foreground, the minority side; 3-component PCA of the foreground as RGB; background black)
and upsampled (nearest) to the input size.
Deterministic: the same inputs give byte-identical PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import models
from common.cli import BACKBONE_HELP, ArgumentParser, Store, run
from common.distributed import resolve_device
from common.io import prepare_output_dir
from models.checkpoints import backbone_name
from pretrain.pca import THRESHOLD, write_pictures

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Proteus PCA pictures")
    a = p.add_argument
    a("--backbone", action="append", required=True, metavar="FILE", help=f"{BACKBONE_HELP}; repeat to compare")
    a("--images", required=True, help="an image, or a folder of images (jpg, jpeg, png, bmp, webp)")
    a("--output-dir", "--out", action=Store, old=("--out",), required=True, metavar="DIR", help="one PNG per image")
    a(
        "--input-size",
        type=int,
        default=448,
        help="the input's short side, a multiple of every backbone's patch size (448: 14 and 16; the long side "
        "keeps the aspect ratio, rounded to a multiple of the patch size)",
    )
    a("--threshold", type=float, default=THRESHOLD, help="foreground: first component (scaled to [0, 1]) above this")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbones run")
    return p


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() in EXTENSIONS:
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"no image or images folder at {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) in {folder}")
    return paths


def load_backbones(paths: list[str], input_size: int, device: torch.device) -> list[torch.nn.Module]:
    """Every backbone loaded and checked before any image is processed."""
    nets = []
    for path in paths:
        try:
            net = models.load_backbone(path)
        except Exception as e:  # any unreadable file: one clear line, not a traceback
            raise ValueError(f"cannot read backbone {path}: {e}") from None
        patch = net.patch_size
        if input_size % patch:
            raise ValueError(f"--input-size {input_size} is not a multiple of {path}'s patch size {patch}")
        nets.append(net.to(device).eval())
    return nets


def visualize(args: argparse.Namespace) -> None:
    if args.input_size < 1:
        raise ValueError("--input-size must be positive")
    if not 0 <= args.threshold < 1:
        raise ValueError(f"--threshold {args.threshold}: the first component is scaled to [0, 1]; use 0 <= t < 1")
    images = list_images(args.images)
    device = resolve_device(args.device)
    nets = load_backbones(args.backbone, args.input_size, device)
    out = prepare_output_dir(args.output_dir)
    names = [backbone_name(b) for b in args.backbone]
    done = write_pictures(images, nets, names, out, args.input_size, device, args.threshold)
    if not done:
        raise ValueError(f"none of the {len(images)} images is readable")
    print(f"{done} pictures (input | {' | '.join(names)}) in {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(visualize, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
