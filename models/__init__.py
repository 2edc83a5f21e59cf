"""Every network and weight format of the project."""

from .architectures import LAYOUTS, STUDENT_ARCHS, create_student, layout_of, vit_from_state_dict
from .checkpoints import (
    DiskFullError,
    atomic_save,
    export_metadata,
    from_reference,
    load_backbone,
    prepare_output_dir,
    remove_stale_temp_files,
    safe_load,
    to_dinov2,
    to_reference,
)
from .teachers import TEACHERS, create_teacher
from .vision_transformer import ViT

__all__ = [
    "DiskFullError",
    "LAYOUTS",
    "STUDENT_ARCHS",
    "TEACHERS",
    "ViT",
    "atomic_save",
    "create_student",
    "create_teacher",
    "export_metadata",
    "from_reference",
    "layout_of",
    "load_backbone",
    "prepare_output_dir",
    "remove_stale_temp_files",
    "safe_load",
    "to_dinov2",
    "to_reference",
    "vit_from_state_dict",
]
