"""DINOv3's ViT (facebookresearch/dinov3, PROTOCOLS G) on timm's Eva: teachers and DINOv3-layout students.

timm's Eva with `rope_type='dinov3'` is DINOv3's network: axial RoPE on the patch tokens only, 4
storage tokens, LayerScale, LayerNorm eps 1e-5, q/v biases with the k bias masked to zero. This
class adds what Proteus uses from every ViT (DINOv2's token API with mask tokens, FAIR's init) and
keeps what timm's converter drops from an official file: the RoPE periods (DINOv3 stored them in
bf16 precision, so the file's values, not the formula's, give FAIR's outputs), the mask token and
`local_cls_norm`. Our state dict uses timm's names plus `mask_token`, `rope.periods` and
`local_cls_norm.*`; `to_official` / `from_official` convert to and from FAIR's names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import DropPath, LayerNorm, RotaryEmbeddingDinoV3
from timm.models import checkpoint
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as timm_checkpoint_filter
from torch import nn

from .errors import UsageError
from .tokens import Tokens
from .vision_transformer import block_indices, layer_outputs

StateDict = dict[str, torch.Tensor]

NUM_STORAGE_TOKENS = 4
ROPE_BASE = 100.0
LAYERSCALE_INIT = 1e-5
NORM_EPS = 1e-5
# FAIR's training configs (and the released hub arguments) rescale the RoPE coordinates in training
# mode by a factor exp(U(-log 2, log 2)); eval mode never does.
ROPE_RESCALE_COORDS = 2.0


class Rope(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE whose periods are weights: persistent (`rope.periods`), and kept in full
    precision when the model is cast (timm would recompute them from the formula, losing the file's).
    `coords` then `embed` compute it as FAIR's RopePositionEmbedding.forward does, on the periods' device."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("periods", self.periods, persistent=True)

    def _apply(self, fn, recurse=True):
        periods = self.periods
        nn.Module._apply(self, fn, recurse)
        if self.periods.dtype != periods.dtype:
            self.periods = periods.to(self.periods.device)
        return self

    def coords(self, shape: Sequence[int]) -> torch.Tensor:
        """A patch grid's coordinates [HW, 2] in [-1, 1] (0.5-centred, each axis over its own length: DINOv3's
        "separate"), on the periods' device in their dtype, where FAIR computes them (its released RoPE is fp32)."""
        dd = dict(device=self.periods.device, dtype=self.periods.dtype)
        h, w = shape
        axes = torch.arange(0.5, h, **dd) / h, torch.arange(0.5, w, **dd) / w
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        """FAIR's training-time coordinate augmentation, drawn afresh at each call: a shift per axis from
        U(-shift, shift), a factor per axis exp(U(-log jitter, log jitter)), then one shared factor
        exp(U(-log rescale, log rescale)), in this order, on the coordinates' device and dtype as FAIR draws them."""
        dd = dict(device=coords.device, dtype=coords.dtype)
        if self.shift_coords is not None:
            shift = float(self.shift_coords)
            coords = coords + torch.empty(2, **dd).uniform_(-shift, shift)
        if self.jitter_coords is not None:
            jitter = math.log(float(self.jitter_coords))
            coords = coords * torch.empty(2, **dd).uniform_(-jitter, jitter).exp()
        if self.rescale_coords is not None:
            rescale = math.log(float(self.rescale_coords))
            coords = coords * torch.empty(1, **dd).uniform_(-rescale, rescale).exp()
        return coords

    def embed(self, coords: torch.Tensor) -> torch.Tensor:
        """sin and cos [HW, 2 * head_dim] (timm's layout) of these coordinates, augmented in training mode."""
        if self.training and self.aug_active:
            coords = self.augment(coords)
        return torch.cat(self._get_pos_embed_from_coords(coords), dim=-1)


class DinoV3ViT(Eva):
    """FAIR's DinoVisionTransformer (released arguments) as a timm Eva with DINOv2's token API.

    `forward_features(x, masks)` returns FAIR's dict (x_norm_clstoken, x_storage_tokens,
    x_norm_patchtokens, x_prenorm, masks); `get_intermediate_layers` has FAIR's semantics. Inputs are
    cast to the weights' dtype, so a bf16 teacher takes float32 crops.

    The RoPE is recomputed before every block, as FAIR's block loop does, so in training mode each block
    has its own draw of the coordinate augmentation, made just before the block runs. Without drop path
    the generator is then consumed exactly as by FAIR's code on the same device. Drop path is timm's
    DropPath (one Bernoulli per sample after the attention, another after the MLP), drawn at the same
    points of the loop as FAIR's but not the same numbers: FAIR drops a fixed-size random subset of the
    batch (two randperms per block). Its rate rises linearly from 0 in the first block to
    `drop_path_rate` in the last, as in our other ViTs; `drop_path_uniform` gives every block the rate,
    as FAIR's DinoVisionTransformer does (DINOv3-layout pretraining, `Family.pretraining_drop_path_uniform`).
    """

    norm_patch_tokens = True  # one final norm over every token (segmentation.mmseg_ext reads this)

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        *,
        mlp_hidden: int = 1536,
        swiglu: bool = False,
        qkv_bias: bool = True,
        local_cls_norm: bool = False,
        patch_size: int = 16,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        rope_rescale_coords: float | None = ROPE_RESCALE_COORDS,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            mlp_ratio=(mlp_hidden + 0.5) / embed_dim,  # int(dim * ratio) gives back exactly `mlp_hidden`
            swiglu_mlp=swiglu,
            swiglu_align_to=1 if swiglu else 0,  # timm's split SwiGLU (fc1_g, fc1_x, fc2) at exactly mlp_hidden
            init_values=LAYERSCALE_INIT,
            norm_layer=partial(LayerNorm, eps=NORM_EPS),
            use_abs_pos_emb=False,
            use_rot_pos_emb=False,  # our Rope below (timm's DINOv3 RoPE with persistent periods)
            rope_rotate_half=True,
            num_reg_tokens=NUM_STORAGE_TOKENS,
            use_fc_norm=False,
            dynamic_img_size=True,
            drop_path_rate=0.0 if drop_path_uniform else drop_path_rate,  # timm's linear ramp over the blocks
        )
        self.patch_size = patch_size
        self.rope = Rope(
            embed_dim // num_heads, temperature=ROPE_BASE, rotate_half=True, rescale_coords=rope_rescale_coords
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # DINOv3 normalises the local crops' CLS with it in training (7B, satellite ViT-L); unused here.
        self.local_cls_norm = LayerNorm(embed_dim, eps=NORM_EPS) if local_cls_norm else None
        if drop_path_uniform and drop_path_rate:
            for blk in self.blocks:
                blk.drop_path1, blk.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)
        self.init_dinov3_weights()

    @torch.no_grad()
    def init_dinov3_weights(self) -> None:
        """FAIR's init_weights: cls/storage N(0, 0.02), zero mask token, Linears trunc-normal 0.02 with
        zero biases, LayerScale 1e-5, the patch Conv2d uniform(+-1/sqrt(fan_in)), RoPE periods from the formula."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.reg_token, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for blk in self.blocks:
            nn.init.constant_(blk.gamma_1, LAYERSCALE_INIT)
            nn.init.constant_(blk.gamma_2, LAYERSCALE_INIT)
            if blk.attn.q_bias is not None:
                nn.init.zeros_(blk.attn.q_bias)
                nn.init.zeros_(blk.attn.v_bias)
        proj = self.patch_embed.proj
        bound = (proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]) ** -0.5
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.uniform_(proj.bias, -bound, bound)
        self.init_non_persistent_buffers()

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """The zero k biases and the formula's RoPE periods: what a build on the meta device lacks."""
        for blk in self.blocks:
            if blk.attn.k_bias is not None:
                blk.attn.k_bias.zero_()
        self.rope.periods.copy_(self.rope._compute_periods())

    # --- tokens ---------------------------------------------------------------------------
    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[cls, 4 storage, patches] (masked patches replaced by the mask token) and the patches' RoPE coordinates."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))  # (B, H, W, D)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        if masks is not None:
            x = torch.where(masks.reshape(b, -1, 1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), x), dim=1)
        return x, self.rope.coords((gh, gw))

    def run_block(self, blk: nn.Module, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        rope = self.rope.embed(coords)  # per block, as FAIR's loop: in training, this block's own augmentation draw
        if self.grad_checkpointing and self.training:
            return checkpoint(blk, x, rope=rope)
        return blk(x, rope=rope)

    # --- DINOv2/DINOv3 API ------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:  # type: ignore[override]
        x, coords = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = self.run_block(blk, x, coords)
        x_norm = self.norm(x)
        s = self.num_prefix_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_storage_tokens": x_norm[:, 1:s],
            "x_norm_patchtokens": x_norm[:, s:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.forward_features(x, masks)["x_norm_clstoken"]

    summary_is_class_token = True  # the backbone contract: its summary is the final-norm CLS (DINOv2's probes)

    @property
    def summary_dim(self) -> int:
        """The backbone contract: the width of its summary token, its CLS's."""
        return self.embed_dim

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Tokens:
        """The backbone contract (models.tokens): the final-norm CLS as the summary, the patch tokens on their grid."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        out = self.forward_features(x, masks)
        return Tokens(out["x_norm_clstoken"], out["x_norm_patchtokens"], grid)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """FAIR's semantics: the last `n` blocks (int) or the listed block indices; extra = storage tokens.

        The blocks after the last one taken are not run (they cannot change the outputs), so in training
        mode their RoPE and drop-path draws, which FAIR's loop over every block makes, are not made."""
        take = block_indices(n, len(self.blocks))
        height, width = x.shape[-2:]
        x, coords = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: max(take) + 1]):
            x = self.run_block(blk, x, coords)
            if i in take:
                outputs.append(self.norm(x) if norm else x)
        grid = (height // self.patch_size, width // self.patch_size) if reshape else None
        return layer_outputs(
            outputs, self.num_prefix_tokens, grid, class_token=return_class_token, extra_tokens=return_extra_tokens
        )


# --- FAIR's key layout -------------------------------------------------------------------------
_TOP = {"reg_token": "storage_tokens", "rope.periods": "rope_embed.periods"}  # ours -> FAIR's
_BLOCK_RENAMES = (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"))
_SWIGLU_RENAMES = (("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."))
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def is_official(state_dict: StateDict) -> bool:
    return "storage_tokens" in state_dict or "rope_embed.periods" in state_dict


def bias_mask(bias: torch.Tensor) -> torch.Tensor:
    """DINOv3's `mask_k_bias`: 1 for the q and v thirds of the qkv bias, 0 for k."""
    d = bias.shape[0] // 3
    mask = torch.ones_like(bias)
    mask[d : 2 * d] = 0
    return mask


def to_official(state_dict: StateDict) -> StateDict:
    """Our names -> FAIR's DinoVisionTransformer state dict (loads there with strict=True).

    The qkv bias is [q_bias, 0, v_bias] with its `bias_mask` buffer; SwiGLU fc1_g/fc1_x/fc2 are w1/w2/w3.
    """
    swiglu = any(".mlp.fc1_g." in k for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if m := _BLOCK.match(k):
            rest = k[m.end() :]
            if rest == "attn.v_bias":
                continue
            if rest == "attn.q_bias":
                bias = torch.cat((v, torch.zeros_like(v), state_dict[m.group(0) + "attn.v_bias"]))
                out[m.group(0) + "attn.qkv.bias"] = bias
                out[m.group(0) + "attn.qkv.bias_mask"] = bias_mask(bias)
                continue
            for ours, theirs in _BLOCK_RENAMES + (_SWIGLU_RENAMES if swiglu else ()):
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours) :]
                    break
            k = m.group(0) + rest
        out[_TOP.get(k, k)] = v
    return out


def from_official(state_dict: StateDict, model: DinoV3ViT) -> StateDict:
    """FAIR's names -> ours, through timm's DINOv3 converter plus what it drops (periods, mask token,
    local_cls_norm). The k third of the qkv bias is dropped only where the file's bias_mask zeroes it."""
    for k, v in state_dict.items():
        if k.endswith("attn.qkv.bias_mask") and not torch.equal(v.float(), bias_mask(v.float())):
            raise UsageError(f"{k} is not DINOv3's masked-k pattern (1 for the q and v thirds, 0 for k)")
    periods = state_dict["rope_embed.periods"].float()
    if not (torch.isfinite(periods).all() and (periods > 0).all()):
        raise UsageError("rope_embed.periods holds non-finite or non-positive values")
    out = timm_checkpoint_filter(state_dict, model)
    out["rope.periods"] = state_dict["rope_embed.periods"]
    out["mask_token"] = state_dict["mask_token"]
    out.update({k: v for k, v in state_dict.items() if k.startswith("local_cls_norm.")})
    return out
