"""The one ViT of the project: timm's VisionTransformer with DINOv2's token API.

Students (in each reference layout: DINOv2, CLIP, SynCLR), DINOv2/SynCLR/CLIP teachers and every
downstream task use this class, so that mask tokens, registers and positional-embedding
interpolation behave exactly as in the official DINOv2 code while the blocks, attention (fused
SDPA) and init come from timm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import deepcopy
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import UsageError
from .tokens import Tokens


def _exporting() -> bool:
    """Whether torch.export is tracing (torch's ONNX exporter among its users); torch < 2.5 has no such test."""
    test = getattr(torch.compiler, "is_exporting", None)
    return bool(test and test())


CUBIC = -0.75  # PyTorch's (non-antialiased) bicubic kernel coefficient
CUBIC_AA = -0.5  # its antialiased bicubic's: Keys' kernel, as PIL's


def _near(d: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel at distances 0 <= d <= 1."""
    return ((a + 2) * d - (a + 3)) * d * d + 1


def _far(d: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel at distances 1 <= d <= 2."""
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a


def bicubic_matrix(n: int, m: int, offset: float, *, keep: torch.Tensor) -> torch.Tensor:
    """[n, m]: F.interpolate(mode="bicubic", scale_factor=(n + offset) / m) along one axis of m samples, as a
    matrix (PyTorch's source coordinates and 4-tap kernel, indices clamped at the edges); the identity where
    `keep`. Built from n's arange, so an exported graph computes it for any n."""
    dst = torch.arange(n, dtype=torch.float32)
    scale = m / (torch.scalar_tensor(n, dtype=torch.float64) + offset)
    src = (dst + 0.5) * scale.float() - 0.5
    start, t = src.floor(), src - src.floor()
    taps = (1 + t, t, 1 - t, 2 - t)  # the distances to the 4 samples from floor - 1 to floor + 2
    weights = (_far(taps[0], CUBIC), _near(taps[1], CUBIC), _near(taps[2], CUBIC), _far(taps[3], CUBIC))
    columns = torch.arange(m, dtype=torch.float32)
    matrix = torch.zeros(n, m)
    for k, weight in zip((-1, 0, 1, 2), weights):
        index = (start + k).clamp(0, m - 1)
        matrix = matrix + weight[:, None] * (index[:, None] == columns[None]).float()
    return torch.where(keep, (dst[:, None] == columns[None]).float(), matrix)


def antialiased_bicubic_matrix(n: int, m: int) -> torch.Tensor:
    """[n, m]: F.interpolate(mode="bicubic", size=n, antialias=True) along one axis of m samples, as a matrix
    (PyTorch's separable filter: Keys' kernel centred on each output's source coordinate, widened by the scale
    when downsampling, every row normalised to sum 1, no sample past the edges). The identity at n == m, and
    built from n's arange, so an exported graph computes it for any n."""
    scale = m / torch.scalar_tensor(n, dtype=torch.float64)
    centre = (torch.arange(n, dtype=torch.float64) + 0.5) * scale
    d = (torch.arange(m, dtype=torch.float64)[None] + 0.5 - centre[:, None]).abs() / scale.clamp(min=1.0)
    zero = torch.zeros((), dtype=torch.float64)
    weights = torch.where(d < 1, _near(d, CUBIC_AA), torch.where(d < 2, _far(d, CUBIC_AA), zero))
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def block_indices(n: int | Sequence[int], total: int) -> set[int]:
    """get_intermediate_layers' `n` (DINOv2 and DINOv3 alike): the last n blocks, or the listed indices."""
    take = set(range(total - n, total) if isinstance(n, int) else n)
    if not take or min(take) < 0 or max(take) >= total:
        raise UsageError(f"block indices {sorted(take)} out of range for {total} blocks")
    return take


def layer_outputs(
    outputs: list[torch.Tensor],
    prefix: int,
    grid: tuple[int, int] | None,
    *,
    class_token: bool = False,
    extra_tokens: bool = False,
) -> tuple:
    """get_intermediate_layers' return value (DINOv2 and DINOv3 alike) from each chosen block's whole token
    sequence: its patch tokens ([B, D, h, w] maps with `grid`), paired with its class token and with the
    tokens between the two (registers, storage tokens) when asked."""
    patches = [o[:, prefix:] for o in outputs]
    if grid is not None:
        patches = [p.reshape(p.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
    parts = [patches]
    parts += [[o[:, 0] for o in outputs]] if class_token else []
    parts += [[o[:, 1:prefix] for o in outputs]] if extra_tokens else []
    return tuple(zip(*parts)) if len(parts) > 1 else tuple(patches)


class ViT(VisionTransformer):
    """A ViT whose `forward_features(x, masks)` returns DINOv2's output dict.

    State-dict keys are timm's, which equal the official DINOv2 layout (cls_token, pos_embed
    [1, 1+N, D], mask_token [1, D], register_tokens, blocks.i.*, norm) except for SwiGLU MLPs,
    whose w12/w3 are stored as timm's fc1/fc2; models.checkpoints converts to and from every
    reference layout.

    `norm_patch_tokens=False` is the reference's CLIP student: the final norm (CLIP's ln_post)
    touches only the CLS token, and "x_norm_patchtokens" are the last block's outputs. With it,
    get_intermediate_layers(norm=True) normalises only the class tokens, so both APIs still agree.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 384,
        *,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        init_values: float | None = 1.0,
        num_register_tokens: int = 0,
        swiglu: bool = False,
        pre_norm: bool = False,
        act_layer: str | type[nn.Module] | None = None,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        norm_patch_tokens: bool = True,
    ) -> None:
        mlp_kwargs = {}
        if swiglu:
            mlp_kwargs = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            init_values=init_values,
            pre_norm=pre_norm,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps),
            act_layer=mlp_kwargs.pop("act_layer", act_layer),
            **mlp_kwargs,
        )
        self.patch_size = patch_size
        self.norm_patch_tokens = norm_patch_tokens
        # DINOv2's rule: its _reg models resize the table antialiased to size, the others with a 0.1 offset
        self.interpolate_offset = 0.0 if num_register_tokens else 0.1
        self.interpolate_antialias = bool(num_register_tokens)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.num_register_tokens = num_register_tokens
        self.register_tokens = None
        if num_register_tokens:
            # DINOv2 keeps registers outside the positional embedding: [cls, regs, patches].
            self.register_tokens = nn.Parameter(torch.empty(1, num_register_tokens, embed_dim))
            nn.init.normal_(self.register_tokens, std=1e-6)
            self.num_prefix_tokens = 1 + num_register_tokens

    # --- tokens ---------------------------------------------------------------------------
    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """DINOv2's formula: bicubic with a 0.1 offset (plain) or antialiased to size (reg)."""
        num_pos = self.pos_embed.shape[1] - 1
        if _exporting():
            return self._pos_encoding_for_export(h, w)
        if h * w == num_pos and h == w:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        dim = pos_embed.shape[-1]
        m = int(math.sqrt(num_pos))
        if m * m != num_pos:
            raise UsageError(f"pos_embed holds {num_pos} patch positions, not a square grid")
        kwargs: dict = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = ((h + self.interpolate_offset) / m, (w + self.interpolate_offset) / m)
        else:
            kwargs["size"] = (h, w)
        patch_pos = F.interpolate(
            pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)

    def _pos_encoding_for_export(self, h, w) -> torch.Tensor:
        """interpolate_pos_encoding as one graph for every size (an ONNX export with free height and width):
        DINOv2's resampling as a matrix per axis (bicubic_matrix with its offset, where the table at its own grid
        is chosen by a tensor test, not a Python branch that the exporter would fix to the example's size; or
        antialiased_bicubic_matrix, the identity there)."""
        m = int(math.isqrt(self.pos_embed.shape[1] - 1))
        if self.interpolate_antialias:
            rows, cols = (antialiased_bicubic_matrix(n, m) for n in (h, w))
        else:
            same = (torch.scalar_tensor(h) == m) & (torch.scalar_tensor(w) == m)
            rows, cols = (bicubic_matrix(n, m, self.interpolate_offset, keep=same) for n in (h, w))
        table = self.pos_embed[0, 1:].float().reshape(m, m, -1)
        patch_pos = torch.einsum("hi,ijd,wj->hwd", rows, table, cols).reshape(1, -1, table.shape[-1])
        return torch.cat((self.pos_embed[:, :1].float(), patch_pos), dim=1).to(self.pos_embed.dtype)

    @torch.no_grad()
    def at_resolution(self, img_size: int) -> ViT:
        """A copy set to `img_size`: its position table is this one resampled to that grid by this network's rule,
        so at `img_size` the copy computes what this network does, without resampling, in any ViT code (timm's
        resamples other sizes its own way)."""
        if img_size % self.patch_size:
            raise UsageError(f"resolution {img_size} is not a multiple of the patch size {self.patch_size}")
        grid = img_size // self.patch_size
        table = self.interpolate_pos_encoding(grid, grid).clone()
        out = deepcopy(self)
        out.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        out.patch_embed.set_input_size(img_size=img_size)
        return out

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch grid (B, H, W, D) -> [cls, registers, patches] with positions added."""
        b, h, w, d = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)), dim=1)
        x = x + self.interpolate_pos_encoding(h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        return self.pos_drop(x)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))  # (B, H, W, D); a bf16 teacher takes fp32 crops
        if masks is not None:
            masks = masks.reshape(x.shape[:3]).unsqueeze(-1)
            x = torch.where(masks, self.mask_token.to(x.dtype), x)
        x = self._pos_embed(x)
        return self.norm_pre(x)

    def output_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm on every token, or on the CLS only (norm_patch_tokens=False: CLIP's ln_post)."""
        if self.norm_patch_tokens:
            return self.norm(x)
        return torch.cat((self.norm(x[:, :1]), x[:, 1:]), dim=1)

    # --- DINOv2 API -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:  # type: ignore[override]
        x = self.prepare_tokens(x, masks)
        if self.grad_checkpointing and self.training:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x_norm = self.output_norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
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

    # positional past three: DINOv2's published API, get_intermediate_layers(x, n, reshape, ...) (tests/test_layers.py)
    def get_intermediate_layers(  # type: ignore[override]
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """DINOv2 semantics: last `n` blocks (int) or the listed block indices, prefix removed."""
        take = block_indices(n, len(self.blocks))
        height, width = x.shape[-2:]
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: max(take) + 1]):  # later blocks cannot change the outputs
            x = blk(x)
            if i in take:
                outputs.append(x)
        if norm:
            outputs = [self.output_norm(o) for o in outputs]
        grid = (height // self.patch_size, width // self.patch_size) if reshape else None
        return layer_outputs(outputs, self.num_prefix_tokens, grid, class_token=return_class_token)
