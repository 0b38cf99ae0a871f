"""The method contract: one handle for every method that patches a model, one registry.

Every method of the suite is a small validated ``@dataclass`` whose
``apply(model, ...)`` returns a :class:`MethodHandle`:

* ``handle.remove()`` undoes every patch (idempotent) and the model is
  exactly as before; the handle is also a context manager;
* applying a method to a model that already carries an active handle
  removes that handle first (applying again replaces, never stacks), also
  when the two patch different parts of it (FastV on the decoder of a model
  that carries HoliTom removes HoliTom, outer stage included); a method
  made of parts applies them inside :meth:`MethodHandle._composing`;
* ``repr(handle)`` says what is applied to what and whether it is active.

The active handles live in one registry keyed by the patched module (weak
both ways: nothing is stored on the model, and the registry keeps neither
the model nor the handle alive).

Methods are registered by name with :func:`register_method`, so scripts and
the run frame build them from a name and parameters
(:func:`build_method`), and one parametrized test runs the whole contract
over :func:`registered_methods` (keep-all identity, ``remove()`` restores,
applying twice replaces, bad fields raise, ``generate`` consistent for LLM
methods). A new method gets that suite by registering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "MethodHandle",
    "MethodSpec",
    "active_handle",
    "build_method",
    "get_method",
    "register_method",
    "registered_methods",
]

logger = logging.getLogger(__name__)

# patched module -> weak reference to its active handle
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
# handles whose parts are being applied right now (MethodHandle._composing)
_COMPOSING: list[MethodHandle] = []


def active_handle(module: nn.Module) -> MethodHandle | None:
    """The handle currently applied to ``module`` (``None`` when there is none)."""
    ref = _ACTIVE.get(module)
    handle = ref() if ref is not None else None
    return handle if handle is not None and handle.active else None


class MethodHandle:
    """Base of what every ``Method.apply(model)`` returns.

    A subclass calls :meth:`_claim` with the module it patches (which removes
    a handle already active there), installs its patches, and implements
    :meth:`_undo` (remove hooks, restore attributes). ``remove()`` calls
    ``_undo`` once and releases the claim. Claim *before* patching when the
    previous handle's ``_undo`` would restore the very attributes you patch
    (replaced ``forward`` attributes); hooks may be installed in either order.

    The registry holds handles weakly, so the installed patches must hold the
    handle (hooks that are its bound methods or closures over it): an active
    handle then lives exactly as long as its patches, and applying again
    still finds and removes it after the caller dropped its reference.
    """

    model: nn.Module
    method: Any
    _key: nn.Module | None = None
    _is_active: bool = False

    # ------------------------------------------------------------------ subclass API
    def _claim(self, key: nn.Module) -> None:
        """Register as the active handle of ``key``, replacing (removing) any other first.

        Also removes the active handles of other modules applied to the same
        ``self.model`` (set it before claiming), except the handles this one
        is a part of (:meth:`_composing`): two methods on one model would
        otherwise each patch their part and neither work as documented.
        """
        model = getattr(self, "model", None)
        for other_key, ref in list(_ACTIVE.items()):
            other = ref()
            if (
                other is None
                or other is self
                or not other.active
                or other in _COMPOSING
                or (
                    other_key is not key
                    and (model is None or getattr(other, "model", None) is not model)
                )
            ):
                continue
            logger.info("replacing %r", other)
            other.remove()
        _ACTIVE[key] = weakref.ref(self)
        self._key = key
        self._is_active = True

    def _undo(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @contextlib.contextmanager
    def _composing(self):
        """Handles claimed inside this block are parts of this one (an outer stage applying
        its inner stage): they do not remove it. The parts are this handle's to remove."""
        _COMPOSING.append(self)
        try:
            yield
        finally:
            _COMPOSING.remove(self)

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> bool:
        return self._is_active

    def remove(self) -> None:
        """Undo every patch and forget all state (idempotent)."""
        if not self._is_active:
            return
        self._undo()
        self._is_active = False
        key = self._key
        if key is not None:
            ref = _ACTIVE.get(key)
            if ref is not None and ref() in (self, None):
                del _ACTIVE[key]

    def __enter__(self) -> MethodHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._is_active else "removed"
        model = type(getattr(self, "model", None)).__name__
        return f"{type(self).__name__}({getattr(self, 'method', None)!r} on {model}, {state})"


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name (``"fastv"``, ``"fastvggt"``, ...).
        cls: the method dataclass.
        kind: what it is applied to: ``"llm"`` (a Hugging Face decoder or VLM,
            through the decoder engine), ``"vggt"``, ``"tsp3d"``, ``"video"``...;
            the parametrized test and the run frame pick models by kind.
        keep_all: parameters under which the method is the exact identity.
        example: parameters under which it really prunes / merges (tests).
        invalid: ``(field, value)`` pairs that must raise ``ValueError`` naming the field.
        summary: one line for ``--help`` and tables.
    """

    name: str
    cls: type
    kind: str
    keep_all: Mapping[str, Any] = field(default_factory=dict)
    example: Mapping[str, Any] = field(default_factory=dict)
    invalid: tuple[tuple[str, Any], ...] = ()
    summary: str = ""

    def build(self, **params: Any) -> Any:
        """An instance from parameters; unknown names raise ``ValueError`` listing the fields."""
        names = (
            {f.name for f in dataclasses.fields(self.cls)}
            if dataclasses.is_dataclass(self.cls)
            else None
        )
        if names is not None:
            unknown = sorted(set(params) - names)
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown parameter(s) {', '.join(unknown)}; "
                    f"fields are {', '.join(sorted(names))}"
                )
        return self.cls(**params)


_REGISTRY: dict[str, MethodSpec] = {}

# modules whose import registers methods; imported lazily on the first lookup so
# that `import common` stays light and the registry still sees every method
_PROVIDERS = (
    "common.engine",
    "threed.vggt.merging",
    "threed.tsp3d.methods",
    "threed.adagate",
    "video.holitom.method",
    "video.baselines",
)
_loaded = False


def register_method(
    name: str,
    *,
    kind: str,
    keep_all: Mapping[str, Any] | None = None,
    example: Mapping[str, Any] | None = None,
    invalid: tuple[tuple[str, Any], ...] = (),
    summary: str = "",
) -> Callable[[type], type]:
    """Class decorator: register a method dataclass under ``name``."""

    def deco(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.cls}")
        _REGISTRY[name] = MethodSpec(
            name, cls, kind, dict(keep_all or {}), dict(example or {}), tuple(invalid), summary
        )
        return cls

    return deco


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # every provider exists and imports only torch (optional dependencies are lazy), so a
    # failing import is a real error: skipping it would silently drop its methods
    for mod in _PROVIDERS:
        importlib.import_module(mod)


def registered_methods(kind: str | None = None) -> list[str]:
    """Names of the registered methods (of one ``kind`` when given), sorted."""
    _load_providers()
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name`` (``ValueError`` listing the names)."""
    _load_providers()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build_method(name: str, **params: Any) -> Any:
    """``get_method(name).build(**params)``."""
    return get_method(name).build(**params)
