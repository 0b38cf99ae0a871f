"""TSP3D's pruning modes as a registered method (``"tsp3d"``, kind ``"tsp3d"``).

TSP3D's text-guided pruning (TGP) and completion-based addition (CBA) are part
of the network: :class:`~threed.tsp3d.model.TSP3DGrounder` runs them on every
call, steered by keyword options of ``forward`` (``prune``, ``thresholds``,
``cba``, ``keep_ratios``). Nothing is patched, so the honest representation
is a method that *sets those options*: :class:`TSP3DPruning` holds them,
:meth:`TSP3DPruning.forward_kwargs` returns them for a direct call, and
:meth:`TSP3DPruning.apply` makes them the options of every call of the
grounder until the handle is removed (one forward pre-hook, no module or
weight touched). That gives scripts and the run frame the same contract as
every other method (pick by name and parameters, ``with method.apply(m):``,
applying again replaces), and the parametrized method test covers it.

While a handle is active, a call that passes one of the options the method
sets raises ``ValueError`` (two sources for the same option would silently
disagree). Options left ``None`` fall back to the grounder's config
(official: thresholds 0.7 / 0.3, CBA on).

Modes (one line each):

- ``TSP3DPruning()``: TGP at the config's thresholds + CBA (the paper's setting);
- ``TSP3DPruning(thresholds=(t64, t32))``: other keep-prob thresholds, no retraining;
- ``TSP3DPruning(cba=False)``: TGP only;
- ``TSP3DPruning(keep_ratios=(r64, r32))``: keep the top fraction per level
  instead of thresholds (a project sweep, not in the paper);
- ``TSP3DPruning(prune=False)``: the unpruned network (keep everything). With
  ``config.unpruned_upsample="generative"`` this equals TGP with thresholds 0
  and no CBA, the keep-all identity the method test checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from common.methods import MethodHandle, register_method

__all__ = ["TSP3DPruning", "TSP3DHandle"]


def _pair(name: str, value: object, low: float, high: float, closed_low: bool) -> tuple:
    """A pair of numbers in [low, high) (``closed_low``) or (low, high]."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (64 cm, 32 cm), got {value!r}")
    for v in value:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
        if ok:
            ok = (low <= v < high) if closed_low else (low < v <= high)
        if not ok:
            interval = f"[{low}, {high})" if closed_low else f"({low}, {high}]"
            raise ValueError(f"{name} must be two numbers in {interval}, got {value!r}")
    return tuple(float(v) for v in value)


@register_method(
    "tsp3d",
    kind="tsp3d",
    keep_all={"prune": False},
    example={"thresholds": (0.7, 0.3), "cba": True},
    invalid=(
        ("prune", "yes"),
        ("thresholds", (1.5, 0.3)),
        ("thresholds", (0.7,)),
        ("thresholds", (float("nan"), 0.3)),
        ("cba", 1),
        ("keep_ratios", (0.0, 0.5)),
    ),
    summary="TSP3D text-guided voxel pruning (+ completion), as run-time forward options",
)
@dataclass
class TSP3DPruning:
    """TSP3D pruning options of a grounder's forward (see the module docstring).

    Attributes:
        prune: TGP (+ CBA) on; ``False`` runs the same layers without them.
        thresholds: keep-prob thresholds ``(64 cm, 32 cm)``, each in [0, 1);
            ``None`` = the config's (official 0.7, 0.3).
        cba: completion-based addition on / off; ``None`` = the config's (on).
        keep_ratios: keep the top fraction ``(64 cm, 32 cm)``, each in (0, 1],
            instead of thresholds; ``None`` = thresholds.
    """

    prune: bool = True
    thresholds: tuple[float, float] | None = None
    cba: bool | None = None
    keep_ratios: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prune, bool):
            raise ValueError(f"prune must be a bool, got {self.prune!r}")
        if self.cba is not None and not isinstance(self.cba, bool):
            raise ValueError(f"cba must be a bool or None, got {self.cba!r}")
        if self.thresholds is not None:
            self.thresholds = _pair("thresholds", self.thresholds, 0.0, 1.0, closed_low=True)
        if self.keep_ratios is not None:
            self.keep_ratios = _pair("keep_ratios", self.keep_ratios, 0.0, 1.0, closed_low=False)
        if self.thresholds is not None and self.keep_ratios is not None:
            raise ValueError(
                "thresholds and keep_ratios exclude each other (keep_ratios replaces them)"
            )
        if not self.prune:
            unused = [n for n in ("thresholds", "cba", "keep_ratios") if getattr(self, n)]
            if unused:
                raise ValueError(
                    f"prune=False runs without TGP and CBA; {', '.join(unused)} must be left unset"
                )

    def forward_kwargs(self) -> dict[str, Any]:
        """The grounder's forward options this method sets (``None`` fields left out)."""
        if not self.prune:
            return {"prune": False}
        out: dict[str, Any] = {"prune": True}
        for name in ("thresholds", "cba", "keep_ratios"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def apply(self, model: nn.Module) -> TSP3DHandle:
        """Make these options those of every call of ``model`` (a TSP3DGrounder) until removed."""
        return TSP3DHandle(model, self)


class TSP3DHandle(MethodHandle):
    """What :meth:`TSP3DPruning.apply` returns: one forward pre-hook on the grounder."""

    def __init__(self, model: nn.Module, method: TSP3DPruning) -> None:
        if not isinstance(model, nn.Module) or not all(
            hasattr(model, name) for name in ("tgp_scene", "tgp_target", "cba")
        ):
            raise TypeError(f"model must be a TSP3DGrounder, got {type(model).__name__}")
        self.model = model
        self.method = method
        self._options = method.forward_kwargs()
        self._claim(model)
        # a bound method: the hook keeps this handle alive as long as it is installed
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        clash = sorted(set(kwargs) & set(self._options))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} is set by the applied {self.method!r}; remove the handle "
                "or leave the option out of the call"
            )
        return args, {**kwargs, **self._options}

    def _undo(self) -> None:
        self._hook.remove()
