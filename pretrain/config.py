"""A pretraining run's settings, resolved once from the command line (main.resolve) into frozen records:
`Config` with a `TeacherConfig` per --teacher and a `StudentConfig` per --student. Everything after
main.resolve (build, the engine, the checkpoint) reads these, never the argparse Namespace.

Each record checks its own values in `__post_init__`; the checks that combine values (patch sizes against
the input size, the mask ratio against the patch count, per-teacher lists against --teacher) are
main.resolve's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from models.adaptors import STANDARDIZATIONS
from models.errors import UsageError

# Every numeric flag's valid range: (flag, predicate, what it must be); None (an unset optional flag) passes.
FLAG_RANGES = (
    ("batch_size", lambda v: v >= 1, "a positive integer"),
    ("epochs", lambda v: v >= 1, "a positive integer"),
    ("epoch_length", lambda v: v >= 1, "a positive number of iterations"),
    ("input_size", lambda v: v >= 1, "a positive number of pixels"),
    ("teacher_stats_batches", lambda v: v >= 1, "a positive number of batches"),
    ("warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("lr", lambda v: v >= 0, ">= 0 (0: the weights stay as initialised)"),
    ("warmup_lr", lambda v: v >= 0, ">= 0"),
    ("min_lr", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("drop_path", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("mask_probability", lambda v: 0 <= v <= 1, "a fraction of the batch in [0, 1]"),
    ("lambda_token", lambda v: v >= 0, ">= 0"),
    ("lambda_patch", lambda v: v >= 0, ">= 0"),
    ("lambda_fea", lambda v: v >= 0, ">= 0"),
    ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("clip_grad", lambda v: v > 0, "> 0 (omit the flag for no clipping)"),
    ("save_every_minutes", lambda v: v > 0, "> 0 minutes (omit the flag to save once per epoch)"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
    ("print_freq", lambda v: v >= 1, "a positive number of iterations"),
    ("pca_every", lambda v: v >= 0, ">= 0 epochs (0: off)"),
    ("subset_images_per_class", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("subset_classes", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
)

LOADERS = ("classic", "dali")  # classic: torch DataLoader over timm's transform; dali: pretrain/dali.py

# pretrain.main's flags in command-line order: the keys of Config.flags(), as checkpoints and log.txt hold them
FLAGS = (
    "data_path", "teacher", "teacher_checkpoint", "teacher_weights", "teacher_standardization",
    "teacher_summary_standardization", "teacher_stats_batches", "random_teacher", "teacher_dtype",
    "teacher_input_size", "teacher_normalization", "student", "student_pretrained", "student_layout", "input_size",
    "batch_size", "epochs", "warmup_epochs", "epoch_length", "lr", "warmup_lr", "min_lr", "weight_decay",
    "drop_path", "mask_probability", "mask_ratio", "lambda_token", "lambda_patch", "lambda_fea", "ema_decay",
    "clip_grad", "compile", "precision", "output_dir", "resume", "save_every_minutes", "device", "num_workers",
    "loader", "seed", "print_freq", "pca_every", "subset_images_per_class", "subset_classes", "single_image",
)  # fmt: skip


def check_ranges(values: Mapping[str, Any]) -> None:
    """FLAG_RANGES over `values` (flag name -> value): the first one out of its range is a UsageError."""
    for name, valid, rule in FLAG_RANGES:
        value = values[name]
        if value is not None and not (math.isfinite(value) and valid(value)):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be {rule}")


@dataclass(frozen=True)
class TeacherConfig:
    """One --teacher and its entries of the per-teacher flags."""

    name: str
    checkpoint: str | None  # its official weight file; None: downloaded (or random with --random-teacher)
    input_size: int  # the side of its resize of each crop
    weight: float  # of its loss in the total

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise UsageError(f"--teacher-input-size {self.input_size}: must be a positive number of pixels")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise UsageError(f"--teacher-weights {self.weight}: must be >= 0")


@dataclass(frozen=True)
class StudentConfig:
    """One --student: its name, the layout it is built and exported in, and the weight file it starts from."""

    name: str
    layout: str
    pretrained: str | None = None  # --student-pretrained's entry; None: random init

    def __post_init__(self) -> None:
        if not self.name or not self.layout:
            raise UsageError(f"a student needs a name and a layout (got {self.name!r}, {self.layout!r})")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a pretraining run is told, resolved: no 'auto' is left, per-teacher flags are records.
    Field names are the flags' (--batch-size: batch_size); `flags()` gives them back as one flat dict."""

    data_path: str | None
    teachers: tuple[TeacherConfig, ...]
    teacher_standardization: str  # phi-s, zscore or none, for every teacher
    teacher_summary_standardization: str  # of the summary (CLS) targets, with their own statistics
    teacher_stats_batches: int
    random_teacher: bool
    teacher_dtype: str  # a key of main.TEACHER_DTYPES
    teacher_normalization: str  # reference (the ImageNet-normalised crops) or teacher (its own mean/std)
    students: tuple[StudentConfig, ...]
    student_layout: str  # --student-layout, else the first teacher's family's (DINOv2's for one without): the layout
    # of names without a family's suffix or prefix
    input_size: int
    batch_size: int
    epochs: int
    warmup_epochs: float
    epoch_length: int | None
    lr: float
    warmup_lr: float
    min_lr: float
    weight_decay: float
    drop_path: float
    mask_probability: float
    mask_ratio: tuple[float, float]  # (lo, hi); one value is (v, v)
    lambda_token: float | None  # None: per teacher and student (main.targets_of)
    lambda_patch: float | None
    lambda_fea: float | None
    ema_decay: float
    clip_grad: float | None
    compile: bool
    precision: str  # bf16, fp16 or fp32
    output_dir: str
    resume: str | None
    save_every_minutes: float | None
    device: str
    num_workers: int
    loader: str  # one of LOADERS: what decodes and augments the images
    seed: int
    print_freq: int
    pca_every: int
    subset_images_per_class: float
    subset_classes: float
    single_image: str | None

    def __post_init__(self) -> None:
        check_ranges({f.name: getattr(self, f.name) for f in fields(self)})
        if not self.teachers or not self.students:
            raise UsageError("a run needs at least one --teacher and one --student")
        lo, hi = self.mask_ratio
        if not 0 < lo <= hi < 1:
            raise UsageError(f"--mask-ratio {lo},{hi}: must be 'lo,hi' with 0 < lo <= hi < 1")
        for flag in ("teacher_standardization", "teacher_summary_standardization"):
            if getattr(self, flag) not in STANDARDIZATIONS:
                raise UsageError(
                    f"--{flag.replace('_', '-')} {getattr(self, flag)}: must be {', '.join(STANDARDIZATIONS)}"
                )
        if self.teacher_normalization not in ("reference", "teacher"):
            raise UsageError(f"--teacher-normalization {self.teacher_normalization}: must be reference or teacher")
        if self.loader not in LOADERS:
            raise UsageError(f"--loader {self.loader}: must be one of {', '.join(LOADERS)}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise UsageError(f"--precision {self.precision}: must be bf16, fp16 or fp32")

    @property
    def teacher(self) -> str:
        """--teacher as given: the names, comma-separated (how messages and checkpoints name them)."""
        return ",".join(t.name for t in self.teachers)

    @property
    def student(self) -> str:
        """--student as given: the names, comma-separated."""
        return ",".join(s.name for s in self.students)

    def flags(self) -> dict[str, Any]:
        """The resolved flags as one flat dict in command-line order, per-teacher flags as lists in --teacher
        order: what checkpoint.pth stores under "args" and what a resumed run is compared with."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        files = [t.checkpoint for t in self.teachers]
        values.update(
            teacher=self.teacher,
            teacher_checkpoint=None if all(f is None for f in files) else ",".join(f or "" for f in files),
            teacher_weights=[t.weight for t in self.teachers],
            teacher_input_size=[t.input_size for t in self.teachers],
            student=self.student,
            student_pretrained=None
            if all(s.pretrained is None for s in self.students)
            else ",".join(s.pretrained or "" for s in self.students),
        )
        return {name: values[name] for name in FLAGS}
