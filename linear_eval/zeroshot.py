"""Zero-shot classification through a student's adaptor of an image-text teacher, next to the teacher's own.

A student distilled from a teacher whose family has a text tower (CLIP, SigLIP2: the family's `zero_shot`)
predicts, with that teacher's adaptor, the teacher's image feature before its projection (CLIP's
ln_post(CLS), SigLIP2's MAP-pooled output). Mapped by the teacher's own image head and compared with class
embeddings of its own text tower, it classifies images with no training on labels. The protocol (prompts,
tokenizer, scoring) is the family's, as its official evaluation runs it: CLIP's is the CLIP paper's (80 OpenAI
ImageNet templates, 100 * cosine), SigLIP2's open_clip's (the same templates through its tokenizer, sigmoid
logits). The teacher's image tower on the same images is the teacher's figure. Both are scored on the image tower's
own eval preprocessing (the family's `crop`: CLIP's resize and centre crop, SigLIP2's squash resize), one crop per
image for both networks, each normalised as it expects: the student with ImageNet mean/std (its training
normalisation), the tower with its own.

python -m linear_eval.zeroshot --backbone out/backbone.pth --adaptors out/adaptors.pth \
    --text-checkpoint ViT-L-14.pt --data-path /imagenet
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from timm.data import ImageNetInfo
from torchvision import transforms

from common import distributed as dist_utils
from common.cli import ArgumentParser, check_positive, evaluation_parser, run, start
from common.features import Features, extract_features, frozen_backbone, image_counts
from common.results import Results, Timer, print_table, topk_correct, write_results
from models import FAMILIES, TEACHERS, Adaptors, load_adaptors
from models.checkpoints import Normalization
from models.errors import UsageError

from .data import image_folder

IMAGENET_NAMES = "the CLIP paper's ImageNet class names (open_clip's IMAGENET_CLASSNAMES)"
FOLDER_NAMES = "the class folder names, underscores as spaces"
DATA_HELP = (
    "<data-path>/val/<class>/<image> is classified (train/ is not read); class folders named by ImageNet's 1000 "
    "WordNet ids get the CLIP paper's ImageNet class names in the prompts, any other folders their own names "
    "(underscores as spaces)"
)


def get_args_parser() -> argparse.ArgumentParser:
    parent = evaluation_parser(data_path=DATA_HELP, output_dir="output/zeroshot", loader=(128, 10))
    p = ArgumentParser("Proteus zero-shot eval", parents=[parent])
    a = p.add_argument
    a("--adaptors", required=True, metavar="FILE", help="adaptors.pth, exported by pretraining with --backbone")
    a(
        "--text-checkpoint",
        "--clip-checkpoint",
        dest="clip_checkpoint",
        required=True,
        metavar="FILE",
        help="the image-text teacher's whole release file, its image head and text tower: OpenAI's CLIP file "
        "(ViT-L-14.pt, ViT-B-16.pt), open_clip's SigLIP2 open_clip_model.safetensors",
    )
    a(
        "--tokenizer",
        metavar="DIR",
        help="a saved Hugging Face tokenizer of the teacher's text tower, for families whose tokenizer is one "
        "(SigLIP2; default: the Hugging Face cache, never the network); CLIP's is open_clip's own",
    )
    a("--teacher", metavar="NAME", help="the image-text teacher's adaptor to use (default: the only one)")
    a(
        "--input-size",
        type=int,
        help="the side the student sees the teacher's crop at (default: the crop as it is, the image tower's input "
        "size); another side resizes the crop (bicubic, antialiased), as pretraining resizes one crop per network",
    )
    a("--no-teacher", action="store_true", help="skip CLIP's own zero-shot on the same images")
    return p


def family_name(name: str, info: dict) -> str | None:
    """A teacher's family as adaptors.pth records it, else as the registry knows its name."""
    return info.get("family") or (TEACHERS[name].family if name in TEACHERS else None)


def text_tower(name: str, info: dict):
    """The zero-shot protocol of a teacher's family (its text tower), or None when it has none."""
    found = family_name(name, info)
    return FAMILIES[found].zero_shot if found in FAMILIES else None


def image_text_families() -> str:
    """The families with a text tower, for messages."""
    return ", ".join(f.title for f in FAMILIES.values() if f.zero_shot is not None)


def clip_teachers(adaptors: Adaptors) -> list[str]:
    """The teachers whose family has a text tower: zero-shot can use their adaptors."""
    return [n for n in adaptors.adaptors if text_tower(n, adaptors.teachers.get(n, {})) is not None]


def choose_teacher(adaptors: Adaptors, requested: str | None, path: str) -> str:
    """The CLIP teacher whose adaptor is used: --teacher, or the only CLIP one."""
    held = ", ".join(
        f"{n} ({family_name(n, adaptors.teachers.get(n, {})) or 'family unknown'})" for n in adaptors.adaptors
    )
    clip = clip_teachers(adaptors)
    if requested and requested not in adaptors.adaptors:
        raise UsageError(f"--teacher {requested}: {path} holds the adaptors of {held}")
    if requested and requested not in clip:
        raise UsageError(f"--teacher {requested} is not an image-text teacher (no text tower) ({path} holds {held})")
    if not requested and not clip:
        raise UsageError(
            f"{path} holds no image-text ({image_text_families()}) teacher's adaptor ({held}): zero-shot needs the "
            "student of a teacher with a text tower"
        )
    if not requested and len(clip) > 1:
        raise UsageError(f"{path} holds several image-text teachers ({', '.join(clip)}): choose one with --teacher")
    return requested or clip[0]


def chosen_tower(adaptors: Adaptors, requested: str | None, path: str) -> tuple[str, object]:
    """The teacher whose adaptor zero-shot uses (choose_teacher) and its family's text tower."""
    name = choose_teacher(adaptors, requested, path)
    return name, text_tower(name, adaptors.teachers.get(name, {}))


def class_names(classes: list[str]) -> tuple[list[str], str]:
    """The names in the prompts, and where they come from: the CLIP paper's ImageNet names when the class
    folders are ImageNet's 1000 WordNet ids (ImageFolder's sorted order is ImageNet's class order), else
    the folder names."""
    if classes == ImageNetInfo().label_names():
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), IMAGENET_NAMES
    return [c.replace("_", " ") for c in classes], FOLDER_NAMES


def student_view(crop, size: int, side: int, *, normalization: Normalization) -> transforms.Compose:
    """The student's copy of the teacher's `size`-pixel crop: resized to `side` when that differs (bicubic,
    antialiased, as pretraining gives each network its own resize of one crop), normalised as the student's
    inputs were in training (`normalization`: ImageNet's for every student pretraining trains)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    resize = [transforms.Resize((side, side), interpolation=bicubic, antialias=True)] if side != size else []
    return transforms.Compose([crop, *resize, transforms.Normalize(normalization.mean, normalization.std)])


def preprocessing(tower, size: int, side: int) -> str:
    """What results.json and the printed summary say both networks were scored on."""
    resized = f", the student's copy resized (bicubic, antialiased) to {side}x{side}" if side != size else ""
    return (
        f"{tower.crop_protocol.format(size=size)}: one crop for the student and the teacher{resized}; normalised "
        "with ImageNet mean/std for the student (as in training), the image tower's own for the teacher"
    )


def accuracy(logits, embeddings: Features, classifier: torch.Tensor) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes), %, of the tower's logits of embeddings and classifier."""
    logits = logits(embeddings.features, classifier.cpu())
    ks = (1, 5) if classifier.shape[1] >= 5 else (1,)
    counts = topk_correct(logits, embeddings.targets, ks) * 100 / len(embeddings.targets)
    return {f"top-{k}": c.item() for k, c in zip(ks, counts)}


def zeroshot(args: argparse.Namespace) -> None:
    timer = Timer()
    device = start(args)
    check_positive(args, "batch_size", *(["input_size"] if args.input_size is not None else []))
    backbone = frozen_backbone(args.backbone, device, args.input_size)
    adaptors = load_adaptors(args.adaptors)
    name, tower = chosen_tower(adaptors, args.teacher, args.adaptors)
    adaptor = adaptors.adaptors[name].to(device)
    widths = (backbone.embed_dim, backbone.summary_dim)
    if widths != (adaptors.student_dim, adaptors.summary_dim):
        raise UsageError(
            f"--backbone {args.backbone} is {backbone.embed_dim} wide but {args.adaptors} adapts a "
            f"{adaptors.student_dim}-wide student: give the backbone.pth exported with these adaptors"
        )
    if adaptor.token_head is None:
        raise UsageError(f"{args.adaptors}: the {name} adaptor has no token head, so it predicts no CLS feature")
    model = tower.load(args.clip_checkpoint, tokenizer=args.tokenizer).to(device)
    width = tower.width(model)
    if adaptor.target.dim != width:
        raise UsageError(
            f"the {name} adaptor predicts {adaptor.target.dim}-dim features but {args.clip_checkpoint}'s visual "
            f"width is {width}: give the file of the teacher the student was distilled from"
        )
    size = tower.image_size(model)
    side = args.input_size or size
    if side % backbone.patch_size:
        raise UsageError(
            f"the {name} image tower's crop ({size} px) is not a multiple of the student's patch size "
            f"{backbone.patch_size}: give --input-size, the side the student sees the crop at (e.g. its training side)"
        )
    crop = tower.crop(model)
    dataset = image_folder(args.data_path, "val", student_view(crop, size, side, normalization=backbone.normalization))
    scored_on = preprocessing(tower, size, side)
    names, naming = class_names(dataset.classes)
    with timer.phase("text classifier"):
        classifier = tower.classifier(model, names, device)

    def student(images: torch.Tensor) -> torch.Tensor:
        return tower.embed(model, adaptor.predict(backbone.forward_tokens(images)).cls)

    def embeddings(fn, data, desc: str) -> dict:
        return extract_features(fn, data, device, batch_size=args.batch_size, num_workers=args.num_workers, desc=desc)

    def logits(features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return tower.logits(model, features, classes)

    with timer.phase("student"):
        ours = embeddings(student, dataset, f"student through the {name} adaptor")
    metrics = accuracy(logits, ours, classifier)
    notes = dict.fromkeys(metrics, f"the student through its {name} adaptor and the teacher's image head")
    if not args.no_teacher:
        clip_view = copy.copy(dataset)  # shares the scanned sample list; the same crop, the tower's mean/std
        clip_view.transform = tower.preprocess(model)
        with timer.phase("teacher"):
            teacher = embeddings(lambda x: tower.encode_image(model, x), clip_view, "the teacher's image tower")
        for metric, value in accuracy(logits, teacher, classifier).items():
            metrics[f"teacher {metric}"] = value
            notes[f"teacher {metric}"] = f"the teacher's own image tower ({Path(args.clip_checkpoint).name})"
    if not dist_utils.is_main():
        return
    rows = [["student", *(f"{metrics[m]:.2f}" for m in metrics if not m.startswith("teacher"))]]
    if not args.no_teacher:
        rows.append(["teacher", *(f"{metrics[m]:.2f}" for m in metrics if m.startswith("teacher"))])
    print(f"preprocessing: {scored_on}", flush=True)
    print_table(["model", *(m for m in metrics if not m.startswith("teacher"))], rows)
    results = Results(
        task="zeroshot",
        backbone=args.backbone,
        protocol={
            "name": tower.protocol,
            "data_path": str(Path(args.data_path).resolve()),
            "split": "val",
            "class_names": naming,
            "teacher": name,
            "adaptors": str(Path(args.adaptors).resolve()),
            "clip_checkpoint": str(Path(args.clip_checkpoint).resolve()),
            "preprocessing": scored_on,
            "input_size": side,
            "teacher_input_size": None if args.no_teacher else size,
            "precision": "fp32",
        },
        metrics=metrics,
        metric_notes=notes,
        unreadable_images={"val": len(ours.dropped)},
        timings=timer.timings(),
        details={"images": {"val": image_counts(ours)}, "class_names": names},
    )
    print(f"results in {write_results(args.output_dir, results)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(zeroshot, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
