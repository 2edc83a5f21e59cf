"""models.adaptors: Hadamard matrices, target standardisation (PHI-S, z-score) and adaptors.pth."""

from __future__ import annotations

import pytest
import torch

from models import Tokens
from models.adaptors import Adaptors, Standardizer, TeacherTarget, hadamard, load_adaptors
from models.errors import UsageError


@pytest.mark.parametrize("n", [1, 2, 12, 20, 48, 384, 768, 1024, 1280, 1536])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


def test_no_hadamard_order_is_a_clear_error():
    with pytest.raises(UsageError, match="order 28.*zscore"):
        hadamard(28)


def moments(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.shape[0], x.sum(0), x.T @ x


@pytest.mark.parametrize("kind", ["phi-s", "zscore"])
def test_standardized_targets_have_unit_variance_and_invert_exactly(kind):
    g = torch.Generator().manual_seed(0)
    # anisotropic, correlated, off-centre features on two very different scales
    x = (torch.randn(4000, 12, generator=g) @ torch.randn(12, 12, generator=g)) * 100 + 7
    s = Standardizer(12, kind)
    assert not s.fitted
    s.fit(*moments(x))
    y = s(x)
    assert s.fitted and y.mean(0).abs().max() < 1e-3
    if kind == "zscore":
        assert torch.allclose(y.var(0, unbiased=False), torch.ones(12), atol=1e-3)
    else:  # isotropic: every channel has the mean eigenvalue's variance, i.e. 1 after the one scale
        assert torch.allclose(y.var(0, unbiased=False), torch.ones(12), atol=1e-3)
        assert y.var(0).sum() == pytest.approx(12, rel=1e-3)
    assert torch.allclose(s.inverse(y), x, rtol=1e-4, atol=1e-2)


def test_none_is_the_identity():
    x = torch.randn(3, 8)
    assert Standardizer(8, "none")(x) is x


def test_adaptors_file_round_trip(tmp_path):
    """adaptors.pth holds plain tensors and values (weights_only) and reloads to the same predictions."""
    targets = [TeacherTarget("a", 12, standardization="phi-s"), TeacherTarget("b", 8, lambda_patch=0, lambda_fea=0)]
    adaptors = Adaptors(16, targets, {"a": {"family": "dinov2"}})
    a = adaptors.adaptors["a"]
    a.cls_std.fit(*moments(torch.randn(100, 12) * 3))
    a.patch_std.fit(*moments(torch.randn(100, 12) + 2))
    torch.save(adaptors.export({"name": "vit_tiny"}), tmp_path / "adaptors.pth")
    loaded = load_adaptors(tmp_path / "adaptors.pth")
    assert loaded.teachers["a"] == {"family": "dinov2"} and loaded.adaptors["b"].target == targets[1]
    tokens = Tokens(torch.randn(2, 16), torch.randn(2, 4, 16), (2, 2))
    want, got = a.predict(tokens), loaded.adaptors["a"].predict(tokens)
    assert torch.equal(want.cls, got.cls) and torch.equal(want.patches, got.patches) and want.grid == got.grid == (2, 2)
    token_only = loaded.adaptors["b"].predict(tokens)
    assert token_only.cls.shape == (2, 8) and token_only.patches is None  # token-only: no patch head


def test_load_adaptors_refuses_other_files(tmp_path):
    torch.save({"student": {}}, tmp_path / "backbone.pth")
    with pytest.raises(UsageError, match="not an adaptors.pth"):
        load_adaptors(tmp_path / "backbone.pth")


def test_standardisation_stays_float32_under_bf16_autocast():
    s = Standardizer(12, "phi-s")
    s.fit(*moments(torch.randn(500, 12) * 5))
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = s(x)
    assert y.dtype == torch.float32 and torch.equal(y, s(x))


def test_a_raw_summary_passes_through_while_the_patches_are_phi_s(tmp_path):
    """summary_standardization "none" (RADIO's normaliser): the CLS targets are the teacher's own and the
    token head's prediction is returned as is; the patches are PHI-S'd as by default. The default standardises
    the CLS with its own statistics. adaptors.pth keeps the choice; one without the field reads as both alike."""
    g = torch.Generator().manual_seed(0)
    cls = (torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g)) * 40 + 5
    patches = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g) * 3 - 2
    targets = [TeacherTarget("raw", 12, standardization="phi-s", summary_standardization="none"),
               TeacherTarget("both", 12, standardization="phi-s")]  # fmt: skip
    assert targets[1].summary_standardization == "phi-s"
    adaptors = Adaptors(16, targets)
    for a in adaptors.adaptors.values():
        a.cls_std.fit(*moments(cls))
        a.patch_std.fit(*moments(patches))
    raw, both = adaptors.adaptors["raw"], adaptors.adaptors["both"]
    assert raw.cls_std.kind == "none" and not list(raw.cls_std.buffers())
    assert torch.equal(raw.cls_std(cls), cls)  # the teacher's CLS, unrotated, scale 1
    standardised = both.cls_std(cls)
    assert standardised.mean(0).abs().max() < 1e-3
    assert torch.allclose(standardised.var(0, unbiased=False), torch.ones(12), atol=1e-3)
    for a in (raw, both):  # the patches: PHI-S, with the same statistics either way
        assert a.patch_std.kind == "phi-s" and bool(a.patch_std.estimated)
        torch.testing.assert_close(a.patch_std(patches), both.patch_std(patches), rtol=0, atol=0)
    tokens = Tokens(torch.randn(2, 16, generator=g), torch.randn(2, 4, 16, generator=g), (2, 2))
    with torch.no_grad():
        predicted = raw.predict(tokens)
        assert torch.equal(predicted.cls, raw.token_head(tokens.cls))  # no de-standardisation of a raw CLS
        torch.testing.assert_close(predicted.patches, raw.patch_std.inverse(raw.fea_head(tokens.patches)))
        torch.testing.assert_close(raw.patch_std.inverse(raw.patch_std(patches)), patches, rtol=1e-5, atol=1e-3)

    exported = adaptors.export({"name": "vit_tiny"})
    torch.save(exported, tmp_path / "adaptors.pth")
    loaded = load_adaptors(tmp_path / "adaptors.pth")
    assert loaded.adaptors["raw"].target == targets[0] and loaded.adaptors["both"].target == targets[1]
    with torch.no_grad():
        for name, a in adaptors.adaptors.items():
            want, got = a.predict(tokens), loaded.adaptors[name].predict(tokens)
            assert torch.equal(want.cls, got.cls) and torch.equal(want.patches, got.patches)
    del exported["teachers"]["both"]["summary_standardization"]  # a file written without the field
    torch.save(exported, tmp_path / "older.pth")
    assert load_adaptors(tmp_path / "older.pth").adaptors["both"].target.summary_standardization == "phi-s"
