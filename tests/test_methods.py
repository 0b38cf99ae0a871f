"""The method contract, run over every registered method (in the spirit of kvpress's
test over all presses): a method gets this whole suite by registering.

For every name in ``common.methods.registered_methods()``:

* its keep-all parameters (``spec.keep_all``) give exactly the unpatched model's
  outputs, and its example parameters really change them;
* ``remove()`` restores the model bit for bit: state dict, outputs, and no leftover
  hook, instance attribute or ``forward`` override on any submodule;
* applying twice replaces (one set of patches, the first handle inactive), also
  when the caller dropped the first handle;
* every ``spec.invalid`` field value raises ``ValueError`` naming the field;
* kind ``"llm"``: ``generate()`` with a cache agrees with a hand-run greedy loop
  over the pruned model's cached forward, its first-step logits with the pruned
  prefill run without a cache, and each sample of a padded batch with the
  sample run alone.

Models come from the per-kind factories below (tiny configs, random weights). A
registered kind without a factory fails loudly.
"""

from __future__ import annotations

import gc
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from common.methods import MethodHandle, active_handle, get_method, registered_methods


@dataclass
class Case:
    """A model of one kind, how to apply a method to it and how to read its outputs."""

    model: nn.Module
    run: Callable[[nn.Module], dict[str, torch.Tensor]]
    apply: Callable[[Any, nn.Module], MethodHandle]
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- factories


def _llm_case() -> Case:
    """Tiny Qwen2 (4 layers, SDPA) and a left-padded batch of 2 with an image span per
    sample: the engine tests' builder (``tests/engine/_tiny.py``)."""
    from tests.engine._tiny import build

    model, inputs, spans = build("qwen2", "sdpa")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask).logits
        gen = m.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        return {"logits": logits, "generate": gen}

    def apply(method: Any, m: nn.Module) -> MethodHandle:
        return method.apply(m, spans=spans)

    return Case(model, run, apply, {"ids": ids, "mask": mask, "spans": spans})


def _vggt_case() -> Case:
    """The project's VGGT at ``VGGTConfig.small()``, 3 frames of 70 x 84 (5 x 6 patches)."""
    from threed.vggt import VGGT, VGGTConfig

    torch.manual_seed(0)
    model = VGGT(VGGTConfig.small()).eval()
    images = torch.rand(1, 3, 3, 70, 84, generator=torch.Generator().manual_seed(1))

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = m(images)
        return {k: out[k] for k in ("depth", "depth_conf", "world_points", "pose_enc")}

    return Case(model, run, lambda method, m: method.apply(m))


def _tsp3d_case() -> Case:
    """The TSP3D tests' tiny grounder and scene (``tests/threed/test_tsp3d_model.py``),
    configured so that its own forward keeps every voxel: thresholds 0, no CBA,
    generative upsampling (the official network without pruning). Its unpatched
    outputs are the unpruned network's, the reference of a keep-all method."""
    pytest.importorskip("spconv")
    from tests.threed.test_tsp3d_model import _model, _scene

    model = _model(prune_thresholds=(0.0, 0.0), cba=False, unpruned_upsample="generative")
    model.eval()
    points, colors, _ = _scene(n=1500)
    batch = model.scene_batch(points, colors)

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        out = m(batch, ["the chair"], generator=torch.Generator().manual_seed(0))
        counts = torch.tensor([out.counts[k] for k in sorted(out.counts)])
        return {"boxes": out.boxes, "cls_logits": out.cls_logits, "counts": counts}

    return Case(model, run, lambda method, m: method.apply(m))


def _video_case() -> Case:
    """Tiny LLaVA-OneVision (4-layer Qwen2 decoder, SDPA), two different 6-frame videos in a
    left-padded batch (tests/video/_models.py)."""
    from tests.video._models import build_llava_ov

    model, inputs = build_llava_ov("sdpa")

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = m(**inputs).logits
            gen = m.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return {"logits": logits, "generate": gen}

    return Case(model, run, lambda method, m: method.apply(m), {"inputs": inputs})


FACTORIES: dict[str, Callable[[], Case]] = {
    "llm": _llm_case,
    "vggt": _vggt_case,
    "tsp3d": _tsp3d_case,
    "video": _video_case,
}

_CASES: dict[str, Case] = {}


def _case(kind: str) -> Case:
    if kind not in FACTORIES:
        pytest.fail(
            f"registered method kind {kind!r} has no model factory in tests/test_methods.py: "
            "add one to FACTORIES"
        )
    if kind not in _CASES:
        _CASES[kind] = FACTORIES[kind]()
    return _CASES[kind]


# ---------------------------------------------------------------------------- helpers

NAMES = registered_methods()


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    """Per submodule: instance attribute names, hook counts, an instance ``forward``."""
    out = {}
    for name, mod in model.named_modules():
        hooks = {
            k: len(v) for k, v in mod.__dict__.items() if "hook" in k and hasattr(v, "__len__")
        }
        out[name] = (sorted(mod.__dict__), hooks, mod.__dict__.get("forward"))
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(ref: dict, out: dict) -> None:
    """Bit for bit."""
    assert ref.keys() == out.keys()
    for k in ref:
        assert torch.equal(ref[k], out[k]), k


def _differs(ref: dict, out: dict) -> bool:
    return any(ref[k].shape != out[k].shape or not torch.equal(ref[k], out[k]) for k in ref)


def _unclaimed(case: Case) -> bool:
    return all(active_handle(m) is None for m in case.model.modules())


# ---------------------------------------------------------------------------- tests


def test_registry_is_not_empty_and_names_resolve():
    assert {"fastv", "pdrop", "fastvggt", "tsp3d"} <= set(NAMES)
    for name in NAMES:
        spec = get_method(name)
        assert spec.name == name and spec.summary
    with pytest.raises(ValueError, match="unknown method"):
        get_method("no-such-method")


@pytest.mark.parametrize("name", NAMES)
def test_kind_has_a_factory(name):
    kind = get_method(name).kind
    assert kind in FACTORIES, f"method {name!r}: kind {kind!r} has no factory in FACTORIES"


@pytest.mark.parametrize("name", NAMES)
def test_bad_fields_raise_naming_the_field(name):
    spec = get_method(name)
    assert spec.invalid, f"{name}: register at least one invalid (field, value) pair"
    for fname, value in spec.invalid:
        with pytest.raises(ValueError, match=re.escape(fname)):
            spec.build(**{fname: value})
    with pytest.raises(ValueError, match="unknown parameter"):
        spec.build(no_such_field=1)
    spec.build(**spec.keep_all)
    spec.build(**spec.example)


@pytest.mark.parametrize("name", NAMES)
def test_keep_all_is_the_identity_and_example_changes_outputs(name):
    spec = get_method(name)
    case = _case(spec.kind)
    ref = case.run(case.model)
    with case.apply(spec.build(**spec.keep_all), case.model) as handle:
        assert handle.active
        out = case.run(case.model)
    _assert_same(ref, out)
    with case.apply(spec.build(**spec.example), case.model):
        changed = case.run(case.model)
    assert _differs(ref, changed), f"{name}: the example parameters change nothing"


@pytest.mark.parametrize("name", NAMES)
def test_remove_restores_bit_for_bit(name):
    spec = get_method(name)
    case = _case(spec.kind)
    state, snap = _state(case.model), _snapshot(case.model)
    ref = case.run(case.model)
    handle = case.apply(spec.build(**spec.example), case.model)
    assert handle.active
    assert type(handle).__name__ in repr(handle) and "active" in repr(handle)
    case.run(case.model)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active and "removed" in repr(handle)
    assert _snapshot(case.model) == snap
    assert _unclaimed(case)
    _assert_same(state, _state(case.model))
    _assert_same(ref, case.run(case.model))


@pytest.mark.parametrize("name", NAMES)
def test_applying_twice_replaces(name):
    spec = get_method(name)
    case = _case(spec.kind)
    snap = _snapshot(case.model)
    ref = case.run(case.model)
    first = case.apply(spec.build(**spec.example), case.model)
    once = _snapshot(case.model)
    expected = case.run(case.model)
    second = case.apply(spec.build(**spec.example), case.model)
    try:
        assert not first.active and second.active
        assert _snapshot(case.model) == once  # one set of patches, not two
        _assert_same(expected, case.run(case.model))
        # the same after the caller dropped the active handle: the patches keep it alive
        del second
        gc.collect()
        third = case.apply(spec.build(**spec.example), case.model)
        assert _snapshot(case.model) == once
    finally:
        for m in case.model.modules():
            h = active_handle(m)
            if h is not None:
                h.remove()
    assert not third.active
    assert _snapshot(case.model) == snap
    _assert_same(ref, case.run(case.model))


# ---------------------------------------------------------------------------- LLM: generate

LLM_NAMES = [n for n in NAMES if get_method(n).kind == "llm"]


def _greedy_by_hand(model: nn.Module, ids, mask, steps: int) -> tuple[torch.Tensor, list]:
    """Greedy decoding written out: a pruned prefill with a cache, then one token at a time."""
    from transformers import DynamicCache

    cache = DynamicCache()
    # transformers 5.x renamed ``past_key_values`` to ``cache``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kw = {name: cache, "use_cache": True}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
        logits = [out.logits[:, -1]]
        seq, m = ids, mask
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            if len(logits) == steps:
                break
            out = model(input_ids=nxt, attention_mask=m, **kw)
            logits.append(out.logits[:, -1])
    return seq, logits


@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_generate_with_cache_is_consistent(name):
    from tests.engine._tiny import generate

    spec = get_method(name)
    case = _case("llm")
    ids, mask, spans = case.extra["ids"], case.extra["mask"], case.extra["spans"]
    model = case.model
    steps = 4
    with case.apply(spec.build(**spec.example), model):
        gen = generate(model, steps, input_ids=ids, attention_mask=mask)
        seq, logits = _greedy_by_hand(model, ids, mask, steps)
        with torch.no_grad():  # the pruned prefill without any cache
            nocache = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
    assert torch.equal(gen.sequences, seq)
    for step, (a, b) in enumerate(zip(gen.logits, logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    torch.testing.assert_close(gen.logits[0], nocache, atol=1e-5, rtol=1e-5)
    # each sample of the padded batch decodes as it does alone
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        alone_ids = ids[b : b + 1, keep]
        alone_spans = [[(s - int((~keep).sum()), e - int((~keep).sum())) for s, e in spans[b]]]
        with spec.build(**spec.example).apply(model, spans=alone_spans):
            alone = generate(model, steps, input_ids=alone_ids).sequences
        assert torch.equal(alone[0, -steps:], gen.sequences[b, -steps:]), f"sample {b}"


# ---------------------------------------------------------------------------- kind specifics


def test_fastvggt_on_the_model_and_on_its_aggregator_is_one_claim():
    case = _case("vggt")
    spec = get_method("fastvggt")
    on_model = case.apply(spec.build(**spec.example), case.model)
    on_agg = spec.build(ratio=0.5).apply(case.model.aggregator)
    try:
        assert not on_model.active and on_agg.active
        assert active_handle(case.model.aggregator) is on_agg
        assert "MergeHandle(TokenMerging(ratio=0.5" in repr(on_agg)
    finally:
        on_agg.remove()
    assert _unclaimed(case)


@pytest.mark.parametrize("first,second", [("holitom", "fastv"), ("fastv", "holitom")])
def test_a_method_on_another_part_of_the_model_replaces_too(first, second):
    """HoliTom claims the video LLM (its inner stage the decoder), FastV the decoder: the
    second replaces the whole first method, outer stage included, and runs as it does alone
    (before the fix FastV over HoliTom pruned nothing: no input_ids under the outer stage)."""
    case = _case("video")
    spec_a, spec_b = get_method(first), get_method(second)
    a = case.apply(spec_a.build(**spec_a.example), case.model)
    first_out = case.run(case.model)  # (transformers adds its own hooks on a first run)
    b = case.apply(spec_b.build(**spec_b.example), case.model)
    try:
        assert not a.active and b.active
        patches = _snapshot(case.model)
        out = case.run(case.model)
    finally:
        b.remove()
    assert _unclaimed(case)
    with case.apply(spec_b.build(**spec_b.example), case.model):
        assert _snapshot(case.model) == patches
        _assert_same(out, case.run(case.model))
    assert _differs(first_out, out)


def test_tsp3d_method_options():
    from threed.tsp3d.methods import TSP3DPruning

    assert TSP3DPruning().forward_kwargs() == {"prune": True}  # the config decides the rest
    assert TSP3DPruning(prune=False).forward_kwargs() == {"prune": False}
    assert TSP3DPruning(cba=False, keep_ratios=(0.5, 0.25)).forward_kwargs() == {
        "prune": True,
        "cba": False,
        "keep_ratios": (0.5, 0.25),
    }
    with pytest.raises(ValueError, match="keep_ratios"):
        TSP3DPruning(thresholds=(0.7, 0.3), keep_ratios=(0.5, 0.5))
    with pytest.raises(ValueError, match="cba"):
        TSP3DPruning(prune=False, cba=True)
    case = _case("tsp3d")
    with TSP3DPruning(cba=False).apply(case.model):
        batch = case.model.scene_batch(torch.rand(500, 3) * 2, torch.rand(500, 3))
        with pytest.raises(ValueError, match="cba is set by the applied"):
            case.model(batch, ["a chair"], cba=True)
    with pytest.raises(TypeError, match="TSP3DGrounder"):
        TSP3DPruning().apply(nn.Linear(2, 2))
