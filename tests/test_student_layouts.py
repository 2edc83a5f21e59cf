"""Students in the reference's per-teacher-family layouts (PROTOCOLS A, "The student's layout follows
the teacher's family"): architecture and init, export key names, outputs against independent
implementations (timm's CLIP and plain ViTs; open_clip where installed), load_backbone on the
reference's own training checkpoints, pretraining in each layout, and the evaluations on them.

What the reference's model code says (pretrain/models_clip.py, models_synclr.py, models_proteus_*.py):
- CLIP runs build `models_clip.vit_base()` (patch 14, 224): conv1 [D, 3, 14, 14] without bias,
  class_embedding [D], positional_embedding [257, D], ln_pre, transformer.resblocks.i.{ln_1,
  attn (nn.MultiheadAttention: in_proj_weight [3D, D], in_proj_bias, out_proj), ln_2, mlp.c_fc,
  mlp.c_proj} with QuickGELU, LayerNorm eps 1e-5, no LayerScale, mask_token [1, D], ln_post. Its
  forward returns x_norm_clstoken = ln_post(x[:, 0]) and x_norm_patchtokens = x[:, 1:] (no norm).
  Init: positional_embedding trunc normal 0.02, class_embedding N(0, 1e-6), nn.Linear trunc normal
  0.02 with zero bias; in_proj_weight is not an nn.Linear and keeps nn.MultiheadAttention's
  xavier-uniform init (zero in_proj_bias); conv1 keeps PyTorch's default; mask_token zeros.
- SynCLR runs build `models_synclr.vit_base(patch_size=14, num_classes=0, mask_style='ibot')`: timm's
  ViT (qkv bias, GELU, eps 1e-6, no LayerScale, no head keys) plus mask_token [1, 1, D] drawn
  N(0, 0.02); cls_token N(0, 1e-6); pos_embed trunc normal 0.02; forward normalises every token.
"""

from __future__ import annotations

import argparse
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

import models
from common.features import frozen_backbone
from common.io import atomic_save
from linear_eval.classifiers import linear_features
from models import LAYOUTS, ViT
from models.architectures import timm_vit
from models.errors import UsageError
from models.families import DEFAULT_LAYOUT
from pretrain import main as pretrain_main
from pretrain.output import Output
from tests.helpers import TINY_RUN, block_outputs, make_image_folder, randomize_, rel_err, tiny_vit

# the registry's layouts built as our timm ViT (DINOv3's, its own class, has tests/test_dinov3.py), and those of
# them the reference release added beside DINOv2's (its models_clip.py and models_synclr.py)
VIT_LAYOUTS = [name for name, layout in LAYOUTS.items() if layout.builder is timm_vit]
REFERENCE_LAYOUTS = [name for name in VIT_LAYOUTS if name != DEFAULT_LAYOUT]
PATCH, GRID, DIM, DEPTH, HEADS = 14, 4, 128, 2, 2  # 2 heads: the MultiheadAttention <-> qkv head split is exercised


def reference_shapes(layout: str, dim: int, depth: int, grid: int, patch: int = PATCH) -> dict[str, tuple]:
    """The reference student's state_dict (keys and shapes), written from its module structure."""
    if layout == "clip":  # models_clip.VisionTransformer
        top = {
            "conv1.weight": (dim, 3, patch, patch),
            "class_embedding": (dim,),
            "positional_embedding": (grid * grid + 1, dim),
            "ln_pre.weight": (dim,),
            "ln_pre.bias": (dim,),
            "mask_token": (1, dim),
            "ln_post.weight": (dim,),
            "ln_post.bias": (dim,),
        }
        block = {
            "attn.in_proj_weight": (3 * dim, dim),
            "attn.in_proj_bias": (3 * dim,),
            "attn.out_proj.weight": (dim, dim),
            "attn.out_proj.bias": (dim,),
            "ln_1.weight": (dim,),
            "ln_1.bias": (dim,),
            "mlp.c_fc.weight": (4 * dim, dim),
            "mlp.c_fc.bias": (4 * dim,),
            "mlp.c_proj.weight": (dim, 4 * dim),
            "mlp.c_proj.bias": (dim,),
            "ln_2.weight": (dim,),
            "ln_2.bias": (dim,),
        }
        prefix = "transformer.resblocks.{}."
    else:  # models_synclr.MaskedTransformer(num_classes=0, mask_style='ibot')
        top = {
            "cls_token": (1, 1, dim),
            "pos_embed": (1, grid * grid + 1, dim),
            "mask_token": (1, 1, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch),
            "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,),
            "norm.bias": (dim,),
        }
        block = {
            "norm1.weight": (dim,),
            "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "norm2.weight": (dim,),
            "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim),
            "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim),
            "mlp.fc2.bias": (dim,),
        }
        prefix = "blocks.{}."
    return {**top, **{prefix.format(i) + k: s for i in range(depth) for k, s in block.items()}}


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def tiny_student(layout: str, seed: int = 0, dim: int = DIM, depth: int = DEPTH) -> ViT:
    return tiny_vit(dim, depth, dim // 64, GRID, PATCH, seed=seed, randomize=True, **LAYOUTS[layout].vit_kwargs)


def independent(layout: str, export: dict[str, torch.Tensor], dim: int = DIM):
    """timm's own model for the layout, loaded strictly from our export (less the mask token those
    models do not have); returns x -> (CLS after the final norm, patch tokens as the reference returns)."""
    common = dict(img_size=GRID * PATCH, patch_size=PATCH, embed_dim=dim, depth=DEPTH, num_heads=dim // 64)
    sd = {k: v for k, v in export.items() if k != "mask_token"}
    if layout == "clip":  # as timm's vit_*_clip_quickgelu_* models, through timm's OpenAI-CLIP converter
        tm = VisionTransformer(**common, pre_norm=True, norm_layer=nn.LayerNorm, act_layer="quick_gelu", num_classes=0)
        sd = checkpoint_filter_fn({"visual." + k: v for k, v in sd.items()}, tm)  # OpenAI's visual.* layout
    else:  # the reference's timm ViT settings
        tm = VisionTransformer(**common, init_values=None, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)
    tm.load_state_dict(sd, strict=True)
    tm.eval()

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = tm.forward_features(x)[:, 0]
        if layout == "clip":  # CLIP's patch tokens are the last block's outputs, before ln_post
            patches = tm.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[0]
        else:
            patches = tm.forward_features(x)[:, 1:]
        return cls, patches

    return run


# ================================================================================================
# 1. Architecture and init per layout
# ================================================================================================
@pytest.mark.parametrize("layout", VIT_LAYOUTS)
def test_layout_architecture(layout):
    with torch.device("meta"):  # shapes only
        m = models.create_student("vit_base", layout=layout)
    dim = 768
    assert tuple(m.pos_embed.shape) == (1, 257, dim) and tuple(m.mask_token.shape) == (1, dim)
    assert m.patch_embed.proj.kernel_size == (14, 14)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    blk = m.blocks[0]
    z = torch.linspace(-4, 4, 101)
    if layout == "clip":
        assert m.patch_embed.proj.bias is None and isinstance(m.norm_pre, nn.LayerNorm)
        assert len(norms) == 2 + 2 * 12 and all(n.eps == 1e-5 for n in norms)
        torch.testing.assert_close(blk.mlp.act(z), z * torch.sigmoid(1.702 * z))  # QuickGELU
        assert not m.norm_patch_tokens
    else:
        assert m.patch_embed.proj.bias is not None and isinstance(m.norm_pre, nn.Identity)
        assert len(norms) == 1 + 2 * 12 and all(n.eps == 1e-6 for n in norms)
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
        assert m.norm_patch_tokens
    assert isinstance(blk.ls1, nn.Identity) == (layout != "dinov2")
    assert blk.attn.qkv.bias is not None and blk.attn.num_heads == 12


def test_unknown_layout():
    with pytest.raises(UsageError, match="unknown student layout 'eva'; choose from dinov2, dinov3, clip, synclr"):
        models.create_student("vit_tiny", layout="eva")


def _linears(m: ViT) -> list[nn.Linear]:
    return [mod for mod in m.modules() if isinstance(mod, nn.Linear)]


def test_clip_student_init_is_the_references():
    torch.manual_seed(0)
    m = models.create_student("vit_tiny", layout="clip")
    dim = 192
    assert torch.count_nonzero(m.mask_token) == 0
    assert 0.7e-6 < m.cls_token.std().item() < 1.3e-6  # class_embedding N(0, 1e-6)
    assert 0.018 < m.pos_embed.std().item() < 0.022
    bound = (6 / (dim + 3 * dim)) ** 0.5  # xavier-uniform of in_proj_weight [3D, D]
    for blk in m.blocks:
        w = blk.attn.qkv.weight
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
        assert abs(w.std().item() - bound / 3**0.5) < 0.02 * bound
        assert torch.count_nonzero(blk.attn.qkv.bias) == 0
    others = [lin for lin in _linears(m) if not any(lin is b.attn.qkv for b in m.blocks)]
    assert len(others) == 12 * 3  # out_proj, c_fc, c_proj: timm init
    for lin in others:
        assert 0.018 < lin.weight.std().item() < 0.022 and torch.count_nonzero(lin.bias) == 0
    fan_in = 3 * 14 * 14  # conv1: PyTorch's default (kaiming-uniform, a=sqrt(5)): |w| <= 1/sqrt(fan_in)
    assert m.patch_embed.proj.weight.abs().max().item() <= fan_in**-0.5
    for n in (mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)):
        assert torch.equal(n.weight, torch.ones_like(n.weight)) and torch.count_nonzero(n.bias) == 0


def test_synclr_student_init_is_the_references():
    torch.manual_seed(0)
    m = models.create_student("vit_tiny", layout="synclr")
    assert 0.015 < m.mask_token.std().item() < 0.025 and abs(m.mask_token.mean().item()) < 0.005  # N(0, 0.02)
    assert 0.7e-6 < m.cls_token.std().item() < 1.3e-6
    assert 0.018 < m.pos_embed.std().item() < 0.022
    assert len(_linears(m)) == 12 * 4
    for lin in _linears(m):
        assert 0.018 < lin.weight.std().item() < 0.022 and torch.count_nonzero(lin.bias) == 0
    assert not any("ls1" in k or "norm_pre" in k for k in m.state_dict())


# ================================================================================================
# 2. Exports: the reference's key names and shapes; outputs of independent implementations
# ================================================================================================
@pytest.mark.parametrize("layout", REFERENCE_LAYOUTS)
def test_export_has_exactly_the_reference_keys_and_shapes(layout):
    torch.manual_seed(0)
    export = models.to_reference(models.create_student("vit_tiny", layout=layout), layout)
    assert shapes(export) == reference_shapes(layout, 192, 12, 16)
    assert all(not v.requires_grad for v in export.values())


def test_export_in_another_layout_is_refused():
    with pytest.raises(UsageError, match="in the dinov2 layout and cannot be written in the clip layout"):
        models.to_reference(tiny_student("dinov2"), "clip")


@pytest.mark.parametrize("layout", REFERENCE_LAYOUTS)
def test_outputs_equal_an_independent_implementation(layout):
    ours = tiny_student(layout)
    ref = independent(layout, models.to_reference(ours, layout))
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        out = ours.forward_features(x)
        last = ours.get_intermediate_layers(x, n=1, return_class_token=True, norm=True)[0]
    cls, patches = ref(x)
    assert rel_err(out["x_norm_clstoken"], cls) < 1e-4
    assert rel_err(out["x_norm_patchtokens"], patches) < 1e-4
    torch.testing.assert_close(last[0], out["x_norm_patchtokens"])  # both APIs give the layout's tokens
    torch.testing.assert_close(last[1], out["x_norm_clstoken"])
    if layout == "clip":  # patch tokens un-normed: ln_post would change them
        assert rel_err(ours.norm(out["x_norm_patchtokens"]), patches) > 1e-2


def test_clip_masked_view_replaces_patch_embeddings_before_positions_and_ln_pre():
    """models_clip.prepare_tokens_with_masks: conv1 -> mask token -> [class_embedding; x] + positions -> ln_pre."""
    ours = tiny_student("clip")
    sd = models.to_reference(ours, "clip")
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    masks = torch.zeros(2, GRID * GRID, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    with torch.no_grad():
        t = torch.nn.functional.conv2d(x, sd["conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
        t = torch.where(masks.unsqueeze(-1), sd["mask_token"].unsqueeze(0), t)
        t = torch.cat((sd["class_embedding"].expand(2, 1, -1), t), dim=1) + sd["positional_embedding"]
        t = nn.functional.layer_norm(t, (DIM,), sd["ln_pre.weight"], sd["ln_pre.bias"], eps=1e-5)
        torch.testing.assert_close(ours.prepare_tokens(x, masks), t, rtol=1e-5, atol=1e-5)


def test_clip_export_equals_open_clip():
    """open_clip's VisionTransformer with final_ln_after_pool is the reference's forward exactly
    (pooled = ln_post(CLS), tokens un-normed); it has `proj` (identity here) and no mask token."""
    transformer = pytest.importorskip("open_clip.transformer", reason="open_clip not installed")
    ours = tiny_student("clip")
    export = models.to_reference(ours, "clip")
    oc = transformer.VisionTransformer(
        GRID * PATCH, PATCH, DIM, DEPTH, HEADS, 4.0, output_dim=DIM, act_layer=transformer.QuickGELU,
        final_ln_after_pool=True, output_tokens=True,
    )  # fmt: skip
    sd = {k: v for k, v in export.items() if k != "mask_token"}
    oc.load_state_dict({**sd, "proj": torch.eye(DIM)}, strict=True)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        pooled, tokens = oc.eval()(x)
        out = ours.forward_features(x)
    assert rel_err(out["x_norm_clstoken"], pooled) < 1e-4
    assert rel_err(out["x_norm_patchtokens"], tokens) < 1e-4


# ================================================================================================
# 3. load_backbone: the reference's training checkpoints, our exports and checkpoints
# ================================================================================================
def reference_training_checkpoint(layout: str, student: dict[str, torch.Tensor]) -> dict:
    """checkpoint.pth of models_proteus_{clip,synclr} runs: the MetaArch state dict under "model"
    (CLIP: token_head only; SynCLR: token/patch/fea heads), model_ema, args."""
    teacher = models.to_reference(tiny_student(layout, seed=9, dim=192), layout)
    model = {f"student.backbone.{k}": v for k, v in student.items()}
    model.update({f"teacher.backbone.{k}": v for k, v in teacher.items()})
    for head in ("token_head",) if layout == "clip" else ("token_head", "patch_head", "fea_head"):
        model.update({f"{head}.0.weight": torch.ones(DIM), f"{head}.0.bias": torch.zeros(DIM)})
        model.update({f"{head}.1.weight": torch.randn(192, DIM), f"{head}.1.bias": torch.randn(192)})
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "model_ema": {k: v + 1.0 for k, v in student.items()},
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model=f"models_proteus_{layout}", target_model="vit_base", patch_size=14),
    }


@pytest.mark.parametrize("mask", ["[1,D]", "[1,1,D]", "none"])
@pytest.mark.parametrize("layout", REFERENCE_LAYOUTS)
def test_load_backbone_reads_reference_training_checkpoints(tmp_path, layout, mask):
    ours = tiny_student(layout, seed=3)
    student = models.to_reference(ours, layout)
    if mask == "none":
        del student["mask_token"]
    else:
        student["mask_token"] = student["mask_token"].reshape((1, DIM) if mask == "[1,D]" else (1, 1, DIM))
    torch.save(reference_training_checkpoint(layout, student), tmp_path / "checkpoint.pth")
    loaded = models.load_backbone(tmp_path / "checkpoint.pth").eval()
    assert models.layout_of(loaded.state_dict()) == layout and loaded.norm_patch_tokens == (layout != "clip")
    assert loaded.embed_dim == DIM and len(loaded.blocks) == DEPTH and loaded.blocks[0].attn.num_heads == HEADS
    expected_mask = torch.zeros(1, DIM) if mask == "none" else ours.mask_token
    torch.testing.assert_close(loaded.mask_token, expected_mask, rtol=0, atol=0)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        out = loaded.forward_features(x)
    cls, patches = independent(layout, models.to_reference(ours, layout))(x)  # the student, not EMA nor teacher
    assert rel_err(out["x_norm_clstoken"], cls) < 1e-4
    assert rel_err(out["x_norm_patchtokens"], patches) < 1e-4


@pytest.mark.parametrize("layout", VIT_LAYOUTS)
def test_export_and_our_checkpoint_load_back_identically(tmp_path, layout):
    ours = tiny_student(layout, seed=4)
    atomic_save(models.to_reference(ours, layout), tmp_path / "backbone.pth")
    torch.save({"student": ours.state_dict(), "args": {"student_layout": layout}}, tmp_path / "checkpoint.pth")
    x = torch.randn(1, 3, 3 * PATCH, 5 * PATCH)  # another grid: positions interpolated as DINOv2
    with torch.no_grad():
        expected = ours.forward_features(x)
    for name in ("backbone.pth", "checkpoint.pth"):
        loaded = models.load_backbone(tmp_path / name).eval()
        assert shapes(loaded.state_dict()) == shapes(ours.state_dict())
        with torch.no_grad():
            out = loaded.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("mask", ["[1,D]", "[1,1,D]", "none"])
def test_synclr_teacher_file_loads_with_any_mask_token(tiny_teacher, tmp_path, mask):
    """Does the official SynCLR file hold a mask_token, and of which shape? The code cannot tell for
    sure, so every case must load:
    - the reference builds its SynCLR teacher as models_synclr.MaskedTransformer(mask_style='ibot'),
      which has mask_token [1, 1, D], and loads the file with strict=False (missing keys only printed);
      the teacher is never given masks, so its mask token never matters there;
    - SynCLR's own evaluation code loads the released file into timm's ViT (no mask token) with
      strict=False and checks only the missing keys (the head): an extra visual.mask_token would pass;
    - SynCLR's PyTorch training code (not what trained the release, per its README) has a mask token
      [1, 1, D] only with --mask_style ibot.
    So the file holds no mask_token or one of [1, 1, D]; [1, D] (DINOv2's) is accepted as well."""
    spec = tiny_teacher("synclr_vitl14", dim=DIM, depth=DEPTH, heads=HEADS)
    ref = randomize_(VisionTransformer(img_size=GRID * PATCH, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                                       num_heads=HEADS, num_classes=0, init_values=None), seed=6)  # fmt: skip
    inner = {f"module.visual.{k}": v.detach().clone() for k, v in ref.state_dict().items()}
    token = torch.randn(1, DIM)
    if mask != "none":
        inner["module.visual.mask_token"] = token.reshape((1, DIM) if mask == "[1,D]" else (1, 1, DIM))
    torch.save({"state_dict": inner, "epoch": 1}, tmp_path / "synclr.pth")
    frozen = models.create_teacher("synclr_vitl14", checkpoint=tmp_path / "synclr.pth")
    assert frozen.family == spec.family == "synclr"
    teacher = frozen.backbone
    torch.testing.assert_close(teacher.mask_token, torch.zeros(1, DIM) if mask == "none" else token, rtol=0, atol=0)
    x = torch.randn(1, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        torch.testing.assert_close(teacher.forward_features(x)["x_norm_clstoken"], ref.forward_features(x)[:, 0])


# ================================================================================================
# 4. Pretraining in each layout
# ================================================================================================
def test_default_layout_is_the_teachers_family():
    parse = pretrain_main.get_args_parser().parse_args
    for teacher, layout in (("dinov2_vitl14", "dinov2"), ("clip_vitl14", "clip"), ("synclr_vitl14", "synclr")):
        assert pretrain_main.resolve(parse(["--teacher", teacher])).student_layout == layout
    explicit = pretrain_main.resolve(parse(["--teacher", "clip_vitl14", "--student-layout", "dinov2"]))
    assert explicit.student_layout == "dinov2"  # a DINOv2-layout student of a CLIP teacher stays possible


@pytest.mark.parametrize("layout", REFERENCE_LAYOUTS)
def test_pretraining_runs_and_exports_in_the_layout(tmp_path, capsys, layout):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    base = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--student-layout", layout]
    assert pretrain_main.main([*base, "--epochs", "1"]) == 0
    assert f"({layout} layout)" in capsys.readouterr().out
    ckpt = models.safe_load(out / "checkpoint.pth")
    assert ckpt["args"]["student_layout"] == layout
    for name, weights in (("backbone.pth", ckpt["student"]), ("backbone_ema.pth", ckpt["ema"])):
        exported = torch.load(out / name, weights_only=True)
        assert shapes(exported) == reference_shapes(layout, 192, 12, 2)
        loaded = models.load_backbone(out / name)
        assert models.layout_of(loaded.state_dict()) == layout
        for k, v in weights.items():
            assert torch.equal(loaded.state_dict()[k], v), (name, k)
    # resume keeps the layout: another one is refused in one line, the same one continues
    assert pretrain_main.main([*base[:-1], "dinov2", "--epochs", "2"]) == 2
    assert f"was trained with --student-layout {layout}, not dinov2" in capsys.readouterr().err
    assert pretrain_main.main([*base, "--epochs", "2"]) == 0
    assert models.safe_load(out / "checkpoint.pth")["epoch"] == 1


def test_a_layout_that_cannot_be_exported_stops_before_training(tmp_path, capsys, monkeypatch):
    """A family registered with a layout its export cannot write (here dinov2's layout under another name, whose
    files it does not recognise) is one line at start-up; without the check the whole run trained and then
    backbone.pth could not be written."""

    class Mine(models.families.Family):
        name, title, layout = "mine", "Mine", LAYOUTS["dinov2"]

        def owns(self, state_dict) -> bool:
            return False

    monkeypatch.setitem(models.FAMILIES, "mine", Mine())
    monkeypatch.setitem(LAYOUTS, "mine", LAYOUTS["dinov2"])
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--student-layout", "mine", "--epochs", "1"]
    assert pretrain_main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: this network is in the dinov2 layout and cannot be written in the mine layout"]
    assert not (out / "checkpoint.pth").exists() and not (out / "log.txt").exists()


def test_checkpoint_from_before_layouts_resumes_as_dinov2(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    base = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN]
    assert pretrain_main.main([*base, "--epochs", "1"]) == 0
    ckpt = models.safe_load(out / "checkpoint.pth")
    del ckpt["args"]["student_layout"]
    torch.save(ckpt, out / "checkpoint.pth")
    assert pretrain_main.main([*base, "--epochs", "2", "--student-layout", "clip"]) == 2
    assert "was trained with --student-layout dinov2, not clip" in capsys.readouterr().err
    assert pretrain_main.main([*base, "--epochs", "2"]) == 0


def test_clip_teacher_run_trains_a_clip_student_as_the_reference(tiny_teacher, tmp_path, capsys):
    """Default layout from the family; only token_head (token loss); class_embedding (1-d in the
    reference, so never decayed by timm's optimizer) is kept out of weight decay."""
    tiny_teacher("clip_vitl14", dim=DIM, depth=DEPTH, heads=HEADS)
    data = make_image_folder(tmp_path / "data")
    argv = ["--data-path", str(data), "--output-dir", str(tmp_path / "run"), *TINY_RUN, "--teacher", "clip_vitl14"]
    config = pretrain_main.resolve(pretrain_main.get_args_parser().parse_args([*argv, "--epochs", "1"]))
    assert config.student_layout == "clip" and (config.lambda_patch, config.lambda_fea) == (0.0, 0.0)
    run = pretrain_main.build(config, torch.device("cpu"), 1, out=Output(tmp_path / "run", main=True))
    distiller, optimizer = run.students[0].distiller, run.students[0].optimizer
    assert distiller.patch_head is None and distiller.fea_head is None and distiller.token_head is not None
    named = dict(distiller.named_parameters())
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(named["student.cls_token"])] == 0.0
    assert decay_of[id(named["student.pos_embed"])] == 0.05  # positional_embedding [257, D] is decayed there too
    assert id(named["student.mask_token"]) not in decay_of  # no masked view: never trained
    assert pretrain_main.main([*argv, "--epochs", "1"]) == 0
    assert shapes(torch.load(tmp_path / "run" / "backbone.pth", weights_only=True)) == reference_shapes(
        "clip", 192, 12, 2
    )


# ================================================================================================
# 5. Evaluations run on every layout (through models.load_backbone and our ViT API)
# ================================================================================================
@pytest.mark.parametrize("layout", REFERENCE_LAYOUTS)
def test_evaluation_features_on_layout_backbones(tmp_path, layout):
    ours = tiny_student(layout, seed=5, depth=4)
    path = tmp_path / "backbone.pth"
    torch.save(models.to_reference(ours, layout), path)
    backbone = frozen_backbone(str(path), torch.device("cpu"), 2 * PATCH)
    x = torch.randn(3, 3, 2 * PATCH, 2 * PATCH)
    feats = linear_features(backbone, x)  # the linear probe's input: 4 CLS + avgpool of the last patches
    per_block = block_outputs(ours, x)
    with torch.no_grad():
        cls = [ours.norm(b[:, 0]) for b in per_block]
        last = per_block[-1][:, 1:] if layout == "clip" else ours.norm(per_block[-1][:, 1:])  # CLIP: un-normed
        torch.testing.assert_close(feats, torch.cat([*cls, last.mean(dim=1)], dim=-1), rtol=1e-5, atol=1e-5)
        # fine-grained and kNN read the CLS after the final norm
        torch.testing.assert_close(backbone.forward_features(x)["x_norm_clstoken"], cls[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", REFERENCE_LAYOUTS)
def test_mmseg_backbone_builds_from_layout_files(tmp_path, layout):
    pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
    import segmentation.mmseg_ext as proteus_mmseg

    ours = tiny_student(layout, seed=7)
    path = tmp_path / "backbone.pth"
    torch.save(models.to_reference(ours, layout), path)
    bb = proteus_mmseg.ProteusViT(checkpoint=str(path), out_indices=(0, 1), frozen=True).train()
    x = torch.randn(1, 3, 5 * PATCH, 7 * PATCH)
    feats = bb(x)
    assert [tuple(f.shape) for f in feats] == [(1, DIM, 5, 7)] * 2
    with torch.no_grad():
        expected = ours.get_intermediate_layers(x, n=[0, 1], reshape=True, norm=False)
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", VIT_LAYOUTS)
def test_mmseg_fine_tuning_trains_what_reaches_the_outputs(tmp_path, layout):
    """Fine-tuning with final_norm: a CLIP-layout norm touches only the CLS, so without the CLS token it gets
    no gradient (DDP would reject it) and is frozen; ln_pre keeps the full lr under layer-wise decay, as the
    reference's mmseg constructor gave it."""
    pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
    import segmentation.mmseg_ext as proteus_mmseg

    path = tmp_path / "backbone.pth"
    torch.save(models.to_reference(tiny_student(layout, seed=7), layout), path)
    bb = proteus_mmseg.ProteusViT(checkpoint=str(path), out_indices=(0, 1), final_norm=True).train()
    sum(f.sum() for f in bb(torch.randn(1, 3, 2 * PATCH, 2 * PATCH))).backward()
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert ("vit.norm.weight" in trainable) == (layout != "clip")
    # the reference's `backbone.ln_pre` fell to mmseg's "everything else" layer id: full lr
    assert proteus_mmseg.vit_layer_id("backbone.vit.norm_pre.weight", 12) == 13
