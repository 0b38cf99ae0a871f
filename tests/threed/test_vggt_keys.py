"""State-dict keys and shapes vs the official facebook/VGGT-1B layout.

``official_shapes`` is written from the official constructors (vggt/models/
vggt.py, aggregator.py, layers/vision_transformer.py ``vit_large``,
layers/block.py, layers/attention.py, heads/camera_head.py, heads/dpt_head.py
at mystorm16/FastVGGT, a near-verbatim copy of facebookresearch/vggt), NOT
from the project's model, so any rename or reshape breaks this test.
"""

from __future__ import annotations

import pytest
import torch

from threed.vggt import VGGT, VGGTConfig
from threed.vggt.model import config_from_state_dict


def _linear(p, i, o, bias=True):
    d = {f"{p}.weight": (o, i)}
    if bias:
        d[f"{p}.bias"] = (o,)
    return d


def _ln(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def _conv(p, i, o, k, bias=True, transpose=False):
    d = {f"{p}.weight": (i, o, k, k) if transpose else (o, i, k, k)}
    if bias:
        d[f"{p}.bias"] = (o,)
    return d


def _block(p, c, mlp_ratio=4, qk_norm=False, heads=16, ls=True):
    """vggt.layers.block.Block (norm1, attn{qkv, q_norm, k_norm, proj}, ls1, norm2, mlp, ls2)."""
    d = {}
    d |= _ln(f"{p}.norm1", c)
    d |= _linear(f"{p}.attn.qkv", c, 3 * c)
    if qk_norm:
        d |= _ln(f"{p}.attn.q_norm", c // heads)
        d |= _ln(f"{p}.attn.k_norm", c // heads)
    d |= _linear(f"{p}.attn.proj", c, c)
    if ls:
        d[f"{p}.ls1.gamma"] = (c,)
    d |= _ln(f"{p}.norm2", c)
    d |= _linear(f"{p}.mlp.fc1", c, int(c * mlp_ratio))
    d |= _linear(f"{p}.mlp.fc2", int(c * mlp_ratio), c)
    if ls:
        d[f"{p}.ls2.gamma"] = (c,)
    return d


def _dpt(p, dim_in, out_dim, features=256, oc=(256, 512, 1024, 1024)):
    d = _ln(f"{p}.norm", dim_in)
    for i, o in enumerate(oc):
        d |= _conv(f"{p}.projects.{i}", dim_in, o, 1)
    d |= _conv(f"{p}.resize_layers.0", oc[0], oc[0], 4, transpose=True)
    d |= _conv(f"{p}.resize_layers.1", oc[1], oc[1], 2, transpose=True)
    d |= _conv(f"{p}.resize_layers.3", oc[3], oc[3], 3)
    for i, o in enumerate(oc, start=1):
        d |= _conv(f"{p}.scratch.layer{i}_rn", o, features, 3, bias=False)
    for r in (1, 2, 3, 4):
        q = f"{p}.scratch.refinenet{r}"
        d |= _conv(f"{q}.out_conv", features, features, 1)
        units = (2,) if r == 4 else (1, 2)
        for u in units:
            d |= _conv(f"{q}.resConfUnit{u}.conv1", features, features, 3)
            d |= _conv(f"{q}.resConfUnit{u}.conv2", features, features, 3)
    d |= _conv(f"{p}.scratch.output_conv1", features, features // 2, 3)
    d |= _conv(f"{p}.scratch.output_conv2.0", features // 2, 32, 3)
    d |= _conv(f"{p}.scratch.output_conv2.2", 32, out_dim, 1)
    return d


def official_shapes(
    embed_dim=1024,
    depth=24,
    heads=16,
    img_size=518,
    patch=14,
    registers=4,
    pe_depth=24,
    cam_depth=4,
    features=256,
    oc=(256, 512, 1024, 1024),
):
    """Key -> shape of VGGT(enable_camera, enable_point, enable_depth) without track_head."""
    c, c2 = embed_dim, 2 * embed_dim
    d = {}
    a = "aggregator"
    d[f"{a}.camera_token"] = (1, 2, 1, c)
    d[f"{a}.register_token"] = (1, 2, registers, c)
    pe = f"{a}.patch_embed"
    d[f"{pe}.cls_token"] = (1, 1, c)
    d[f"{pe}.pos_embed"] = (1, 1 + (img_size // patch) ** 2, c)
    d[f"{pe}.register_tokens"] = (1, registers, c)
    d[f"{pe}.mask_token"] = (1, c)
    d |= _conv(f"{pe}.patch_embed.proj", 3, c, patch)
    for i in range(pe_depth):
        d |= _block(f"{pe}.blocks.{i}", c)
    d |= _ln(f"{pe}.norm", c)
    for kind in ("frame_blocks", "global_blocks"):
        for i in range(depth):
            d |= _block(f"{a}.{kind}.{i}", c, qk_norm=True, heads=heads)
    h = "camera_head"
    for i in range(cam_depth):
        d |= _block(f"{h}.trunk.{i}", c2)
    d |= _ln(f"{h}.token_norm", c2)
    d |= _ln(f"{h}.trunk_norm", c2)
    d[f"{h}.empty_pose_tokens"] = (1, 1, 9)
    d |= _linear(f"{h}.embed_pose", 9, c2)
    d |= _linear(f"{h}.poseLN_modulation.1", c2, 3 * c2)
    d |= _linear(f"{h}.pose_branch.fc1", c2, c2 // 2)
    d |= _linear(f"{h}.pose_branch.fc2", c2 // 2, 9)
    d |= _dpt("point_head", c2, 4, features, oc)
    d |= _dpt("depth_head", c2, 2, features, oc)
    return d


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_keys_match_official():
    with torch.device("meta"):
        model = VGGT(VGGTConfig())
    got, want = _shapes(model), official_shapes()
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert got == want
    # spot checks written out by hand from the VGGT-1B checkpoint layout
    assert got["aggregator.patch_embed.pos_embed"] == (1, 1370, 1024)
    assert got["aggregator.frame_blocks.23.attn.q_norm.weight"] == (64,)
    assert got["camera_head.poseLN_modulation.1.weight"] == (6144, 2048)
    assert got["depth_head.scratch.output_conv2.2.weight"] == (2, 32, 1, 1)
    n_params = sum(v.numel() for v in model.state_dict().values())
    assert 0.9e9 < n_params < 1.3e9  # VGGT-1B minus the track head
    assert config_from_state_dict(model.state_dict()) == VGGTConfig()


def test_small_config_keys_match_official_formula():
    cfg = VGGTConfig.small()
    got = _shapes(VGGT(cfg))
    want = official_shapes(
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        heads=cfg.num_heads,
        img_size=cfg.img_size,
        patch=cfg.patch_size,
        pe_depth=cfg.patch_embed_depth,
        cam_depth=cfg.camera_trunk_depth,
        features=cfg.dpt_features,
        oc=cfg.dpt_out_channels,
    )
    assert got == want


def test_from_checkpoint_strict_and_drops_track_head(tmp_path):
    cfg = VGGTConfig.small()
    torch.manual_seed(0)
    src = VGGT(cfg).eval()
    state = dict(src.state_dict())
    state["track_head.fnet.norm.weight"] = torch.ones(3)  # an official extra head
    path = tmp_path / "model.pt"
    torch.save(state, path)
    loaded = VGGT.from_checkpoint(path, cfg)
    x = torch.rand(2, 3, 56, 42)
    with torch.no_grad():
        a, b = src(x), loaded(x)
    assert torch.equal(a["depth"], b["depth"])
    assert torch.equal(a["pose_enc"], b["pose_enc"])
    # sizes read from the shapes; the camera trunk's head count is not in them and is
    # the official constructor's 16 (small() builds its camera head with 4)
    inferred = VGGT.from_checkpoint(path)
    assert inferred.config == VGGTConfig.small(camera_heads=16)
    with torch.no_grad():
        assert torch.equal(inferred(x)["depth"], a["depth"])
    # a checkpoint written by save_checkpoint carries its config: the same model exactly
    src.save_checkpoint(tmp_path / "own.pt")
    own = VGGT.from_checkpoint(tmp_path / "own.pt")
    assert own.config == cfg
    with torch.no_grad():
        assert torch.equal(own(x)["pose_enc"], a["pose_enc"])
    bad = dict(state)
    bad["aggregator.unexpected"] = torch.zeros(1)
    torch.save(bad, path)
    with pytest.raises(ValueError, match="unexpected aggregator.unexpected"):
        VGGT.from_checkpoint(path, cfg)


def test_camera_heads_read_from_shapes_when_visible():
    """Official VGGT: the camera head has 16 heads whatever the aggregator has (8 here);
    a camera trunk with qk-norm shows its head count, which is then read."""
    state = {k: torch.empty(v) for k, v in official_shapes(embed_dim=128, heads=8).items()}
    cfg = config_from_state_dict(state)
    assert cfg.num_heads == 8 and cfg.camera_heads == 16
    state["camera_head.trunk.0.attn.q_norm.weight"] = torch.empty(64)  # 256 / 64 = 4 heads
    assert config_from_state_dict(state).camera_heads == 4


def test_from_checkpoint_errors_name_the_problem(tmp_path):
    from threed.checkpoints import CheckpointError

    with pytest.raises(FileNotFoundError, match="not found"):
        VGGT.from_checkpoint(tmp_path / "nope.pt")
    # a checkpoint of another model: the missing VGGT keys are named
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a VGGT checkpoint: missing aggregator") as e:
        VGGT.from_checkpoint(tmp_path / "other.pt")
    assert "it holds encoder" in str(e.value)
    # a partial VGGT: the first missing key is named, not a bare KeyError
    state = VGGT(VGGTConfig.small()).state_dict()
    del state["aggregator.register_token"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing aggregator.register_token"):
        VGGT.from_checkpoint(tmp_path / "partial.pt")
    # garbage, empty and truncated files: "not a ... checkpoint", and never the advice to
    # unpickle with weights_only=False
    (tmp_path / "garbage.pt").write_bytes(b"hello world, not a checkpoint" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(state, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    import pickle
    from argparse import Namespace

    with open(tmp_path / "objects.pt", "wb") as f:  # a pickle of arbitrary objects
        pickle.dump({"args": Namespace(a=1)}, f)
    for name in ("garbage.pt", "empty.pt", "cut.pt", "objects.pt"):
        with pytest.raises(CheckpointError, match="is not a VGGT checkpoint") as e:
            VGGT.from_checkpoint(tmp_path / name)
        assert "weights_only" not in str(e.value), name
        assert e.value.__cause__ is None and e.value.__suppress_context__, name
    with pytest.raises(CheckpointError, match="folder"):
        VGGT.from_checkpoint(tmp_path)


def test_from_checkpoint_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    from threed.checkpoints import CheckpointError

    torch.manual_seed(0)
    src = VGGT(VGGTConfig.small()).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors")
    loaded = VGGT.from_checkpoint(tmp_path / "m.safetensors", VGGTConfig.small())
    x = torch.rand(2, 3, 56, 42)
    with torch.no_grad():
        assert torch.equal(loaded(x)["pose_enc"], src(x)["pose_enc"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match="is not a VGGT checkpoint"):
        VGGT.from_checkpoint(tmp_path / "bad.safetensors")
