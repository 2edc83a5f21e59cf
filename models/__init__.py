"""Every network and weight format of the project."""

from .adaptors import Adaptors, Prediction, TeacherTarget, load_adaptors
from .architectures import STUDENT_ARCHS, VIT_CONFIGS, ViTConfig, build_vit
from .backbones import (
    create_student,
    from_reference,
    layout_of,
    load_backbone,
    to_dinov2,
    to_reference,
    vit_from_state_dict,
)
from .checkpoints import export_metadata, safe_load
from .dinov3 import DinoV3ViT
from .errors import MissingFile, UsageError
from .families import FAMILIES, LAYOUTS, TEACHERS, teacher_spec
from .teachers import Teacher, create_teacher, default_dtype
from .timm_backbone import TimmBackbone
from .tokens import Backbone, Tokens, resample_patches
from .vision_transformer import ViT

__all__ = [
    "Adaptors",
    "Backbone",
    "Prediction",
    "TeacherTarget",
    "load_adaptors",
    "DinoV3ViT",
    "FAMILIES",
    "LAYOUTS",
    "MissingFile",
    "STUDENT_ARCHS",
    "TEACHERS",
    "VIT_CONFIGS",
    "Teacher",
    "TimmBackbone",
    "Tokens",
    "UsageError",
    "ViT",
    "ViTConfig",
    "build_vit",
    "create_student",
    "create_teacher",
    "default_dtype",
    "export_metadata",
    "from_reference",
    "layout_of",
    "load_backbone",
    "resample_patches",
    "safe_load",
    "teacher_spec",
    "to_dinov2",
    "to_reference",
    "vit_from_state_dict",
]
