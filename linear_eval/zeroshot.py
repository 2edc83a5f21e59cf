"""Zero-shot classification through a student's CLIP adaptor, next to CLIP's own (issue 15).

A student distilled from a CLIP teacher predicts, with that teacher's adaptor, CLIP's ln_post(CLS): the
feature before CLIP's projection. Projected by CLIP's own `proj` and compared with class embeddings of
CLIP's own text tower, it classifies images with no training on labels. The protocol is the CLIP
paper's (as open_clip runs it): per class the 80 OpenAI ImageNet prompt templates, each text embedding
L2-normalised, their mean renormalised; image embeddings L2-normalised; logits 100 * image @ classes.
CLIP's visual tower on the same images, with CLIP's own preprocessing, is the teacher's figure.

python -m linear_eval.zeroshot --backbone out/backbone.pth --adaptors out/adaptors.pth \
    --clip-checkpoint ViT-L-14.pt --data-path /imagenet
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageNetInfo

from common import distributed as dist_utils
from common.cli import ArgumentParser, MissingDependency, check_positive, evaluation_parser, run, start
from common.features import Features, eval_transform, extract_features, frozen_backbone, image_counts
from common.results import Results, Timer, print_table, topk_correct, write_results
from models import TEACHERS, Adaptors, load_adaptors
from models.errors import UsageError
from models.teachers import openai_clip_state_dict

from .data import image_folder, val_transform

LOGIT_SCALE = 100.0  # the CLIP paper's zero-shot logits: 100 * cosine similarity
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
        "--clip-checkpoint",
        required=True,
        metavar="FILE",
        help="OpenAI's release file of the CLIP teacher (ViT-L-14.pt, ViT-B-16.pt): its projection and text tower",
    )
    a("--teacher", metavar="NAME", help="the CLIP teacher's adaptor to use (default: the only CLIP one)")
    a("--input-size", type=int, default=224, help="the student's crop; images are resized to input-size * 256/224")
    a("--no-teacher", action="store_true", help="skip CLIP's own zero-shot on the same images")
    return p


def family(name: str, info: dict) -> str | None:
    """A teacher's family as adaptors.pth records it, else as TEACHERS knows its name."""
    return info.get("family") or (TEACHERS[name].family if name in TEACHERS else None)


def clip_teachers(adaptors: Adaptors) -> list[str]:
    return [n for n in adaptors.adaptors if family(n, adaptors.teachers.get(n, {})) == "clip"]


def choose_teacher(adaptors: Adaptors, requested: str | None, path: str) -> str:
    """The CLIP teacher whose adaptor is used: --teacher, or the only CLIP one."""
    held = ", ".join(f"{n} ({family(n, adaptors.teachers.get(n, {})) or 'family unknown'})" for n in adaptors.adaptors)
    clip = clip_teachers(adaptors)
    if requested and requested not in adaptors.adaptors:
        raise UsageError(f"--teacher {requested}: {path} holds the adaptors of {held}")
    if requested and requested not in clip:
        raise UsageError(f"--teacher {requested} is not a CLIP teacher ({path} holds {held})")
    if not requested and not clip:
        raise UsageError(f"{path} holds no CLIP teacher's adaptor ({held}): zero-shot needs a CLIP teacher's student")
    if not requested and len(clip) > 1:
        raise UsageError(f"{path} holds several CLIP teachers ({', '.join(clip)}): choose one with --teacher")
    return requested or clip[0]


def load_clip(path: str):
    """open_clip's CLIP from OpenAI's file (read with weights_only, or its TorchScript archive read as data), fp32."""
    try:
        from open_clip.model import build_model_from_openai_state_dict
    except ImportError:
        raise MissingDependency("zero-shot needs open_clip: pip install open_clip_torch") from None
    raw = openai_clip_state_dict(path)
    if "visual.proj" not in raw:
        raise UsageError(f"{path} is not a ViT CLIP (no visual.proj): no ln_post(CLS) feature was distilled from it")
    try:
        clip = build_model_from_openai_state_dict(raw, cast_dtype=None)
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"{path} is not a complete OpenAI CLIP checkpoint: {str(e).strip().splitlines()[0]}") from None
    return clip.float().eval().requires_grad_(False)


def class_names(classes: list[str]) -> tuple[list[str], str]:
    """The names in the prompts, and where they come from: the CLIP paper's ImageNet names when the class
    folders are ImageNet's 1000 WordNet ids (ImageFolder's sorted order is ImageNet's class order), else
    the folder names."""
    if classes == ImageNetInfo().label_names():
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), IMAGENET_NAMES
    return [c.replace("_", " ") for c in classes], FOLDER_NAMES


def text_classifier(clip, names: list[str], device: torch.device) -> torch.Tensor:
    """[embed dim, classes]: open_clip's zero-shot classifier with OpenAI's 80 ImageNet templates."""
    import open_clip
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
    return open_clip.build_zero_shot_classifier(clip, tokenizer, names, OPENAI_IMAGENET_TEMPLATES, device=device)


def accuracy(embeddings: Features, classifier: torch.Tensor) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes), %, of LOGIT_SCALE * embeddings @ classifier."""
    logits = LOGIT_SCALE * embeddings.features @ classifier.cpu()
    ks = (1, 5) if classifier.shape[1] >= 5 else (1,)
    counts = topk_correct(logits, embeddings.targets, ks) * 100 / len(embeddings.targets)
    return {f"top-{k}": c.item() for k, c in zip(ks, counts)}


def zeroshot(args: argparse.Namespace) -> None:
    timer = Timer()
    device = start(args)
    check_positive(args, "batch_size", "input_size")
    backbone = frozen_backbone(args.backbone, device, args.input_size)
    adaptors = load_adaptors(args.adaptors)
    name = choose_teacher(adaptors, args.teacher, args.adaptors)
    adaptor = adaptors.adaptors[name].to(device)
    if backbone.embed_dim != adaptors.student_dim:
        raise UsageError(
            f"--backbone {args.backbone} is {backbone.embed_dim} wide but {args.adaptors} adapts a "
            f"{adaptors.student_dim}-wide student: give the backbone.pth exported with these adaptors"
        )
    if adaptor.token_head is None:
        raise UsageError(f"{args.adaptors}: the {name} adaptor has no token head, so it predicts no CLS feature")
    clip = load_clip(args.clip_checkpoint).to(device)
    width = clip.visual.proj.shape[0]
    if adaptor.target.dim != width:
        raise UsageError(
            f"the {name} adaptor predicts {adaptor.target.dim}-dim features but {args.clip_checkpoint}'s visual "
            f"width is {width}: give the CLIP file the student was distilled from"
        )
    dataset = image_folder(args.data_path, "val", val_transform(args.input_size))
    names, naming = class_names(dataset.classes)
    with timer.phase("text classifier"):
        classifier = text_classifier(clip, names, device)

    def student(images: torch.Tensor) -> torch.Tensor:
        out = backbone.forward_features(images)
        cls = adaptor.predict(out["x_norm_clstoken"], out["x_norm_patchtokens"])["cls"]
        return F.normalize(cls @ clip.visual.proj, dim=-1)

    def embeddings(fn, data, desc: str) -> dict:
        return extract_features(fn, data, device, args.batch_size, args.num_workers, desc)

    with timer.phase("student"):
        ours = embeddings(student, dataset, f"student through the {name} adaptor")
    metrics = accuracy(ours, classifier)
    notes = dict.fromkeys(metrics, f"the student through its {name} adaptor and CLIP's projection")
    size = clip.visual.image_size[0]
    if not args.no_teacher:
        clip_view = copy.copy(dataset)  # shares the scanned sample list; only the transform differs
        clip_view.transform = eval_transform(size, resize_size=None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        with timer.phase("teacher"):
            teacher = embeddings(lambda x: clip.encode_image(x, normalize=True), clip_view, "CLIP's visual tower")
        for metric, value in accuracy(teacher, classifier).items():
            metrics[f"teacher {metric}"] = value
            notes[f"teacher {metric}"] = f"CLIP's own visual tower ({Path(args.clip_checkpoint).name})"
    if not dist_utils.is_main():
        return
    rows = [["student", *(f"{metrics[m]:.2f}" for m in metrics if not m.startswith("teacher"))]]
    if not args.no_teacher:
        rows.append(["teacher", *(f"{metrics[m]:.2f}" for m in metrics if m.startswith("teacher"))])
    print_table(["model", *(m for m in metrics if not m.startswith("teacher"))], rows)
    results = Results(
        task="zeroshot",
        backbone=args.backbone,
        protocol={
            "name": "CLIP zero-shot: 80 OpenAI ImageNet templates, mean of normalised text embeddings, 100 * cos",
            "data_path": str(Path(args.data_path).resolve()),
            "split": "val",
            "class_names": naming,
            "teacher": name,
            "adaptors": str(Path(args.adaptors).resolve()),
            "clip_checkpoint": str(Path(args.clip_checkpoint).resolve()),
            "input_size": args.input_size,
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
