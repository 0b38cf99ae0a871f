"""The eval_scannet "llava3d" track on a generated scene (tiny random LLaVA-3D-shaped model)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from common.flops import decoder_prefill_flops
from common.runs import TrackContext

pytest.importorskip("transformers")
pytest.importorskip("open3d")

from threed.evaluation import DataPaths  # noqa: E402
from threed.llava3d.track import (  # noqa: E402
    Llava3DOptions,
    Llava3DTrack,
    fastv_equal_flops,
    tokens_per_layer,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from threed.scannet import ensure_synthetic

    root = tmp_path_factory.mktemp("synth")
    return root, ensure_synthetic(root=root, num_scenes=1, seed=0)


@pytest.fixture(scope="module")
def scene(synthetic):
    from threed.scannet import load_scene

    _, syn = synthetic
    return load_scene(syn.scene_ids[0], syn.scannet_root, syn.posed_images_root)


def _track(syn, *argv) -> Llava3DTrack:
    p = argparse.ArgumentParser()
    Llava3DTrack.add_arguments(p)
    data = DataPaths(
        syn.scannet_root,
        syn.posed_images_root,
        syn.scanrefer_path,
        syn.scanqa_path,
        list(syn.scene_ids),
        synthetic=True,
    )
    options = Llava3DTrack.options_from_args(p.parse_args(list(argv)))
    return Llava3DTrack(options, TrackContext(device="cpu", seed=0, data=data))


def test_options_and_settings(synthetic):
    _, syn = synthetic
    track = _track(syn, "--adagate-keep", "0.5,0.25,0.1")
    assert [s.label for s in track.settings()] == [
        "full",
        "adagate",
        "adagate-adaptive",
        "adagate-profile",
        "fastv",
    ]
    assert track.gate_layers == (2, 4, 6) and track.options.keep == (0.5, 0.25, 0.1)
    assert track.spatial_config.num_views == 8 and track.accuracy_valid is False
    for kwargs, name in (
        ({"keep": (0.5, 0.6, 0.1)}, "keep"),
        ({"mass": 1.5}, "mass"),
        ({"questions": 0}, "questions"),
        ({"views": 0}, "views"),
        ({"patch_pixel": "middle"}, "patch_pixel"),
    ):
        with pytest.raises(ValueError, match=name):
            Llava3DOptions(**kwargs)


def test_layer_counts_and_equal_flops_budget():
    plan = {"kept_counts": {2: [60], 5: [30]}}
    assert tokens_per_layer(100, 7, plan) == [100, 100, 60, 60, 60, 30, 30]
    assert tokens_per_layer(100, 3, None) == [100] * 3

    def flops(per):
        return decoder_prefill_flops(per, 64, 172, mlp="swiglu")

    target = flops([50 + 500] * 2 + [50 + 100] * 6)  # 100 of 500 kept from layer 2
    assert fastv_equal_flops(50, 500, target, flops, 8, layer=2) == pytest.approx(0.2, abs=1e-3)


def test_rows_flops_agreement_and_visual(synthetic, scene, tmp_path):
    _, syn = synthetic
    track = _track(syn, "--llava3d-questions", "1", "--llava3d-views", "4")
    steps = []
    rows = list(track.run_unit(scene, track.settings(), steps.append))
    json.dumps(rows)
    assert steps[0] == "spatial tokens" and steps[-1] == "fastv: 2 questions"
    by = {r["setting"]: r for r in rows}
    assert list(by) == ["full", "adagate", "adagate-adaptive", "adagate-profile", "fastv"]
    full = by["full"]
    n = full["spatial_tokens"]
    assert 100 < n <= 2560 and full["num_views"] == 4 and full["num_questions"] == 2
    assert [a["dataset"] for a in full["answers"]] == ["scanqa", "sqa3d"]
    assert full["agreement"] == 1.0 and full["kept_ratio"] == 1.0 and full["flops_ratio"] == 1.0
    assert full["accuracy_valid"] is False and full["em1"] is not None
    assert full["em1_scanqa"] is not None and full["em1_sqa3d"] is not None
    # known answer: the full prefill of question q runs L_q tokens through all 8 layers
    x, span = track._sample(track._questions(scene.scene_id)[0].text, track._scene_tokens(scene)[1])
    assert span[1] - span[0] == n and 30 <= span[0] <= 40  # LLaVA-3D's ~35-token prefix
    one = decoder_prefill_flops([x.shape[1]] * 8, 64, 172, mlp="swiglu")
    assert full["prefill_tflops"] * 1e12 > 0.9 * one
    gate = by["adagate"]
    assert gate["spatial_left"] == round(n * 0.125)  # keep fractions of the original span
    assert 0.3 < gate["flops_ratio"] < 0.5
    fastv = by["fastv"]
    assert fastv["flops_ratio"] <= gate["flops_ratio"] + 0.01
    assert fastv["flops_ratio"] >= gate["flops_ratio"] - 0.02  # comparable budget
    adaptive = by["adagate-adaptive"]
    assert 0.05 * n <= adaptive["spatial_left"] <= n
    prof = by["adagate-profile"]
    assert prof["flops_ratio"] < 0.45 and len(prof["profile_layers"]) == 3
    for r in rows:
        assert 0.0 <= r["agreement"] <= r["first_token_agreement"] <= 1.0
        assert r["prefill_time_s"] > 0
    paths = track.visualize(scene, tmp_path)
    assert len(paths) == 1 and paths[0].stat().st_size > 0


def test_script_runs_and_resumes_the_track(synthetic, tmp_path):
    from scripts.eval_scannet import main

    root, _ = synthetic
    argv = [
        "--tracks",
        "llava3d",
        "--out",
        str(tmp_path / "out"),
        "--synthetic-root",
        str(root),
        "--num-synthetic-scenes",
        "1",
        "--llava3d-questions",
        "1",
        "--llava3d-views",
        "2",
        "--no-visuals",
    ]
    assert main(argv) == 0
    rows = (tmp_path / "out" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 5 and all(json.loads(r)["track"] == "llava3d" for r in rows)
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "llava3d" in table and "adagate-adaptive" in table and "flops_ratio" in table
    assert main(argv) == 0  # resumes: nothing to redo
    assert (tmp_path / "out" / "rows.jsonl").read_text().splitlines() == rows


def test_track_module_imports_no_optional_dependency():
    import subprocess
    import sys

    code = (
        "import sys, threed.llava3d, threed.llava3d.track\n"
        "heavy = ('transformers', 'open3d', 'spconv', 'matplotlib', 'PIL')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


class _Tokenizer:
    """What the LLaVA-3D path needs of a tokenizer (word-hash ids; see WordTokenizer)."""

    def __init__(self):
        from threed.llava3d.track import WordTokenizer

        self.words = WordTokenizer(128)

    def encode(self, text):
        return self.words.encode(text)

    def decode(self, ids, skip_special_tokens=False):
        return self.words.decode(ids)


def _fake_llava(monkeypatch, model, tokenizer):
    """A ``llava`` package with the names the track's checkpoint path imports, serving
    the test stand-in of LLaVA-3D (tests/threed/llava3d_standin.py)."""
    import sys
    import types

    import torch

    from threed.llava3d.track import SYSTEM

    class Conv:
        roles = ("USER", "ASSISTANT")

        def __init__(self):
            self.messages = []

        def copy(self):
            return Conv()

        def append_message(self, role, message):
            self.messages.append((role, message))

        def get_prompt(self):
            turns = " ".join(f"{r}: {m}" if m is not None else f"{r}:" for r, m in self.messages)
            return f"{SYSTEM} {turns}"

    def tokenizer_image_token(prompt, tok, index, return_tensors=None):
        before, after = prompt.split("<image>")
        return torch.tensor([1, *tok.encode(before), index, *tok.encode(after)])

    modules = {
        "llava": {},
        "llava.constants": {"IMAGE_TOKEN_INDEX": -200, "DEFAULT_IMAGE_TOKEN": "<image>"},
        "llava.conversation": {"conv_templates": {"llava_v1": Conv()}},
        "llava.mm_utils": {
            "tokenizer_image_token": tokenizer_image_token,
            "get_model_name_from_path": lambda path: "llava3d-standin",
        },
        "llava.model": {},
        "llava.model.builder": {
            "load_pretrained_model": lambda path, base, name: (tokenizer, model, None, 4096)
        },
    }
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)


def test_llava3d_checkpoint_path_on_a_stand_in(monkeypatch, synthetic, scene, tmp_path):
    """The --llava3d-model path (LLaVA-3D's prompt, generate(images=...), span found by
    AdaGate through prepare_inputs_labels_for_multimodal) on the test stand-in whose scene
    encoder pools our spatial tokens from the video tensors it is given."""
    import torch

    from tests.threed import llava3d_standin as standin
    from threed.llava3d import SceneViews, build_spatial_tokens

    class VideoStandIn(standin.Llava3DStandIn):
        """Stand-in fed LLaVA-3D's video tensors: ``images [B, V, 3, S, S]`` (with depths,
        poses, intrinsics) become 6-d spatial tokens (patch colour, xyz) before the
        stand-in's own scene projection."""

        def prepare_inputs_labels_for_multimodal(
            self, ids, pos, mask, pkv, labels, images, *rest, **kw
        ):
            if torch.is_tensor(images) and images.ndim == 5:
                depths, poses, intrinsics = rest[:3]
                scenes = []
                for b in range(images.shape[0]):
                    im = images[b].float()
                    v = im.shape[0]
                    colour = (
                        im.reshape(v, 3, 24, 14, 24, 14).mean((3, 5)).flatten(2).transpose(1, 2)
                    )
                    feats = torch.cat([colour, torch.zeros(v, 576, 3)], -1)
                    views = SceneViews(
                        im, depths[b].float(), poses[b].float(), intrinsics[b].float()
                    )
                    tok = build_spatial_tokens(
                        feats,
                        views,
                        position_embedding=lambda p: torch.nn.functional.pad(p, (3, 0)),
                    )
                    scenes.append(tok.features)
                images = scenes
            return super().prepare_inputs_labels_for_multimodal(
                ids, pos, mask, pkv, labels, images, *rest, **kw
            )

    torch.manual_seed(0)
    model = VideoStandIn(standin.tiny_config(layers=8, vocab=128)).eval()
    _fake_llava(monkeypatch, model, _Tokenizer())
    _, syn = synthetic
    track = _track(
        syn,
        "--llava3d-model",
        str(tmp_path),
        "--llava3d-questions",
        "1",
        "--llava3d-views",
        "2",
        "--llava3d-max-new-tokens",
        "3",
        "--adagate-layers",
        "2,4,6",
    )
    assert track.real and track.accuracy_valid
    rows = list(track.run_unit(scene, track.settings(), lambda _: None))
    by = {r["setting"]: r for r in rows}
    assert list(by) == ["full", "adagate", "adagate-adaptive", "adagate-profile", "fastv"]
    n = by["full"]["spatial_tokens"]
    assert n > 50 and by["full"]["agreement"] == 1.0 and by["full"]["flops_ratio"] == 1.0
    assert by["adagate"]["spatial_left"] == round(n * 0.125)
    assert by["adagate"]["flops_ratio"] < 0.5
    assert abs(by["fastv"]["flops_ratio"] - by["adagate"]["flops_ratio"]) < 0.02
    assert by["adagate-profile"]["flops_ratio"] < 0.45
    for r in rows:
        assert r["model"] == "LLaVA-3D" and r["accuracy_valid"] is True
        assert [a["dataset"] for a in r["answers"]] == ["scanqa", "sqa3d"]
        assert r["prefill_time_s"] > 0


def test_accuracy_per_data_set():
    from threed.llava3d.track import _accuracy, _Question

    qs = [
        _Question("scanqa", "1", "what color is the chair?", ["brown", "dark brown"]),
        _Question("scanqa", "2", "how many chairs?", ["2"]),
        _Question("sqa3d", "3", "what is in front of me?", ["table"]),
    ]
    out = _accuracy(["Brown.", "three", "the table"], qs)
    assert out["em1"] == pytest.approx(2 / 3)
    assert out["em1_scanqa"] == 0.5 and out["em1_sqa3d"] == 1.0
    if importlib.util.find_spec("pycocoevalcap") is None:
        assert out["cider"] is None
