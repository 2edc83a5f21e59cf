"""The DINOv2/Proteus PCA picture of one or more backbones, one PNG per image: input | backbone 1 | ...,
each panel under its name (the backbone's folder and file name).

python -m scripts.visualize_pca --backbone out/s/backbone.pth --backbone dinov2_vitb14_pretrain.pth \
    --images photos/ --output-dir pca/

Each image is resized (bicubic) to --input-size on its short side, the long side keeping the aspect
ratio, both rounded to a multiple of the patch size; an image more elongated than MAX_ASPECT:1 is drawn
smaller, its long side at most MAX_ASPECT x --input-size (a 10000x10 image would otherwise ask for a
448000-pixel-long input, gigabytes), with a note. The picture of `x.jpg` is `<output-dir>/x.png`: two
images that would share that name (x.jpg and x.png) are refused before anything runs, rather than one
picture silently overwriting the other. The final-norm patch tokens are reduced as in
`pretrain/pca.py`, which draws the picture for this script and the demo (first component thresholded
for the foreground, the minority side; 3-component PCA of the foreground as RGB; background black)
and upsampled (nearest) to the input size.
Deterministic: the same inputs give byte-identical PNGs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image

import models
from common.cli import BACKBONE_HELP, ArgumentParser, Store, run
from common.distributed import resolve_device
from common.images import IMAGE_ERRORS
from common.io import prepare_output_dir
from models.checkpoints import backbone_name
from models.errors import MissingFile, UsageError
from pretrain.pca import THRESHOLD, input_shape, write_pictures

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_ASPECT = 4  # the long side drawn is at most this many times --input-size


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
        f"keeps the aspect ratio, rounded to a multiple of the patch size, and is at most {MAX_ASPECT} x this: a more "
        "elongated image is drawn smaller)",
    )
    a("--threshold", type=float, default=THRESHOLD, help="foreground: first component (scaled to [0, 1]) above this")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbones run")
    return p


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() in EXTENSIONS:
        return [folder]
    if not folder.is_dir():
        raise MissingFile(f"no image or images folder at {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise MissingFile(f"no images ({', '.join(EXTENSIONS)}) in {folder}")
    check_output_names(paths)
    return paths


def check_output_names(paths: list[Path]) -> None:
    """Each picture is saved as <image stem>.png (pretrain.pca.write_pictures): images whose pictures would
    share a name (x.jpg and x.png; X.png too, on a case-insensitive disk) are refused, naming them."""
    by_name: dict[str, list[Path]] = {}
    for p in paths:
        by_name.setdefault(f"{p.stem}.png".casefold(), []).append(p)
    clashes = [group for group in by_name.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(p.name for p in group) + f" -> {group[0].stem}.png" for group in clashes[:3])
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise UsageError(f"pictures would overwrite each other in --output-dir ({shown}{more}): rename one of each")


def drawn_size(path: Path, size: int, multiple: int) -> int:
    """The short side `path` is drawn at: `size`, or less when its long side would pass MAX_ASPECT x `size`
    (said in a note). An unreadable header is left to write_pictures, which reports the image."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except IMAGE_ERRORS:
        return size
    short = min(size, max(1, size * MAX_ASPECT * min(width, height) // max(width, height)))
    if short < size:
        w, h = input_shape(width, height, short, multiple=multiple)
        print(f"note: {path} is {width}x{height}: drawn at {w}x{h}, the long side at most {MAX_ASPECT} x "
              f"--input-size", flush=True)  # fmt: skip
    return short


def load_backbones(paths: list[str], input_size: int, device: torch.device) -> list[torch.nn.Module]:
    """Every backbone loaded and checked before any image is processed."""
    nets = []
    for path in paths:
        try:
            net = models.load_backbone(path)
        except Exception as e:  # any unreadable file: one clear line, not a traceback
            raise UsageError(f"cannot read backbone {path}: {e}") from None
        patch = net.patch_size
        if input_size % patch:
            raise UsageError(f"--input-size {input_size} is not a multiple of {path}'s patch size {patch}")
        nets.append(net.to(device).eval())
    return nets


def visualize(args: argparse.Namespace) -> None:
    if args.input_size < 1:
        raise UsageError("--input-size must be positive")
    if not 0 <= args.threshold < 1:
        raise UsageError(f"--threshold {args.threshold}: the first component is scaled to [0, 1]; use 0 <= t < 1")
    images = list_images(args.images)
    device = resolve_device(args.device)
    nets = load_backbones(args.backbone, args.input_size, device)
    out = prepare_output_dir(args.output_dir)
    names = [backbone_name(b) for b in args.backbone]
    multiple = math.lcm(*(net.patch_size for net in nets))
    done = sum(
        write_pictures(
            [p],
            nets,
            names,
            out=out,
            size=drawn_size(p, args.input_size, multiple),
            device=device,
            threshold=args.threshold,
        )
        for p in images
    )
    if not done:
        raise UsageError(f"none of the {len(images)} images is readable")
    print(f"{done} pictures (input | {' | '.join(names)}) in {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(visualize, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
