"""Backbones from and to files, whatever their family: the students we create, any backbone file we read
(ours, the reference's, an official release) and the exports in each family's official layout. Each asks
the family registry (models.families); nothing here knows a family."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoints import Normalization, StateDict, export_metadata, few_names, load_strict, safe_load, strip_prefix
from .errors import UsageError
from .exports import exported_folder, timm_export_family
from .families import FAMILIES, Family, family_of, split_student, student_family
from .families.base import STUDENT_INPUTS


def create_student(
    name: str,
    img_size: int = 224,
    patch_size: int | None = None,
    *,
    drop_path_rate: float = 0.0,
    layout: str | None = None,
    pretraining: bool = False,
) -> nn.Module:
    """A randomly initialised student (no registers) in a family's layout, initialised as the reference.

    dinov2 (default): LayerScale 1.0. clip: CLIP's ViT (conv1 without bias, ln_pre, QuickGELU, eps
    1e-5, no LayerScale, ln_post on the CLS only). synclr: timm's ViT without LayerScale. These have
    patch 14 by default. dinov3: the released DINOv3 ViT-S/16 arguments at this size (patch 16, axial
    RoPE, 4 storage tokens, LayerScale 1e-5, LayerNorm eps 1e-5, masked k bias, MLP x4); a name with
    the suffix `_dinov3` (`vit_small_dinov3`) selects it. timm:<model>: timm's model without its
    classifier, randomly initialised as timm does.

    Drop path rises linearly from 0 in the first block to `drop_path_rate` in the last (timm's rule, DINOv2's
    default), the same in every ViT layout, so one dense config regularises each alike; `pretraining` builds the
    student for distillation, with its family's pretraining schedule (dinov3: the rate in every block, as FAIR's).
    """
    arch, found = student_family(name, layout)
    return found.create_student(
        arch, img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate, pretraining=pretraining
    )


def _family(state_dict: StateDict) -> Family:
    found = family_of(state_dict)
    if found is None:
        raise UsageError(
            f"no backbone family recognises these weights (keys: {few_names(sorted(map(str, state_dict)))})"
        )
    return found


def layout_of(state_dict: StateDict) -> str:
    """The family of a ViT state dict (official names or ours)."""
    return _family(state_dict).name


def vit_from_state_dict(state_dict: StateDict, img_size: int | None = None, **kwargs) -> nn.Module:
    """An empty backbone whose family and shape match a state dict (ours, or DINOv3's in FAIR's names too).
    img_size defaults to the position table's grid x patch size (DINOv3's RoPE has no table: any size)."""
    return _family(state_dict).empty_backbone(state_dict, img_size=img_size, **kwargs)


def from_reference(state_dict: StateDict) -> StateDict:
    """A ViT state dict in its family's official names and shapes (or ours) -> ours."""
    return _family(state_dict).from_official(state_dict)


def check_exportable(model: nn.Module, layout: str) -> None:
    """to_reference(model, layout) can write it: the model is that family's."""
    if not FAMILIES[layout].is_own(model):
        found = family_of(model.state_dict())
        what = f"in the {found.name} layout" if found else f"a {type(model).__name__}"
        raise UsageError(f"this network is {what} and cannot be written in the {layout} layout")


def to_reference(model: nn.Module, layout: str) -> StateDict:
    """Our backbone -> the official key names and shapes of `layout`'s family, so its own model code loads it
    strictly: DINOv2's DinoVisionTransformer, FAIR's DINOv3 one, the reference's CLIP VisionTransformer
    (conv1.weight, class_embedding [D], positional_embedding [N+1, D], ln_pre, transformer.resblocks.i.*,
    ln_post, mask_token [1, D]) or SynCLR's timm MaskedTransformer (mask_token [1, 1, D]). The training
    resolution goes into the dict's `_metadata` (see `export_metadata`), not into its keys."""
    check_exportable(model, layout)
    return FAMILIES[layout].to_official(model)


def to_dinov2(model: nn.Module) -> StateDict:
    """Our ViT -> the official DINOv2 key layout (loads strictly into DinoVisionTransformer)."""
    return to_reference(model, "dinov2")


def backbone_state_dict(ckpt: object, path: str | os.PathLike) -> tuple[Family, StateDict]:
    """Find the student backbone in any checkpoint format we accept, and its family.

    - ours: `checkpoint.pth` {"student": ...} or the exported flat `backbone.pth` (any layout)
    - the reference release's `checkpoint.pth` {"model": {"student.backbone.*", ...}, "args": Namespace},
      with a DINOv2-, CLIP- or SynCLR-layout student
    - an official DINOv2 or DINOv3 flat state dict
    - DINOv2 training checkpoints {"teacher": {"backbone.*", heads}} (the weights DINOv2 evaluates), and
      the common {"state_dict": ...} / {"model": ...} wrappers, with module./backbone. prefixes
    """
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if isinstance(ckpt.get("student"), dict):
        sd = ckpt["student"]
    elif isinstance(ckpt.get("model"), dict) and any(k.startswith("student.backbone.") for k in ckpt["model"]):
        sd = strip_prefix(ckpt["model"], ("student.backbone.",))
    elif wrapper := next((k for k in ("teacher", "model", "state_dict") if isinstance(ckpt.get(k), dict)), None):
        sd = strip_prefix(ckpt[wrapper], ("module.backbone.", "backbone.", "module."))
    else:
        sd = strip_prefix(ckpt, ("module.backbone.", "backbone.", "module."))
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    found = family_of(sd)
    if found is None or not ({"cls_token", "patch_embed.proj.weight"} <= set(found.from_official(sd))):
        raise UsageError(
            f"{path} holds no ViT backbone (looked for cls_token and patch_embed.proj.weight, or CLIP's "
            f"class_embedding and conv1.weight; top-level keys: {few_names(sorted(map(str, ckpt)))}); a timm "
            "student's weights are read from its backbone.pth, or a checkpoint.pth that records its student_name"
        )
    return found, sd


def named_student(ckpt: object) -> tuple[str, Family] | None:
    """(architecture, family) of a pretraining checkpoint.pth's student when its family's weights are recognised
    only by the name given (timm:<model>); None for every other file."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("student_name"), str):
        return None
    arch, name = split_student(ckpt["student_name"], None)
    found = FAMILIES.get(name) if name else None
    return (arch, found) if found is not None and not found.detects and isinstance(ckpt.get("args"), dict) else None


def load_backbone(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Rebuild a backbone from a file, its family and architecture read from the weights, loaded strictly.

    A CLIP-layout file gives the reference's CLIP ViT (ln_post on the CLS only), whatever its key names;
    a DINOv3 file (official, our export or our checkpoint) gives a DinoV3ViT, built on the meta device
    and filled from the file, which strictly holds every weight: no random init to overwrite (minutes
    and a second copy of the network for the 7B teacher). An exported backbone is built at the
    resolution it records it was trained at; a timm student (export or checkpoint.pth) as the model it records.
    A folder written by scripts.export (or its weight file) gives the same network as the backbone.pth it was
    exported from, whichever layout it holds (models.exports).
    The model's `normalization` is the mean and std its inputs had in training (`input_normalization`; an
    exported folder's weight file records those its config.json shows timm's users).
    """
    folder = exported_folder(path)
    if folder is not None:
        path = folder.weights
    ckpt = safe_load(path)
    trained = export_metadata(ckpt)
    student = named_student(ckpt)
    if student is not None:  # a training checkpoint of a student whose weights do not say which model it is
        arch, found = student
        model = found.create_student(arch, img_size=ckpt["args"]["input_size"], **kwargs)
        load_strict(model, ckpt["student"], f"{path} (student {ckpt['student_name']})")
    elif "architecture" in trained:  # timm's layout of one of our networks: its family reads it back
        found = timm_export_family(trained)
        sd = found.from_timm(dict(ckpt), trained["model_args"])
        model = found.load_backbone(sd, str(path), trained=trained, **kwargs)
    elif trained.get("family") in FAMILIES and not FAMILIES[trained["family"]].detects:  # its keys would not say
        found = FAMILIES[trained["family"]]
        model = found.load_backbone(ckpt, str(path), trained=trained, **kwargs)
    else:
        found, sd = backbone_state_dict(ckpt, path)
        model = found.load_backbone(sd, str(path), trained=trained, **kwargs)
    model.normalization = input_normalization(ckpt, path, found=found, trained=trained)
    return model


def input_normalization(ckpt: object, path: str | os.PathLike, *, found: Family, trained: dict) -> Normalization:
    """The mean and std a backbone's inputs had in training: what our export records; a student's training
    checkpoint (ours or the reference release's) or an export that records none: pretraining's (ImageNet's);
    an official file: its release's, known by its file name (DINOv3's satellite weights are not ImageNet-
    normalised and share the shapes of the others), else its family's."""
    if "normalization" in trained:
        return trained["normalization"]
    student = isinstance(ckpt, dict) and (
        isinstance(ckpt.get("student"), dict)
        or (isinstance(ckpt.get("model"), dict) and any(str(k).startswith("student.backbone.") for k in ckpt["model"]))
    )
    if trained or student:
        return STUDENT_INPUTS
    name = Path(path).name
    files = [(spec, getattr(spec, "url", "").rsplit("/", 1)[-1]) for spec in found.teachers.values()]
    release = next((spec for spec, file in files if file and file == name), None)
    source = release or found
    return Normalization(tuple(source.mean), tuple(source.std))
