"""A distilled student as a folder people can use without this repository:

python -m scripts.export --run out/s_dinov2b --to exports/s_dinov2b [--ema] [--img-size N] [--onnx-adaptors]
    [--no-onnx]

--run is a student's output folder (the one holding backbone.pth; with several students, its <student>/ folder).
The folder written (models.exports says what each file is):
  model.safetensors + config.json   timm's Hugging Face Hub layout (timm.create_model("local-dir:FOLDER",
                                    pretrained=True)); backbone.safetensors + config.json where timm has no
                                    architecture for the student's layout
  adaptors.safetensors + adaptors.json   the per-teacher heads and standardisation statistics (README.md,
                                    "Use a distilled student elsewhere", reads them with torch alone)
  model.onnx                        the backbone's summary and patch tokens (and with --onnx-adaptors each
                                    teacher's predicted ones), any batch, any height and width where it allows
  README.md                         the model card: teachers, student, recipe, data, epochs, evaluations, licence
Each format is checked against the network before the folder appears (timm's features to 1e-5, onnxruntime's to
1e-4 relative); the folder is written whole or not at all. Every evaluation takes it as --backbone.
--img-size N exports the student set to N px (Family.at_resolution): timm resamples a position table with its own
rule, not DINOv2's 0.1-offset one, so timm gives a plain ViT student's exact features at the folder's resolution
only; export at the size you use (a dense task's 518, say). model.onnx is the trained student at every size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import models
from common.cli import ArgumentParser, run
from common.io import replace_folder
from models import exports
from models.errors import MissingFile, UsageError
from models.families import family_of_model
from scripts import model_card


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Export a distilled student: timm/Hugging Face safetensors, adaptors, ONNX, model card")
    p.add_argument("--run", required=True, type=Path, help="the student's output folder (holding backbone.pth)")
    p.add_argument("--to", required=True, type=Path, help="the folder to write (replaced if it is an earlier export)")
    p.add_argument("--ema", action="store_true", help="export backbone_ema.pth instead of backbone.pth")
    p.add_argument(
        "--img-size",
        type=int,
        help="the resolution to export at (default: the training one): a ViT's position table is resampled there "
        "by the student's own rule, so timm's model gives the student's exact features at that size",
    )
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="write no model.onnx")
    p.add_argument("--onnx-adaptors", action="store_true", help="model.onnx also outputs every teacher's prediction")
    return p


def backbone_file(folder: Path, ema: bool) -> Path:
    """The backbone file of a student's output folder; with several students, one line naming their folders."""
    name = "backbone_ema.pth" if ema else "backbone.pth"
    path = folder / name
    if path.is_file():
        return path
    if not folder.is_dir():
        raise MissingFile(f"--run {folder} is not a folder")
    students = sorted(p.parent.name for p in folder.glob(f"*/{name}"))
    if students:
        raise UsageError(
            f"--run {folder} holds students' folders: export one of {', '.join(students)} (--run {folder}/NAME)"
        )
    raise MissingFile(f"--run {folder} holds no {name}: not a finished pretraining run")


def _is_export(folder: Path) -> bool:
    try:
        return exports.exported_folder(folder) is not None
    except UsageError:
        return False


def training_resolution(source: Path, adaptors: dict | None) -> int:
    """The side the student was trained at: what its backbone file records (a position table's ViT), else what
    adaptors.pth or the run's checkpoint.pth say (a DINOv3 student's file does not: RoPE takes any size)."""
    trained = models.export_metadata(models.safe_load(source))
    size = trained.get("img_size") or (adaptors or {}).get("student", {}).get("img_size")
    if size is None and (source.parent / "checkpoint.pth").is_file():
        size = model_card.read_checkpoint(source.parent).get("args", {}).get("input_size")
    if not isinstance(size, int):
        raise UsageError(
            f"{source} does not record its training resolution, nor does an adaptors.pth or checkpoint.pth beside it"
        )
    return size


@torch.no_grad()
def export(args: argparse.Namespace) -> None:
    source = backbone_file(args.run, args.ema)
    model = models.load_backbone(source).eval()
    adaptors_path = source.parent / "adaptors.pth"
    adaptors_data = models.safe_load(adaptors_path) if adaptors_path.is_file() else None
    adaptors = models.load_adaptors(adaptors_path) if adaptors_data is not None else None
    if args.onnx_adaptors and adaptors is None:
        raise MissingFile(f"--onnx-adaptors: {adaptors_path} not found")
    trained = training_resolution(source, adaptors_data)
    img_size = trained if args.img_size is None else args.img_size
    if img_size <= 0 or img_size % model.patch_size:
        raise UsageError(f"--img-size {img_size} is not a positive multiple of the patch size {model.patch_size}")
    network = family_of_model(model).at_resolution(model, img_size)
    about = {"source": source.name, "trained_img_size": trained}
    backbone = exports.export_backbone(
        network, img_size=img_size, normalization=model.normalization, reference=model, about=about
    )

    def write(folder: Path) -> None:
        for artefact in backbone.files:
            artefact.write(folder / artefact.name)
        if adaptors is not None:
            for artefact in exports.adaptor_files(adaptors_data):
                artefact.write(folder / artefact.name)
        onnx = None
        if args.onnx:
            # the trained network itself, exact at every size; its example and first check at img_size
            onnx = exports.export_onnx(
                model, folder / exports.ONNX, img_size=img_size, adaptors=adaptors if args.onnx_adaptors else None
            )
        card = model_card.card(
            network, source, backbone=backbone, onnx=onnx, adaptors=adaptors, resolution=(img_size, trained)
        )
        (folder / "README.md").write_text(card)

    replace_folder(args.to, write, ours=_is_export, what="an export")
    print(f"{args.to}: {backbone.note}", flush=True)
    print(json.dumps(sorted(p.name for p in args.to.iterdir())), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(export, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
