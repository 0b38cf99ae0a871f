"""What a track is: the typed contract between the run frame and a model.

A *track* turns one unit (a scene, a clip, a QA sample) into result rows,
one per :class:`Setting`. It has its own options dataclass (built from the
command line by :func:`add_options` / :func:`options_from_args`, validated
in ``__post_init__``) and receives a :class:`TrackContext` (device, seed,
the run's data description and kept-ratio sweep) from the runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)

__all__ = [
    "FULL",
    "NoOptions",
    "Progress",
    "Setting",
    "Track",
    "TrackContext",
    "TrackRegistry",
    "add_options",
    "option",
    "options_from_args",
]

Progress = Callable[[str], None]
"""``progress(detail)``: what a track is doing inside a unit (shown on the run's bar)."""


@dataclass(frozen=True)
class Setting:
    """One setting of a track: a method name, its parameters and the row label.

    Attributes:
        label: the row key, unique within the track (``"full"``, ``"fastvggt@0.9"``).
        method: a name of :mod:`common.methods`'s registry, or ``"full"`` (unpruned).
        params: the method's parameters (``build_method(method, **params)``).
        series: the plot line this setting belongs to; the settings of one
            sweep share it, every other setting has its own (default: ``label``).
    """

    label: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    series: str | None = None

    def __post_init__(self) -> None:
        if not self.label or not isinstance(self.label, str):
            raise ValueError(f"Setting.label must be a non-empty string, got {self.label!r}")
        if not self.method or not isinstance(self.method, str):
            raise ValueError(f"Setting.method must be a non-empty string, got {self.method!r}")
        object.__setattr__(self, "params", dict(self.params))

    @property
    def line(self) -> str:
        return self.series or self.label

    def build(self) -> Any:
        """The method instance from the registry (``None`` for ``full``)."""
        if self.method == "full":
            return None
        from common.methods import build_method

        return build_method(self.method, **self.params)


FULL = Setting("full", "full")


@dataclass(frozen=True)
class TrackContext:
    """What the runner hands every track.

    Attributes:
        device: where the track runs (``cuda:<local rank>`` under torchrun).
        seed: the run's seed; tracks seed their random models and samplers from it.
        data: the run's data description (the caller's object, passed through).
        ratios: the kept ratios the run sweeps; each track maps them to its settings.
    """

    device: Any = "cpu"
    seed: int = 0
    data: Any = None
    ratios: tuple[float, ...] = ()


@dataclass(frozen=True)
class NoOptions:
    """Options of a track that has none."""


def option(flag: str, *, help: str, **argparse_kwargs: Any) -> dict:
    """Field metadata declaring an options field's command-line flag.

    ``dataclasses.field(default=..., metadata=option("--frames", help="...", type=int))``;
    ``argparse_kwargs`` go to ``add_argument`` (``type``, ``choices``...).
    """
    return {"flag": flag, "help": help, "argparse": dict(argparse_kwargs)}


def _dest(f: dataclasses.Field) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def add_options(parser: argparse.ArgumentParser | Any, options_cls: type) -> None:
    """Add one flag per field of ``options_cls`` that declares one with :func:`option`."""
    for f in dataclasses.fields(options_cls):
        if "flag" not in f.metadata:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs = dict(f.metadata["argparse"])
        kwargs.setdefault("default", default)
        parser.add_argument(f.metadata["flag"], dest=_dest(f), help=f.metadata["help"], **kwargs)


def options_from_args(options_cls: type, args: argparse.Namespace) -> Any:
    """An ``options_cls`` instance from parsed flags (fields without a flag keep defaults)."""
    values = vars(args)
    kwargs = {
        f.name: values[_dest(f)]
        for f in dataclasses.fields(options_cls)
        if "flag" in f.metadata and _dest(f) in values
    }
    return options_cls(**kwargs)


class Track:
    """Base of every track.

    A subclass sets ``name`` and ``Options`` (a dataclass), and implements
    :meth:`settings` and :meth:`run_unit`; :meth:`visualize` is optional.
    Class attributes shape the summary: ``table_columns`` (the Markdown
    table's columns, all fields otherwise), ``labels`` (field -> axis label
    in words and units, ``kept_ratio`` included) and ``empty_reasons``
    (field -> why it can be empty).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    table_columns: ClassVar[list[str] | None] = None
    labels: ClassVar[dict[str, str]] = {}
    empty_reasons: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any, context: TrackContext) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(
                f"track {self.name}: options must be {self.Options.__name__}, "
                f"got {type(options).__name__}"
            )
        self.options = options
        self.context = context

    # ------------------------------------------------------------------ command line
    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        add_options(parser, cls.Options)

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> Any:
        return options_from_args(cls.Options, args)

    # ------------------------------------------------------------------ contract
    def settings(self) -> list[Setting]:
        """Every setting this track runs, ``full`` (the unpruned reference) first."""
        raise NotImplementedError

    def run_unit(self, unit: Any, settings: list[Setting], progress: Progress) -> Iterator[dict]:
        """Yield one row per setting of ``settings`` (those not done yet).

        A row holds ``setting`` (the label) and measurements; the runner adds
        the unit id, ``track``, ``method``, ``series`` and ``status``. Call
        ``progress("...")`` inside long steps.
        """
        raise NotImplementedError

    def visualize(self, unit: Any, out_dir: Path) -> list[Path]:
        """Pictures of what was kept for one unit (default: none)."""
        return []

    def notes(self) -> list[str]:
        """Lines printed under the track's table (caps, baselines); default none."""
        return []

    @classmethod
    def has_visuals(cls) -> bool:
        return cls.visualize is not Track.visualize


class TrackRegistry:
    """Track classes by name, given as classes or lazily as ``"module:Class"``.

    A lazy entry whose module cannot be imported (its optional dependency is
    missing) is reported as unavailable, not an error.
    """

    def __init__(self, entries: Mapping[str, str | type[Track]] | None = None) -> None:
        self._entries: dict[str, str | type[Track]] = dict(entries or {})

    def add(self, name: str, entry: str | type[Track]) -> None:
        self._entries[name] = entry

    def names(self) -> list[str]:
        return list(self._entries)

    def load(self, name: str) -> type[Track]:
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, cls_name = entry.split(":")
            entry = getattr(importlib.import_module(module_name), cls_name)
        return entry

    def available(self) -> dict[str, type[Track]]:
        """Track classes that import in this environment, by name.

        An ``ImportError`` of another package (an optional dependency, a broken
        native library) makes a track unavailable; one inside the entry's own
        package (a missing module or name there) is a bug and is raised.
        """
        found = {}
        for name, entry in self._entries.items():
            try:
                found[name] = self.load(name)
            except ImportError as e:
                own = entry.split(".")[0].split(":")[0] if isinstance(entry, str) else ""
                if own and (e.name or "").split(".")[0] == own:
                    raise
                log.info("track %s unavailable: %s", name, e)
        return found
