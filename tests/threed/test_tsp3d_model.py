"""The TSP3D grounding network, losses, evaluator, training loop and track (tiny configs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

pytest.importorskip("spconv")
pytest.importorskip("transformers")

from threed.tsp3d import (  # noqa: E402
    TextEncoder,
    TSP3DConfig,
    TSP3DGrounder,
    WordHashTokenizer,
    axis_aligned_diou_loss,
    axis_aligned_iou,
    grounding_loss,
    tiny_roberta,
)
from threed.tsp3d.model import make_scene_batch  # noqa: E402
from threed.tsp3d.track import grounding_accuracy, parse_thresholds  # noqa: E402
from threed.tsp3d.train import GroundingSample, TrainConfig, train  # noqa: E402

TINY = dict(
    voxel_size=0.04,
    backbone_blocks=(1, 1, 1, 1),
    backbone_channels=(16, 32, 32, 32),
    stem_channels=16,
    d_model=32,
    n_heads=4,
    dim_feedforward=32,
    num_layers=1,
    train_topk=(400, (100, 400)),
    train_max_voxels=(64, 256),
    cba_candidates=200,
)


def _encoder():
    return TextEncoder(
        model=tiny_roberta(hidden_size=32, num_layers=1, vocab_size=200),
        tokenizer=WordHashTokenizer(200),
    )


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TSP3DGrounder(TSP3DConfig(**{**TINY, **kw}), _encoder())


def _scene(seed=0, n=3000):
    """A 4 x 3 m floor with three boxes; returns points, colors, boxes [3, 6]."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor(
        [
            [0.8, 0.8, 0.4, 0.6, 0.6, 0.8],
            [3.0, 2.0, 0.5, 0.8, 0.5, 1.0],
            [2.0, 0.6, 0.3, 0.4, 0.4, 0.6],
        ]
    )
    pts = [torch.rand(n, 3, generator=g) * torch.tensor([4.0, 3.0, 0.02])]
    for b in boxes:
        pts.append((torch.rand(n // 3, 3, generator=g) - 0.5) * b[3:] + b[:3])
    p = torch.cat(pts)
    return p, torch.rand(p.shape[0], 3, generator=g), boxes


def test_text_encoder_offline_and_frozen():
    enc = _encoder()
    h, pad = enc(["the red chair", "a table near the window"])
    assert h.shape[:2] == pad.shape and h.shape[2] == 32
    assert pad[0].sum() == 2 and not pad[1].any()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    tok = WordHashTokenizer(200)
    assert tok.encode("Chair!") == tok.encode("chair") and tok.encode("a")[0] == 0
    with pytest.raises(ValueError):
        enc([])


def test_text_encoder_by_path(tmp_path):
    model = tiny_roberta(hidden_size=32, num_layers=1, vocab_size=200)
    model.save_pretrained(tmp_path)  # no tokenizer files: falls back to the word hash
    a = TextEncoder(str(tmp_path))
    b = TextEncoder(model=model, tokenizer=WordHashTokenizer(200))
    assert isinstance(a.tokenizer, WordHashTokenizer) and a.hidden_size == 32
    assert torch.allclose(a(["a red chair"])[0], b(["a red chair"])[0], atol=1e-5)


def test_forward_shapes_counts_and_determinism():
    p, c, _ = _scene()
    m = _model().eval()
    b = m.scene_batch(p, c)
    o1 = m(b, ["the chair"], generator=torch.Generator().manual_seed(0))
    o2 = m(b, ["the chair"], generator=torch.Generator().manual_seed(0))
    assert o1.boxes.shape == (1, 6) and torch.equal(o1.boxes, o2.boxes)
    assert torch.equal(o1.cls_logits, o2.cls_logits)
    cnt = o1.counts
    assert cnt["kept_64"] <= cnt["backbone_64"] and cnt["kept_32"] <= cnt["decoder_32"]
    assert cnt["decoder_16"] == cnt["pruned_16"] + cnt["added_16"]
    assert (o1.boxes[0, 3:] > 0).all()


def test_keep_everything_equals_unpruned_network():
    p, c, _ = _scene()
    m = _model(unpruned_upsample="generative").eval()
    b = m.scene_batch(p, c)
    full = m(b, ["the chair"], prune=False)
    keep_all = m(b, ["the chair"], prune=True, thresholds=(0.0, 0.0), cba=False)
    assert full.counts == keep_all.counts
    assert torch.allclose(full.cls_logits, keep_all.cls_logits, atol=1e-5)
    assert torch.allclose(full.boxes, keep_all.boxes, atol=1e-5)


def test_pruning_reduces_decoder_voxels_vs_scene_baseline():
    p, c, _ = _scene()
    m = _model().eval()
    b = m.scene_batch(p, c)
    full = m(b, ["the chair"], prune=False)  # "scene": decoder = the scene's voxels
    assert full.counts["decoder_16"] == full.counts["backbone_16"]
    half = m(b, ["the chair"], keep_ratios=(0.2, 0.2), cba=False)
    assert half.counts["kept_64"] == -(-full.counts["backbone_64"] * 2 // 10)
    m.config.unpruned_upsample = "generative"  # all 27 children: what TGP prunes from
    gen = m(b, ["the chair"], prune=False)
    assert gen.counts["decoder_16"] > full.counts["decoder_16"]
    assert half.counts["decoder_16"] < gen.counts["decoder_16"]


def test_batch_of_two_scenes_matches_single_runs():
    p, c, _ = _scene(0)
    q, d, _ = _scene(1)
    m = _model().eval()
    both = m(make_scene_batch([p, q], [c, d], m.config.voxel_size), ["chair", "table"], prune=False)
    one = m(make_scene_batch([q], [d], m.config.voxel_size), ["table"], prune=False)
    assert torch.allclose(both.boxes[1], one.boxes[0], atol=1e-4)


def test_bad_inputs_raise():
    m = _model().eval()
    with pytest.raises(ValueError):
        m.scene_batch(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="single voxel"):
        m.scene_batch(torch.zeros(4, 3))
    p, c, _ = _scene()
    with pytest.raises(ValueError, match="one text per scene"):
        m(m.scene_batch(p, c), ["a", "b"])
    with pytest.raises(ValueError):
        TSP3DConfig(prune_thresholds=(1.2, 0.3))
    with pytest.raises(ValueError):
        TSP3DConfig(d_model=64)


def test_iou_diou_and_accuracy_thresholds_strict():
    a = torch.tensor([[0.0, 0, 0, 2, 2, 2]])
    assert axis_aligned_iou(a, a).item() == pytest.approx(1.0)
    b = torch.tensor([[1.0, 0, 0, 2, 2, 2]])  # overlap 1x2x2 = 4, union 12
    assert axis_aligned_iou(a, b).item() == pytest.approx(1 / 3)
    assert axis_aligned_diou_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert axis_aligned_diou_loss(a, b).item() == pytest.approx(
        1 - 1 / 3 + 1 / 17
    )  # enclosing diag^2 = 17
    # IoU exactly 0.5 does not count for Acc@0.5 (strictly greater)
    c = torch.tensor([[0.5, 0, 0, 1, 2, 2]])  # inside a, half its volume: IoU exactly 0.5
    assert axis_aligned_iou(a, c).item() == 0.5
    acc = grounding_accuracy(torch.cat([a, c, b]), torch.cat([a, a, a]), [True, False, False])
    assert acc["acc@0.25"] == pytest.approx(1.0) and acc["acc@0.5"] == pytest.approx(1 / 3)
    assert acc["acc@0.5_unique"] == 1.0 and acc["acc@0.5_multiple"] == 0.0
    assert parse_thresholds("0.5,0.2") == (0.5, 0.2)
    with pytest.raises(ValueError):
        parse_thresholds("0.5")


def _sample(seed=0):
    p, c, boxes = _scene(seed)
    return GroundingSample(
        "s0", "the chair in the corner", p, c, boxes[0], boxes[:, :3], boxes[:1, :3]
    )


def test_losses_finite_and_train_loss_goes_down(tmp_path):
    m = _model(dropout=0.0)
    s = _sample()
    m.train()
    out = m(m.scene_batch(s.points, s.colors), [s.text], generator=torch.Generator())
    losses = grounding_loss(
        out, s.target_box[None], [s.scene_centers], [s.target_centers], m.config
    )
    assert all(torch.isfinite(v) for v in losses.values())
    assert out.cba is not None and losses["com_loss"] > 0
    cfg = TrainConfig(steps=14, lr=3e-3, clip_norm=10.0, save_every=7, progress=False)
    hist = train(m, [s], cfg, out_dir=tmp_path)
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < first
    assert (tmp_path / "last.pt").exists()
    # resume: the checkpoint is at the last step, so nothing is left to do
    assert train(m, [s], cfg, out_dir=tmp_path) == []
    more = train(
        m, [s], TrainConfig(steps=16, lr=3e-3, clip_norm=10.0, progress=False), out_dir=tmp_path
    )
    assert [h["step"] for h in more] == [15, 16]


def test_checkpoint_round_trip(tmp_path, monkeypatch):
    from threed.tsp3d import train as train_mod

    m = _model().eval()
    train_mod.save_checkpoint(tmp_path / "m.pt", m, step=3)
    monkeypatch.setattr(train_mod, "TextEncoder", lambda *a, **k: _encoder())
    m2, ck = train_mod.load_grounder(tmp_path / "m.pt")
    m2.eval()
    p, c, _ = _scene()
    b = m.scene_batch(p, c)
    g = torch.Generator
    assert torch.allclose(
        m(b, ["x"], generator=g().manual_seed(0)).boxes,
        m2(b, ["x"], generator=g().manual_seed(0)).boxes,
    )
    assert ck["step"] == 3


def test_grounding_track_rows_on_handmade_scene(tmp_path, monkeypatch):
    np = pytest.importorskip("numpy")
    from threed.tsp3d import track as track_mod

    p, c, boxes = _scene()

    from threed.scannet import Instance
    from threed.scannet import Scene as RealScene

    def Scene():  # noqa: N802
        inst = [
            Instance(i, f"obj{i}", np.zeros(0, dtype=np.int64), b.double().numpy())
            for i, b in enumerate(boxes)
        ]
        return RealScene("scene0000_00", p.numpy(), c.numpy(), inst)

    class Rec:
        def __init__(self, oid, text, unique):
            self.scene_id, self.object_id, self.description, self.unique = (
                "scene0000_00",
                oid,
                text,
                unique,
            )

    monkeypatch.setattr(track_mod, "TextEncoder", lambda *a, **k: _encoder())
    monkeypatch.setattr(track_mod, "TSP3DConfig", lambda **k: TSP3DConfig(**{**TINY, **k}))
    from common.runs import TrackContext

    opts = track_mod.GroundingOptions(voxel_size=0.04, max_queries=2)
    tr = track_mod.GroundingTrack(opts, TrackContext(seed=0, ratios=(1.0, 0.5)))
    tr._records = {"scene0000_00": [Rec(0, "the chair", True), Rec(1, "the table", False)]}
    labels = [s.label for s in tr.settings()]
    assert labels == ["full", "tsp3d", "tsp3d-nocba", "tsp3d-oracle", "tsp3d@0.5"]
    steps = []
    rows = list(tr.run_unit(Scene(), tr.settings(), steps.append))
    assert [r["setting"] for r in rows] == labels
    assert "tsp3d@0.5: expression 2/2" in steps  # progress inside the scene
    assert rows[0]["method"] == "full"
    full, oracle = rows[0], rows[3]
    assert full["agreement_iou"] == pytest.approx(1.0) and full["kept_ratio"] == 1.0
    assert all(r["accuracy_valid"] is False for r in rows)
    assert all(r["fps"] > 0 for r in rows)
    if Path("/proc/self/clear_refs").exists():  # per-setting peak memory (Linux)
        assert all(r["peak_mem_mb"] >= 0 for r in rows)
    assert all(np.isfinite(r["acc@0.25"]) for r in rows if r is not oracle)
    assert oracle["acc@0.25"] is None and oracle["method"] == "tsp3d-oracle"  # reads the GT
    assert rows[4]["voxels_kept_64"] < full["voxels_kept_64"]
    rows2 = list(tr.run_unit(Scene(), [tr.settings()[1]]))
    assert rows2[0]["acc@0.25"] == rows[1]["acc@0.25"]
    assert rows2[0]["agreement_iou"] == rows[1]["agreement_iou"]
    pytest.importorskip("matplotlib")
    paths = tr.visualize(Scene(), tmp_path)
    assert paths and paths[0].stat().st_size > 0


def test_oracle_scores_keep_target_and_cba_restores_it():
    from threed.tsp3d.oracle import oracle_scores

    p, c, boxes = _scene()
    m = _model(voxel_size=0.01).eval()  # official geometry: levels at 16 / 32 / 64 cm
    b = m.scene_batch(p, c)
    target, far = boxes[0, :3], boxes[1, :3]
    g = torch.Generator

    def dist(out, centre):
        return (out.positions - centre).norm(dim=1)

    with oracle_scores(m, boxes[:, :3], target):
        out = m(b, ["the chair"], generator=g().manual_seed(0))
    assert out.counts["kept_32"] < out.counts["decoder_32"]
    assert (dist(out, target) < 0.3).any()  # the target's 16 cm voxels survive
    assert dist(out, far).min() > 1.0  # far objects are pruned away
    assert out.counts["decoder_16"] < m(b, ["the chair"], prune=False).counts["decoder_16"]
    # prune the target on purpose (32 cm field on the far box): CBA puts it back
    with oracle_scores(m, boxes[:, :3], target, target_level_center=far):
        no_cba = m(b, ["the chair"], cba=False, generator=g().manual_seed(0))
        with_cba = m(b, ["the chair"], generator=g().manual_seed(0))
    assert not (dist(no_cba, target) < 0.3).any()
    assert with_cba.counts["added_16"] > 0
    added = with_cba.positions[-with_cba.counts["added_16"] :]
    # sigmoid(8 (0.3 - d)) > 0.15  <=>  d < 0.3 + ln(0.15 / 0.85) / -8 = 0.517 m
    assert ((added - target).norm(dim=1) < 0.517).all()
    assert (dist(with_cba, target) < 0.3).any()
    # the context manager restores the learned heads
    assert "score" not in vars(m.tgp_scene) and "forward" not in vars(m.cba.head)
    assert not m.cba.pos_embed._forward_hooks  # the position hook is gone too


@pytest.mark.slow
def test_overfit_one_expression_grounds_its_target():
    """Losses, keep targets and box decoding agree: a few dozen steps on one expression
    give a top-1 box with IoU > 0.25, and the learned TGP prunes without the fallback."""
    m = _model(dropout=0.0, voxel_size=0.02)
    s = _sample()
    train(m, [s], TrainConfig(steps=60, lr=2e-3, clip_norm=10.0, progress=False))
    m.eval()
    with torch.no_grad():
        out = m(m.scene_batch(s.points, s.colors), [s.text], generator=torch.Generator())
    assert axis_aligned_iou(out.boxes[0], s.target_box).item() > 0.25
    assert out.counts["kept_32"] < out.counts["decoder_32"]


def test_resume_reproduces_uninterrupted_training(tmp_path):
    """Stop after 2 steps and resume: same losses and weights as one 5-step run
    (optimiser, scheduler with warm-up and decay, step, sampling and dropout RNG)."""

    def cfg(steps):
        return TrainConfig(
            steps=steps,
            batch_size=2,
            lr=3e-3,
            clip_norm=10.0,
            warmup_steps=2,
            decay_steps=(3,),
            save_every=2,
            progress=False,
        )

    samples = [_sample(0), _sample(1)]
    whole = _model(dropout=0.1)
    hist = train(whole, samples, cfg(5), out_dir=tmp_path / "a")
    first = train(_model(dropout=0.1), samples, cfg(2), out_dir=tmp_path / "b")
    resumed = _model(seed=7, dropout=0.1)  # different init: everything must come from disk
    rest = train(resumed, samples, cfg(5), out_dir=tmp_path / "b")
    assert [h["step"] for h in first + rest] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in hist]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # a checkpoint of another architecture is refused instead of half-loaded
    with pytest.raises(ValueError, match="does not match"):
        train(_model(num_layers=2), samples, cfg(6), out_dir=tmp_path / "b")


def test_loss_accepts_targets_of_another_dtype():
    m = _model(dropout=0.0).train()
    s = _sample()
    out = m(m.scene_batch(s.points, s.colors), [s.text], generator=torch.Generator())
    a = grounding_loss(out, s.target_box[None], [s.scene_centers], [s.target_centers], m.config)
    b = grounding_loss(
        out,
        s.target_box[None].double(),
        [s.scene_centers.double()],
        [s.target_centers.double()],
        m.config,
    )
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_grounding_track_reads_full_scanrefer_with_partial_scannet(tmp_path):
    """Real ScanRefer JSONs have no unique field and name scenes the user may not have
    downloaded: the track must only read the annotations of the scene it evaluates."""
    import json

    pytest.importorskip("open3d")
    pytest.importorskip("PIL")
    from threed.scannet import ensure_synthetic, load_scene
    from threed.tsp3d import track as track_mod

    syn = ensure_synthetic(
        tmp_path / "syn", num_scenes=1, seed=0, num_frames=1, image_size=(32, 24)
    )
    recs = json.loads(syn.scanrefer_path.read_text())
    drop = ("unique", "is_unique", "eval_type", "split_type")
    recs = [{k: v for k, v in r.items() if k not in drop} for r in recs]
    recs.append({**recs[0], "scene_id": "scene0999_00"})  # not on disk
    path = tmp_path / "ScanRefer_val.json"
    path.write_text(json.dumps(recs))
    data = argparse.Namespace(scannet_root=syn.scannet_root, scanrefer_path=path)
    tr = track_mod.GroundingTrack.__new__(track_mod.GroundingTrack)
    tr.data, tr._records, tr.max_queries = data, {}, 100
    scene = load_scene(syn.scene_ids[0], syn.scannet_root)
    got = tr._scene_records(scene)
    assert len(got) == len(recs) - 1 and all(r.scene_id == scene.scene_id for r in got)
    assert [r.unique for r in got] == [scene.is_unique(r.object_id) for r in got]


def test_keep_loss_polarity_matches_inference_pruning():
    """The keep loss must lower the logit (= P(prune)) of voxels inside the keep cube and
    raise it outside, the direction in which ``sigmoid(-logit) > threshold`` keeps them."""
    from threed.tsp3d.pruning import keep_targets

    m = _model(dropout=0.0).train()
    s = _sample()
    out = m(m.scene_batch(s.points, s.colors), [s.text], generator=torch.Generator())
    for level in (64, 32):
        out.keep[level]["logits"].retain_grad()
    losses = grounding_loss(
        out, s.target_box[None], [s.scene_centers], [s.target_centers], m.config
    )
    losses["keep_loss"].backward()
    centers = {64: torch.cat([s.scene_centers, s.target_centers]), 32: s.target_centers}
    hw = dict(zip((64, 32), m.config.keep_half_widths))
    for level in (64, 32):
        k = out.keep[level]
        inside = keep_targets(k["positions"].detach(), k["batch_idx"], [centers[level]], hw[level])
        grad = k["logits"].grad
        assert inside.any() and (~inside).any()
        assert (grad[inside] > 0).all() and (grad[~inside] < 0).all()
