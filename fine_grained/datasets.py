"""The 12 datasets of PROTOCOLS C: where they live on disk, how they are read, how they are split.

Folder convention: `--data-path` holds one folder per dataset name; `<data-path>/<name>` is the
root handed to torchvision (what its `download=True` creates) or read by our own readers. Every
reader checks its layout first and raises a UsageError naming the expected layout.

Split rules. "official": the dataset's own train/val/test, trainval = train + val. "holdout": the
dataset's train (pets: its trainval) and test; val = the first floor(0.2 N) of the train indices
shuffled by numpy's legacy generator seeded 0 (the reference's `np.random.seed(0)` +
`np.random.shuffle(list(range(N)))`), train = the rest, trainval = all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from common.features import sample_list
from common.images import LinkSafeImageFolder, load_rgb
from models.errors import UsageError

Transform = Callable[[Image.Image], torch.Tensor]
VOC_CLASSES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()
CALTECH_TRAIN_PER_CLASS = 30
# "reference": 30 draws per class WITH replacement, as the reference (this defines the paper's test set);
# "distinct": 30 distinct images per class (ours: no duplicates in train, a slightly smaller test set).
CALTECH_SPLITS = ("reference", "distinct")
SEED = 0


class ImageList(Dataset):
    """(path, target) pairs read as RGB images; the readers below return these. `samples` and `loader`
    are ImageFolder's names, so common.features reads, keys and checks both the same way."""

    loader = staticmethod(load_rgb)

    def __init__(self, samples: Sequence[tuple[Path, object]], transform: Transform | None = None) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = self.loader(path)
        return (self.transform(img) if self.transform else img), target


@dataclass(frozen=True)
class SplitOptions:
    """Split choices a user can make; the defaults are the reference's."""

    caltech: str = "reference"  # one of CALTECH_SPLITS


def layout_error(name: str, layout: str, detail: str) -> UsageError:
    return UsageError(f"{name}: {detail}; expected <data-path>/{name}/{layout}")


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_fields(path: Path, n: int, name: str, *, layout: str) -> list[list[str]]:
    """Each non-empty line split into `n` whitespace-separated fields (the last keeps its spaces); a line
    with fewer is an error naming the file and the line number."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=n - 1)
        if len(fields) != n:
            raise layout_error(name, layout, f"{path} line {number} has {len(fields)} field(s), expected {n}: {line!r}")
        rows.append(fields)
    return rows


# --- split rules ---------------------------------------------------------------------------------
def holdout_val(n: int, seed: int = SEED) -> tuple[list[int], list[int]]:
    """'val 20% of train': (train, val) index lists, exactly the reference's draw: list(range(n)) shuffled
    by numpy's legacy generator seeded `seed`, the first floor(0.2 n) are val (a torch permutation differs)."""
    indices = list(range(n))
    np.random.RandomState(seed).shuffle(indices)  # = np.random.seed(seed); np.random.shuffle(indices)
    k = int(np.floor(0.2 * n))
    return sorted(indices[k:]), sorted(indices[:k])


def per_class_split(
    targets: Sequence[int], per_class: int, rule: str = "reference", *, seed: int = SEED
) -> tuple[list[int], list[int]]:
    """(train, test) index lists, classes in increasing label order. "reference": per class, `per_class`
    draws WITH replacement by numpy's legacy generator seeded once (`np.random.seed(0)`,
    `np.sort(np.random.choice(idx, per_class))`), duplicates kept in train; test = every index never drawn.
    "distinct": `per_class` indices per class WITHOUT replacement (torch.randperm, one seeded generator)."""
    if rule not in CALTECH_SPLITS:
        raise UsageError(f"unknown split rule '{rule}'; choose from {', '.join(CALTECH_SPLITS)}")
    rs, g = np.random.RandomState(seed), torch.Generator().manual_seed(seed)
    train = []
    for c in sorted(set(targets)):
        idx = [i for i, t in enumerate(targets) if t == c]
        if rule == "reference":
            train += np.sort(rs.choice(idx, per_class)).tolist()
        else:
            train += sorted(idx[j] for j in torch.randperm(len(idx), generator=g)[:per_class].tolist())
    chosen = set(train)
    return train, [i for i in range(len(targets)) if i not in chosen]


# --- our readers ---------------------------------------------------------------------------------
def read_caltech101(root: Path, split: str, layout: str, *, options: SplitOptions) -> list[tuple[Path, int]]:
    """All 102 folders of 101_ObjectCategories (BACKGROUND_Google included), listed as torchvision's
    ImageFolder listed them for the reference (classes and files sorted by name; a symlinked folder is read
    once, common.images.walk_once), split by `options.caltech`."""
    base = root / "101_ObjectCategories"
    try:
        samples = [(Path(p), c) for p, c in LinkSafeImageFolder(str(base)).samples]
    except (FileNotFoundError, OSError) as e:
        raise layout_error("caltech101", layout, f"no class folders with images in {base} ({e})") from None
    train, test = per_class_split([t for _, t in samples], CALTECH_TRAIN_PER_CLASS, options.caltech)
    return [samples[i] for i in (train if split == "train" else test)]


def read_sun397(root: Path, split: str, layout: str, *, options: SplitOptions) -> list[tuple[Path, int]]:
    """Partition 01 of the official Partitions files; labels in ClassName.txt order."""
    parts = root / "Partitions"
    names = {"train": "Training_01.txt", "test": "Testing_01.txt"}
    for f in ("ClassName.txt", names[split]):
        if not (parts / f).is_file():
            raise layout_error("sun397", layout, f"missing {parts / f}")
    classes = {c: i for i, c in enumerate(read_lines(parts / "ClassName.txt"))}
    samples = []
    for rel in read_lines(parts / names[split]):
        cls = rel.rsplit("/", 1)[0]
        if cls not in classes:
            raise layout_error("sun397", layout, f"{rel} in {names[split]} has a class not in ClassName.txt")
        samples.append((root / "SUN397" / rel.lstrip("/"), classes[cls]))
    return samples


def read_voc2007(root: Path, split: str, layout: str, *, options: SplitOptions) -> list[tuple[Path, torch.Tensor]]:
    """20-dim 0/1 targets from <class>_<split>.txt: 1 positive; -1 negative and 0 ("difficult")
    both count as not positive. No image is dropped."""
    base = root / "VOCdevkit" / "VOC2007"
    main = base / "ImageSets" / "Main"
    for f in [f"{split}.txt"] + [f"{c}_{split}.txt" for c in VOC_CLASSES]:
        if not (main / f).is_file():
            raise layout_error("voc2007", layout, f"missing {main / f}")
    ids = read_lines(main / f"{split}.txt")
    targets = {i: torch.zeros(len(VOC_CLASSES)) for i in ids}
    for k, c in enumerate(VOC_CLASSES):
        for image_id, label in read_fields(main / f"{c}_{split}.txt", 2, "voc2007", layout=layout):
            if label.strip() not in ("-1", "0", "1"):
                raise layout_error("voc2007", layout, f"{main / f'{c}_{split}.txt'}: label {label!r} of {image_id}")
            if image_id not in targets:
                raise layout_error("voc2007", layout, f"{image_id} of {c}_{split}.txt is not in {split}.txt")
            targets[image_id][k] = float(int(label) == 1)
    return [(base / "JPEGImages" / f"{i}.jpg", targets[i]) for i in ids]


def read_cub200(root: Path, split: str, layout: str, *, options: SplitOptions) -> list[tuple[Path, int]]:
    """The official train_test_split.txt (1 = train); labels 1..200 -> 0..199."""
    base = root / "CUB_200_2011"
    files = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    for f in files:
        if not (base / f).is_file():
            raise layout_error("cub200", layout, f"missing {base / f}")
    images, labels, is_train = (dict(read_fields(base / f, 2, "cub200", layout=layout)) for f in files)
    bad = next((i for i, c in labels.items() if not c.strip().isdigit()), None)
    if bad is not None:
        raise layout_error("cub200", layout, f"{base / files[1]}: image {bad} has the label {labels[bad]!r}")
    want = "1" if split == "train" else "0"
    return [(base / "images" / images[i], int(labels[i]) - 1) for i in images if is_train[i].strip() == want]


# --- registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    metric: str  # a key of metrics.METRICS
    num_classes: int
    splits: tuple[str, ...]  # what is on disk; ("train", "test") means the holdout val rule
    layout: str  # under <data-path>/<name>/
    build: Callable[..., Dataset]  # (root, split, transform, *, download, options)

    @property
    def official_val(self) -> bool:
        return "val" in self.splits


def _ours(reader: Callable[..., list], name: str, layout: str):  # reader(root, split, layout, *, options)
    def build(root: Path, split: str, transform: Transform, *, download: bool, options: SplitOptions) -> Dataset:
        if not root.is_dir():
            raise layout_error(name, layout, f"{root} does not exist")
        if download:
            raise UsageError(f"{name}: --download is not available; place the files as the README says")
        return ImageList(reader(root, split, layout, options=options), transform)

    return build


def file_samples(ds: Dataset) -> list[tuple[str, object]] | None:
    """(path, label) of every sample of a torchvision file dataset, read from where each class keeps them
    (StanfordCars `_samples`; DTD, Flowers102, Food101, FGVCAircraft `_image_files` and OxfordIIITPet
    `_images`, each beside `_labels`); None for an in-memory one (CIFAR). torchvision publishes no such
    list, so this is the one place that reads its private names."""
    if hasattr(ds, "_samples"):
        return [(str(p), t) for p, t in ds._samples]
    for attr in ("_image_files", "_images"):
        if hasattr(ds, attr):
            return [(str(p), t) for p, t in zip(getattr(ds, attr), ds._labels)]
    return None


def _torchvision(cls: Callable[..., Dataset], name: str, layout: str, *, marker: str, **fixed):
    """torchvision class; `fixed` maps our split name to its keyword arguments via {split}. A file dataset
    gets ImageFolder's `samples` (file_samples), which common.features reads for paths and cache keys."""

    def build(root: Path, split: str, transform: Transform, *, download: bool, options: SplitOptions) -> Dataset:
        if not download and not (root / marker).exists():
            raise layout_error(name, layout, f"{root / marker} does not exist (or pass --download)")
        kwargs = {k: (v(split) if callable(v) else v) for k, v in fixed.items()}
        try:
            ds = cls(str(root), transform=transform, download=download, **kwargs)
        except (RuntimeError, OSError, KeyError, IndexError) as e:
            raise layout_error(name, layout, f"cannot read {root} ({type(e).__name__}: {e})") from None
        samples = file_samples(ds)
        if samples is not None:
            ds.samples = samples
        return ds

    return build


def _same(split: str) -> str:
    return split


# positional past three: each call is a row of the DATASETS table below (tests/test_layers.py)
def _spec(name, metric, num_classes, splits, layout, build_from, *args, **kwargs) -> Spec:
    return Spec(name, metric, num_classes, splits, layout, build_from(*args, name, layout, **kwargs))


TRAIN_TEST = ("train", "test")
OFFICIAL = ("train", "val", "test")
DATASETS: dict[str, Spec] = {
    s.name: s
    for s in (
        _spec(
            "aircraft", "mean_per_class_acc", 100, OFFICIAL,
            "fgvc-aircraft-2013b/data/{variants.txt,images_variant_{train,val,test}.txt,images/*.jpg}",
            _torchvision, tvd.FGVCAircraft, marker="fgvc-aircraft-2013b", split=_same, annotation_level="variant",
        ),
        _spec(
            "caltech101", "mean_per_class_acc", 102, TRAIN_TEST,
            "101_ObjectCategories/<class>/*.jpg (102 class folders, BACKGROUND_Google included)",
            _ours, read_caltech101,
        ),
        _spec(
            "cars", "acc", 196, TRAIN_TEST,
            "stanford_cars/{devkit/{cars_meta.mat,cars_train_annos.mat},cars_train/,"
            "cars_test_annos_withlabels.mat,cars_test/}",
            _torchvision, tvd.StanfordCars, marker="stanford_cars", split=_same,
        ),
        _spec(
            "cifar10", "acc", 10, TRAIN_TEST, "cifar-10-batches-py/ (the python version)",
            _torchvision, tvd.CIFAR10, marker="cifar-10-batches-py", train=lambda s: s == "train",
        ),
        _spec(
            "cifar100", "acc", 100, TRAIN_TEST, "cifar-100-python/ (the python version)",
            _torchvision, tvd.CIFAR100, marker="cifar-100-python", train=lambda s: s == "train",
        ),
        _spec(
            "dtd", "acc", 47, OFFICIAL, "dtd/dtd/{images/<class>/*.jpg,labels/{train,val,test}1.txt}",
            _torchvision, tvd.DTD, marker="dtd/dtd", split=_same, partition=1,
        ),
        _spec(
            "flowers102", "mean_per_class_acc", 102, OFFICIAL,
            "flowers-102/{jpg/image_*.jpg,imagelabels.mat,setid.mat}",
            _torchvision, tvd.Flowers102, marker="flowers-102", split=_same,
        ),
        _spec(
            "food101", "acc", 101, TRAIN_TEST, "food-101/{images/<class>/*.jpg,meta/{train,test}.json}",
            _torchvision, tvd.Food101, marker="food-101", split=_same,
        ),
        _spec(
            "pets", "mean_per_class_acc", 37, TRAIN_TEST,
            "oxford-iiit-pet/{images/*.jpg,annotations/{trainval,test}.txt}",
            _torchvision, tvd.OxfordIIITPet, marker="oxford-iiit-pet",
            split=lambda s: "trainval" if s == "train" else "test", target_types="category",
        ),
        _spec(
            "sun397", "acc", 397, TRAIN_TEST,
            "{SUN397/<letter>/<class>/*.jpg,Partitions/{ClassName.txt,Training_01.txt,Testing_01.txt}}",
            _ours, read_sun397,
        ),
        _spec(
            "voc2007", "map11", 20, OFFICIAL,
            "VOCdevkit/VOC2007/{JPEGImages/<id>.jpg,ImageSets/Main/{train,val,test}.txt,"
            "ImageSets/Main/<class>_{train,val,test}.txt}",
            _ours, read_voc2007,
        ),
        _spec(
            "cub200", "acc", 200, TRAIN_TEST,
            "CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,images/<class>/*.jpg}",
            _ours, read_cub200,
        ),
    )
}  # fmt: skip


def parse_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise UsageError(f"unknown dataset(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(DATASETS)}")
    return names


def build_split(
    spec: Spec,
    data_path: str | Path,
    split: str,
    *,
    transform: Transform,
    download: bool = False,
    options: SplitOptions | None = None,
) -> Dataset:
    """One on-disk split; an empty one, or one listing an image that is not on disk, is an error (raised
    before any feature is extracted, not midway through the datasets)."""
    root = Path(data_path) / spec.name
    ds = spec.build(root, split, transform, download=download, options=options or SplitOptions())
    if len(ds) == 0:
        raise layout_error(spec.name, spec.layout, f"the {split} split is empty")
    missing = [p for p, _ in sample_list(ds) or () if not os.path.isfile(p)]
    if missing:
        raise layout_error(
            spec.name, spec.layout, f"the {split} split lists {len(missing)} image(s) not on disk (first: {missing[0]})"
        )
    return ds


def protocol_splits(
    spec: Spec, features: dict[str, tuple[torch.Tensor, ...]], train_size: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """On-disk split features -> {'train', 'val', 'trainval', 'test'} (x, y) per the split rule.

    features['train'] may carry a third tensor, each row's on-disk index (unreadable images have no row);
    the 20% val rule is then drawn on the train_size on-disk indices, so dropping an image moves no other."""
    x, y, *index = features["train"]
    if spec.official_val:
        train, val = (x, y), features["val"][:2]
        trainval = tuple(torch.cat(p) for p in zip(train, val))
    else:
        trainval = (x, y)
        row = {j: r for r, j in enumerate(index[0].tolist() if index else range(len(x)))}
        t, v = (
            [row[j] for j in part if j in row] for part in holdout_val(len(x) if train_size is None else train_size)
        )
        train, val = (tuple(a[idx] for a in trainval) for idx in (t, v))
        if not v:
            raise layout_error(spec.name, spec.layout, f"{len(t)} train images leave an empty 20% val split")
    return {"train": train, "val": val, "trainval": trainval, "test": features["test"]}
