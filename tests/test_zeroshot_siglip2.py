"""linear_eval.zeroshot with a SigLIP2 teacher: a random tiny SigLIP2 saved in open_clip's whole-model format (an
open_clip CustomTextCLIP built from a SigLIP2-structured config: timm MAP-head ViT, no projection, non-causal text
tower pooled at its last token, logit bias), and a tiny Hugging Face tokenizer made here and saved to a folder.
The expected figures come from open_clip's own model(image, text) and its own tokenizer of the config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

import models
from linear_eval import zeroshot
from models.families import FAMILIES
from tests.helpers import DIM, student_adaptors
from tests.test_zeroshot import BICUBIC, CLASSES, IMAGENET, INPUT, batch, data, topk  # noqa: F401  (data: a fixture)

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed")
pytest.importorskip("transformers", reason="transformers not installed")
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # noqa: E402

WIDTH, IMAGE, CONFIG = 64, 32, "ViT-T-16-SigLIP2-test"
SCALE, BIAS = math.log(7.0), -3.5  # not CLIP's 100 * cos: the logits must use both


def tiny_siglip_vit(pretrained: bool = False, **kwargs):
    """SigLIP's image tower at a tiny size: patch 16, no CLS token, a MAP head (timm's vit_*_siglip_* layout)."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}
    args = dict(img_size=IMAGE, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=2, class_token=False)
    return VisionTransformer(**{**args, "global_pool": "map", **kwargs})


def write_tokenizer(folder: Path, texts: list[str]) -> int:
    """A word-level Hugging Face tokenizer of every word in `texts` (and pad, unk, bos), saved to `folder` as
    save_pretrained writes one; returns its vocabulary size."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", *words])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """(open_clip_model.safetensors, tokenizer folder, the fp32 model the file holds) of a tiny random SigLIP2."""
    import timm
    from open_clip.tokenizer import canonicalize_text
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("siglip2")
    if not timm.is_model("tiny_siglip_vit"):
        timm.models.register_model(tiny_siglip_vit)
    names = [c.replace("_", " ") for c in CLASSES]
    texts = [canonicalize_text(t(n)) for n in names for t in OPENAI_IMAGENET_TEMPLATES]
    vocab = write_tokenizer(root / "tokenizer", texts)
    config = {
        "embed_dim": WIDTH, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": IMAGE, "timm_model_name": "tiny_siglip_vit", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": vocab, "hf_tokenizer_name": str(root / "tokenizer"),
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 1,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                     "act_kwargs": {"approximate": "tanh"}},
    }  # fmt: skip
    (root / f"{CONFIG}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{CONFIG}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(CONFIG).eval()
    with torch.no_grad():
        model.logit_scale.fill_(SCALE)
        model.logit_bias.fill_(BIAS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
    return root / "open_clip_model.safetensors", root / "tokenizer", model


def reference_logits(model, images: torch.Tensor, names: list[str]) -> torch.Tensor:
    """open_clip's own figures: model(image, text) on every prompt with open_clip's tokenizer of the config, each
    class the renormalised mean of its 80 prompts' features, scored exp(logit_scale) * cos + logit_bias."""
    tokenizer = open_clip.get_tokenizer(CONFIG)
    prompts = [t(n) for n in names for t in OPENAI_IMAGENET_TEMPLATES]
    with torch.no_grad():
        image_features, text_features, scale, bias = model(images, tokenizer(prompts))
    classes = F.normalize(text_features.reshape(len(names), len(OPENAI_IMAGENET_TEMPLATES), -1).mean(1), dim=-1)
    return scale * image_features @ classes.T + bias


def test_siglip2_zero_shot_is_open_clips(siglip, backbone, data, tmp_path, capsys):  # noqa: F811
    path, folder, ref = siglip
    tower = FAMILIES["siglip2"].zero_shot
    loaded = tower.load(path, tokenizer=folder)
    assert loaded.config == CONFIG and tower.width(loaded) == WIDTH and tower.image_size(loaded) == IMAGE
    names = [c.replace("_", " ") for c in CLASSES]

    # the teacher's own path: open_clip's SigLIP preprocessing (squash resize), features and sigmoid logits
    transform = open_clip.image_transform(IMAGE, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    images, labels = batch(data, transform)
    want = reference_logits(ref, images, names)
    classifier = tower.classifier(loaded, names, torch.device("cpu"))
    with torch.no_grad():
        got = tower.logits(loaded, tower.encode_image(loaded, images), classifier)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch(data, tower.preprocess(loaded))[0], images)

    # sigmoid scoring: exp(logit_scale) * cos + logit_bias, not CLIP's 100 * cos
    e, c = F.normalize(torch.randn(3, WIDTH), dim=-1), F.normalize(torch.randn(WIDTH, 4), dim=0)
    torch.testing.assert_close(tower.logits(loaded, e, c), 7 * e @ c - 3.5)

    # the student's path: a predicted MAP-pooled feature maps as encode_image maps the trunk's own
    with torch.no_grad():
        trunk = ref.visual.trunk
        pooled = trunk.forward_head(trunk.forward_features(images), pre_logits=True)
        torch.testing.assert_close(tower.embed(loaded, pooled), ref.encode_image(images, normalize=True))

    # the whole script: a student with a SigLIP2 adaptor (random heads) beside a DINOv2 one
    adaptors = student_adaptors(DIM, {"siglip2_tiny": (WIDTH, "siglip2"), "dinov2_vits14": (48, "dinov2")})
    adaptors_path = tmp_path / "adaptors.pth"
    torch.save(adaptors.export({"name": "vit_tiny"}), adaptors_path)
    vit = models.load_backbone(backbone).eval()
    student_tf = transforms.Compose([  # the teacher's squash resize, its copy resized to the student's side
        transforms.Resize((IMAGE, IMAGE), interpolation=BICUBIC), transforms.ToTensor(),
        transforms.Resize((INPUT, INPUT), interpolation=BICUBIC, antialias=True), transforms.Normalize(*IMAGENET),
    ])  # fmt: skip
    student_images = batch(data, student_tf)[0]
    with torch.no_grad():
        predicted = adaptors.adaptors["siglip2_tiny"].predict(vit.forward_tokens(student_images)).cls
    student = 7 * F.normalize(predicted, dim=-1) @ classifier - 3.5
    expected = {"top-1": topk(student, labels, 1), "top-5": topk(student, labels, 5)}
    expected |= {"teacher top-1": topk(want, labels, 1), "teacher top-5": topk(want, labels, 5)}
    out = tmp_path / "out"
    argv = ["--backbone", str(backbone), "--adaptors", str(adaptors_path), "--text-checkpoint", str(path),
            "--tokenizer", str(folder), "--data-path", str(data), "--input-size", str(INPUT), "--device", "cpu",
            "--batch-size", "4", "--num-workers", "0", "--output-dir", str(out)]  # fmt: skip
    assert zeroshot.main(argv) == 0, capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"].keys() == expected.keys()
    for metric, value in expected.items():
        assert res["metrics"][metric] == pytest.approx(value, abs=1e-9), metric
    assert res["protocol"]["name"] == tower.protocol and res["protocol"]["teacher"] == "siglip2_tiny"
    assert res["protocol"]["teacher_input_size"] == IMAGE


@pytest.mark.parametrize("case", ["no-tokenizer", "image-only-file"])
def test_siglip2_zero_shot_input_errors_are_one_line(case, siglip, backbone, data, tmp_path, capsys):  # noqa: F811
    path, folder, ref = siglip
    adaptors_path = tmp_path / "adaptors.pth"
    torch.save(student_adaptors(DIM, {"siglip2_tiny": (WIDTH, "siglip2")}).export({"name": "vit_tiny"}), adaptors_path)
    if case == "no-tokenizer":
        extra, message = ["--tokenizer", str(tmp_path / "none")], "no SigLIP2 tokenizer (--tokenizer "
    else:  # timm's image-only file: no text tower
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.visual.trunk.state_dict().items()}, tmp_path / "model.safetensors")
        path, extra, message = tmp_path / "model.safetensors", [], "holds no text tower"
    argv = ["--backbone", str(backbone), "--adaptors", str(adaptors_path), "--text-checkpoint", str(path),
            "--data-path", str(data), "--input-size", str(INPUT), "--device", "cpu", "--num-workers", "0",
            "--output-dir", str(tmp_path / "out"), *extra]  # fmt: skip
    assert zeroshot.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if case == "no-tokenizer":
        assert "save_pretrained('DIR')" in err[0] and "--tokenizer DIR" in err[0]
