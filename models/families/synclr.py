"""SynCLR (google-research/syn-rep-learn): ViT-B/16 and ViT-L/14 trained on synthetic images.

Its files are timm ViTs (StableRep's MaskedTransformer: mask token [1, 1, D], no LayerScale), under
`state_dict`/`model` and a `module.visual.`/`visual.` prefix, with a classifier head we leave out.
The reference's SynCLR student: timm's ViT without LayerScale, its mask token drawn N(0, 0.02).
"""

from __future__ import annotations

from ..architectures import VIT_CONFIGS, Layout
from ..checkpoints import StateDict, safe_load, strip_prefix
from ..errors import UsageError
from .base import (
    CLIP_KEYS,
    ROPE_KEYS,
    Family,
    TeacherSpec,
    TimmArchitecture,
    has_any,
    has_layerscale,
    our_shape,
    size_name,
    table_resolution,
    timm_name,
    vit_model_args,
    with_export_metadata,
    without,
)

URL = "https://www.dropbox.com/scl/fi/{key}?dl=1"
LAYOUT = Layout(dict(init_values=None), mask_token_std=0.02)


def _teacher(size: str, patch: int, key: str) -> TeacherSpec:
    return TeacherSpec("synclr", LAYOUT, VIT_CONFIGS[size], patch, 224, URL.format(key=key))


class SynCLR(Family):
    name = "synclr"
    title = "SynCLR"
    in_reference = True
    layout = LAYOUT
    teachers = {
        "synclr_vitb16": _teacher(
            "base", 16, "ogktmm26yojhlgsbwqqti/synclr_vit_b_16.pth?rlkey=2bn6j4upcrqy93d5b9fgrrj02"
        ),
        "synclr_vitl14": _teacher(
            "large", 14, "al5a8d045ir0zsqo4ogpg/synclr_vit_l_14.pth?rlkey=ksyktxamcs17zqr6wha6ekdp4"
        ),
    }

    def owns(self, state_dict) -> bool:
        vit = "cls_token" in state_dict and "patch_embed.proj.weight" in state_dict
        return vit and not has_layerscale(state_dict) and not has_any(state_dict, ROPE_KEYS + CLIP_KEYS)

    def from_official(self, state_dict: StateDict) -> StateDict:
        return {k: our_shape(k, v) for k, v in state_dict.items()}

    def read_teacher(self, spec: TeacherSpec, path) -> StateDict:
        raw = safe_load(path)
        if not isinstance(raw, dict):
            raise UsageError(f"{path} holds a {type(raw).__name__}, not a state dict")
        raw = raw.get("state_dict", raw.get("model", raw))
        sd = strip_prefix(raw, ("module.visual.", "visual."))
        return self.from_official({k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))})

    def release_file(self, model) -> dict:
        """SynCLR's training checkpoint: the image tower under `model` with DDP's and its own `visual.` prefix."""
        return {"model": {f"module.visual.{k}": v for k, v in self.to_official(model).items()}}

    def to_official(self, model) -> StateDict:
        out = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        out["mask_token"] = out["mask_token"].reshape(1, 1, -1)
        return with_export_metadata(model, out)

    def timm_architecture(self, model, *, img_size: int) -> TimmArchitecture:
        """timm's plain ViT (`vit_<size>_patch16_224`, no LayerScale), its patch and shape through its arguments,
        at its position table's resolution."""
        size, patch = size_name(model) or "base", model.patch_size
        name = timm_name(f"vit_{size}_patch{patch}_224", f"vit_{size}_patch16_224", "vit_base_patch16_224")
        return TimmArchitecture(name, vit_model_args(model, img_size=table_resolution(model)))

    def to_timm(self, model) -> StateDict:
        return without(model.state_dict(), "mask_token")


FAMILY = SynCLR()
