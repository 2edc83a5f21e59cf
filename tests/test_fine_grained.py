"""Fine-grained protocol: split rules per on-disk layout, metrics, logistic regression vs
scikit-learn, C selection, standardisation, feature cache, errors, and main() end to end."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from timm.data import OPENAI_CLIP_MEAN

import models
from common import features as features_module
from common.images import load_rgb
from fine_grained import logreg
from fine_grained import main as fg_main
from fine_grained.datasets import (
    DATASETS,
    VOC_CLASSES,
    SplitOptions,
    build_split,
    holdout_val,
    per_class_split,
    protocol_splits,
)
from fine_grained.metrics import accuracy, average_precision_11point, mean_per_class_accuracy
from models.errors import UsageError
from pretrain import main as pretrain_main
from tests.helpers import TINY_RUN, img, make_cub, make_image_folder, write


def ids(ds):
    return [os.path.basename(str(p)) for p, _ in ds.samples]


# --- on-disk layouts the tests build (CUB-200's is tests.helpers.make_cub, shared) ---------------
def make_caltech(root, per_class=(32, 33, 31)):
    names = ["BACKGROUND_Google", "accordion", "airplanes"]
    for c, n in zip(names, per_class):
        for i in range(n):
            img(
                root / "caltech101" / "101_ObjectCategories" / c / f"image_{i:04d}.jpg", value=40 * (names.index(c) + 1)
            )
    return names


def make_sun397(root):
    base = root / "sun397"
    classes = ["/a/abbey", "/b/bedroom", "/b/boat_deck"]
    train, test = [], []
    for c in classes:
        for i in range(6):
            rel = f"{c}/sun_{i}.jpg"
            img(base / "SUN397" / rel.lstrip("/"))
            (train if i < 4 else test).append(rel)
    write(base / "Partitions" / "ClassName.txt", classes)
    write(base / "Partitions" / "Training_01.txt", train)
    write(base / "Partitions" / "Testing_01.txt", test)
    return classes


def make_voc(root, n_per_split=6):
    base = root / "voc2007" / "VOCdevkit" / "VOC2007"
    labels = {}
    for s, split in enumerate(("train", "val", "test")):
        split_ids = [f"{s:02d}{i:04d}" for i in range(n_per_split)]
        write(base / "ImageSets" / "Main" / f"{split}.txt", split_ids)
        for i in split_ids:
            img(base / "JPEGImages" / f"{i}.jpg")
        for k, c in enumerate(VOC_CLASSES):
            # image j: positive for class k when (j + k) % 3 == 0, difficult when == 1, else negative
            lab = [(1, 0, -1)[(j + k) % 3] for j in range(n_per_split)]
            write(base / "ImageSets" / "Main" / f"{c}_{split}.txt", [f"{i} {v:2d}" for i, v in zip(split_ids, lab)])
            labels[(split, k)] = lab
    return labels


def make_dtd(root):
    base = root / "dtd" / "dtd" / "dtd"
    for split in ("train", "val", "test"):
        lines = [f"{c}/{c}_{split}_{i}.jpg" for c in ("banded", "zigzagged") for i in range(2)]
        write(base / "labels" / f"{split}1.txt", lines)
        for line in lines:
            img(base / "images" / line)


def make_pets(root, n=10):
    base = root / "pets" / "oxford-iiit-pet"
    for split in ("trainval", "test"):
        lines = [f"{b}_{split}_{i} {k + 1} {k + 1} 1" for k, b in enumerate(("Abyssinian", "beagle")) for i in range(n)]
        write(base / "annotations" / f"{split}.txt", lines)
        for line in lines:
            img(base / "images" / f"{line.split()[0]}.jpg")


def make_aircraft(root):
    base = root / "aircraft" / "fgvc-aircraft-2013b" / "data"
    write(base / "variants.txt", ["707-320", "A300B4"])
    for s, split in enumerate(("train", "val", "test")):
        lines = [f"{s}{k}{i:04d} {v}" for k, v in enumerate(("707-320", "A300B4")) for i in range(2)]
        write(base / f"images_variant_{split}.txt", lines)
        for line in lines:
            img(base / "images" / f"{line.split()[0]}.jpg")


def make_food(root):
    base = root / "food101" / "food-101"
    for split in ("train", "test"):
        meta = {c: [f"{c}/{split}{i}" for i in range(3)] for c in ("apple_pie", "sushi")}
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for rels in meta.values():
            for rel in rels:
                img(base / "images" / f"{rel}.jpg")


# --- split rules ---------------------------------------------------------------------------------
def test_holdout_val_is_the_references_numpy_shuffle():
    """The reference's code: indices = list(range(N)); np.random.seed(0); np.random.shuffle(indices)."""
    for n in (23, 90, 3060):
        indices = list(range(n))
        np.random.seed(0)
        np.random.shuffle(indices)
        k = int(np.floor(0.2 * n))
        train, val = holdout_val(n)
        assert val == sorted(indices[:k]) and train == sorted(indices[k:])
    assert len(holdout_val(23)[1]) == 4 and holdout_val(4)[1] == []  # floor(0.2 * 23) = 4
    torch_perm = torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()
    assert holdout_val(23)[1] != sorted(torch_perm[:4])  # the earlier torch draw gave other indices


def reference_caltech_draw(targets, per_class=30):
    """The reference's create_caltech101_splits on a label list (np.random.seed(0) once, classes in order)."""
    np.random.seed(0)
    class_idxs = {c: [i for i, t in enumerate(targets) if t == c] for c in sorted(set(targets))}
    train = []
    for c in class_idxs:
        train.extend(list(np.sort(np.random.choice(class_idxs[c], per_class))))
    return [int(i) for i in train], set(range(len(targets))) - set(train)


def test_per_class_split_reference_draws_with_replacement():
    targets = [0] * 35 + [1] * 31 + [2] * 40
    train, test = per_class_split(targets, 30)
    expect_train, expect_test = reference_caltech_draw(targets)
    assert train == expect_train and set(test) == expect_test and len(test) == len(expect_test)
    assert len(train) == 90 and len(set(train)) < 90  # duplicates kept, as the reference's train.txt
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(106))


def test_per_class_split_distinct_draws_without_replacement_seed0():
    targets = [0] * 35 + [1] * 31 + [2] * 40
    train, test = per_class_split(targets, 30, "distinct")
    assert len(train) == len(set(train)) == 90 and sorted(train + test) == list(range(106))
    for c in range(3):
        assert sum(targets[i] == c for i in train) == 30
    g = torch.Generator().manual_seed(0)  # one generator, classes in order
    expect = []
    for start, n in ((0, 35), (35, 31), (66, 40)):
        expect += sorted(start + j for j in torch.randperm(n, generator=g)[:30].tolist())
    assert train == expect
    with pytest.raises(UsageError, match="unknown split rule 'bogus'"):
        per_class_split(targets, 30, "bogus")


CALTECH_COUNTS = (32, 33, 31)


def caltech_files(names):
    return [f"{names[t]}/image_{i:04d}.jpg" for t, n in enumerate(CALTECH_COUNTS) for i in range(n)]


def test_caltech101_layout_30_per_class_and_val(tmp_path):
    names = make_caltech(tmp_path)
    spec = DATASETS["caltech101"]
    train = build_split(spec, tmp_path, "train", transform=None)
    test = build_split(spec, tmp_path, "test", transform=None)
    all_targets = [c for c, n in enumerate(CALTECH_COUNTS) for _ in range(n)]
    expect_train, expect_test = reference_caltech_draw(all_targets)
    files = caltech_files(names)
    assert len(train) == 90 and len(test) == len(expect_test) == 96 - len(set(expect_train))
    assert [f"{p.parent.name}/{p.name}" for p, _ in train.samples] == [files[i] for i in expect_train]
    assert {f"{p.parent.name}/{p.name}" for p, _ in test.samples} == {files[i] for i in expect_test}
    assert train.samples[0][1] == 0 and names[0] == "BACKGROUND_Google"  # a class like any other
    feats = {"train": (torch.arange(90.0)[:, None], torch.tensor([t for _, t in train.samples])), "test": None}
    s = protocol_splits(spec, feats)
    t, v = holdout_val(90)
    assert len(s["val"][0]) == 18 and s["val"][0].flatten().tolist() == [float(i) for i in v]
    assert s["train"][0].flatten().tolist() == [float(i) for i in t] and len(s["trainval"][0]) == 90


def test_caltech101_distinct_split_option(tmp_path):
    names = make_caltech(tmp_path)
    spec, options = DATASETS["caltech101"], SplitOptions(caltech="distinct")
    train = build_split(spec, tmp_path, "train", transform=None, options=options)
    test = build_split(spec, tmp_path, "test", transform=None, options=options)
    expect_train, _ = per_class_split([c for c, n in enumerate(CALTECH_COUNTS) for _ in range(n)], 30, "distinct")
    assert [f"{p.parent.name}/{p.name}" for p, _ in train.samples] == [caltech_files(names)[i] for i in expect_train]
    assert len(set(p for p, _ in train.samples)) == 90 and len(test) == 6


def test_caltech101_symlink_cycle_is_read_once(tmp_path, caplog):
    """A link back up 101_ObjectCategories is not followed (os.walk would, ~40 levels deep): the same split."""
    names = make_caltech(tmp_path)
    spec = DATASETS["caltech101"]
    splits = lambda: [build_split(spec, tmp_path, split, transform=None).samples for split in ("train", "test")]  # noqa: E731
    before = splits()
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    (base / names[1] / "up").symlink_to("..", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        assert splits() == before
    assert f"not following {base / names[1] / 'up'}" in caplog.text


def test_sun397_partition_files(tmp_path):
    classes = make_sun397(tmp_path)
    train = build_split(DATASETS["sun397"], tmp_path, "train", transform=None)
    test = build_split(DATASETS["sun397"], tmp_path, "test", transform=None)
    assert [t for _, t in train.samples] == [0] * 4 + [1] * 4 + [2] * 4 and len(test) == 6
    assert train.samples[4][0] == tmp_path / "sun397" / "SUN397" / classes[1].lstrip("/") / "sun_0.jpg"
    assert train[0][0].size == (16, 16)


def test_voc2007_difficult_is_not_positive_and_nothing_dropped(tmp_path):
    labels = make_voc(tmp_path)
    for split in ("train", "val", "test"):
        ds = build_split(DATASETS["voc2007"], tmp_path, split, transform=None)
        assert len(ds) == 6
        y = torch.stack([t for _, t in ds.samples])
        expect = torch.tensor([[float(labels[(split, k)][j] == 1) for k in range(20)] for j in range(6)])
        assert torch.equal(y, expect)


def test_cub200_official_split(tmp_path):
    make_cub(tmp_path)
    train = build_split(DATASETS["cub200"], tmp_path, "train", transform=None)
    test = build_split(DATASETS["cub200"], tmp_path, "test", transform=None)
    assert [t for _, t in train.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and [t for _, t in test.samples] == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert ids(test)[:2] == ["Bird_0_3.jpg", "Bird_0_4.jpg"]


def test_torchvision_layouts_and_pets_80_20(tmp_path):
    make_dtd(tmp_path)
    make_pets(tmp_path)
    make_aircraft(tmp_path)
    make_food(tmp_path)
    for name, n in (("dtd", 4), ("aircraft", 4), ("food101", 6), ("pets", 20)):
        spec = DATASETS[name]
        sets = {s: build_split(spec, tmp_path, s, transform=None) for s in spec.splits}
        assert all(len(d) == n for d in sets.values()), name
        for d in sets.values():  # ImageFolder's `samples`: what common.features keys, caches and reports by
            assert [t for _, t in d.samples] == [d[i][1] for i in range(n)]
            assert features_module.sample_list(d) == d.samples
            pixels = [np.asarray(load_rgb(p)).tolist() for p, _ in d.samples]
            assert pixels == [np.asarray(d[i][0]).tolist() for i in range(n)]
    assert DATASETS["dtd"].official_val and DATASETS["aircraft"].official_val and not DATASETS["pets"].official_val
    pets = build_split(DATASETS["pets"], tmp_path, "train", transform=None)  # torchvision's trainval
    y = torch.tensor([pets[i][1] for i in range(len(pets))])
    s = protocol_splits(DATASETS["pets"], {"train": (torch.arange(20.0)[:, None], y), "test": None})
    assert len(s["train"][0]) == 16 and len(s["val"][0]) == 4 and len(s["trainval"][0]) == 20
    dtd = protocol_splits(
        DATASETS["dtd"],
        {
            k: (torch.full((n, 1), float(i)), torch.zeros(n))
            for i, (k, n) in enumerate((("train", 4), ("val", 4), ("test", 4)))
        },
    )
    assert dtd["trainval"][0].flatten().tolist() == [0.0] * 4 + [1.0] * 4


@pytest.mark.parametrize("name", list(DATASETS))
def test_missing_folder_names_expected_layout(tmp_path, name):
    with pytest.raises(UsageError, match=f"expected <data-path>/{name}/"):
        build_split(DATASETS[name], tmp_path, "train", transform=None)


def test_empty_split_is_an_error(tmp_path):
    make_cub(tmp_path)
    split_file = tmp_path / "cub200" / "CUB_200_2011" / "train_test_split.txt"
    split_file.write_text(split_file.read_text().replace(" 1\n", " 0\n"))
    with pytest.raises(UsageError, match="the train split is empty"):
        build_split(DATASETS["cub200"], tmp_path, "train", transform=None)


# --- metrics -------------------------------------------------------------------------------------
def direct_ap11(scores, labels):
    """Definition: for each t, the max precision over every cut-off of the ranking with recall >= t."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    npos, points = sum(labels), []
    for k in range(1, len(order) + 1):
        tp = sum(labels[i] for i in order[:k])
        points.append((tp / k, tp / npos))
    return 100 * sum(max([p for p, r in points if r >= t / 10], default=0.0) for t in range(11)) / 11


def test_11point_ap_matches_definition():
    g = np.random.default_rng(1)
    for _ in range(20):
        scores = g.random(15).tolist()
        labels = (g.random(15) < 0.4).astype(int).tolist()
        labels[0] = 1
        assert average_precision_11point(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
            direct_ap11(scores, labels)
        )
    # 3 of 10 positives ranked first: recall exactly 0.3 counts for t = 0.3
    s = torch.arange(10.0, 0, -1)
    lab = torch.tensor([1, 1, 1] + [0] * 7)
    assert average_precision_11point(s, lab) == pytest.approx(100.0)


def test_mean_per_class_accuracy_and_accuracy():
    y = torch.tensor([0, 0, 0, 1, 3, 3])  # class 2 absent: left out of the mean
    pred = torch.tensor([0, 1, 0, 1, 3, 2])
    scores = torch.nn.functional.one_hot(pred, 4).float()
    assert mean_per_class_accuracy(scores, y) == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert accuracy(scores, y) == pytest.approx(100 * 4 / 6)


# --- logistic regression -------------------------------------------------------------------------
def blobs(n=600, d=20, k=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + spread * torch.randn(n, d, generator=g)
    return x, y


def theta_of(model):
    return torch.cat([torch.from_numpy(model.coef_.T), torch.from_numpy(model.intercept_)[None]])


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_multinomial_agrees_with_sklearn(C):
    sklearn = pytest.importorskip("sklearn.linear_model")
    from sklearn.metrics import log_loss

    x, y = blobs(spread=2.0)
    xt, xs = logreg.standardize(x[:400], x[400:])
    ours = logreg.fit(xt, y[:400], C)
    sk = sklearn.LogisticRegression(C=C, max_iter=1000, tol=1e-12).fit(xt.double().numpy(), y[:400].numpy())
    acc_ours = accuracy(logreg.predict(ours, xs), y[400:])
    acc_sk = 100 * (sk.predict(xs.double().numpy()) == y[400:].numpy()).mean()
    assert abs(acc_ours - acc_sk) <= 0.5
    # the objective is sklearn's, C * sum CE + 0.5 ||W||^2, evaluated at sklearn's own solution
    th = theta_of(sk)
    direct = C * log_loss(y[:400].numpy(), sk.predict_proba(xt.double().numpy()), normalize=False)
    direct += 0.5 * float((th[:-1] ** 2).sum())
    at_sk = logreg.sklearn_objective(th, xt.double(), y[:400], C=C)
    assert at_sk == pytest.approx(direct, rel=1e-9)
    assert logreg.sklearn_objective(ours, xt.double(), y[:400], C=C) <= at_sk * (1 + 1e-7)


def test_binary_per_class_agrees_with_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(n=300, d=10, k=3, seed=2, spread=2.0)
    targets = torch.stack([y == 0, (y == 1) | (y == 2), y == 2], 1).float()
    xt = logreg.standardize(x)[0]
    C = 0.5
    ours = logreg.fit(xt, targets, C)
    for k in range(3):
        sk = sklearn.LogisticRegression(C=C, max_iter=1000, tol=1e-12).fit(xt.double().numpy(), targets[:, k].numpy())
        torch.testing.assert_close(ours[:-1, k], torch.from_numpy(sk.coef_[0]), rtol=1e-4, atol=1e-5)
        assert float(ours[-1, k]) == pytest.approx(float(sk.intercept_[0]), abs=1e-5)


def test_c_grid_and_first_best():
    assert (
        len(logreg.C_GRID) == 45 and logreg.C_GRID[0] == pytest.approx(1e6) and logreg.C_GRID[-1] == pytest.approx(1e-5)
    )
    assert logreg.first_best([1.0, 3.0, 2.0, 3.0]) == 1
    x, y = blobs(n=100, d=5, k=3, spread=3.0)
    res = logreg.sweep((x, y), (x, y), lambda s, t: 50.0, Cs=(1.0, 0.1, 10.0))
    assert res.best_index == 0 and res.best_C == 1.0  # all tied: the first C of the grid


def test_warm_start_sweep_matches_cold():
    x, y = blobs(n=300, d=10, k=4, seed=3, spread=2.5)
    (xt, xv) = logreg.standardize(x[:200], x[200:])
    Cs = logreg.C_GRID[20::5]
    warm = logreg.sweep((xt, y[:200]), (xv, y[200:]), accuracy, Cs=Cs)
    cold = logreg.sweep((xt, y[:200]), (xv, y[200:]), accuracy, Cs=Cs, warm_start=False)
    assert max(abs(a - b) for a, b in zip(warm.val_scores, cold.val_scores)) <= 0.5


def test_standardize_uses_reference_statistics():
    ref = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    other = torch.tensor([[2.0, 6.0]])
    a, b = logreg.standardize(ref, other)
    std = (8 / 3) ** 0.5  # population std
    torch.testing.assert_close(a[:, 0], torch.tensor([-2.0, 0.0, 2.0]) / std)
    torch.testing.assert_close(b, torch.tensor([[0.0, 1.0]]))  # constant feature: divided by 1


# --- main end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = make_image_folder(root / "data", classes=2, per_class=4)
    assert (
        pretrain_main.main(["--data-path", str(data), "--output-dir", str(root / "o"), "--epochs", "1", *TINY_RUN]) == 0
    )
    return root / "o" / "checkpoint.pth"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fg")
    make_caltech(root)
    make_voc(root)
    make_cub(root)
    return root


def run(checkpoint, data_root, out, *extra):
    argv = ["--backbone", str(checkpoint), "--data-path", str(data_root), "--output-dir", str(out)]
    return fg_main.main([*argv, "--input-size", "28", "--device", "cpu", "--num-workers", "0", *extra])


def test_end_to_end_on_pretrain_checkpoint(checkpoint, data_root, tmp_path, capsys, monkeypatch):
    calls = []
    real = logreg.standardize
    monkeypatch.setattr(
        fg_main.logreg, "standardize", lambda r, *o: calls.append((len(r), *map(len, o))) or real(r, *o)
    )
    assert run(checkpoint, data_root, tmp_path / "o", "--datasets", "caltech101,voc2007,cub200") == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(res["details"]["datasets"]) == ["caltech101", "voc2007", "cub200"]
    cal, voc = res["details"]["datasets"]["caltech101"], res["details"]["datasets"]["voc2007"]
    n_test = 96 - len(set(reference_caltech_draw([c for c, n in enumerate(CALTECH_COUNTS) for _ in range(n)])[0]))
    assert cal["metric"] == "mean_per_class_acc" and (cal["n_train"], cal["n_val"], cal["n_test"]) == (72, 18, n_test)
    assert voc["metric"] == "map11" and (voc["n_train"], voc["n_val"], voc["n_test"]) == (6, 6, 6)
    assert cal["best_C"] in logreg.C_GRID and 0 <= cal["value"] <= 100
    # train/val standardised with train statistics, trainval/test with trainval statistics
    assert calls[:2] == [(72, 18), (90, n_test)] and calls[2:4] == [(6, 6), (12, 6)]
    values = [r["value"] for r in res["details"]["datasets"].values()]
    assert res["metrics"]["mean (3 of 12)"] == pytest.approx(sum(values) / 3)
    assert list(res["metrics"]) == ["caltech101 mean_per_class_acc", "voc2007 map11", "cub200 acc", "mean (3 of 12)"]
    splits = {"caltech101": ("train", "test"), "voc2007": ("train", "val", "test"), "cub200": ("train", "test")}
    assert res["unreadable_images"] == {f"{n} {split}": 0 for n, ss in splits.items() for split in ss}
    table = (tmp_path / "o" / "results.md").read_text()
    out = capsys.readouterr().out
    assert table.count("\n") == 8 and "| **mean** |" in table and table in out
    # the default is not the paper's protocol (ImageNet mean/std): said in results.json and the table
    assert res["protocol"]["paper_protocol"] is False and res["protocol"]["normalization"] == "imagenet"
    assert res["protocol"]["caltech_split"] == "reference" and "--normalization clip" in table
    # the tiny sets have fewer classes than the protocol's: said, so nobody compares them to the paper
    assert "warning: caltech101: 3 classes in the data, the protocol has 102" in out
    assert "warning: cub200: 3 classes" in out and "warning: voc2007" not in out


def test_reference_layout_checkpoint_and_clip_normalisation(data_root, tmp_path):
    torch.manual_seed(0)
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1, init_values=1.0)
    ref = tmp_path / "reference.pth"
    sd = {f"student.backbone.{k}": v for k, v in models.to_dinov2(vit).items()}
    torch.save({"model": sd, "args": argparse.Namespace(model="vit_small")}, ref)
    assert run(ref, data_root, tmp_path / "o", "--datasets", "cub200", "--normalization", "clip") == 0
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    res = summary["details"]["datasets"]["cub200"]
    assert (res["n_train"], res["n_val"], res["n_test"]) == (8, 1, 6)
    protocol = summary["protocol"]
    assert protocol["paper_protocol"] is True and protocol["mean"] == list(OPENAI_CLIP_MEAN)
    assert "the paper's protocol" in (tmp_path / "o" / "results.md").read_text()


def test_caltech_split_flag_reaches_the_reader(checkpoint, data_root, tmp_path):
    assert run(checkpoint, data_root, tmp_path / "o", "--datasets", "caltech101", "--caltech-split", "distinct",
               "--max-iter", "20") == 0  # fmt: skip
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    assert (
        summary["details"]["datasets"]["caltech101"]["n_test"] == 6
        and summary["protocol"]["caltech_split"] == "distinct"
    )
    assert summary["protocol"]["paper_protocol"] is False


def test_feature_cache_reused_and_invalidated_by_a_new_backbone(data_root, tmp_path, monkeypatch):
    calls = count_extractions(monkeypatch)
    torch.manual_seed(0)
    bb = tmp_path / "bb.pth"
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1, init_values=1.0)
    torch.save(models.to_dinov2(vit), bb)
    args = ("--datasets", "cub200", "--cache-dir", str(tmp_path / "cache"), "--max-iter", "30")
    assert run(bb, data_root, tmp_path / "o", *args) == 0 and len(calls) == 2
    first = json.loads((tmp_path / "o" / "results.json").read_text())
    assert run(bb, data_root, tmp_path / "o", *args) == 0 and len(calls) == 2  # both splits from the cache
    assert json.loads((tmp_path / "o" / "results.json").read_text())["details"] == first["details"]
    vit2 = models.ViT(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1, init_values=1.0)
    torch.save(models.to_dinov2(vit2), bb)
    os.utime(bb, ns=(1, 1))  # a different file identity even if size and mtime were to coincide
    assert run(bb, data_root, tmp_path / "o", *args) == 0 and len(calls) == 4
    assert run(bb, data_root, tmp_path / "o", *args, "--input-size", "56") == 0 and len(calls) == 6


def count_extractions(monkeypatch) -> list:
    calls = []
    real = features_module.extract_features
    monkeypatch.setattr(
        features_module, "extract_features", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k)
    )
    return calls


def test_feature_cache_invalidated_by_a_changed_image_list(checkpoint, tmp_path, monkeypatch, capsys):
    """Same data root, same backbone, but the split files now list other images: the cache is not reused."""
    make_cub(tmp_path / "d")
    calls = count_extractions(monkeypatch)
    args = ("--datasets", "cub200", "--max-iter", "30", "--cache-dir", str(tmp_path / "cache"))
    assert run(checkpoint, tmp_path / "d", tmp_path / "o", *args) == 0 and len(calls) == 2
    split = tmp_path / "d" / "cub200" / "CUB_200_2011" / "train_test_split.txt"
    split.write_text(split.read_text().replace("\n4 0\n", "\n4 1\n"))  # Bird_0_3: test -> train
    capsys.readouterr()
    assert run(checkpoint, tmp_path / "d", tmp_path / "o", *args) == 0 and len(calls) == 4
    assert "cub200_train.pth was written for a different image list; recomputing" in capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "results.json").read_text())["details"]["datasets"]["cub200"]
    assert (res["n_train"] + res["n_val"], res["n_test"]) == (10, 5)


def truncate_jpeg(path) -> str:
    path.write_bytes(path.read_bytes()[:400])  # header intact, scan data cut: "Truncated File Read" on decode
    return str(path)


def test_corrupt_jpeg_is_reported_dropped_and_counted(checkpoint, tmp_path, capsys):
    make_cub(tmp_path / "d")
    bad = truncate_jpeg(tmp_path / "d" / "cub200" / "CUB_200_2011" / "images" / "002.Bird_1" / "Bird_1_0.jpg")
    args = ("--datasets", "cub200", "--max-iter", "30")
    assert run(checkpoint, tmp_path / "d", tmp_path / "o", *args, "--num-workers", "2") == 0
    out = capsys.readouterr().out
    assert f"warning: unreadable image {bad}" in out and "cub200 train features: 1 of 9 images unreadable" in out
    summary = json.loads((tmp_path / "o" / "results.json").read_text())
    res = summary["details"]["datasets"]["cub200"]
    assert (res["n_train"] + res["n_val"], res["n_test"]) == (8, 6) and res["dropped"] == {"train": [bad], "test": []}
    assert summary["unreadable_images"] == {"cub200 train": 1, "cub200 test": 0}


def test_a_failing_dataset_keeps_the_finished_ones(checkpoint, tmp_path, capsys):
    """cub200 with no readable image fails alone: caltech101's result is written, the run exits 1."""
    make_caltech(tmp_path / "d", per_class=(31, 31, 31))
    make_cub(tmp_path / "d")
    for jpg in (tmp_path / "d" / "cub200").rglob("*.jpg"):
        jpg.write_bytes(b"not a jpeg")
    assert run(checkpoint, tmp_path / "d", tmp_path / "o", "--datasets", "caltech101,cub200", "--max-iter", "30") == 1
    assert "error: cub200: cub200 train features: none of the 9 images is readable" in capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(res["details"]["datasets"]) == ["caltech101"] and list(res["details"]["failed"]) == ["cub200"]
    assert "FAILED cub200" in (tmp_path / "o" / "results.md").read_text()
    assert not list((tmp_path / "o" / "features").glob("cub200_*"))  # unreadable images: nothing cached


def test_holdout_split_is_drawn_on_disk_indices_when_images_are_dropped():
    """Dropping one unreadable image leaves the other images in the train/val halves the protocol puts them in."""
    spec = DATASETS["cub200"]
    t, v = holdout_val(20)
    kept = [i for i in range(20) if i != v[1]]
    x = torch.tensor(kept, dtype=torch.float)[:, None]
    s = protocol_splits(spec, {"train": (x, torch.zeros(19), torch.tensor(kept)), "test": None}, train_size=20)
    assert s["val"][0].flatten().tolist() == [float(i) for i in v if i != v[1]]
    assert s["train"][0].flatten().tolist() == [float(i) for i in t] and len(s["trainval"][0]) == 19


def test_missing_listed_file_fails_before_any_extraction(checkpoint, tmp_path, capsys, monkeypatch):
    make_caltech(tmp_path / "d", per_class=(31, 31, 31))
    make_cub(tmp_path / "d")
    gone = tmp_path / "d" / "cub200" / "CUB_200_2011" / "images" / "003.Bird_2" / "Bird_2_4.jpg"
    gone.unlink()
    calls = count_extractions(monkeypatch)
    rc = run(checkpoint, tmp_path / "d", tmp_path / "o", "--datasets", "caltech101,cub200", "--max-iter", "30")
    err = capsys.readouterr().err
    assert rc == 2 and calls == [] and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cub200: ") and str(gone) in err and "expected <data-path>/cub200/CUB_200_2011/" in err
    assert "lists 1 image(s) not on disk" in err


def test_an_empty_split_stops_the_run_before_any_extraction(checkpoint, tmp_path, capsys, monkeypatch):
    make_cub(tmp_path / "d")
    split_file = tmp_path / "d" / "cub200" / "CUB_200_2011" / "train_test_split.txt"
    split_file.write_text(split_file.read_text().replace(" 1\n", " 0\n"))
    calls = count_extractions(monkeypatch)
    rc = run(checkpoint, tmp_path / "d", tmp_path / "o", "--datasets", "cub200", "--max-iter", "30")
    err = capsys.readouterr().err
    assert rc == 2 and calls == [] and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cub200: the train split is empty") and "expected <data-path>/cub200/" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--datasets", "imagenet"], "unknown dataset(s) imagenet"),
        (["--datasets", "cub200,pets"], "pets: "),
        (["--datasets", "sun397"], "expected <data-path>/sun397/"),
    ],
)
def test_bad_input_is_one_line_error(data_root, tmp_path, capsys, extra, message, checkpoint):
    rc = run(checkpoint, data_root, tmp_path / "o", *extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()


def test_bad_backbone_is_one_line_error(data_root, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    for path, message in ((bad, "cannot read checkpoint"), (tmp_path / "none.pth", "not found")):
        assert run(path, data_root, tmp_path / "o", "--datasets", "cub200") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_benchmark_single_fits_and_sweep(capsys):
    """`python -m fine_grained.benchmark`: ours and scikit-learn on the same problem, same accuracies."""
    from fine_grained import benchmark

    tiny = ["--n", "300", "--dim", "8", "--classes", "3", "--device", "cpu"]
    assert benchmark.main([*tiny, "--C", "0.1,10"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("C=")]
    assert len(lines) == 2 and "total: ours" in out
    for line in lines:  # the same problem solved to tol 1e-12 on both sides: the same test accuracy
        ours, theirs = re.findall(r"\(acc ([\d.]+)", line)
        assert ours == theirs, line
    assert benchmark.main([*tiny, "--sweep"]) == 0
    assert "45-C sweep: ours" in capsys.readouterr().out
    assert benchmark.main([*tiny, "--device", "gpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --device gpu: not a torch device")


@pytest.mark.parametrize(
    "name, file, line, message",
    [
        ("voc2007", "VOCdevkit/VOC2007/ImageSets/Main/cat_train.txt", "000123", "line 2 has 1 field(s), expected 2"),
        ("voc2007", "VOCdevkit/VOC2007/ImageSets/Main/cat_train.txt", "000123 maybe", "label 'maybe' of 000123"),
        ("cub200", "CUB_200_2011/images.txt", "17", "line 2 has 1 field(s), expected 2"),
        ("cub200", "CUB_200_2011/image_class_labels.txt", "1 bird", "image 1 has the label 'bird'"),
    ],
)
def test_a_malformed_split_file_line_names_the_file_and_line(tmp_path, name, file, line, message):
    (make_voc if name == "voc2007" else make_cub)(tmp_path)
    path = tmp_path / name / file
    lines = path.read_text().splitlines()
    if name == "cub200" and "labels" in file:
        lines[0] = line  # the first image's label
    else:
        lines.insert(1, line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError) as e:
        build_split(DATASETS[name], tmp_path, "train", transform=None)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)
