"""AdaGate: AdaToken-3D spatial gating for LLaVA-3D and any Hugging Face decoder.

Usage (inside the LLaVA-3D code base, or with any decoder LM)::

    from threed import AdaGate

    gate = AdaGate.from_profile("llava3d_7b.json")  # or AdaGate(layers=(8, 16, 24),
    # keep=(0.5, 0.25, 0.125)) or AdaGate(mode="adaptive", mass=0.9)
    with gate.apply(model):  # LLaVA-3D: spans found from prepare_inputs_labels_for_multimodal
        output_ids = model.generate(...)

    profile = AdaGate.calibrate(model, samples, target_flops=0.37, out="profile.json")

Needs torch and transformers only (no spconv / open3d).
"""

from threed.adagate.calibrate import (
    SpatialFlow,
    choose_schedule,
    fit_keep_curve,
    measure_spatial_flow,
)
from threed.adagate.llava3d import SpanRecorder, llava3d_spans
from threed.adagate.method import AdaGate, AdaGateHandle
from threed.adagate.profile import AdaGateProfile, ProfileMismatchError, exp_decay
from threed.adagate.profiles import calibrate_profile

__all__ = [
    "AdaGate",
    "AdaGateHandle",
    "AdaGateProfile",
    "ProfileMismatchError",
    "SpanRecorder",
    "SpatialFlow",
    "calibrate_profile",
    "choose_schedule",
    "exp_decay",
    "fit_keep_curve",
    "llava3d_spans",
    "measure_spatial_flow",
]
