"""The backbone families: one module each, listed here. Everything outside a family's module asks this registry
(see README.md in this folder for what a family module provides)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..architectures import STUDENT_ARCHS
from ..errors import UsageError
from . import clip, dinov2, dinov3, siglip2, synclr, timm
from .base import Family, TeacherSpec

FAMILIES: dict[str, Family] = {
    f.name: f for f in (dinov2.FAMILY, dinov3.FAMILY, clip.FAMILY, synclr.FAMILY, siglip2.FAMILY, timm.FAMILY)
}
# Every released teacher by name; the one table lookups read (tests put tiny specs into it)
TEACHERS: dict[str, TeacherSpec] = {name: spec for f in FAMILIES.values() for name, spec in f.teachers.items()}
# The student layouts: the families that have one
LAYOUTS = {name: f.layout for name, f in FAMILIES.items() if f.layout is not None}
DEFAULT_LAYOUT = "dinov2"  # the reference's student, for a teacher whose family has no student layout


def teacher_spec(name: str) -> TeacherSpec:
    """A teacher's spec: a released one, or one a family builds on demand from its name."""
    spec = TEACHERS.get(name) or next((s for f in FAMILIES.values() if (s := f.resolve(name))), None)
    if spec is None:
        raise UsageError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}, or timm:<model name>")
    return spec


def family(name: str) -> Family:
    return FAMILIES[name]


def family_of(state_dict: Mapping[str, object]) -> Family | None:
    """The family a backbone state dict (official names or ours) belongs to; None when none owns it."""
    owners = [f for f in FAMILIES.values() if f.detects and f.owns(state_dict)]
    if len(owners) > 1:  # the families' tests exclude each other; two owners is a bug in one of them
        raise AssertionError(f"families {[f.name for f in owners]} all claim one state dict")
    return owners[0] if owners else None


def family_of_model(model: nn.Module) -> Family:
    """The family a network belongs to (what can export it)."""
    # the families that know a network by its class first: a timm ViT with LayerScale has DINOv2's key names
    ordered = sorted(FAMILIES.values(), key=lambda f: f.detects)
    found = next((f for f in ordered if f.is_own(model)), None)
    if found is None:
        raise UsageError(f"a {type(model).__name__} belongs to no backbone family")
    return found


def student_layout(teacher: str) -> str:
    """The default student layout for a teacher: its family's, as the reference chose per family."""
    name = teacher_spec(teacher).family
    return name if name in LAYOUTS else DEFAULT_LAYOUT


def split_student(name: str, layout: str | None) -> tuple[str, str | None]:
    """(architecture, layout) of a student name: a family's suffix (vit_small_dinov3) or prefix
    (timm:resnet18) says its family."""
    # prefixes first: a prefixed name is that family's model whatever it ends with (timm:vit_small_patch16_dinov3)
    matches = [(f, name.removeprefix(f.student_prefix)) for f in FAMILIES.values()
               if f.student_prefix and name.startswith(f.student_prefix)]  # fmt: skip
    matches += [(f, name.removesuffix(f.student_suffix)) for f in FAMILIES.values()
                if f.student_suffix and name.endswith(f.student_suffix)]  # fmt: skip
    if not matches:
        return name, layout
    f, arch = matches[0]
    if layout not in (None, f.name):
        raise UsageError(f"student '{name}' is in the {f.name} layout, not {layout}")
    return arch, f.name


def student_names(archs: list[str]) -> list[str]:
    """Every student name: the architectures, each with each family's suffix, and each family's prefix."""
    suffixed = [a + f.student_suffix for f in FAMILIES.values() if f.student_suffix for a in archs]
    prefixed = [f"{f.student_prefix}<model>" for f in FAMILIES.values() if f.student_prefix]
    return [*archs, *suffixed, *prefixed]


def student_family(name: str, layout: str | None = None) -> tuple[str, Family]:
    """(architecture, family) of a student name, its layout defaulting to `layout`, else DINOv2's."""
    arch, found = split_student(name, layout)
    found = found or DEFAULT_LAYOUT
    if found not in FAMILIES or (found not in LAYOUTS and not FAMILIES[found].student_prefix):
        raise UsageError(f"unknown student layout '{found}'; choose from {', '.join(LAYOUTS)}")
    if not FAMILIES[found].student_prefix and arch not in STUDENT_ARCHS:
        raise UsageError(f"unknown student '{name}'; choose from {', '.join(student_names(list(STUDENT_ARCHS)))}")
    return arch, FAMILIES[found]


def student_patch_size(name: str, layout: str | None = None) -> int:
    """The side in pixels of one token of a student (its grid at an input size is size // this)."""
    arch, found = student_family(name, layout)
    return found.student_patch_size(arch)


def suffix_help() -> str:
    """What the student-name suffixes and prefixes mean, for help texts."""
    parts = [f"a name's {f.student_suffix} suffix says {f.name}" for f in FAMILIES.values() if f.student_suffix]
    parts += [f"{f.student_prefix}<model> is {f.title}'s model" for f in FAMILIES.values() if f.student_prefix]
    return "; ".join(parts)


__all__ = [
    "DEFAULT_LAYOUT",
    "FAMILIES",
    "LAYOUTS",
    "TEACHERS",
    "Family",
    "TeacherSpec",
    "family",
    "family_of",
    "family_of_model",
    "split_student",
    "student_layout",
    "student_family",
    "student_names",
    "student_patch_size",
    "suffix_help",
    "teacher_spec",
]
