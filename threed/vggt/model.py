"""VGGT (Wang et al., CVPR 2025) re-implemented: aggregator + camera/depth/point heads.

State-dict keys and shapes equal the official facebook/VGGT-1B checkpoint for
every included module (``aggregator.*``, ``camera_head.*``, ``depth_head.*``,
``point_head.*``). The track head is left out: ``from_checkpoint`` drops
``track_head.*``. Sizes are configurable (:class:`VGGTConfig`) so tests run
a tiny model on CPU.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError, missing_keys_message, read_checkpoint
from .heads import CameraHead, DPTHead
from .layers import Block, DinoViT, RotaryPositionEmbedding2D, patch_positions

log = logging.getLogger(__name__)

__all__ = [
    "VGGTConfig",
    "Aggregator",
    "VGGT",
    "OFFICIAL_LAYERS",
    "scaled_layers",
    "config_from_state_dict",
]

OFFICIAL_LAYERS = (4, 11, 17, 23)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def scaled_layers(depth: int) -> tuple[int, ...]:
    """The DPT layers [4, 11, 17, 23] of depth 24 scaled to ``depth``."""
    if depth == 24:
        return OFFICIAL_LAYERS
    return tuple(min(depth - 1, round(i * (depth - 1) / 23)) for i in OFFICIAL_LAYERS)


@dataclass
class VGGTConfig:
    """Sizes of a VGGT. Defaults are VGGT-1B (embed 1024, 24+24 blocks, 16 heads,
    DINOv2 ViT-L/14 with 4 registers, 518 px)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_embed_depth: int = 24
    patch_embed_heads: int = 16
    rope_freq: float = 100.0
    intermediate_layers: tuple[int, ...] | None = None
    camera_trunk_depth: int = 4
    camera_heads: int = 16
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True

    def __post_init__(self) -> None:
        for name in (
            "img_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "patch_embed_depth",
            "patch_embed_heads",
            "camera_trunk_depth",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) / num_heads ({self.num_heads}) must be a "
                "multiple of 4 (2D RoPE)"
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size must be a multiple of patch_size ({self.patch_size})")
        if self.intermediate_layers is None:
            self.intermediate_layers = scaled_layers(self.depth)
        self.intermediate_layers = tuple(int(i) for i in self.intermediate_layers)
        if len(self.intermediate_layers) != 4 or not all(
            0 <= i < self.depth for i in self.intermediate_layers
        ):
            raise ValueError(
                f"intermediate_layers must be 4 indices in [0, {self.depth}), "
                f"got {self.intermediate_layers}"
            )
        if len(self.dpt_out_channels) != 4:
            raise ValueError("dpt_out_channels must have 4 entries")

    @classmethod
    def small(cls, preset: str = "test", **overrides) -> VGGTConfig:
        """A CPU-sized random model, the one small configuration of the suite.

        ``preset="test"``: embed 64, 2+2 blocks, 56 px, tiny heads (unit tests);
        ``"eval"``: embed 128, 4+4 blocks, 224 px (the eval track's no-weights
        mode and the VGGT benchmark). ``overrides`` replace single fields.
        """
        if preset not in _SMALL_PRESETS:
            raise ValueError(f"preset must be one of {tuple(_SMALL_PRESETS)}, got {preset!r}")
        kw = {**_SMALL, **_SMALL_PRESETS[preset], **overrides}
        return cls(**kw)


_SMALL = dict(
    img_size=56,
    embed_dim=64,
    depth=2,
    num_heads=4,
    patch_embed_depth=1,
    patch_embed_heads=4,
    camera_trunk_depth=1,
    camera_heads=4,
    dpt_features=16,
    dpt_out_channels=(8, 16, 32, 32),
)
# what each preset changes in _SMALL
_SMALL_PRESETS = {
    "test": {},
    "eval": dict(
        img_size=224,
        embed_dim=128,
        depth=4,
        patch_embed_depth=2,
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
    ),
}


def _count(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# keys whose shapes give the aggregator's sizes; a state dict without them is not a VGGT
_REQUIRED_KEYS = (
    "aggregator.camera_token",
    "aggregator.register_token",
    "aggregator.frame_blocks.0.attn.q_norm.weight",
    "aggregator.patch_embed.pos_embed",
    "aggregator.patch_embed.patch_embed.proj.weight",
)
# official ``CameraHead(dim_in=2 * embed_dim)``: its trunk has 16 heads whatever the
# aggregator's, and no qk-norm, so the count is not visible in the shapes
OFFICIAL_CAMERA_HEADS = 16


def config_from_state_dict(state: dict, path: str | Path = "state dict") -> VGGTConfig:
    """Infer a :class:`VGGTConfig` from checkpoint shapes.

    The aggregator's head count comes from its qk-norm size. The camera trunk's and
    DINOv2's attention carry no qk-norm, so their head counts are not in the shapes:
    the camera head's is read from ``camera_head.trunk.0.attn.q_norm`` when present,
    else it is the official constructor's 16 (``CameraHead``'s default, independent of
    the aggregator; 2C / 16 must divide); DINOv2's is taken equal to the aggregator's
    (ViT-L/14: 16, as VGGT-1B). Checkpoints written by :meth:`VGGT.save_checkpoint`
    carry their config and need no inference. Raises :class:`CheckpointError` naming
    the keys that are missing.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(missing_keys_message(path, "VGGT", missing, list(state)))
    cam = state["aggregator.camera_token"]
    c = int(cam.shape[-1])
    heads = c // int(state["aggregator.frame_blocks.0.attn.q_norm.weight"].shape[0])
    pos = state["aggregator.patch_embed.pos_embed"]
    patch = int(state["aggregator.patch_embed.patch_embed.proj.weight"].shape[-1])
    side = int(round((pos.shape[1] - 1) ** 0.5))
    dpt = "depth_head" if "depth_head.norm.weight" in state else "point_head"
    kw = {}
    if f"{dpt}.norm.weight" in state:
        need = [f"{dpt}.projects.{i}.weight" for i in range(4)]
        need.append(f"{dpt}.scratch.layer1_rn.weight")
        lost = [k for k in need if k not in state]
        if lost:
            raise CheckpointError(missing_keys_message(path, "VGGT", lost, list(state)))
        kw["dpt_out_channels"] = tuple(
            int(state[f"{dpt}.projects.{i}.weight"].shape[0]) for i in range(4)
        )
        kw["dpt_features"] = int(state[f"{dpt}.scratch.layer1_rn.weight"].shape[0])
    cam_depth = _count(state, "camera_head.trunk.")
    if cam_depth:
        kw["camera_trunk_depth"] = cam_depth
        qn = state.get("camera_head.trunk.0.attn.q_norm.weight")
        if qn is not None:
            kw["camera_heads"] = 2 * c // int(qn.shape[0])
        elif (2 * c) % OFFICIAL_CAMERA_HEADS == 0:
            kw["camera_heads"] = OFFICIAL_CAMERA_HEADS
        else:  # cannot come from the official constructor; the aggregator's count divides
            log.warning(
                "%s: camera head width %d is not a multiple of 16; assuming %d heads",
                path,
                2 * c,
                heads,
            )
            kw["camera_heads"] = heads
    return VGGTConfig(
        img_size=side * patch,
        patch_size=patch,
        embed_dim=c,
        depth=_count(state, "aggregator.frame_blocks."),
        num_heads=heads,
        num_register_tokens=int(state["aggregator.register_token"].shape[2]),
        patch_embed_depth=_count(state, "aggregator.patch_embed.blocks."),
        patch_embed_heads=heads,
        enable_point="point_head.norm.weight" in state,
        enable_depth="depth_head.norm.weight" in state,
        enable_camera=cam_depth > 0,
        **kw,
    )


def _frame_specific(tokens: Tensor, b: int, s: int) -> Tensor:
    """``[1, 2, X, C]`` -> ``[B*S, X, C]``: entry 0 for frame 0, entry 1 for the others."""
    first = tokens[:, :1].expand(b, 1, *tokens.shape[2:])
    rest = tokens[:, 1:].expand(b, s - 1, *tokens.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(b * s, *tokens.shape[2:])


class Aggregator(nn.Module):
    """Alternating frame / global attention over ``[B, S]`` frames.

    Per frame: 1 camera + R register tokens (frame 0 has its own pair), then the
    DINOv2 patch tokens. Frame blocks attend within ``[B*S, P, C]``, global
    blocks across ``[B, S*P, C]``; both use qk LayerNorm, LayerScale 0.01 and
    2D RoPE (specials at (0, 0), patches at (y+1, x+1)).
    """

    def __init__(self, cfg: VGGTConfig):
        super().__init__()
        c = cfg.embed_dim
        self.patch_embed = DinoViT(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=c,
            depth=cfg.patch_embed_depth,
            num_heads=cfg.patch_embed_heads,
            mlp_ratio=cfg.mlp_ratio,
            num_register_tokens=cfg.num_register_tokens,
            init_values=1.0,
        )
        self.patch_embed.mask_token.requires_grad_(False)
        self.rope = RotaryPositionEmbedding2D(cfg.rope_freq) if cfg.rope_freq > 0 else None

        def blocks():
            return nn.ModuleList(
                [
                    Block(c, cfg.num_heads, cfg.mlp_ratio, 0.01, qk_norm=True, rope=self.rope)
                    for _ in range(cfg.depth)
                ]
            )

        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        self.depth = cfg.depth
        self.patch_size = cfg.patch_size
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, c) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, c) * 1e-6)
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.register_buffer("_resnet_mean", torch.tensor(_MEAN).view(1, 1, 3, 1, 1), False)
        self.register_buffer("_resnet_std", torch.tensor(_STD).view(1, 1, 3, 1, 1), False)

    def forward(
        self, images: Tensor, keep_layers: tuple[int, ...] | None = None
    ) -> tuple[dict[int, Tensor], int]:
        """images ``[B, S, 3, H, W]`` in [0, 1], H and W multiples of the patch size.

        Returns ``({layer: [B, S, P, 2C]}, patch_start_idx)``, where each layer's
        output is the concatenation of its frame- and global-block outputs. Only
        ``keep_layers`` (default: all) are kept, to save memory.
        """
        b, s, ch, h, w = images.shape
        if ch != 3:
            raise ValueError(f"images must have 3 channels, got shape {tuple(images.shape)}")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image height and width must be multiples of {p}, got {h}x{w}")
        keep = set(range(self.depth)) if keep_layers is None else set(keep_layers)
        x = (images - self._resnet_mean) / self._resnet_std
        patches = self.patch_embed(x.reshape(b * s, ch, h, w))
        tokens = torch.cat(
            [
                _frame_specific(self.camera_token, b, s).to(patches.dtype),
                _frame_specific(self.register_token, b, s).to(patches.dtype),
                patches,
            ],
            dim=1,
        )
        n_tok, c = tokens.shape[1], tokens.shape[2]
        pos = None
        if self.rope is not None:
            pos = patch_positions(b * s, h // p, w // p, self.patch_start_idx, images.device)
        pos_global = None if pos is None else pos.reshape(b, s * n_tok, 2)
        outputs: dict[int, Tensor] = {}
        for i in range(self.depth):
            tokens = self.frame_blocks[i](tokens.reshape(b * s, n_tok, c), pos=pos)
            frame_out = tokens.reshape(b, s, n_tok, c) if i in keep else None
            tokens = self.global_blocks[i](tokens.reshape(b, s * n_tok, c), pos=pos_global)
            if i in keep:
                outputs[i] = torch.cat([frame_out, tokens.reshape(b, s, n_tok, c)], dim=-1)
        return outputs, self.patch_start_idx


class VGGT(nn.Module):
    """VGGT without the track head.

    ``forward(images [S,3,H,W] or [B,S,3,H,W] in [0,1])`` returns a dict with
    ``pose_enc [B,S,9]``, ``pose_enc_list``, ``depth [B,S,H,W,1]``,
    ``depth_conf [B,S,H,W]``, ``world_points [B,S,H,W,3]``,
    ``world_points_conf [B,S,H,W]`` (for enabled heads). On CUDA the aggregator
    runs under bf16 autocast (fp16 on GPUs before compute capability 8, as the
    official demo picks) and the heads in float32; on CPU all is float32.
    """

    def __init__(self, cfg: VGGTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VGGTConfig(**overrides)
        self.config = cfg
        self.aggregator = Aggregator(cfg)
        d2 = 2 * cfg.embed_dim
        self.camera_head = (
            CameraHead(d2, cfg.camera_trunk_depth, cfg.camera_heads, cfg.mlp_ratio)
            if cfg.enable_camera
            else None
        )

        def dpt(out_dim, act):
            return DPTHead(
                d2, cfg.patch_size, out_dim, act, "expp1", cfg.dpt_features, cfg.dpt_out_channels
            )

        self.point_head = dpt(4, "inv_log") if cfg.enable_point else None
        self.depth_head = dpt(2, "exp") if cfg.enable_depth else None

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Aggregator layers the heads read (DPT layers and the last one)."""
        return tuple(sorted(set(self.config.intermediate_layers) | {self.config.depth - 1}))

    def forward(self, images: Tensor, num_camera_iterations: int = 4) -> dict[str, Tensor]:
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5:
            raise ValueError(f"images must be [S,3,H,W] or [B,S,3,H,W], got {tuple(images.shape)}")
        on_cuda = images.device.type == "cuda"
        if on_cuda:
            major = torch.cuda.get_device_capability(images.device)[0]
            amp = torch.autocast("cuda", dtype=torch.bfloat16 if major >= 8 else torch.float16)
        else:
            amp = nullcontext()
        with amp:
            layers, psi = self.aggregator(images, keep_layers=self.kept_layers)
        layers = {k: v.float() for k, v in layers.items()}
        hw = tuple(images.shape[-2:])
        out: dict[str, Tensor] = {}
        off = torch.autocast("cuda", enabled=False) if on_cuda else nullcontext()
        with off:
            if self.camera_head is not None:
                poses = self.camera_head(layers[self.config.depth - 1], num_camera_iterations)
                out["pose_enc"] = poses[-1]
                out["pose_enc_list"] = poses
            dpt_in = [layers[i] for i in self.config.intermediate_layers]
            if self.depth_head is not None:
                out["depth"], out["depth_conf"] = self.depth_head(dpt_in, hw, psi)
            if self.point_head is not None:
                out["world_points"], out["world_points_conf"] = self.point_head(dpt_in, hw, psi)
        return out

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, cfg: VGGTConfig | None = None, map_location="cpu"
    ) -> VGGT:
        """Load the official ``model.pt`` (facebook/VGGT-1B) with ``strict=True``
        after dropping ``track_head.*``, or a file from :meth:`save_checkpoint`.

        ``cfg`` defaults to the config stored in the file, else to the sizes read from
        the checkpoint's shapes (:func:`config_from_state_dict`; VGGT-1B for model.pt).
        The file is read with ``weights_only=True`` (``*.safetensors`` with
        safetensors). A missing file raises
        ``FileNotFoundError``; a file that is not a checkpoint, or a checkpoint of
        another model, raises :class:`~threed.checkpoints.CheckpointError` (a
        ``ValueError``) that names what is missing.
        """
        raw = read_checkpoint(path, map_location, "VGGT checkpoint")
        stored_cfg = None
        state = raw
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            state = raw["model"]
            if isinstance(raw.get("config"), dict):
                stored_cfg = raw["config"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(
                f"{path} is not a VGGT checkpoint: expected a state dict of named tensors, "
                f"got {type(state).__name__}"
            )
        dropped = [k for k in state if k.startswith("track_head.")]
        state = {k: v for k, v in state.items() if not k.startswith("track_head.")}
        if cfg is None and stored_cfg is not None:
            cfg = VGGTConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in stored_cfg.items()}
            )
        if cfg is None:
            cfg = config_from_state_dict(state, path)
        with torch.device("meta"):
            model = cls(cfg)
        want = set(model.state_dict())
        missing = sorted(want - set(state))
        unexpected = sorted(set(state) - want)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(
                    f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
                )
            if unexpected:
                parts.append(
                    f"unexpected {', '.join(unexpected[:5])}"
                    + (" ..." if len(unexpected) > 5 else "")
                )
            raise CheckpointError(
                f"{path} does not match VGGT({cfg}): {len(missing)} missing and "
                f"{len(unexpected)} unexpected keys: {'; '.join(parts)}"
            )
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:  # same keys, other shapes
            msg = str(e).strip().splitlines()
            raise CheckpointError(
                f"{path} does not match the VGGT sizes: {msg[-1].strip() if msg else e}"
            ) from None
        # non-persistent buffers were created on meta: rebuild them
        agg = model.aggregator
        dev = agg.camera_token.device
        agg._resnet_mean = torch.tensor(_MEAN, device=dev).view(1, 1, 3, 1, 1)
        agg._resnet_std = torch.tensor(_STD, device=dev).view(1, 1, 3, 1, 1)
        log.info(
            "loaded %s (%d tensors, dropped %d track_head keys)", path, len(state), len(dropped)
        )
        return model.eval()

    def save_checkpoint(self, path: str | Path) -> None:
        """Write ``{"model": state_dict, "config": sizes}`` (readable with
        ``weights_only=True``); :meth:`from_checkpoint` rebuilds the same model from it
        without guessing the head counts that the shapes do not show."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.state_dict(), "config": self.config_dict()}, path)

    def config_dict(self) -> dict:
        return asdict(self.config)
