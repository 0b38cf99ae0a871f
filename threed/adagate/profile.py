"""AdaGate profiles: a calibrated gating schedule saved as JSON.

A profile holds what :func:`threed.adagate.calibrate` measured and chose for
one model: the model's name and decoder depth, the gating schedule
(``layers``, ``keep``), the fitted keep curve ``f(l) = A e^{-B(l-C)} + D``
(percent of the spatial span kept at layer ``l``, 1-based as in the paper)
and the measured per-layer information flow it was fitted to. Loading a
profile onto a model of another depth is refused with a clear error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AdaGateProfile", "ProfileMismatchError", "exp_decay"]

_FORMAT = "holoprune.adagate.profile/1"


class ProfileMismatchError(ValueError):
    """A profile does not fit the model it is applied to (layer count, name)."""


def exp_decay(layer: float, a: float, b: float, c: float, d: float) -> float:
    """``f(l) = a * exp(-b (l - c)) + d`` (percent kept at 1-based layer ``l``)."""
    return a * math.exp(-b * (layer - c)) + d


@dataclass
class AdaGateProfile:
    """A calibrated AdaGate schedule for one model.

    Attributes:
        model_name: what the profile was calibrated on (``config._name_or_path``
            or the class name); informational.
        num_layers: decoder depth ``L``; a profile only applies to this depth.
        layers: gating layers (0-based decoder indices, strictly increasing, >= 1).
        keep: fraction of the original spatial span kept from each gating layer on.
        curve_params: ``{"A", "B", "C", "D"}`` of the fitted keep curve (percent).
        curve: ``[L]`` fitted percent kept at layers 1..L.
        flow: ``[L]`` measured information flow through spatial tokens per
            layer (min-max normalised to [0, 1]).
        flow_intra / flow_text: ``[L]`` raw head-averaged attention mass:
            spatial queries on spatial keys, text queries on spatial keys.
        target_flops: prefill FLOPs fraction asked for (pruned / unpruned).
        flops_ratio: the chosen schedule's prefill FLOPs fraction (analytic).
        num_samples: calibration samples used.
        extra: free-form metadata (layout, token counts, version).
    """

    model_name: str
    num_layers: int
    layers: tuple[int, ...]
    keep: tuple[float, ...]
    curve_params: dict[str, float] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)
    flow: list[float] = field(default_factory=list)
    flow_intra: list[float] = field(default_factory=list)
    flow_text: list[float] = field(default_factory=list)
    target_flops: float | None = None
    flops_ratio: float | None = None
    num_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(v) for v in self.layers)
        self.keep = tuple(float(v) for v in self.keep)
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")
        if self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers}")
        if len(self.layers) != len(self.keep):
            raise ValueError(
                f"keep must have one entry per layer ({len(self.layers)}), got {len(self.keep)}"
            )
        for i, layer in enumerate(self.layers):
            if not 1 <= layer < self.num_layers:
                raise ValueError(f"layers[{i}] must be in [1, {self.num_layers - 1}], got {layer}")
            if i and layer <= self.layers[i - 1]:
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        for i, k in enumerate(self.keep):
            if not 0 < k <= 1:
                raise ValueError(f"keep[{i}] must be in (0, 1], got {k}")

    # ----------------------------------------------------------------- checks
    def check_model(self, num_layers: int, model_name: str | None = None) -> None:
        """Raise :class:`ProfileMismatchError` unless the profile fits a ``num_layers`` decoder."""
        if num_layers != self.num_layers:
            raise ProfileMismatchError(
                f"AdaGate profile for {self.model_name!r} was calibrated on a "
                f"{self.num_layers}-layer decoder; this model has {num_layers} layers. "
                "Calibrate a profile for this model (AdaGate.calibrate)."
            )

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["keep"] = list(self.keep)
        return {"format": _FORMAT, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaGateProfile:
        if not isinstance(data, dict):
            raise ValueError(f"an AdaGate profile must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != _FORMAT:
            raise ValueError(f"not an AdaGate profile (format {fmt!r}, expected {_FORMAT!r})")
        names = set(cls.__dataclass_fields__)
        missing = {"model_name", "num_layers", "layers", "keep"} - set(data)
        if missing:
            raise ValueError(f"AdaGate profile lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (creating parent folders); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AdaGateProfile:
        """Read a profile written by :meth:`save` (``ValueError`` naming the file if malformed)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"AdaGate profile {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"AdaGate profile {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"AdaGate profile {path}: {err}") from None
