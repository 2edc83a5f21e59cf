"""Every network and weight format of the project."""

from .adaptors import Adaptors, TeacherTarget, load_adaptors
from .architectures import (
    LAYOUTS,
    STUDENT_ARCHS,
    VIT_CONFIGS,
    ViTConfig,
    build_vit,
    create_student,
    layout_of,
    vit_from_state_dict,
)
from .checkpoints import (
    export_metadata,
    from_reference,
    load_backbone,
    safe_load,
    to_dinov2,
    to_reference,
)
from .dinov3 import DinoV3ViT
from .errors import MissingFile, UsageError
from .teachers import TEACHERS, Teacher, create_teacher, default_dtype
from .tokens import Tokens, resample_patches
from .vision_transformer import ViT

__all__ = [
    "Adaptors",
    "TeacherTarget",
    "load_adaptors",
    "DinoV3ViT",
    "LAYOUTS",
    "MissingFile",
    "STUDENT_ARCHS",
    "TEACHERS",
    "VIT_CONFIGS",
    "Teacher",
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
    "to_dinov2",
    "to_reference",
    "vit_from_state_dict",
]
