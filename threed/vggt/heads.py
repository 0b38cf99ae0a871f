"""VGGT prediction heads: camera head (iterative refinement) and DPT head.

Keys and shapes match the official ``vggt.heads`` modules. The track head is
not implemented (the token-merging study only needs cameras, depth and
points); its ``track_head.*`` checkpoint keys are dropped on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, Mlp

__all__ = ["CameraHead", "DPTHead", "activate_pose", "activate_head"]


def _inverse_log(y: Tensor) -> Tensor:
    return torch.sign(y) * torch.expm1(y.abs())


def activate_pose(enc: Tensor) -> Tensor:
    """VGGT's pose activation: translation and quaternion linear, FoV ReLU."""
    return torch.cat([enc[..., :7], F.relu(enc[..., 7:])], dim=-1)


def activate_head(out: Tensor, activation: str, conf_activation: str = "expp1"):
    """``[B, C, H, W]`` -> (values ``[B, H, W, C-1]``, confidence ``[B, H, W]``)."""
    fmap = out.permute(0, 2, 3, 1)
    xyz, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "exp":
        values = torch.exp(xyz)
    elif activation == "inv_log":
        values = _inverse_log(xyz)
    elif activation == "linear":
        values = xyz
    else:
        raise ValueError(f"activation must be 'exp', 'inv_log' or 'linear', got {activation!r}")
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise ValueError(f"conf_activation must be 'expp1' or 'sigmoid', got {conf_activation!r}")
    return values, conf


class CameraHead(nn.Module):
    """Camera tokens of the last aggregator layer -> 9-d pose encoding
    (translation 3, quaternion xyzw 4, FoV h/w 2), refined ``num_iterations``
    times through an adaLN-modulated trunk of ``trunk_depth`` blocks that
    attends across the frames."""

    target_dim = 9

    def __init__(
        self, dim_in: int = 2048, trunk_depth: int = 4, num_heads: int = 16, mlp_ratio: float = 4
    ):
        super().__init__()
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, mlp_ratio, init_values=0.01) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def forward(self, last_tokens: Tensor, num_iterations: int = 4) -> list[Tensor]:
        """last_tokens ``[B, S, P, 2C]`` -> list of ``[B, S, 9]``, one per iteration."""
        tokens = self.token_norm(last_tokens[:, :, 0])
        b, s, _ = tokens.shape
        pred = None
        outs = []
        for _ in range(num_iterations):
            if pred is None:
                inp = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1))
            else:
                inp = self.embed_pose(pred.detach())
            shift, scale, gate = self.poseLN_modulation(inp).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            pred = delta if pred is None else pred + delta
            outs.append(activate_pose(pred))
        return outs


def _uv_grid(width: int, height: int, aspect: float, dtype, device) -> Tensor:
    """``[H, W, 2]`` grid normalised by the image diagonal (VGGT's create_uv_grid)."""
    diag = (aspect**2 + 1.0) ** 0.5
    span_x, span_y = aspect / diag, 1.0 / diag
    xs = torch.linspace(
        -span_x * (width - 1) / width,
        span_x * (width - 1) / width,
        width,
        dtype=dtype,
        device=device,
    )
    ys = torch.linspace(
        -span_y * (height - 1) / height,
        span_y * (height - 1) / height,
        height,
        dtype=dtype,
        device=device,
    )
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack([uu, vv], dim=-1)


def _sincos(embed_dim: int, pos: Tensor, omega_0: float = 100.0) -> Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / omega_0 ** (omega / (embed_dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def _pos_embed_2d(x: Tensor, img_w: int, img_h: int, ratio: float = 0.1) -> Tensor:
    """Add VGGT's sinusoidal UV embedding (scaled by ``ratio``) to ``[B, C, h, w]``."""
    h, w, c = x.shape[-2], x.shape[-1], x.shape[1]
    grid = _uv_grid(w, h, img_w / img_h, x.dtype, x.device).reshape(-1, 2)
    emb = torch.cat([_sincos(c // 2, grid[:, 0]), _sincos(c // 2, grid[:, 1])], dim=-1)
    emb = emb.view(h, w, c).permute(2, 0, 1)[None].to(x.dtype)
    return x + emb * ratio


class _ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # The official unit uses an in-place ReLU on its input, so the skip
        # connection adds relu(x), not x. Reproduced for checkpoint fidelity.
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class _FusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = _ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = _ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size=None) -> Tensor:
        if self.has_residual and skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense head reading 4 intermediate aggregator layers (patch tokens only),
    fused DPT-style at 4 scales, upsampled to the image size.

    ``output_dim=2`` + ``activation="exp"``: depth ``[B,S,H,W,1]`` + conf.
    ``output_dim=4`` + ``activation="inv_log"``: world points ``[B,S,H,W,3]`` + conf.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: tuple[int, ...] = (256, 512, 1024, 1024),
    ):
        super().__init__()
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, 1) for oc in out_channels])
        oc = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        scratch.stem_transpose = nn.Identity()
        scratch.refinenet1 = _FusionBlock(features)
        scratch.refinenet2 = _FusionBlock(features)
        scratch.refinenet3 = _FusionBlock(features)
        scratch.refinenet4 = _FusionBlock(features, has_residual=False)
        scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
        )
        self.scratch = scratch

    def forward(
        self,
        layers: list[Tensor],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> tuple[Tensor, Tensor]:
        """layers: 4 tensors ``[B, S, P, 2C]``. Returns (values, conf)."""
        s = layers[0].shape[1]
        if not frames_chunk_size or frames_chunk_size >= s:
            return self._forward(layers, image_hw, patch_start_idx)
        vals, confs = [], []
        for start in range(0, s, frames_chunk_size):
            chunk = [t[:, start : start + frames_chunk_size] for t in layers]
            v, c = self._forward(chunk, image_hw, patch_start_idx)
            vals.append(v)
            confs.append(c)
        return torch.cat(vals, dim=1), torch.cat(confs, dim=1)

    def _forward(self, layers, image_hw, patch_start_idx):
        h, w = image_hw
        b, s = layers[0].shape[:2]
        ph, pw = h // self.patch_size, w // self.patch_size
        feats = []
        for i, tokens in enumerate(layers):
            x = tokens[:, :, patch_start_idx:].reshape(b * s, -1, tokens.shape[-1])
            x = self.norm(x)
            x = x.permute(0, 2, 1).reshape(b * s, x.shape[-1], ph, pw)
            x = self.projects[i](x)
            x = _pos_embed_2d(x, w, h)
            feats.append(self.resize_layers[i](x))
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i + 1}_rn")(f) for i, f in enumerate(feats))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        out = sc.output_conv1(out)
        out = F.interpolate(
            out,
            size=(ph * self.patch_size, pw * self.patch_size),
            mode="bilinear",
            align_corners=True,
        )
        out = _pos_embed_2d(out, w, h)
        out = sc.output_conv2(out)
        values, conf = activate_head(out, self.activation, self.conf_activation)
        return values.view(b, s, *values.shape[1:]), conf.view(b, s, *conf.shape[1:])
