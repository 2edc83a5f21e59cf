"""Our ViT and what mmsegmentation lacks for the dense protocols, registered on import.

Configs load it with `custom_imports = dict(imports=["segmentation.mmseg_ext"])`. It provides:
- `ProteusViT`: any checkpoint `models.load_backbone` accepts (a scripts.export folder too), run at any
  input size (DINOv2 pos-embed interpolation per forward; a DINOv3 backbone's RoPE), returning the blocks in
  `out_indices` without CLS (or DINOv3's storage tokens) or final norm; frozen (probes) or
  fine-tuned, with drop path. `reference_pos_embed=True` instead resizes the table once to the dense
  grid and fine-tunes that, as the reference's backbone did (DINOv2-style backbones only).
- `ProteusTimm`: a timm student's export (`models.TimmBackbone`), returning its multi-scale maps (a CNN's
  last four stages; a single-stride model's blocks at each quarter of its depth), with everything past the
  last of them pruned (timm's `prune_intermediate_layers`); frozen or fine-tuned, with drop path.
  `runner.fit_dense_config` sizes the config's heads from its `feature_info`.
- `ViTLayerDecayOptimizerConstructor`: layer-wise lr decay keyed on OUR parameter names
  (`backbone.vit.blocks.i`; mmseg's own constructor keys on `backbone.layers.i`, the names of the
  reference's BEiT-style backbone), with the reference's multipliers and weight decay.
- `TimmLayerDecayOptimizerConstructor`: the same for a timm backbone, its layers as timm's own
  `param_groups_layer_decay` groups them (the model's `group_matcher`).
- `DPTDepthHead`, `LinearDepthHead`: mmseg's DPT and 1x1-conv heads as depth heads (one channel,
  no output activation, SiLog loss on `gt_depth_map`); `DPTStagesDepthHead`: DPT's fusion over a
  multi-scale backbone's stage maps, which need no reassembly (DPT-hybrid's use of ResNet stages).
- `ProteusViT(center_pad=True)` pads its input to whole patches around the centre, as DINOv3's depth
  encoder does; `DepthHeadMixin` makes any decode head a depth head. What DINOv3's own dense protocols need
  beyond these is in `segmentation/dinov3_protocol.py`.
- `EvaluationHistoryHook`: every evaluation during training, one JSON line each in
  `<work_dir>/evaluations.jsonl`, from which the runner reports the best-on-test figure.
- `DenseRunner`: mmengine's Runner, writing checkpoints atomically and as plain data (tensors,
  numbers, strings, containers), so that `read_checkpoint` loads every checkpoint with
  `weights_only=True`, and refusing a loaded checkpoint that does not cover the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.dist import is_main_process, master_only
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModule, is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.runner import Runner
from mmseg.models.decode_heads.dpt_head import DPTHead
from mmseg.models.decode_heads.fcn_head import FCNHead
from mmseg.models.utils import resize
from mmseg.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from common.io import atomic_replace
from models.backbones import create_student, load_backbone
from models.checkpoints import few_names, pickled_globals, safe_load
from models.errors import UsageError
from models.families import family_of_model
from models.timm_backbone import TimmBackbone

EVALUATIONS = "evaluations.jsonl"  # in the work dir, written by EvaluationHistoryHook


class CheckpointMismatchError(UsageError):
    """A segmentor checkpoint that does not fit the backbone as configured (one line, no traceback)."""


def resize_pos_embed_once(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The reference's resize at load: the patch table bicubic to (grid, grid), align_corners=False,
    no antialias and no DINOv2 offset; the CLS position unchanged."""
    num_patches = pos_embed.shape[1] - 1
    old = math.isqrt(num_patches)
    if old * old != num_patches:
        raise UsageError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    patch = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1], patch.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def check_reference_pos_embed(vit: nn.Module) -> None:
    """--reference-pos-embed resizes a learned position table; DINOv3's ViT has none to resize."""
    if getattr(vit, "pos_embed", None) is None:
        raise UsageError(
            "--reference-pos-embed (reference_pos_embed) resizes a learned positional-embedding table once, "
            "and this DINOv3 backbone has none (its RoPE takes any input size): leave it out"
        )


def center_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x zero-padded to a multiple of `multiple` on each side of H and W, the odd pixel at the bottom/right."""
    h, w = x.shape[-2:]
    dh, dw = -h % multiple, -w % multiple
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


@MODELS.register_module()
class ProteusViT(BaseModule):
    """A DINOv3 backbone (`DinoV3ViT`) runs as FAIR's at eval in every mode: its RoPE without the
    pretraining's coordinate rescaling when fine-tuned (DINOv3 evaluates its dense tasks on a frozen
    backbone, and the DINOv2-style backbones get no position augmentation here either)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        arch: str = "vit_small",
        img_size: int = 518,
        *,
        out_indices: tuple[int, ...] = (3, 5, 7, 11),
        frozen: bool = False,
        drop_path_rate: float = 0.0,
        with_cls_token: bool = False,
        final_norm: bool = False,
        reference_pos_embed: bool = False,
        center_pad: bool = False,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg)
        if checkpoint:
            self.vit = load_backbone(checkpoint, drop_path_rate=drop_path_rate)
        else:  # random weights: only for tests and smoke runs
            self.vit = create_student(arch, img_size=img_size, drop_path_rate=drop_path_rate)
        depth = len(self.vit.blocks)
        if not all(-depth <= i < depth for i in out_indices):
            raise UsageError(f"out_indices {out_indices} out of range for a {depth}-block backbone")
        # negative indices count from the last block (-1: the last, whatever the depth: one config for every size)
        self.out_indices = tuple(i % depth for i in out_indices)
        self.frozen, self.center_pad = frozen, center_pad
        self.with_cls_token, self.final_norm = with_cls_token, final_norm
        if reference_pos_embed:
            check_reference_pos_embed(self.vit)
            # a (img_size / patch)^2 table, used as is at that grid (the ViT interpolates only other grids)
            grid = img_size // self.vit.patch_size
            self.vit.pos_embed = nn.Parameter(resize_pos_embed_once(self.vit.pos_embed.detach(), grid))
        # parameters that never reach the outputs get no gradient, which DDP rejects: freeze them
        self.vit.mask_token.requires_grad_(False)  # no masking downstream
        # the final norm reaches the outputs only with final_norm, and with a CLIP-layout student (norm on
        # the CLS only) only through the class tokens
        self.vit.norm.requires_grad_(final_norm and (with_cls_token or self.vit.norm_patch_tokens))
        self.family = family_of_model(self.vit)
        for name in self.family.pretraining_only:  # e.g. DINOv3's local_cls_norm
            if getattr(self.vit, name, None) is not None:
                getattr(self.vit, name).requires_grad_(False)
        for block in self.vit.blocks[max(self.out_indices) + 1 :]:
            block.requires_grad_(False)
        if frozen:
            self.vit.requires_grad_(False)

    @staticmethod
    def takes(model: nn.Module) -> bool:
        return not isinstance(model, TimmBackbone)

    def init_weights(self) -> None:
        """Weights come from the checkpoint; mmengine must not re-initialise them."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """mmengine loads segmentor checkpoints non-strictly: a pos_embed of another size would only
        be a warning, and the backbone would keep its unresized table."""
        saved, own = state_dict.get(f"{prefix}vit.pos_embed"), self.vit.pos_embed
        if saved is not None and own is not None and saved.shape != own.shape:
            have = own.shape[1]
            raise CheckpointMismatchError(
                f"the checkpoint's pos_embed has {saved.shape[1]} positions, this backbone's {have}: "
                "evaluate or resume with --reference-pos-embed exactly when the run was trained with it"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> ProteusViT:
        super().train(mode)
        if self.frozen:
            self.vit.eval()  # a probe never updates the backbone (no drop path either)
        for name in self.family.eval_only:  # e.g. DINOv3's RoPE coordinate rescaling: never here
            getattr(self.vit, name).eval()
        return self

    def forward(self, x: torch.Tensor) -> list:
        if self.center_pad:  # zeros (the normalised mean) split evenly around the image: DINOv3's CenterPadding
            x = center_pad(x, self.vit.patch_size)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            outs = self.vit.get_intermediate_layers(
                x, n=list(self.out_indices), reshape=True, return_class_token=self.with_cls_token, norm=self.final_norm
            )
        return [list(o) for o in outs] if self.with_cls_token else list(outs)


@MODELS.register_module()
class ProteusTimm(BaseModule):
    """A timm student's export as an mmseg backbone: the maps `out_indices` names (default: the model's
    `dense_indices`, the four a dense head reads), as [B, C, h, w] without the final norm. What comes after the
    last of them (later stages, the final norm, a pooling head) is pruned: it reaches no output, and a
    parameter without a gradient is an error under DDP."""

    def __init__(
        self,
        checkpoint: str | None = None,
        model_name: str = "resnet18",
        img_size: int = 518,
        *,
        out_indices: tuple[int, ...] | None = None,
        frozen: bool = False,
        drop_path_rate: float = 0.0,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg)
        if checkpoint:
            self.net = load_backbone(checkpoint, drop_path_rate=drop_path_rate)
        else:  # random weights: only for tests and smoke runs
            self.net = create_student(f"timm:{model_name}", img_size=img_size, drop_path_rate=drop_path_rate)
        if not isinstance(self.net, TimmBackbone):
            raise UsageError(f"{checkpoint} is no timm model's export: use the ViT configs (*_vit_*.py)")
        count = len(self.net.model.feature_info)
        self.out_indices = tuple(self.net.dense_indices() if out_indices is None else out_indices)
        if not all(0 <= i < count for i in self.out_indices) or list(self.out_indices) != sorted(set(self.out_indices)):
            raise UsageError(f"out_indices {self.out_indices}: increasing indices of the model's {count} feature maps")
        self.net.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.frozen = frozen
        if frozen:
            self.net.requires_grad_(False)
        strides = set(self.net.map_strides(range(count)))
        self.pad_to = strides.pop() if len(strides) == 1 else 0  # a CNN takes any size

    @staticmethod
    def takes(model: nn.Module) -> bool:
        return isinstance(model, TimmBackbone)

    def init_weights(self) -> None:
        """Weights come from the checkpoint; mmengine must not re-initialise them."""

    def train(self, mode: bool = True) -> ProteusTimm:
        super().train(mode)
        if self.frozen:
            self.net.eval()  # a probe never updates the backbone (BatchNorm statistics included)
        return self

    def forward(self, x: torch.Tensor) -> list:
        if self.pad_to:  # a ViT's patch embedding takes only whole patches: padded at the corner, as mmseg's ViT
            h, w = x.shape[-2:]
            x = F.pad(x, (0, -w % self.pad_to, 0, -h % self.pad_to))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return list(self.net.get_intermediate_layers(x, n=list(self.out_indices), reshape=True, norm=False))


# The learned tokens, in our names: DINOv2's (register_tokens: DINOv2 with registers) and DINOv3's
# (reg_token: its 4 storage tokens). They are embeddings: layer 0 of the lr decay, like pos_embed.
TOKENS = ("cls_token", "pos_embed", "register_tokens", "reg_token", "mask_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for everything else: a CLIP-layout ln_pre too,
    as mmseg's get_layer_id_for_vit gave the reference's `backbone.ln_pre` (full lr)."""
    m = re.match(r"backbone\.vit\.blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if re.match(rf"backbone\.vit\.({'|'.join(TOKENS)}|patch_embed)", name):
        return 0
    return num_layers + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """lr x decay_rate ** (num_layers + 1 - layer_id); no weight decay on 1-d parameters and biases.

    paramwise_cfg = dict(num_layers=12, decay_rate=0.65, token_weight_decay=True)

    The multipliers equal mmseg's LayerDecayOptimizerConstructor on the reference's backbone
    (embeddings 0.65^13 ... last block 0.65, heads 1 for 12 blocks). token_weight_decay=True is the
    reference: its no-decay check compared `pos_embed`/`cls_token` with names that start with
    `backbone.`, so both tokens were decayed. False leaves them undecayed, as that check meant to.
    DINOv3's storage and mask tokens (and DINOv2's registers) follow cls_token either way: the same
    layer-0 lr, decayed exactly when it is, since they are learned tokens of the same kind and the
    reference, whose ViT had none, gives no other rule (the mask token is frozen in any case).
    """

    def add_params(self, params: list, module: nn.Module, **kwargs) -> None:
        num_layers = self.paramwise_cfg["num_layers"]
        decay_rate = self.paramwise_cfg["decay_rate"]
        token_weight_decay = self.paramwise_cfg.get("token_weight_decay", True)
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            no_wd = p.ndim == 1 or name.endswith(".bias")
            if not token_weight_decay:
                no_wd = no_wd or name.endswith(TOKENS)
            scale = decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers))
            params.append({"params": [p], "lr": self.base_lr * scale, "weight_decay": 0.0 if no_wd else self.base_wd})


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TimmLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise lr decay on a timm backbone (ProteusTimm), its layers and weight-decay exemptions as timm's own
    `param_groups_layer_decay` makes them (the model's `group_matcher`: the stem first, then each block; its
    `no_weight_decay` names and 1-d parameters undecayed); its last layer and the heads at the base lr, the heads'
    1-d parameters and biases undecayed.

    paramwise_cfg = dict(decay_rate=0.9)
    """

    def add_params(self, params: list, module: nn.Module, **kwargs) -> None:
        from timm.optim import param_groups_layer_decay

        timm_model = module.backbone.net.model
        skip = getattr(timm_model, "no_weight_decay", lambda: ())()
        decay = self.paramwise_cfg["decay_rate"]
        for group in param_groups_layer_decay(
            timm_model, weight_decay=self.base_wd, no_weight_decay_list=skip, layer_decay=decay
        ):
            lr = self.base_lr * group["lr_scale"]
            params.append({"params": group["params"], "lr": lr, "weight_decay": group["weight_decay"]})
        for name, p in module.named_parameters():
            if not p.requires_grad or name.startswith("backbone."):
                continue
            no_wd = p.ndim == 1 or name.endswith(".bias")
            params.append({"params": [p], "lr": self.base_lr, "weight_decay": 0.0 if no_wd else self.base_wd})


class DepthHeadMixin:
    """Makes an mmseg decode head a depth head: loss on gt_depth_map, positive predictions.

    The head ends in a plain 1-channel conv (no activation); SiLog clamps inside the loss and the
    prediction is clamped to the evaluation's minimum depth so log-metrics stay finite.
    """

    min_depth = 1e-3

    def loss_by_feat(self, pred: torch.Tensor, batch_data_samples: list) -> dict:
        gt = torch.stack([s.gt_depth_map.data for s in batch_data_samples])
        pred = resize(pred, size=gt.shape[2:], mode="bilinear", align_corners=self.align_corners)
        losses = self.loss_decode if isinstance(self.loss_decode, nn.ModuleList) else [self.loss_decode]
        out: dict = {}
        for loss in losses:
            out[loss.loss_name] = out.get(loss.loss_name, 0) + loss(pred, gt)
        return out

    def predict_by_feat(self, pred: torch.Tensor, batch_img_metas: list) -> torch.Tensor:
        return super().predict_by_feat(pred, batch_img_metas).clamp(min=self.min_depth)


@MODELS.register_module()
class DPTDepthHead(DepthHeadMixin, DPTHead):
    """mmseg's DPT (readout "project") predicting one depth channel."""


@MODELS.register_module()
class DPTStagesDepthHead(DPTDepthHead):
    """DPT's convolutions and fusion blocks over a multi-scale backbone's four stage maps (strides 4 to 32): the
    maps go to the 3x3 convs as they are, since they already have the strides DPT's reassembly gives a ViT's
    tokens (DPT-hybrid reads its ResNet stages the same way); no readout, as a CNN has no class token."""

    def __init__(self, in_channels: list[int], **kwargs) -> None:
        # DPTHead's reassembly built 1 channel wide and dropped (2048-channel stages would make it large); the 3x3
        # convs rebuilt to read the stages' widths
        kwargs.update(embed_dims=1, post_process_channels=[1] * len(in_channels), readout_type="ignore")
        super().__init__(in_channels=in_channels, **kwargs)
        self.reassemble_blocks = nn.Identity()
        self.post_process_channels = list(in_channels)
        self.convs = nn.ModuleList(
            ConvModule(c, self.channels, kernel_size=3, padding=1, act_cfg=None, bias=False) for c in in_channels
        )


@MODELS.register_module()
class LinearDepthHead(DepthHeadMixin, FCNHead):
    """Linear probe: the resized, concatenated levels -> a 1x1 conv to one depth channel."""


@HOOKS.register_module()
class EvaluationHistoryHook(Hook):
    """Appends {"iter", "metrics"} to <work_dir>/evaluations.jsonl after each evaluation in training.

    The reference evaluated on the test split during training and published the best figure; the
    file lets the runner name that figure next to the final one. A fresh run starts the file anew;
    a resumed one drops the entries after its checkpoint (they are evaluated again).
    """

    priority = "LOW"

    def before_train(self, runner) -> None:
        path = Path(runner.work_dir) / EVALUATIONS
        if is_main_process() and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["iter"] <= runner.iter]
            path.write_text("".join(f"{line}\n" for line in kept))

    def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
        if not is_main_process() or not metrics:
            return
        entry = {"iter": runner.iter, "metrics": {k: float(v) for k, v in metrics.items()}}
        with open(Path(runner.work_dir) / EVALUATIONS, "a") as f:
            f.write(json.dumps(entry) + "\n")


def stale_saves(work_dir: Path) -> list[Path]:
    """The temp files of saves killed mid-write (DenseRunner.save_checkpoint's names)."""
    return list(work_dir.glob(".*.pth.*.tmp"))


def check_covers(model: nn.Module, checkpoint: dict, source: str, *, revise_keys) -> None:
    """mmengine loads non-strictly: a checkpoint without the head (a backbone file, say) would leave it
    random and report a figure near 0, with "missing keys" only in the log."""
    state = checkpoint.get("state_dict", checkpoint)
    for pattern, replacement in revise_keys:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    problems = [f"missing keys {few_names(missing)}"] if missing else []
    if len(missing) == len(own):
        problems = ["it holds none of the model's weights (a backbone file? pass it as --backbone); " + problems[0]]
    if shapes:
        problems.append(f"shape mismatch (file vs model): {few_names(shapes)}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint {source} does not cover the model: " + "; ".join(problems))


REVISE_KEYS = ((r"^module.", ""),)  # Runner.load_checkpoint's default: DDP's prefix


# What a checkpoint holds besides containers and tensors: torch.load(weights_only=True) reads these as they are.
_PLAIN = (str, int, float, bool, bytes, type(None), torch.dtype, torch.Size, torch.device)


def _as_data(value, where: str):
    """`value` as weights_only=True reads it back: numpy numbers as Python's, numpy arrays as tensors.
    Anything else (an object, a function) is a TypeError naming its place in the checkpoint, at the save
    that would write it, not at the resume that could not read it."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _as_data(v, f"{where}.{k}")) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_as_data(v, f"{where}[{i}]") for i, v in enumerate(value))
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"checkpoint entry {where} is a {kind}: DenseRunner saves only plain data")


def _names_checkpoint(key: str) -> bool:
    """The message hub's entries that CheckpointHook resumes as paths (and deletes when superseded)."""
    return key == "last_ckpt" or key.startswith("best_ckpt")


def _hub_as_data(state: dict, work_dir: Path) -> dict:
    """mmengine pickles each HistoryBuffer with its statistics functions (getattr on the class), which a
    weights_only load refuses and no allow-list may admit: keep the buffers' numbers instead. The
    checkpoint paths become relative to the work dir, so a moved or copied work dir resumes with its own
    files (an absolute path would make CheckpointHook delete a best checkpoint in the old folder)."""
    scalars = OrderedDict(
        (k, {"log_history": b.data[0], "count_history": b.data[1], "max_length": b.max_length})
        for k, b in state["log_scalars"].items()
    )
    info = OrderedDict(
        (k, (_relative(v, work_dir) or v) if _names_checkpoint(k) else v) for k, v in state["runtime_info"].items()
    )
    return {"log_scalars": scalars, "runtime_info": info, "resumed_keys": state["resumed_keys"]}


def _relative(path, folder: Path) -> str | None:
    """`path` relative to `folder` when it is an absolute path inside it."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return None
    path, folder = Path(path).resolve(), folder.resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else None


def _hub_from_data(state: dict, work_dir: Path) -> dict:
    """_hub_as_data undone: the HistoryBuffers rebuilt, relative checkpoint paths in this work dir."""
    scalars = OrderedDict(
        (k, HistoryBuffer(v["log_history"].numpy(), v["count_history"].numpy(), v["max_length"]))
        for k, v in state["log_scalars"].items()
    )
    info = OrderedDict(
        (k, str(work_dir / v) if _names_checkpoint(k) and isinstance(v, str) and not os.path.isabs(v) else v)
        for k, v in state["runtime_info"].items()
    )
    return {"log_scalars": scalars, "runtime_info": info, "resumed_keys": state["resumed_keys"]}


OLDER_FORMAT = (
    "{path} is a checkpoint of the older format, whose message hub pickles function references, and is "
    "not unpickled (code in a checkpoint is never run): train afresh (another --output-dir, or remove its "
    "checkpoints), or keep its weights for --eval-only as segmentation/README.md (Checkpoints) shows"
)


def read_checkpoint(path: str | os.PathLike) -> object:
    """Every dense checkpoint, whoever wrote it, is read as data (weights_only=True), never unpickled in
    full: DenseRunner saves nothing else, and a pickle with code is refused in one line."""
    try:
        return safe_load(path)
    except ValueError:
        if any(g.endswith(".HistoryBuffer") for g in pickled_globals(path)):  # mmengine's own format
            raise UsageError(OLDER_FORMAT.format(path=path)) from None
        raise


class DenseRunner(Runner):
    """mmengine's Runner with three changes: a checkpoint is written to a temp file and renamed (a kill
    mid-save leaves the previous one whole), as plain data (read back with weights_only=True, so no
    checkpoint file can run code), and a loaded checkpoint must cover the model."""

    def call_hook(self, fn_name: str, **kwargs) -> None:
        if fn_name == "after_load_checkpoint":  # before any hook or the resume reads it
            checkpoint = kwargs["checkpoint"]
            if isinstance(checkpoint.get("message_hub"), dict):
                checkpoint["message_hub"] = _hub_from_data(checkpoint["message_hub"], Path(self.work_dir))
        super().call_hook(fn_name, **kwargs)
        if fn_name == "before_save_checkpoint":  # after every hook has added its part
            checkpoint = kwargs["checkpoint"]
            checkpoint["message_hub"] = _hub_as_data(checkpoint["message_hub"], Path(self.work_dir))
            checkpoint.update(_as_data(checkpoint, "checkpoint"))

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        with atomic_replace(Path(out_dir).resolve() / filename) as tmp:  # a full disk: DiskFullError, one line
            super().save_checkpoint(str(tmp.parent), tmp.name, *args, **kwargs)

    # positional past three: mmengine's Runner.load_checkpoint, overridden (tests/test_layers.py)
    def load_checkpoint(self, filename: str, map_location="cpu", strict: bool = False, revise_keys=REVISE_KEYS):
        checkpoint = super().load_checkpoint(filename, map_location, strict, list(revise_keys))
        model = self.model.module if is_model_wrapper(self.model) else self.model
        check_covers(model, checkpoint, filename, revise_keys=revise_keys)
        return checkpoint
