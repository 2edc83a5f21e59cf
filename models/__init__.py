"""Every network and weight format of the project."""

from .architectures import STUDENT_ARCHS, create_student, vit_from_state_dict
from .checkpoints import atomic_save, load_backbone, prepare_output_dir, safe_load, to_dinov2
from .teachers import TEACHERS, create_teacher
from .vision_transformer import ViT

__all__ = [
    "STUDENT_ARCHS",
    "TEACHERS",
    "ViT",
    "atomic_save",
    "create_student",
    "create_teacher",
    "load_backbone",
    "prepare_output_dir",
    "safe_load",
    "to_dinov2",
    "vit_from_state_dict",
]
