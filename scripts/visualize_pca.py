"""The DINOv2/Proteus PCA picture of one or more backbones, one PNG per image: input | backbone 1 | ...

python -m scripts.visualize_pca --backbone out/s/backbone.pth --backbone dinov2_vitb14_pretrain.pth \
    --images photos/ --out pca/

Each image is resized to --input-size x --input-size (bicubic; a multiple of the patch size), the
final-norm patch tokens are reduced as in `pretrain/pca.py` (first component thresholded for the
foreground, the minority side; 3-component PCA of the foreground as RGB; background black) and
upsampled (nearest) to the input size. Deterministic: the same inputs give byte-identical PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import models
from linear_eval.features import IMAGE_ERRORS
from models import prepare_output_dir
from pretrain.cli import HelpFormatter
from pretrain.data import load_rgb
from pretrain.distributed import resolve_device
from pretrain.pca import THRESHOLD, pca_images

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Proteus PCA pictures", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--backbone", action="append", required=True, help="anything models.load_backbone reads; repeat to compare")
    a("--images", required=True, help="an image, or a folder of images (jpg, jpeg, png, bmp, webp)")
    a("--out", required=True, help="one PNG per image goes here")
    a(
        "--input-size",
        type=int,
        default=448,
        help="square input side; a multiple of every backbone's patch size (448: 14 and 16)",
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
        patch = net.patch_embed.patch_size[0]
        if input_size % patch:
            raise ValueError(f"--input-size {input_size} is not a multiple of {path}'s patch size {patch}")
        nets.append(net.to(device).eval())
    return nets


def side_by_side(image: Image.Image, nets: list[torch.nn.Module], size: int, device, threshold: float) -> np.ndarray:
    """uint8 [size, (1 + len(nets)) * size, 3]: the resized input, then each backbone's PCA picture."""
    resized = image.resize((size, size), Image.BICUBIC)
    x = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(transforms.functional.to_tensor(resized))
    panels = [np.asarray(resized)]
    for net in nets:
        rgb = pca_images(net, x[None].to(device), threshold)[0]
        panels.append((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return np.concatenate(panels, axis=1)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.input_size < 1:
            raise ValueError("--input-size must be positive")
        if not 0 <= args.threshold < 1:
            raise ValueError(f"--threshold {args.threshold}: the first component is scaled to [0, 1]; use 0 <= t < 1")
        images = list_images(args.images)
        device = resolve_device(args.device)
        nets = load_backbones(args.backbone, args.input_size, device)
        out = prepare_output_dir(args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = 0
    for path in images:
        try:
            picture = side_by_side(load_rgb(path), nets, args.input_size, device, args.threshold)
        except IMAGE_ERRORS as e:
            print(f"warning: unreadable image {path} ({type(e).__name__}: {e}); skipped", file=sys.stderr, flush=True)
            continue
        Image.fromarray(picture).save(out / f"{path.stem}.png")
        done += 1
    if not done:
        print(f"error: none of the {len(images)} images is readable", file=sys.stderr)
        return 2
    print(f"{done} pictures (input | {' | '.join(args.backbone)}) in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
