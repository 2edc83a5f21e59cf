"""Speed of one pretraining step (ours vs the reference's step) and of the input pipeline.

python -m pretrain.benchmark --teacher dinov2_vitl14 --student vit_base --batch-size 128 --reference
python -m pretrain.benchmark --teacher dinov2_vitg14 --student vit_small,vit_base   # teacher sharing
python -m pretrain.benchmark --pipeline --images 64 --workers 1,2   # the CPU loaders, stage by stage
python -m pretrain.benchmark --pipeline --loaders dali --device cuda --pipeline-batch 128 --workers 4,8

The step benchmark uses synthetic images already on the device and a RANDOM-weight teacher: the
step's speed does not depend on the weights, and no download is needed. "Ours" is the trainer's own
step (engine.forward_losses + engine.backward_and_step on a Distiller, optimizer as main.build); its
breakdown times the same engine code in three parts. The reference keeps its own two-pass step. With
several students, the joint step (the teacher once, then each student on its targets, as the trainer's
step) is timed against each student's separate step (teacher + that student).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import distributed as dist_utils
from common.cli import ArgumentParser, run
from common.shards import shard_folder
from models import LAYOUTS, TEACHERS, Teacher, TeacherTarget, Tokens, create_student, create_teacher
from models.errors import MissingFile, UsageError
from models.families import split_student, student_family, student_layout, teacher_spec

from .data import PositionSampler, SeededDataset, build_dataset, derive_seed, seed_sample, worker_init
from .distiller import Distiller, TeacherInput, Views, channels_last, compile_student, param_groups
from .engine import AMP, backward, backward_and_step, forward_losses, student_losses, teacher_targets, update
from .loaders import DraftRead, Stages, UInt8Crop, classic_finish, loader_stages, recipe_stages, to_uint8
from .masking import make_masks

PIPELINE_LOADERS = ("classic", "cpu", "cpu --jpeg-draft")  # --pipeline --loaders: the CPU variants (variants)
MATMUL_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of `fn`, synchronised on both sides so queued GPU work is counted where it belongs."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def matmul_rate(device: torch.device, precision: str, seconds: float = 1.0) -> float:
    """Achievable matmul FLOP/s at this precision on this device: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=MATMUL_DTYPE[precision])
    b = torch.randn(n, n, device=device, dtype=MATMUL_DTYPE[precision])
    for _ in range(2):
        a @ b
    k, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += timed(lambda: a @ b, device)
        k += 1
    return 2 * n**3 * k / elapsed


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def disable_fused_attention(model: nn.Module) -> None:
    """The reference ran attention as explicit matmul + softmax (no fused SDPA kernel)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


class ReferenceDistiller(nn.Module):
    """The reference's step: the student sees the masked view of the whole batch, then a second, clean pass.

    Same weights, heads and loss definitions as Distiller (whose single batched pass only runs the masked
    samples twice), so on the same batch in fp32 both give the same losses.
    """

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.student = copy.deepcopy(distiller.student)
        self.token_head = copy.deepcopy(distiller.token_head)
        self.patch_head = copy.deepcopy(distiller.patch_head)
        self.fea_head = copy.deepcopy(distiller.fea_head)
        (target,) = (a.target for a in distiller.adaptors.values())  # the reference had one teacher
        self.lambda_token = target.lambda_token
        self.lambda_patch, self.lambda_fea = target.lambda_patch, target.lambda_fea
        disable_fused_attention(self.student)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None, targets: Tokens) -> dict[str, torch.Tensor]:
        """`masks` (B, N) bool for the whole batch (clean samples all False)."""
        t_cls, t_patches = targets.cls.float(), targets.patches.float()
        zero = images.new_zeros((), dtype=torch.float32)
        parts = {"token": zero, "patch": zero, "fea": zero}
        if self.lambda_patch and masks is not None:
            patches = self.student.forward_features(images, masks=masks)["x_norm_patchtokens"]
            parts["patch"] = F.mse_loss(self.patch_head(patches[masks]).float(), t_patches[masks])
        out = self.student.forward_features(images)
        token_pred = self.token_head(out["x_norm_clstoken"]).float()
        if self.lambda_token:
            parts["token"] = F.mse_loss(token_pred, t_cls)
        if self.lambda_fea:
            pred = torch.cat((token_pred.unsqueeze(1), self.fea_head(out["x_norm_patchtokens"]).float()), dim=1)
            parts["fea"] = F.mse_loss(pred, torch.cat((t_cls.unsqueeze(1), t_patches), dim=1))
        total = self.lambda_token * parts["token"] + self.lambda_patch * parts["patch"] + self.lambda_fea * parts["fea"]
        return {"total": total, **parts}


def single_process_group(device: torch.device) -> bool:
    """A 1-process group so the reference can run under DDP(find_unused_parameters=True); True if we made it."""
    if dist.is_initialized():
        return False
    store = dist.FileStore(tempfile.mktemp(prefix="proteus_bench_store_"), 1)
    dist.init_process_group(dist_utils.backend(device), store=store, rank=0, world_size=1)
    return True


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    """What one Setup is made of: the step benchmarks' flags for one student."""

    teacher: str
    student: str
    student_layout: str | None  # None: the teacher's family
    input_size: int
    batch_size: int
    precision: str
    seed: int


def step_configs(args: argparse.Namespace) -> list[StepConfig]:
    """A StepConfig per --student, in order."""
    return [
        StepConfig(
            teacher=args.teacher,
            student=name,
            student_layout=args.student_layout,
            input_size=args.input_size,
            batch_size=args.batch_size,
            precision=args.precision,
            seed=args.seed,
        )
        for name in args.student.split(",")
    ]


class Setup:
    """Teacher, Distiller, optimizer and scaler as main.build makes them, plus one fixed synthetic batch."""

    def __init__(self, config: StepConfig, device: torch.device, teacher: Teacher | None = None) -> None:
        """teacher: another Setup's, shared (the teacher-sharing benchmark); else a random one is made."""
        torch.manual_seed(config.seed)
        self.device, self.precision = device, config.precision
        with torch.device(device):  # a random teacher is initialised where it runs (the 7B: on the GPU, in seconds)
            self.teacher = teacher if teacher is not None else create_teacher(config.teacher, pretrained=False)
        # a family's own name (vit_small_dinov3, timm:resnet50) says its layout, else --student-layout or the teacher's
        layout = split_student(config.student, None)[1] or config.student_layout or student_layout(config.teacher)
        student = create_student(config.student, img_size=config.input_size, layout=layout, pretraining=True)
        if device.type == "cuda":
            channels_last(student)
        self.teachers = [TeacherInput(self.teacher, config.input_size)]
        grid = config.input_size // student.patch_size
        self.views = Views(config.input_size, (grid, grid))
        level = teacher_spec(config.teacher).dense_level(config.input_size, grid)  # 0: the CLS loss alone (CLIP)
        target = TeacherTarget(config.teacher, self.teacher.embed_dim, lambda_patch=level, lambda_fea=level)
        self.distiller = Distiller(student, [target]).to(device).train()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.distiller, 0.05), lr=1e-4, eps=1e-8, fused=device.type == "cuda"
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        b = config.batch_size
        self.images = torch.randn(b, 3, config.input_size, config.input_size, device=device)
        full = make_masks(
            b, grid**2, 0.5, mask_ratio=(0.5, 0.5), generator=torch.Generator().manual_seed(config.seed)
        ).to(device)
        self.masks_full = full if level else None  # the reference's (B, N) masks
        self.masks = full[: int(0.5 * b)] if level else None  # ours: the masked samples only
        self.amp = AMP[config.precision]

    def step(self) -> torch.Tensor:
        loss = forward_losses(
            self.distiller, self.teachers, self.images, masks=self.masks, amp_dtype=self.amp, views=self.views
        )["total"]
        backward_and_step(self.distiller, loss, self.optimizer, scaler=self.scaler)
        return loss.detach()

    def breakdown(self) -> tuple[float, float, float]:
        """Seconds of the step's three parts (engine's own code), each synchronised: teacher forward, student
        forward + backward, optimizer step."""
        targets: dict = {}

        def teacher() -> None:
            targets.update(teacher_targets(self.teachers, self.images, self.amp))

        def student() -> None:
            losses = student_losses(
                self.distiller,
                self.teachers,
                self.images,
                masks=self.masks,
                targets=targets,
                amp_dtype=self.amp,
                views=self.views,
            )
            backward(losses["total"], self.optimizer, self.scaler)

        def optimizer() -> None:
            update(self.distiller, self.optimizer, self.scaler)

        return timed(teacher, self.device), timed(student, self.device), timed(optimizer, self.device)

    def release(self) -> None:
        """Ours is measured: its models, gradients and optimizer state leave the device (the batch stays)."""
        self.optimizer.state.clear()
        self.distiller.zero_grad(set_to_none=True)
        self.distiller.cpu()
        self.teacher.cpu()

    def flops(self) -> int:
        """FlopCounterMode over one forward + backward (teacher forward, student forward/backward); no update."""
        with FlopCounterMode(display=False) as counter:
            losses = forward_losses(
                self.distiller, self.teachers, self.images, masks=self.masks, amp_dtype=self.amp, views=self.views
            )
            backward(losses["total"], self.optimizer, self.scaler)
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


class Reference:
    """The reference step on Setup's batch and initial weights: two student passes, fp16 autocast + GradScaler
    (fp32 when --precision fp32), unfused AdamW, DDP with find_unused_parameters, unfused attention.

    The weights are copied when it is made (before ours trains) and wait on the CPU until `start`, so
    neither side's peak memory holds the other's models."""

    def __init__(self, setup: Setup) -> None:
        self.setup, self.device = setup, setup.device
        self.teacher = copy.deepcopy(setup.teacher).cpu()
        disable_fused_attention(self.teacher)
        self.distiller = ReferenceDistiller(setup.distiller).cpu()
        self.amp = None if setup.precision == "fp32" else torch.float16
        self.model, self.owns_group, self.skipped = None, False, 0

    def start(self) -> None:
        device = self.device
        self.teacher.to(device)
        model = self.distiller.to(device)
        self.owns_group = single_process_group(device)
        self.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None, find_unused_parameters=True
        )
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, eps=1e-8, foreach=False, fused=False)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is not None)

    def step(self) -> torch.Tensor:
        s = self.setup
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            targets = self.teacher.targets(s.images, s.views.grid)
            loss = self.model(s.images, s.masks_full, targets)["total"]
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        scale = self.scaler.get_scale() if self.amp is not None else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.amp is not None and self.scaler.get_scale() < scale:  # an inf/NaN gradient: no update
            self.skipped += 1
        return loss.detach()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def run_steps(step: Callable[[], torch.Tensor], device: torch.device, *, warmup: int, steps: int):
    """(per-step seconds after warm-up, the losses of every step)."""
    losses, times = [], []
    for _ in range(warmup):
        losses.append(float(step()))
    for _ in range(steps):
        times.append(timed(lambda: losses.append(float(step())), device))
    return times, losses


def step_benchmark(args: argparse.Namespace) -> float:
    """Prints the report; returns the speedup (reference / ours median step time), or 0 without --reference."""
    device = torch.device(args.device)
    (config,) = step_configs(args)
    setup = Setup(config, device)
    reference = Reference(setup) if args.reference else None  # copies the weights before ours trains
    print(
        f"teacher {args.teacher} (RANDOM weights, {str(setup.teacher.dtype).removeprefix('torch.')}) -> student "
        f"{args.student} ({type(setup.distiller.student).__name__}), batch {args.batch_size}, "
        f"input {args.input_size}, {args.precision}, {device}, compile {args.compile}, "
        f"synthetic batch on device, warmup {args.warmup}, steps {args.steps}, torch {torch.__version__}"
    )
    flops = setup.flops()
    rate = matmul_rate(device, args.precision)
    print(f"flops/step: {flops / 1e9:.2f} GFLOP (FlopCounterMode: teacher fwd + student fwd/bwd of ours)")
    print(f"matmul rate: {rate / 1e12:.3f} TFLOP/s ({args.precision} square matmul loop on {device})")
    if args.compile:
        compile_student(setup.distiller.student)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = run_steps(setup.step, device, warmup=args.warmup, steps=args.steps)
    ours = statistics.median(times)
    print(
        f"ours: step {ours * 1e3:.1f} ms (median of {len(times)}), {args.batch_size / ours:.1f} img/s, "
        f"peak memory {peak_memory_mib(device):.0f} MiB, MFU {100 * flops / ours / rate:.1f}%"
    )
    parts = [setup.breakdown() for _ in range(max(1, min(args.steps, 3)))]
    t, s, o = (statistics.median(p[k] for p in parts) * 1e3 for k in range(3))
    print(f"ours breakdown: teacher fwd {t:.1f} ms, student fwd+bwd {s:.1f} ms, optimizer {o:.1f} ms")
    print("ours losses: " + " ".join(f"{v:.6f}" for v in losses))
    if reference is None:
        return 0.0
    setup.release()
    try:
        reference.start()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, ref_losses = run_steps(reference.step, device, warmup=args.warmup, steps=args.steps)
    finally:
        reference.close()
    ref = statistics.median(times)
    print(
        f"reference: step {ref * 1e3:.1f} ms (median of {len(times)}), {args.batch_size / ref:.1f} img/s, "
        f"peak memory {peak_memory_mib(device):.0f} MiB, MFU {100 * flops / ref / rate:.1f}% (ours' FLOPs)"
    )
    print("reference losses: " + " ".join(f"{v:.6f}" for v in ref_losses))
    if reference.amp is not None:  # a skipped update is a cheaper step: it would flatter the reference
        print(f"reference: GradScaler skipped {reference.skipped} of {args.warmup + args.steps} updates")
    print(f"speedup: {ref / ours:.2f}")
    return ref / ours


def sharing_benchmark(args: argparse.Namespace) -> float:
    """Several students of one teacher: the joint step (the teacher once, then each student on its targets)
    and each student's separate step (teacher + that student), in one process on one batch. Prints and
    returns the teacher-sharing speedup: the sum of the separate step times / the joint step time."""
    device = torch.device(args.device)
    configs = step_configs(args)
    names = [c.student for c in configs]
    setups = [Setup(configs[0], device)]
    for config in configs[1:]:
        setups.append(Setup(config, device, setups[0].teacher))
    first = setups[0]
    for s in setups[1:]:
        s.images = first.images  # one batch for all
    print(
        f"teacher {args.teacher} (RANDOM weights, {str(first.teacher.dtype).removeprefix('torch.')}) -> students "
        f"{', '.join(names)}, batch {args.batch_size}, input {args.input_size}, {args.precision}, {device}, "
        f"compile {args.compile}, synthetic batch on device, warmup {args.warmup}, steps {args.steps}, "
        f"torch {torch.__version__}"
    )
    if args.compile:
        for s in setups:
            compile_student(s.distiller.student)

    def joint() -> torch.Tensor:
        targets = teacher_targets(first.teachers, first.images, first.amp)
        total = first.images.new_zeros(())
        for s in setups:
            loss = student_losses(
                s.distiller, s.teachers, s.images, masks=s.masks, targets=targets, amp_dtype=s.amp, views=s.views
            )["total"]
            backward_and_step(s.distiller, loss, s.optimizer, scaler=s.scaler)
            total = total + loss.detach()
        return total

    separate = []
    for name, s in zip(names, setups):
        times, _ = run_steps(s.step, device, warmup=args.warmup, steps=args.steps)
        separate.append(statistics.median(times))
        print(f"separate: {name} step {separate[-1] * 1e3:.1f} ms (teacher + {name}, median of {len(times)})")
    times, _ = run_steps(joint, device, warmup=args.warmup, steps=args.steps)
    together = statistics.median(times)
    print(
        f"joint: step {together * 1e3:.1f} ms (teacher once + {len(names)} students, median of {len(times)}), "
        f"peak memory {peak_memory_mib(device):.0f} MiB"
    )
    print(f"teacher-sharing speedup: {sum(separate) / together:.2f}")
    return sum(separate) / together


LARGE_PHOTO = (1600, 1200)  # the share of large photos among the generated JPEGs
PIPELINE_SEED = 0  # the keys (seed, rank 0, epoch 0, position) of the pipeline benchmark's samples


def generate_jpegs(
    folder: Path, n: int, size: tuple[int, int] = (500, 375), *, seed: int = 0, large_share: float = 0.0
) -> Path:
    """`n` ImageNet-like JPEGs (quality 90) cropped from scikit-image's sample photos, in folder/train/photos/;
    a `large_share` of them (spread evenly) LARGE_PHOTO-sized instead."""
    import numpy as np
    from PIL import Image
    from skimage import data as samples

    photos = [getattr(samples, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    out = folder / "train" / "photos"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        large = int((i + 1) * large_share) > int(i * large_share)
        img = img.crop((x, y, x + cw, y + ch)).resize(LARGE_PHOTO if large else size, Image.BICUBIC)
        img.save(out / f"{i:04d}.jpg", quality=90)
    return folder


@contextlib.contextmanager
def pipeline_jpegs(args: argparse.Namespace) -> Iterator[Path]:
    """--pipeline's ImageFolder root, for every loader: --pipeline-dir, else --images generated JPEGs (a
    --large-share of them large photos) in a temporary folder, removed afterwards."""
    if args.pipeline_dir:
        yield Path(args.pipeline_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield generate_jpegs(Path(tmp), args.images, large_share=args.large_share)


def jpeg_summary(root: Path, paths: list[str]) -> str:
    """What a pipeline figure was measured on: 'N JPEGs in root/train (k over 1 Mpixel)'."""
    from PIL import Image

    large = sum(w * h > 1e6 for w, h in (Image.open(p).size for p in paths))
    return f"{len(paths)} JPEGs in {root}/train ({large} over 1 Mpixel)"


def images_per_second(batches: Iterable, device: torch.device | None = None) -> float:
    """img/s of (images, labels) batches; the first (worker start-up, a pipeline's build, decoder start-up) stays
    out of the measurement, and the clock stops once `device` has finished the work queued on it."""
    batches = iter(batches)
    next(batches)
    t = time.perf_counter()
    count = sum(len(labels) for _, labels in batches)
    if device is not None:
        sync(device)
    return count / (time.perf_counter() - t)


class Variant(NamedTuple):
    """A CPU loader as the pipeline benchmark times it: its worker stages in order (name, function of the
    previous stage's output), the whole loader (pretrain.loaders.Stages), and what it hands over per sample."""

    name: str
    stages: list[tuple[str, Callable]]
    loader: Stages


def variants(input_size: int) -> list[Variant]:
    """classic, cpu and cpu with --jpeg-draft, split into the stages their workers run."""
    from PIL import Image

    from common.images import to_rgb

    augment, final, erasing = recipe_stages(input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    crop, flip, randaugment = augment.transforms
    to_tensor, normalise, random_erasing = final.transforms
    record = UInt8Crop(augment, erasing).record
    read = ("read", lambda path: Path(path).read_bytes())
    decode = ("decode", lambda data: to_rgb(Image.open(io.BytesIO(data))))
    pil = [("flip", flip), ("RandAugment", randaugment)]
    uint8 = [("to-tensor (uint8)", to_uint8), ("erasing boxes", lambda x: (x, record(x)))]
    draft = DraftRead(crop)
    return [
        Variant(
            "classic",
            [
                read,
                decode,
                ("crop+resize", crop),
                *pil,
                ("to-tensor", to_tensor),
                ("normalise", normalise),
                ("erasing", random_erasing),
            ],
            loader_stages("classic", input_size),
        ),  # fmt: skip
        Variant("cpu", [read, decode, ("crop+resize", crop), *pil, *uint8], loader_stages("cpu", input_size)),
        Variant(
            "cpu --jpeg-draft",
            [read, ("decode+crop (draft)", lambda data: draft.decode(Image.open(io.BytesIO(data)))), *pil, *uint8],
            loader_stages("cpu", input_size, jpeg_draft=True),
        ),
    ]


STAGE_ORDER = ("read", "decode", "decode+crop (draft)", "crop+resize", "flip", "RandAugment", "to-tensor",
               "to-tensor (uint8)", "normalise", "erasing", "erasing boxes", "collate+transfer")  # fmt: skip


def collate_shared(samples: list[torch.Tensor]) -> torch.Tensor:
    """The worker's collate: the batch stacked straight into shared memory, which is what the main process
    maps (torch's default_collate in a worker does the same)."""
    first = samples[0]
    storage = first.untyped_storage()._new_shared(len(samples) * first.nbytes, device=first.device)
    out = first.new(storage).resize_(len(samples), *first.shape)
    return torch.stack(samples, out=out)


def stage_breakdown(variant: Variant, paths: list[str], batch: int) -> dict[str, float]:
    """Seconds per image of each worker stage, in process on one thread, each sample seeded by its key as
    data.SeededDataset seeds it; collate (+ transfer) per batch into shared memory, divided by the batch."""
    times: dict[str, float] = dict.fromkeys([name for name, _ in variant.stages] + ["collate+transfer"], 0.0)
    images = []
    for position, path in enumerate(paths):
        seed_sample(derive_seed(PIPELINE_SEED, 0, 0, position))
        x = path
        for name, fn in variant.stages:
            t = time.perf_counter()
            x = fn(x)
            times[name] += time.perf_counter() - t
        images.append(x[0] if isinstance(x, tuple) else x)
        if len(images) == batch or position == len(paths) - 1:
            t = time.perf_counter()
            collate_shared(images)
            times["collate+transfer"] += time.perf_counter() - t
            images = []
    return {name: v / len(paths) for name, v in times.items()}


def device_finish(variant: Variant, dataset, *, batch: int, device: torch.device) -> float:
    """Seconds per image of the loader's `finish` on `device` (the cpu loader: normalisation and erasing,
    batched), over one collated batch of its samples; 0 when it only moves the batch."""
    if variant.loader.finish is classic_finish:
        return 0.0
    keys = [(i, derive_seed(PIPELINE_SEED, 0, 0, i)) for i in range(min(batch, len(dataset)))]
    collated = torch.utils.data.default_collate([SeededDataset(dataset)[k] for k in keys])
    variant.loader.finish(collated, device)  # warm-up: the device's kernels, the mean/std copies
    times = [timed(lambda: variant.loader.finish(collated, device), device) for _ in range(5)]
    return statistics.median(times) / len(keys)


def loader_rate(dataset, *, workers: int, batch: int) -> float:
    """img/s of the training DataLoader (PositionSampler keys, SeededDataset) over `dataset`, first batch out."""
    sampler = PositionSampler(torch.utils.data.SequentialSampler(dataset), PIPELINE_SEED, 0)
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset), batch_size=batch, sampler=sampler, num_workers=workers, worker_init_fn=worker_init
    )
    return images_per_second(loader)


def pipeline_benchmark(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Each CPU loader's per-stage breakdown (ms per image, one thread) and its training DataLoader's img/s for
    each worker count, on the same JPEGs and keys; prints `pipeline speedup` (cpu / classic img/s per worker at
    the first worker count) last. Returns {loader: {workers: img/s}}."""
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a DataLoader worker runs
    try:
        with pipeline_jpegs(args) as root:
            return report_pipeline(args, root, device)
    finally:
        torch.set_num_threads(threads)


def report_pipeline(args: argparse.Namespace, root: Path, device: torch.device) -> dict[str, dict[int, float]]:
    from PIL import Image

    chosen = [v for v in variants(args.input_size) if v.name in args.loaders]
    datasets = {v.name: build_dataset(str(root), args.input_size, transform=v.loader.transform, read=v.loader.read)
                for v in chosen}  # fmt: skip
    paths = [p for p, _ in next(iter(datasets.values())).samples]
    print(
        f"input pipeline: {jpeg_summary(root, paths)}, input {args.input_size}, "
        f"batch {args.pipeline_batch}, torch threads 1, Pillow {Image.__version__}, device stages on {device}"
    )
    breakdown = {v.name: stage_breakdown(v, paths, args.pipeline_batch) for v in chosen}
    finish = {v.name: device_finish(v, datasets[v.name], batch=args.pipeline_batch, device=device) for v in chosen}
    names = [name for name in STAGE_ORDER if any(name in b for b in breakdown.values())]
    print("stage (ms/image)".ljust(24) + "".join(v.name.rjust(18) for v in chosen))
    for name in names:
        cells = [f"{breakdown[v.name][name] * 1e3:.2f}" if name in breakdown[v.name] else "-" for v in chosen]
        print(name.ljust(24) + "".join(c.rjust(18) for c in cells))
    totals = {v.name: sum(breakdown[v.name].values()) for v in chosen}
    print("worker total".ljust(24) + "".join(f"{totals[v.name] * 1e3:.2f}".rjust(18) for v in chosen))
    print("per core (img/s)".ljust(24) + "".join(f"{1 / totals[v.name]:.1f}".rjust(18) for v in chosen))
    print(f"on {device} (batched)".ljust(24) + "".join(f"{finish[v.name] * 1e3:.3f}".rjust(18) for v in chosen))
    rates: dict[str, dict[int, float]] = {}
    for v in chosen:
        rates[v.name] = {}
        for workers in args.workers:
            rate = loader_rate(datasets[v.name], workers=workers, batch=args.pipeline_batch)
            rates[v.name][workers] = rate
            print(f"{v.name}: workers {workers}: {rate:.1f} img/s ({rate / max(workers, 1):.1f} img/s per worker)")
    if {"classic", "cpu"} <= set(rates):
        first = args.workers[0]
        print(f"pipeline speedup: {rates['cpu'][first] / rates['classic'][first]:.2f}")
    return rates


def dali_pipeline_benchmark(args: argparse.Namespace) -> dict[int, float]:
    """--loaders dali: the trainer's DALI pipeline (pretrain/dali.py) on --device in images/s for each count of its
    CPU threads, on the CPU loaders' JPEGs, timed as their DataLoaders are."""
    from .dali import DaliLoader  # optional dependency (requirements-dali.txt)

    device = torch.device(args.device)
    with pipeline_jpegs(args) as root:
        dataset = build_dataset(str(root), args.input_size)
        paths = [p for p, _ in dataset.samples]
        print(f"DALI pipeline on {device}: {jpeg_summary(root, paths)}, input {args.input_size}")
        sampler = PositionSampler(torch.utils.data.SequentialSampler(dataset), PIPELINE_SEED, 0)  # loader_rate's
        rates = {}
        for threads in args.workers:
            loader = DaliLoader(
                dataset,
                sampler,
                batch_size=args.pipeline_batch,
                size=args.input_size,
                device=device,
                num_threads=threads,
            )
            rates[threads] = images_per_second(loader, device)
            print(f"threads {loader.num_threads}: {rates[threads]:.1f} img/s on one {device.type.upper()}")
    return rates


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Proteus pretraining benchmark")
    a = p.add_argument
    a("--teacher", default="dinov2_vits14", help=f"one of: {', '.join(TEACHERS)} (random weights)")
    a(
        "--student",
        default="vit_tiny",
        help="vit_tiny, vit_small, vit_base or vit_large; a comma list times the teacher-sharing step",
    )
    a("--student-layout", choices=tuple(LAYOUTS), help="as pretrain.main (default: the teacher's family)")
    a("--batch-size", type=int, default=8, help="images per step")
    a("--input-size", type=int, default=224, help="square crop side")
    a("--steps", type=int, default=10, help="timed steps (median reported)")
    a("--warmup", type=int, default=3, help="untimed steps first")
    a("--compile", action="store_true", help="torch.compile the student's forward_features, as main.py --compile")
    a("--reference", action="store_true", help="also time the reference's step on the same batch; prints speedup")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the step runs")
    a(
        "--precision",
        choices=tuple(AMP),
        default="bf16",
        help="ours; --reference runs fp16 + GradScaler then (fp32 for fp32)",
    )
    a("--seed", type=int, default=0, help="weights and synthetic batch")
    a("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a shared machine avoids OpenMP spinning")
    a("--pipeline", action="store_true", help="benchmark JPEG decode + augmentation instead of the step")
    a("--pipeline-dir", help="ImageFolder root with train/ (default: generate --images JPEGs in a temp dir)")
    a("--images", type=int, default=64, help="JPEGs to generate for --pipeline")
    a("--pipeline-batch", type=int, default=16, help="loader batch size for --pipeline")
    a(
        "--large-share",
        type=float,
        default=0.1,
        help=f"--pipeline: the fraction of generated JPEGs that are large photos ({LARGE_PHOTO[0]}x{LARGE_PHOTO[1]})",
    )
    a(
        "--loaders",
        type=lambda s: s.split(","),
        default=list(PIPELINE_LOADERS),
        help="--pipeline: comma list of classic, cpu, 'cpu --jpeg-draft'; or dali alone (on --device)",
    )
    a("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2], help="comma list (dali: its threads)")
    return p


def benchmark(args: argparse.Namespace) -> None:
    names = args.student.split(",")
    teacher_spec(args.teacher)  # an unknown name: one line that lists the teachers
    families = [student_family(name)[1] for name in names]  # an unknown one: one line that lists the students
    if len(names) > 1 and args.reference:
        raise UsageError("--reference times one student's step; give one --student")
    if args.reference and families[0].layout is None:
        raise UsageError(f"--reference times the reference's step, whose students are ViTs; not {names[0]}")
    dist_utils.resolve_device(args.device)
    if args.pipeline and args.pipeline_dir and not (Path(args.pipeline_dir) / "train").is_dir():
        raise MissingFile(f"--pipeline-dir {args.pipeline_dir}: no train/ folder (an ImageFolder root)")
    if args.pipeline and args.pipeline_dir and shard_folder(args.pipeline_dir):
        raise UsageError(f"--pipeline-dir {args.pipeline_dir}: the benchmark reads image files, not train-shards/")
    unknown = sorted(set(args.loaders) - {*PIPELINE_LOADERS, "dali"})
    if args.pipeline and unknown:
        raise UsageError(f"--loaders {','.join(unknown)}: choose from {', '.join(PIPELINE_LOADERS)}, or dali alone")
    if args.pipeline and "dali" in args.loaders and args.loaders != ["dali"]:
        raise UsageError("--loaders dali runs alone: the DALI pipeline runs on --device, the others on the CPU")
    if args.pipeline and args.images < 2 * args.pipeline_batch and not args.pipeline_dir:
        raise UsageError(f"--images {args.images}: the loaders' rates need at least two batches of --pipeline-batch "
                         f"{args.pipeline_batch} (the first is left out)")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline:
        (dali_pipeline_benchmark if args.loaders == ["dali"] else pipeline_benchmark)(args)
    elif len(names) > 1:
        sharing_benchmark(args)
    else:
        step_benchmark(args)


def main(argv: list[str] | None = None) -> int:
    return run(benchmark, get_args_parser().parse_args(argv), during="the benchmark")


if __name__ == "__main__":
    sys.exit(main())
