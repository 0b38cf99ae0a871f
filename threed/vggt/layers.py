"""Building blocks of VGGT: ViT block with qk-norm and 2D RoPE, and DINOv2.

Parameter names follow the official ``vggt`` package (and DINOv2's
``vit_large`` inside it) so that the facebook/VGGT-1B ``model.pt`` loads
with ``strict=True``. Written from the architecture description; no code
was copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Mlp",
    "LayerScale",
    "Attention",
    "Block",
    "RotaryPositionEmbedding2D",
    "patch_positions",
    "PatchEmbed",
    "DinoViT",
]


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (init ``init_values``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE: first half of each head's channels rotated by the y position,
    second half by x; within each half, pairs are (i, i + d/2) with inverse
    frequencies ``freq ** (-2i/d)`` (``freq`` = 100 in VGGT). No parameters."""

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.frequency = float(frequency)

    def _cos_sin(self, dim: int, max_pos: int, device, dtype) -> tuple[Tensor, Tensor]:
        exponents = torch.arange(0, dim, 2, device=device).float() / dim
        inv_freq = 1.0 / (self.frequency**exponents)
        angles = torch.outer(torch.arange(max_pos, device=device).float(), inv_freq)
        angles = angles.to(dtype)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _rotate_1d(x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        c = F.embedding(pos, cos)[:, None]  # [B, 1, N, d]
        s = F.embedding(pos, sin)[:, None]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * c + rotated * s

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens ``[B, H, N, D]`` (D divisible by 4), positions ``[B, N, 2]`` (y, x) long."""
        d = tokens.shape[-1] // 2
        pos = positions.long()
        cos, sin = self._cos_sin(d, int(pos.max()) + 1, tokens.device, tokens.dtype)
        ty, tx = tokens.chunk(2, dim=-1)
        return torch.cat(
            [
                self._rotate_1d(ty, pos[..., 0], cos, sin),
                self._rotate_1d(tx, pos[..., 1], cos, sin),
            ],
            dim=-1,
        )


def patch_positions(batch: int, grid_h: int, grid_w: int, num_special: int, device=None) -> Tensor:
    """``[batch, num_special + grid_h * grid_w, 2]`` long (y, x): special tokens at
    (0, 0), patches at (y + 1, x + 1) in row-major order (VGGT's convention)."""
    ys = torch.arange(grid_h, device=device)
    xs = torch.arange(grid_w, device=device)
    grid = torch.cartesian_prod(ys, xs) + 1
    special = torch.zeros(num_special, 2, dtype=torch.long, device=device)
    return torch.cat([special, grid], dim=0)[None].expand(batch, -1, -1)


class Attention(nn.Module):
    """Multi-head self-attention with optional qk LayerNorm and RoPE.

    The order is ``qkv -> q_norm/k_norm -> RoPE -> SDPA -> proj``; token
    merging (:class:`threed.vggt.TokenMerging`) replaces ``forward`` on chosen
    instances and reuses these parts.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block ``x + ls1(attn(norm1(x))); x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv patchify ``[B, 3, H, W] -> [B, (H/p)(W/p), D]`` (key ``proj``)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINOv2 ViT with register tokens, as built by ``vit_large(patch_size=14,
    num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0,
    block_chunks=0, init_values=1.0)`` inside VGGT's aggregator.

    Keys: ``cls_token [1,1,D]``, ``pos_embed [1, 1+(img/p)^2, D]``,
    ``register_tokens [1,R,D]``, ``mask_token [1,D]``, ``patch_embed.proj.*``,
    ``blocks.{i}.*``, ``norm.*``. ``forward`` returns the final-normed patch
    tokens ``[B, (H/p)(W/p), D]`` (``x_norm_patchtokens``), the only output VGGT
    uses. The position embedding is bicubically resized (antialiased) to any
    grid, as DINOv2 does.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float = 1.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-6)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        n = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(n))
        if grid_h * grid_w == n and grid_h == grid_w:
            return self.pos_embed.to(dtype)
        cls_pos = self.pos_embed[:, :1]
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", antialias=True
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos.float(), patch_pos], dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        x = self.patch_embed(images)
        # Like DINOv2, concatenating the (float32) class token promotes half patch
        # embeddings (bf16 autocast) to float32, so the class / register tokens and
        # the position embedding are added in float32, not rounded to bf16.
        dtype = torch.promote_types(x.dtype, self.cls_token.dtype)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(dtype), x.to(dtype)], dim=1)
        x = x + self._pos_embed(gh, gw, dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1).to(dtype), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1 + self.num_register_tokens :]
