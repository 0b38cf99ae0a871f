"""TSP3D as a new user meets it: input checks, clear errors, checkpoints, keep targets,
the training bar and quiet logs (issue 9, items 7, 8, 14, 16, 17)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("spconv")
pytest.importorskip("transformers")

from tests.threed.test_tsp3d_model import (  # noqa: E402
    TINY,
    _encoder,
    _model,
    _sample,
    _scene,
)
from threed.checkpoints import CheckpointError  # noqa: E402
from threed.scannet import Instance, Scene  # noqa: E402
from threed.tsp3d import TextEncoder, TSP3DConfig, tiny_roberta  # noqa: E402
from threed.tsp3d import train as train_mod  # noqa: E402
from threed.tsp3d.train import (  # noqa: E402
    MAX_SCENE_OBJECTS,
    TrainConfig,
    sample_from_scene,
    scene_keep_centres,
    train,
)


# ---------------------------------------------------------------- item 7: text encoder path
def test_text_encoder_missing_folder_says_folder_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found: .*roberta-base"):
        TextEncoder(str(tmp_path / "models" / "roberta-base"))
    with pytest.raises(FileNotFoundError, match="folder not found"):
        TextEncoder("surely-not-a-cached-model-name")  # no hub lookup, no download
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder(str(tmp_path))  # a folder, but not a model
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        TextEncoder(str(tmp_path / "file.bin"))
    tiny_roberta(hidden_size=32, num_layers=1, vocab_size=200).save_pretrained(tmp_path / "enc")
    assert TextEncoder(str(tmp_path / "enc")).hidden_size == 32  # a real folder still loads


# ---------------------------------------------------- item 8: run-time thresholds and inputs
@pytest.mark.parametrize(
    "bad", [(1.5, -1), (0.7, float("nan")), (0.7,), (0.7, 0.3, 0.1), ("a", 0.3), (1.0, 0.3)]
)
def test_run_time_thresholds_checked_like_the_config(bad):
    with pytest.raises(ValueError, match="prune_thresholds"):
        TSP3DConfig(**TINY, prune_thresholds=bad)
    m = _model().eval()
    p, c, _ = _scene()
    with pytest.raises(ValueError, match="thresholds must be two numbers in \\[0, 1\\)"):
        m.predict(p, c, "the chair", thresholds=bad)


def test_keep_ratios_checked():
    m = _model().eval()
    p, c, _ = _scene()
    for bad in ((0.0, 0.5), (0.5, 1.5), (0.5,), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="keep_ratios"):
            m.predict(p, c, "the chair", keep_ratios=bad)


def test_predict_accepts_numpy_arrays_as_load_scene_gives():
    m = _model().eval()
    p, c, _ = _scene()
    g = torch.Generator
    want = m.predict(p, c, "the chair", generator=g().manual_seed(0))
    got = m.predict(p.numpy(), c.numpy(), "the chair", generator=g().manual_seed(0))
    assert torch.equal(got.boxes, want.boxes) and got.counts == want.counts
    # uint8 colours (an image-style array) are read as 0..255
    c8 = np.round(c.numpy() * 255).astype(np.uint8)
    again = m.predict(p.numpy(), c8, "the chair", generator=g().manual_seed(0))
    assert again.counts == want.counts


def test_nan_points_say_nan_in_points():
    m = _model().eval()
    p, c, _ = _scene()
    p = p.clone()
    p[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN in points: 1 of"):
        m.predict(p, c, "the chair")
    p[5, 1] = float("inf")
    with pytest.raises(ValueError, match="inf in points"):
        m.predict(p, c, "the chair")
    p, c, _ = _scene()
    c = c.clone()
    c[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN in features"):
        m.predict(p, c, "the chair")


# ------------------------------------------------------------ item 14: 64 cm keep targets
def _instances(labels_boxes):
    out = []
    for i, (label, centre) in enumerate(labels_boxes):
        box = np.array([*centre, 0.2, 0.2, 0.2])
        out.append(Instance(i, label, np.array([2 * i, 2 * i + 1]), box))
    return out


def test_scene_keep_centres_official_includes_structure_and_caps_at_132():
    pts = np.random.default_rng(0).random((400, 3)).astype(np.float32)
    insts = _instances(
        [("wall", (0, 0, 1)), ("floor", (1, 1, 0)), ("chair", (2, 2, 0.4)), ("ceiling", (1, 1, 3))]
    )
    dup = Instance(9, "chair", insts[2].point_idx.copy(), insts[2].box.copy())  # same points
    scene = Scene("scene0000_00", pts, pts, [*insts, dup])
    official = scene_keep_centres(scene)
    assert official.shape == (4, 3)  # walls, floor, chair, ceiling; the duplicate dropped
    np.testing.assert_array_equal(official[:, :2], [[0, 0], [1, 1], [2, 2], [1, 1]])
    earlier = scene_keep_centres(scene, "no_structure")
    assert earlier.shape == (2, 3)  # the chair and its duplicate only
    only = scene_keep_centres(scene, object_labels={"Chair", "floor"})
    np.testing.assert_array_equal(only[:, :2], [[1, 1], [2, 2]])
    many = Scene("scene0000_01", pts, pts, _instances([("box", (i, 0, 0)) for i in range(140)]))
    capped = scene_keep_centres(many)
    assert capped.shape == (MAX_SCENE_OBJECTS, 3) == (132, 3)
    np.testing.assert_array_equal(capped[:, 0], np.arange(132))  # the first 132, in order
    assert scene_keep_centres(many, "no_structure").shape == (140, 3)
    with pytest.raises(ValueError, match="mode"):
        scene_keep_centres(scene, "all")

    class Rec:
        description, object_id, unique = "the chair", 2, True

    s = sample_from_scene(scene, Rec(), max_points=100)
    assert s.scene_centers.shape == (4, 3) and s.points.shape == (100, 3)
    s_old = sample_from_scene(scene, Rec(), max_points=100, scene_objects="no_structure")
    assert s_old.scene_centers.shape == (2, 3)

    # the grounding track's oracle keeps the same 64 cm cubes that training supervises
    from threed.tsp3d.track import _object_centres

    oracle_centres = _object_centres(scene)
    assert oracle_centres.dtype == torch.float32
    np.testing.assert_array_equal(oracle_centres.numpy(), s.scene_centers.numpy())


# ------------------------------------------------- issue 12: one checkpoint loader, item 17
def test_checkpoint_has_no_text_encoder_weights_and_loads_back(tmp_path, monkeypatch):
    m = _model().eval()
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad])
    train_mod.save_checkpoint(tmp_path / "m.pt", m, opt, step=3)
    ck = torch.load(tmp_path / "m.pt", weights_only=True)  # plain tensors and containers
    assert ck["model"] and not any(k.startswith("text_encoder.") for k in ck["model"])
    enc_params = {id(q) for q in m.text_encoder.parameters()}
    assert not any(id(q) in enc_params for q in opt.param_groups[0]["params"])
    monkeypatch.setattr(train_mod, "TextEncoder", lambda *a, **k: _encoder())
    m2, ck2 = train_mod.load_grounder(tmp_path / "m.pt")
    assert ck2["step"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="TSP3D checkpoint not found"):
        train_mod.load_grounder(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk" * 50)
    with pytest.raises(CheckpointError, match="is not a TSP3D checkpoint") as e:
        train_mod.load_grounder(tmp_path / "junk.pt")
    assert "weights_only" not in str(e.value)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing model, config, step"):
        train_mod.load_grounder(tmp_path / "other.pt")
    # a weights-only file cannot be resumed from: say so instead of a TypeError
    train_mod.save_checkpoint(tmp_path / "run" / "last.pt", _model(), step=1)
    with pytest.raises(CheckpointError, match="no optimiser"):
        train(_model(), [_sample()], TrainConfig(steps=2, progress=False), tmp_path / "run")


# -------------------------------------------------------- item 16: the bar and quiet logs
def test_resumed_training_bar_counts_from_the_checkpoint(tmp_path, capsys):
    s = [_sample()]
    cfg = dict(lr=1e-3, clip_norm=10.0, save_every=1)
    train(_model(), s, TrainConfig(steps=1, progress=False, **cfg), tmp_path)
    capsys.readouterr()
    train(_model(), s, TrainConfig(steps=2, progress=True, **cfg), tmp_path)
    err = capsys.readouterr().err
    assert "1/2" in err and "2/2" in err  # resumed at step 1 of 2
    assert "0/1" not in err


def test_spconv_and_fx_notes_silenced_narrowly(caplog):
    import warnings

    from threed.tsp3d.sparse import make_tensor, spconv_modules

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        spconv_modules()
        x = make_tensor(torch.ones(2, 1), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]]), [2, 2, 2], 1)
    assert x.features.shape == (2, 1)
    assert not [w for w in seen if "custom_fwd" in str(w.message)]
    fx = logging.getLogger("torch.fx._symbolic_trace")
    with caplog.at_level(logging.WARNING, logger="torch.fx._symbolic_trace"):
        fx.warning("is_fx_tracing will return true for both fx.symbolic_trace and export")
        fx.warning("another torch.fx warning")
    assert "is_fx_tracing" not in caplog.text  # the known note is dropped ...
    assert "another torch.fx warning" in caplog.text  # ... and nothing else


def test_fallback_warning_goes_above_a_tqdm_bar(capsys):
    """The TGP fallback is logged through logging; inside ``logging_redirect_tqdm`` (as the
    runner and the training loop use it) the line is written by tqdm, above the bar."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    handler = logging.StreamHandler()  # what setup_logging's basicConfig installs
    root.addHandler(handler)
    try:
        m = _model().eval()
        p, c, _ = _scene()
        with tqdm(total=1, desc="bar") as bar, logging_redirect_tqdm():
            m.predict(p, c, "the chair", thresholds=(0.999, 0.999))
            bar.update(1)
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "TGP: no voxel" in err and m.tgp_scene.num_fallbacks >= 1
    line = next(ln for ln in err.splitlines() if "TGP: no voxel" in ln)
    assert "bar" not in line  # on its own line, not glued into the bar


# ------------------------------------------------------------------ the training script
@pytest.mark.slow
def test_train_script_errors_and_resume(tmp_path, capsys):
    """scripts/train_grounding.py: a missing --text-encoder folder is one line and exit 2;
    a rerun resumes and says where (the bar counts on from the checkpoint)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("open3d")
    pytest.importorskip("PIL")
    from threed.scannet import ensure_synthetic

    spec = importlib.util.spec_from_file_location(
        "train_grounding", Path(__file__).parents[2] / "scripts" / "train_grounding.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    syn = ensure_synthetic(
        tmp_path / "syn", num_scenes=1, seed=0, num_frames=1, image_size=(32, 24)
    )
    base = [
        "--scannet-root", str(syn.scannet_root), "--scanrefer", str(syn.scanrefer_path),
        "--points", "1500", "--voxel-size", "0.04", "--save-every", "1",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert script.main([*base, "--steps", "1", "--text-encoder", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "folder not found" in err and "Traceback" not in err
    assert script.main([*base, "--steps", "1"]) == 0
    capsys.readouterr()
    assert script.main([*base, "--steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert "resuming from" in out and "at step 1 of 2" in out
    assert "1/2" in err and "0/1" not in err


def test_module_level_thresholds_checked_too():
    """TextGuidedPruning.prune_coarse and CompletionAddition take a threshold per call:
    checked there as well (before any work)."""
    m = _model().eval()
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="threshold must be in"):
            m.tgp_scene.prune_coarse(None, torch.zeros(3), bad)
        with pytest.raises(ValueError, match="threshold must be in"):
            m.cba(None, None, None, None, None, threshold=bad)
