"""The DINOv2 PCA picture of patch features, shared by pretraining's tensorboard images, the demo
and `scripts/visualize_pca.py`.

Per image: the first principal component of the patch tokens separates foreground from background;
a second PCA with 3 components on the foreground patches only gives the colours (min-max scaled to
RGB, background black). Deterministic: full SVD (no random low-rank solver) and a fixed sign per
component.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from common.features import eval_transform
from common.images import IMAGE_ERRORS
from models import Teacher

from .data import load_rgb

log = logging.getLogger(__name__)

THRESHOLD = 0.5


def _components(x: torch.Tensor, k: int) -> torch.Tensor:
    """Projections [N, k] of the centred rows of x on their first k principal axes (zero-padded when
    there are fewer), each axis signed so that its largest-magnitude coordinate is positive."""
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    vh = vh[:k]
    vh = vh * torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    proj = x @ vh.T
    return F.pad(proj, (0, k - proj.shape[1]))


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale each column to [0, 1]; a constant column becomes 0."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def foreground_mask(tokens: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """[N] bool: patches whose first principal component, min-max scaled to [0, 1], exceeds threshold.

    The sign of a principal axis is arbitrary, so the side that selects FEWER patches is taken as the
    foreground (objects usually cover less of the picture than the background); a tie keeps the
    SVD's own sign.
    """
    score = _min_max(_components(tokens.float(), 1))[:, 0]
    fg, flipped = score > threshold, (1 - score) > threshold
    return flipped if flipped.sum() < fg.sum() else fg


def pca_rgb(tokens: torch.Tensor, grid: tuple[int, int], threshold: float = THRESHOLD) -> torch.Tensor:
    """[3, h, w] in [0, 1] from patch tokens [h*w, D]: foreground coloured by its own 3-component
    PCA, background black. With fewer than 3 foreground patches every patch counts as foreground."""
    tokens = tokens.float()
    fg = foreground_mask(tokens, threshold)
    if fg.sum() < 3:
        fg = torch.ones_like(fg)
    rgb = torch.zeros(len(tokens), 3)
    rgb[fg] = _min_max(_components(tokens[fg], 3)).cpu()
    return rgb.T.reshape(3, *grid)


@torch.no_grad()
def pca_images(model: torch.nn.Module, images: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """[B, 3, H, W] PCA pictures (float in [0, 1], nearest-upsampled to the input size) of a
    DINOv2-API ViT's or a models.Teacher's final-norm patch tokens, from ImageNet-normalised images (a
    Teacher re-normalises them as in training); run in eval mode, mode restored. Non-finite features give black
    pictures and a warning."""
    was_training = model.training
    model.eval()
    if isinstance(model, Teacher):
        tokens = model.targets(images).patches
    else:
        tokens = model.forward_tokens(images).patches
    tokens = tokens.float().cpu()
    model.train(was_training)
    if not torch.isfinite(tokens).all():  # the SVD would fail; a run stops on non-finite numbers elsewhere, not here
        log.warning("PCA picture: the features are not finite (NaN or inf); the picture is left black")
        return torch.zeros(images.shape[0], 3, *images.shape[-2:])
    patch = model.patch_size
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    small = torch.stack([pca_rgb(t, (h, w), threshold) for t in tokens])
    return F.interpolate(small, size=images.shape[-2:], mode="nearest")


def first_images(dataset, input_size: int, n: int = 4, *, max_skips: int = 50) -> torch.Tensor | None:
    """A fixed batch of the dataset's first n readable images under the eval transform (Resize +
    CenterCrop, ImageNet normalisation): an ImageFolder (`samples`) or a single-image dataset (`image`).
    Unreadable images are reported by path and skipped (at most `max_skips`); None when none is readable."""
    transform = eval_transform(input_size, None)
    while hasattr(dataset, "dataset"):  # wrappers (Subset, the seeded dataset of pretraining)
        dataset = dataset.dataset
    if not hasattr(dataset, "samples"):
        return transform(dataset.image)[None]
    pictures = []
    for path, _ in dataset.samples[: n + max_skips]:
        try:
            pictures.append(load_rgb(dataset.source(path)))
        except IMAGE_ERRORS as e:
            log.warning("PCA picture: skipping unreadable image %s (%s)", path, e)
        if len(pictures) == n:
            break
    return torch.stack([transform(p) for p in pictures]) if pictures else None


def pca_grid(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[3, 2H, n*W] for tensorboard's add_image: the batch's images (ImageNet-normalised, shown as they
    are read) side by side on top, each one's PCA picture below it."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    inputs = (images.cpu().float() * std + mean).clamp(0, 1)
    return torch.cat([torch.cat(list(inputs), dim=2), torch.cat(list(pca_images(model, images)), dim=2)], dim=1)


def input_shape(width: int, height: int, size: int, *, multiple: int) -> tuple[int, int]:
    """(width, height) with the short side `size` and the aspect ratio kept, each a multiple of `multiple`."""
    scale = size / min(width, height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def label(text: str, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: black text on white, cut at the start ("...") when wider than the panel."""
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=round(height * 0.7))
    shown = text
    while len(shown) > 1 and draw.textlength(shown, font=font) > width - 4:
        text = text[1:]
        shown = "..." + text
    draw.text((width / 2, height / 2), shown, fill="black", font=font, anchor="mm")
    return np.asarray(strip)


def label_height(size: int) -> int:
    """The name strip above a panel: 28 px at the default 448, readable at tiny sizes."""
    return max(12, size // 16)


GAP = 4  # white pixels between panels


def side_by_side(
    image: Image.Image, nets: list[torch.nn.Module], names: list[str], *, size: int, device, threshold: float
) -> np.ndarray:
    """uint8 [label + H, (1 + len(nets)) * (W + GAP) - GAP, 3]: the resized input, then each backbone's PCA
    picture, each under its name; H x W keeps the image's aspect ratio (short side `size`)."""
    multiple = math.lcm(*(net.patch_size for net in nets))
    resized = image.resize(input_shape(*image.size, size, multiple=multiple), Image.BICUBIC)
    pixels = transforms.functional.to_tensor(resized)
    panels = [np.asarray(resized)]
    for net in nets:  # each normalised as its inputs were in training (a teacher converts the crops' itself)
        x = transforms.Normalize(net.normalization.mean, net.normalization.std)(pixels)
        rgb = pca_images(net, x[None].to(device), threshold)[0]
        panels.append((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    titles = [f"input {image.width}x{image.height}", *names]
    labelled = [np.concatenate([label(t, resized.width, label_height(size)), p]) for t, p in zip(titles, panels)]
    gap = np.full((labelled[0].shape[0], GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([x for panel in labelled for x in (gap, panel)][1:], axis=1)


def write_pictures(
    images: list[Path], nets: list[torch.nn.Module], names: list[str], *, out: Path, size: int, device, threshold: float
) -> int:
    """`side_by_side` of each image, saved as out/<image name>.png; an unreadable image is reported by path
    and skipped. Returns how many pictures were written."""
    done = 0
    for path in images:
        try:
            picture = side_by_side(load_rgb(path), nets, names, size=size, device=device, threshold=threshold)
        except IMAGE_ERRORS as e:
            print(f"warning: unreadable image {path} ({type(e).__name__}: {e}); skipped", file=sys.stderr, flush=True)
            continue
        Image.fromarray(picture).save(out / f"{path.stem}.png")
        done += 1
    return done
