"""Proteus distillation pretraining (DeiT-style script).

python -m pretrain.main --data-path /imagenet --teacher dinov2_vitl14 --student vit_base
torchrun --nproc_per_node=4 -m pretrain.main --data-path /imagenet ...

python -m pretrain.main ... --student vit_tiny,vit_small,vit_base   # one teacher pass, three students
python -m pretrain.main ... --teacher dinov2_vitl14,clip_vitl14      # one student, two teachers (adaptors.pth)

main -> common.cli.run(distil): resolve (every check; the command line becomes a frozen config.Config, the only
thing read after it) -> build (a state.Run, resumed when a checkpoint exists) -> train (the epochs,
engine.train_one_epoch each, a checkpoint after each) -> export_backbones.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import random
import sys
from dataclasses import fields, replace

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.distributed_sampler import RepeatAugSampler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from common import cli
from common import distributed as dist_utils
from common.cli import ArgumentParser
from common.io import prepare_output_dir
from common.schedule import warmup_cosine
from common.shards import shard_folder
from models import (
    LAYOUTS,
    STUDENT_ARCHS,
    TEACHERS,
    TeacherTarget,
    create_student,
    create_teacher,
    to_reference,
)
from models.adaptors import STANDARDIZATIONS, hadamard
from models.backbones import check_exportable
from models.checkpoints import few_names
from models.errors import MissingDependency, UsageError
from models.families import (
    FAMILIES,
    family,
    split_student,
    student_family,
    student_layout,
    student_patch_size,
    suffix_help,
    teacher_spec,
)

from .config import Config, StudentConfig, TeacherConfig, check_ranges
from .data import PositionSampler, SeededDataset, build_dataset, worker_init
from .distiller import Distiller, TeacherInput, Views, channels_last, compile_student, param_groups
from .engine import NonFiniteLoss, Preempted, estimate_statistics, train_one_epoch
from .loaders import LOADERS, loader_stages
from .output import CHECKPOINT, EPOCH_LOG, ITERATION_LOG, Output
from .state import Run, StopControl, Student

log = logging.getLogger("pretrain")
TEACHER_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}  # auto: models.default_dtype
EXIT_REQUEUE = dist_utils.EXIT_REQUEUE  # SIGUSR1/SIGTERM: checkpoint written mid-epoch, re-run to continue


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Proteus distillation pretraining")
    a = p.add_argument
    a("--data-path", help="ImageNet root holding train/ in ImageFolder layout, or train-shards/ (scripts.make_shards)")
    a(
        "--teacher",
        default="dinov2_vitl14",
        help=f"one of: {', '.join(TEACHERS)}, or timm:<model name> (any timm model, from its timm weight file "
        "given with --teacher-checkpoint); a comma list distils from several teachers at once (each its own "
        "heads, input normalisation and size, standardised targets; adaptors.pth holds the heads)",
    )
    a(
        "--teacher-checkpoint",
        help="the teacher's official weight file, downloaded from the official URL if omitted; several teachers: "
        "a comma list in --teacher order (an empty entry downloads that teacher's)",
    )
    a(
        "--teacher-weights",
        help="several teachers: the weight of each one's loss in the total, a comma list in --teacher order or one "
        "value for every teacher (default: 1 each)",
    )
    a(
        "--teacher-standardization",
        choices=("auto", *STANDARDIZATIONS),
        default="auto",
        help="how each teacher's targets are standardised before the MSE: phi-s = PCA + Hadamard rotation + one "
        "scale (PHI-S, as AM-RADIO v2.5), zscore = per channel, none; auto = phi-s with several teachers, none "
        "with one (the paper's)",
    )
    a(
        "--teacher-summary-standardization",
        choices=("auto", *STANDARDIZATIONS),
        default="auto",
        help="the same for the summary (CLS) targets, with their own statistics: auto = as "
        "--teacher-standardization (the token loss then sees targets of unit scale, like the patch losses); none "
        "= the summary as the teacher gives it while the patches are standardised (RADIO's normaliser)",
    )
    a(
        "--teacher-stats-batches",
        type=int,
        default=64,
        help="batches per process on which the target statistics are estimated, once, before training (then "
        "frozen and saved with the heads)",
    )
    a("--random-teacher", action="store_true", help="random teacher weights: smoke tests and demos only")
    a(
        "--teacher-dtype",
        choices=tuple(TEACHER_DTYPES),
        default="auto",
        help="the teacher's weights; auto = bf16 for teachers over 2B parameters (the DINOv3 7B), fp32 otherwise "
        "(DINOv2's ViT-g too, as the reference ran it)",
    )
    a(
        "--teacher-input-size",
        help="side of the teacher's resize of each crop (default: --input-size); its patch tokens are resampled "
        "to the student's grid. Several teachers: one value for all, or a comma list in --teacher order",
    )
    a(
        "--teacher-normalization",
        choices=("auto", "reference", "teacher"),
        default="auto",
        help="what the teachers see: reference = the ImageNet-normalised crops, as the paper's runs (CLIP too); "
        "teacher = re-normalised with each teacher's own mean/std (differs for CLIP, DINOv3's satellite, SigLIP2 "
        "and timm teachers); auto = reference with one teacher of a family the reference ran "
        f"({', '.join(f.title for f in FAMILIES.values() if f.in_reference)}), teacher otherwise",
    )
    a(
        "--student",
        default="vit_base",
        help=f"one of: {', '.join(STUDENT_ARCHS)} ({suffix_help()}); a comma list "
        "trains several students from one teacher pass, each into <output-dir>/<student>/",
    )
    a(
        "--student-pretrained",
        metavar="FILE",
        help="a timm student's start: timm's weight file of that model (default: random init, as the paper); "
        "several students: a comma list in --student order (an empty entry starts that one at random)",
    )
    a(
        "--student-layout",
        choices=tuple(LAYOUTS),
        help="the students' architecture and export key names, as the reference's per teacher family "
        f"(default: the teacher's family, dinov2 for a family without a student layout; {suffix_help()})",
    )
    a("--input-size", type=int, default=224, help="the student's crop side; a multiple of its patch size")
    a("--batch-size", type=int, default=128, help="per process; lr scales with the global batch")
    a("--epochs", type=int, default=300, help="the cosine spans all of them")
    a("--warmup-epochs", type=float, default=5, help="linear warmup from --warmup-lr")
    a("--epoch-length", type=int, help="iterations per epoch (default: one pass of the sampler)")
    a("--lr", type=float, default=5e-4, help="for a global batch of 512; scaled linearly")
    a("--warmup-lr", type=float, default=1e-6, help="lr at the start of the linear warmup")
    a("--min-lr", type=float, default=1e-5, help="lr at the end of the cosine")
    a("--weight-decay", type=float, default=0.05, help="AdamW; none on biases, norms, LayerScale")
    a(
        "--drop-path",
        type=float,
        default=0.0,
        help="stochastic depth of the student: its last block's, rising linearly from 0 (a DINOv3-layout student: "
        "every block's, as FAIR's pretraining; a timm student: timm's rule)",
    )
    a("--mask-probability", type=float, default=0.5, help="fraction of each batch (the first samples) masked")
    a(
        "--mask-ratio",
        default="0.5",
        help="fraction of patches masked: a value, or a range 'lo,hi' (one stratum of it per masked sample, as DINOv2)",
    )
    a("--lambda-token", type=float, help="weight of the CLS loss (default 1)")
    a(
        "--lambda-patch",
        type=float,
        help="weight of the masked-patch loss (default 1; 0 for a CLIP teacher on the student's grid); given, it holds "
        "for every teacher",
    )
    a(
        "--lambda-fea",
        type=float,
        help="weight of the all-token feature loss (default 1; 0 for a CLIP teacher on the student's grid, 1 when its "
        "patch map is resampled to another grid); given, it holds for every teacher",
    )
    a("--ema-decay", type=float, default=0.99996, help="EMA of the student, per iteration")
    a("--clip-grad", type=float, help="max gradient norm (default: no clipping)")
    a("--compile", action="store_true", help="torch.compile the student's forward (distiller.compile_student)")
    a("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="autocast dtype; fp16 adds GradScaler")
    a("--output-dir", default="output/pretrain", help="checkpoint.pth, log.txt, tensorboard/, backbone*.pth")
    a(
        "--resume",
        help="checkpoint to resume from (default: <output-dir>/checkpoint.pth when present); with several students "
        "the folder holding their <student>/checkpoint.pth",
    )
    a("--save-every-minutes", type=float, help="also write checkpoint.pth mid-epoch this often (default: per epoch)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="under torchrun: cuda:LOCAL_RANK")
    a(
        "--loader",
        choices=tuple(LOADERS),
        default="cpu",
        help="how batches reach the device: cpu = PIL augmentation in the workers, uint8 crops, normalisation and "
        "erasing on the device; classic = timm's whole transform in the workers, float crops; dali = NVIDIA DALI, "
        "nvJPEG decode and the augmentation on the GPU (requirements-dali.txt) (README.md: which to use, workers "
        "per GPU)",
    )
    a(
        "--jpeg-draft",
        action="store_true",
        help="with --loader cpu: decode each JPEG at 1/2, 1/4 or 1/8 size when its crop keeps the input size "
        "(faster on large photos; changes pixels, so off by default)",
    )
    a("--num-workers", type=int, default=10, help="data loader processes per GPU (--loader dali: its CPU threads)")
    a("--seed", type=int, default=0, help="augmentations, masks and init (+ rank)")
    a("--print-freq", type=int, default=50, help="iterations between progress lines")
    a("--pca-every", type=int, default=10, help="epochs between tensorboard PCA pictures of 4 fixed images (0: off)")
    a("--subset-images-per-class", type=float, default=1.0, help="proxy data: fraction of each class's images")
    a("--subset-classes", type=float, default=1.0, help="proxy data: fraction of the classes")
    a("--single-image", help="proxy data: distil on augmentations of this one image")
    return p


def per_teacher(value: str | None, teachers: list[str], flag: str, *, kind: type, default) -> list:
    """A per-teacher flag: one value for all teachers or a comma list in --teacher order."""
    if value is None:
        return [default] * len(teachers)
    items = str(value).split(",")
    if len(items) == 1:
        items *= len(teachers)
    if len(items) != len(teachers):
        raise UsageError(f"{flag} {value}: {len(items)} values for {len(teachers)} teachers ({', '.join(teachers)})")
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise UsageError(f"{flag} {value}: expected {kind.__name__} values, one per teacher") from None


def targets_of(config: Config, grid: int) -> list[TeacherTarget]:
    """What a student whose token grid is `grid` learns from each teacher: its width, weight, loss levels
    (`TeacherSpec.dense_level`'s defaults unless --lambda-patch/--lambda-fea say otherwise) and
    standardisation."""
    targets = []
    for teacher in config.teachers:
        name, weight, size = teacher.name, teacher.weight, teacher.input_size
        spec = teacher_spec(name)
        level = spec.dense_level(size, grid)
        targets.append(
            TeacherTarget(
                name,
                spec.embed_dim,
                weight,
                1.0 if config.lambda_token is None else config.lambda_token,
                level if config.lambda_patch is None else config.lambda_patch,
                level if config.lambda_fea is None else config.lambda_fea,
                config.teacher_standardization,
                summary_standardization=config.teacher_summary_standardization,
            )
        )
    return targets


def grid_of(config: Config, student: StudentConfig) -> int:
    """The token grid side of a student at --input-size."""
    return config.input_size // student_patch_size(student.name, student.layout)


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (nor failing on a missing parent package)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def resolve(args: argparse.Namespace) -> Config:
    """The command line as a run's Config: family defaults filled, 'auto' decided, per-teacher flags split
    into records, and everything checked that can be checked before training starts: each value on its own
    (the checks of Config.__post_init__), then the values together. Nothing after this reads `args`."""
    check_ranges(vars(args))  # Config's own range checks, first: a bad number is named before the checks using it
    if args.warmup_epochs > args.epochs:
        log.warning("--warmup-epochs %g is longer than the run (--epochs %d): the lr never reaches its peak",
                    args.warmup_epochs, args.epochs)  # fmt: skip
    teachers = args.teacher.split(",")
    for name in teachers:
        teacher_spec(name)  # an unknown name: one line that lists the teachers
    if len(set(teachers)) < len(teachers):
        raise UsageError(f"--teacher {args.teacher} names a teacher twice")
    files = [""] * len(teachers) if args.teacher_checkpoint is None else args.teacher_checkpoint.split(",")
    if len(files) != len(teachers):
        raise UsageError(
            f"--teacher-checkpoint names {len(files)} files for {len(teachers)} "
            f"teachers ({args.teacher}): give one per teacher, in order (an empty entry downloads that one)"
        )
    if args.random_teacher and args.teacher_checkpoint:
        raise UsageError("--random-teacher and --teacher-checkpoint exclude each other: which teacher do you want?")
    sizes = per_teacher(args.teacher_input_size, teachers, "--teacher-input-size", kind=int, default=args.input_size)
    for size in sizes:
        if size < 1:
            raise UsageError(f"--teacher-input-size {args.teacher_input_size}: must be a positive number of pixels")
    weights = per_teacher(args.teacher_weights, teachers, "--teacher-weights", kind=float, default=1.0)
    if any(not (math.isfinite(w) and w >= 0) for w in weights) or not any(weights):
        raise UsageError(f"--teacher-weights {weights}: must be >= 0 and not all 0")
    normalization = args.teacher_normalization
    if normalization == "auto":  # the paper's setting where it applies: one teacher, of a family the reference ran
        ran = len(teachers) == 1 and family(teacher_spec(teachers[0]).family).in_reference
        normalization = "reference" if ran else "teacher"
    standardization = args.teacher_standardization
    if standardization == "auto":
        standardization = "phi-s" if len(teachers) > 1 else "none"
    summary = args.teacher_summary_standardization
    if summary == "auto":
        summary = standardization
    if "phi-s" in (standardization, summary):
        for name in teachers:
            hadamard(teacher_spec(name).embed_dim)  # a width without a Hadamard matrix: one clear line
    if args.loader == "dali" and args.data_path and shard_folder(args.data_path) and not args.single_image:
        raise UsageError(f"--loader dali reads image files, not the shards in {args.data_path}: use --loader cpu")
    if args.loader == "dali" and not installed("nvidia.dali"):
        raise MissingDependency("--loader dali needs NVIDIA DALI: pip install -r requirements-dali.txt")
    names = args.student.split(",")
    for name in names:
        student_family(name)  # an unknown name: one line that lists the students
    if len(set(names)) < len(names):
        raise UsageError(f"--student {args.student} names a student twice: each needs its own output folder")
    layout = args.student_layout or student_layout(teachers[0])
    # a family's layout for a name with its suffix (vit_small_dinov3), else --student-layout
    starts = [""] * len(names) if args.student_pretrained is None else args.student_pretrained.split(",")
    if len(starts) != len(names):
        raise UsageError(
            f"--student-pretrained names {len(starts)} files for {len(names)} students ({args.student}): give one "
            "per student, in order (an empty entry starts that one at random)"
        )
    students = [
        StudentConfig(n, split_student(n, None)[1] or layout, pretrained=start or None)
        for n, start in zip(names, starts)
    ]
    patches = [student_patch_size(s.name, s.layout) for s in students]
    for s, patch in zip(students, patches):
        if args.input_size % patch:
            whose = f"{s.name}'s" if len(students) > 1 else "the student's"
            raise UsageError(f"--input-size {args.input_size} is not a multiple of {whose} patch size {patch}")
    for name, size in zip(teachers, sizes):
        if size % teacher_spec(name).patch_size:
            raise UsageError(
                f"the teacher's input size {size} (--teacher-input-size, default --input-size) is not "
                f"a multiple of {name}'s patch size {teacher_spec(name).patch_size}"
            )
    try:
        ratio = [float(v) for v in str(args.mask_ratio).split(",")]
    except ValueError:
        raise UsageError(f"--mask-ratio must be a number or 'lo,hi', got {args.mask_ratio!r}") from None
    if len(ratio) == 1:
        ratio *= 2
    if len(ratio) == 2 and ratio[0] > ratio[1]:
        raise UsageError(f"--mask-ratio {args.mask_ratio}: the range must be 'lo,hi' with lo <= hi")
    num_patches = (args.input_size // max(patches)) ** 2  # the fewest of any student
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] < 1 or int(num_patches * ratio[0]) < 1:
        raise UsageError(f"--mask-ratio {args.mask_ratio} must mask at least one of {num_patches} patches and not all")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if f.name not in ("teachers", "students")}
    config = Config(
        **{
            **given,
            "teachers": tuple(TeacherConfig(*t) for t in zip(teachers, [f or None for f in files], sizes, weights)),
            "teacher_standardization": standardization,
            "teacher_summary_standardization": summary,
            "teacher_normalization": normalization,
            "students": tuple(students),
            "student_layout": layout,
            "mask_ratio": tuple(ratio),
        }
    )
    targets = [t for s in config.students for t in targets_of(config, grid_of(config, s))]
    levels = {(t.lambda_token, t.lambda_patch, t.lambda_fea) for t in targets}
    if len(teachers) == 1 and len(levels) == 1:  # the flags as the run uses them (log.txt's args)
        token, patch, fea = levels.pop()
        config = replace(config, lambda_token=token, lambda_patch=patch, lambda_fea=fea)
    for t in targets:
        if not (t.lambda_token or t.lambda_patch or t.lambda_fea):
            whose = f" of {t.name}" if len(teachers) > 1 else ""
            raise UsageError(f"all loss weights{whose} are 0: nothing to train")
    if any(t.lambda_patch for t in targets) and int(config.mask_probability * config.batch_size) < 1:
        raise UsageError(
            f"--mask-probability {config.mask_probability} masks no sample of a batch of {config.batch_size}; "
            "the patch loss needs masked samples (or set --lambda-patch 0)"
        )
    return config


def build(config: Config, device: torch.device, world: int, *, out: Output, fresh: bool = False) -> Run:
    """Everything a run of `config` needs, resumed if a checkpoint exists; bad input raises UsageError here."""
    seed = config.seed + dist_utils.rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # one crop per sample, at the larger of the two input sizes; each network gets its own resize (Views)
    crop_size = max(config.input_size, *(t.input_size for t in config.teachers))
    stages = loader_stages(config.loader, crop_size, jpeg_draft=config.jpeg_draft)
    dataset = build_dataset(
        config.data_path,
        crop_size,
        config.single_image,
        subset_classes=config.subset_classes,
        subset_images_per_class=config.subset_images_per_class,
        transform=stages.transform,
        read=stages.read,
    )
    if config.random_teacher:
        log.warning(
            "RANDOM TEACHER: %s has random weights; this run distils noise (demo/smoke test only)", config.teacher
        )
    teachers = []
    for t in config.teachers:
        name, file, size = t.name, t.checkpoint, t.input_size
        teacher = create_teacher(
            name, file, pretrained=not config.random_teacher, dtype=TEACHER_DTYPES[config.teacher_dtype]
        ).to(device)
        if bad := teacher.non_finite():  # stop before any target is computed, naming the damaged weights
            where = file or "its file in torch hub's cache"
            raise NonFiniteLoss(f"the weights of teacher {name} are not all finite ({few_names(bad)}) in {where}")
        if config.teacher_normalization == "reference":  # the crops as they are (ImageNet mean/std), as the reference
            teacher.mean, teacher.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        teachers.append(TeacherInput(teacher, size))
    distillers = []  # made in --student order, so the first student's init is that of a run of it alone
    for spec in config.students:
        student = create_student(
            spec.name, img_size=config.input_size, drop_path_rate=config.drop_path, layout=spec.layout, pretraining=True
        )
        if spec.pretrained:  # before the EMA copy; a resumed run's checkpoint then replaces it
            student_family(spec.name, spec.layout)[1].load_student_weights(student, spec.pretrained)
        if device.type == "cuda":
            channels_last(student)
        check_exportable(student, spec.layout)  # one line before training, not at the export after it
        distillers.append(Distiller(student, targets_of(config, grid_of(config, spec))).to(device))

    # Repeated augmentation under DDP (3 repeats, DeiT's floor(N/256)*256 samples); one plain
    # seeded shuffle per epoch in a single process.
    sampler = RepeatAugSampler(
        dataset,
        num_replicas=world,
        rank=dist_utils.rank(),
        shuffle=True,
        num_repeats=3 if world > 1 else 1,
        selected_round=256 if world > 1 else 0,
    )
    # augmentation seeded by (seed, rank, epoch, position): resumable and independent of the workers
    sampler = PositionSampler(sampler, config.seed, dist_utils.rank())
    if config.loader == "dali":  # an optional dependency, imported only when asked for
        from .dali import DaliLoader

        loader = DaliLoader(
            dataset,
            sampler,
            batch_size=config.batch_size,
            size=crop_size,
            device=device,
            num_threads=config.num_workers,
        )
    else:
        loader = DataLoader(
            SeededDataset(dataset),
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=config.num_workers > 0,
            worker_init_fn=worker_init,
            prefetch_factor=4 if config.num_workers > 0 else None,
        )
    if len(sampler) < config.batch_size:
        raise UsageError(
            f"{len(sampler)} images per process cannot fill one batch of {config.batch_size}; lower --batch-size"
        )
    iters = config.epoch_length or len(sampler) // config.batch_size

    global_batch = config.batch_size * world
    lr = config.lr * global_batch / 512
    if lr < config.min_lr:
        log.warning(
            "the scaled peak lr %.3g (--lr %g x global batch %d / 512) is below --min-lr %g: the cosine will rise; "
            "lower --min-lr for small batches",
            *(lr, config.lr, global_batch, config.min_lr),
        )
    schedule = warmup_cosine(
        lr,
        config.min_lr,
        config.epochs * iters,
        warmup_iters=int(config.warmup_epochs * iters),
        warmup_start=config.warmup_lr,
    )
    several = len(distillers) > 1
    students = []
    for spec, distiller in zip(config.students, distillers):
        name, layout = spec.name, spec.layout
        grid = (config.input_size // distiller.student.patch_size,) * 2
        for t, adaptor in zip(teachers, distiller.adaptors.values()):
            target = adaptor.target
            if (target.lambda_patch or target.lambda_fea) and t.grid != grid:
                out.print(
                    f"the teacher's {t.grid[0]}x{t.grid[1]} patch tokens ({t.name} at {t.size} px) are resampled "
                    f"to {name if several else 'the student'}'s {grid[0]}x{grid[1]} grid (bilinear, antialiased "
                    "when shrinking)"
                )
        no_decay = tuple(f"student.{n}" for n in FAMILIES[layout].student_no_weight_decay(distiller.student))
        optimizer = torch.optim.AdamW(
            param_groups(distiller, config.weight_decay, no_decay),
            lr=lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=device.type == "cuda",
        )
        student_out = out.sub(name) if several else out
        student_out.remove_stale_temp_files((CHECKPOINT, *EXPORTS, EPOCH_LOG, ITERATION_LOG))
        students.append(
            Student(
                name=name,
                layout=layout,
                distiller=distiller,
                model=distiller,
                views=Views(config.input_size, grid),
                optimizer=optimizer,
                scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
                ema=ModelEmaV3(distiller.student, decay=config.ema_decay),
                out=student_out,
            )
        )
    run = Run(
        config=config,
        device=device,
        teachers=teachers,
        students=students,
        schedule=schedule,
        loader=loader,
        finish=stages.finish,
        sampler=sampler,
        iters_per_epoch=iters,
        out=out,
        control=StopControl(config.save_every_minutes),
    )
    run.resume(fresh)
    estimate_statistics(run)  # standardised targets, a fresh run: before any student sees a target
    for s in students:
        if config.compile:  # after the EMA copy and the resume: both see the plain module
            compile_student(s.distiller.student)
        if world > 1:  # one process group; each student its own DDP wrapper
            s.model = torch.nn.parallel.DistributedDataParallel(
                s.distiller, device_ids=[device.index] if device.type == "cuda" else None
            )
    return run


def train(run: Run) -> None:
    """Epochs from where the run stands to --epochs, a checkpoint after each, then the exports."""
    config, out = run.config, run.out
    start_epoch, world = run.position.epoch, dist_utils.world_size()
    if start_epoch >= config.epochs:
        out.print(f"{out.folder} already holds all {config.epochs} epochs; raise --epochs to train longer")
    else:
        for s in run.students:
            n_params = sum(p.numel() for p in s.distiller.student.parameters()) / 1e6
            teachers = ", ".join(f"{t.name} ({str(t.teacher.dtype).removeprefix('torch.')})" for t in run.teachers)
            out.print(
                f"distilling {teachers} -> {s.name} "
                f"({s.layout} layout, {n_params:.1f}M params) "
                f"on {run.device}, world {world}, global batch {config.batch_size * world}, peak lr "
                f"{max(run.schedule):.3e}, {run.iters_per_epoch} it/epoch, epochs {start_epoch}..{config.epochs - 1}"
            )
    # PCA pictures of the dataset's first 4 images (eval transform): the teacher's once, each student's every N epochs
    if config.pca_every > 0:
        for s in run.students:
            s.out.load_pictures(run.loader.dataset, config.input_size, run.device)
            for t in run.teachers:
                tag = "pca/teacher" + (f"/{t.name}" if len(run.teachers) > 1 else "")
                s.out.picture(tag, t.teacher, start_epoch, size=t.size)

    for epoch in range(start_epoch, config.epochs):
        stats = train_one_epoch(run)
        run.save_checkpoint()
        for s, line in zip(run.students, stats):
            s.out.epoch(epoch, line)
            if config.pca_every > 0 and (epoch + 1) % config.pca_every == 0:
                s.out.picture("pca/student", s.distiller.student, epoch)
            s.out.flush()
        dist_utils.barrier()
        if run.control.signalled and epoch + 1 < config.epochs:
            raise Preempted(f"stopped after epoch {epoch}")
        run.next_epoch()
    for s in run.students:
        export(run, s, trained=start_epoch < config.epochs)
        s.out.close()
        out.print(
            f"done: {s.out.folder / 'backbone.pth'} ({s.layout} layout), {s.out.folder / 'backbone_ema.pth'}, "
            f"{s.out.folder / 'adaptors.pth'}, trained at img_size {config.input_size}; tensorboard logs in "
            f"{s.out.folder / 'tensorboard'}"
        )


EXPORTS = ("backbone.pth", "backbone_ema.pth", "adaptors.pth")


def export(run: Run, s: Student, trained: bool) -> None:
    """Student `s`'s backbone.pth and backbone_ema.pth in the reference's layout of its layout, and adaptors.pth
    (its heads per teacher and their target statistics: models.load_adaptors). A finished run re-run keeps
    the files it finds: a new mtime would void the evaluations' feature caches."""
    if not s.out.main:  # only rank 0 writes
        return
    for name in EXPORTS:
        if not trained and (s.out.folder / name).is_file():
            continue
        if name == "adaptors.pth":
            teachers = {
                t.name: {"family": t.teacher.family, "patch_size": t.teacher.patch_size, "input_size": t.size,
                         "mean": list(t.teacher.mean), "std": list(t.teacher.std)}
                for t in run.teachers
            }  # fmt: skip
            student = {"name": s.name, "layout": s.layout, "img_size": run.config.input_size}
            s.out.save(s.distiller.export_adaptors(student, teachers), name)
        else:
            s.out.save(to_reference(s.distiller.student if name == "backbone.pth" else s.ema.module, s.layout), name)


SET_UP = "set-up (checks, teacher, data, model; nothing trained or written yet)"  # what a SIGTERM then interrupts


def distil(args: argparse.Namespace, fresh: bool = False) -> int:
    """The run, under common.cli.run (bad input: `error:` and 2; a full disk: 1); 0 when done, 3 when the
    loss turns non-finite, EXIT_REQUEUE (75) when stopped by SIGUSR1/SIGTERM after its checkpoints.
    fresh: start at epoch 0 even if --output-dir holds a checkpoint.pth (the demo's re-runs); the old files
    are replaced only once every input is checked."""
    config = resolve(args)
    prepare_output_dir(config.output_dir)
    device, _, world = dist_utils.init_distributed(config.device)
    out = Output(config.output_dir, main=dist_utils.is_main())
    try:
        run = build(config, device, world, out=out, fresh=fresh)
    except NonFiniteLoss as e:
        print(f"error: {e}; stopping before training", file=sys.stderr, flush=True)
        return 3
    try:
        with run.control:
            train(run)
    except NonFiniteLoss as e:
        print(f"error: {e}; stopping, {run.kept()}", file=sys.stderr, flush=True)
        return 3
    except Preempted as e:
        dist_utils.barrier()  # no rank exits (and gets its peers killed by torchrun) before rank 0 has written
        out.print(f"{e}: wrote {', '.join(map(str, run.checkpoints()))}, exiting {EXIT_REQUEUE} (requeue)")
        return EXIT_REQUEUE
    return 0


def main(argv: list[str] | None = None, fresh: bool = False) -> int:
    return cli.run(distil, get_args_parser().parse_args(argv), fresh, during=SET_UP)


if __name__ == "__main__":
    sys.exit(main())
