"""Run tracks over units: resumable, shardable under torchrun, summarised.

The runner owns everything around a track: which units this process runs,
which rows are done, failure records, progress, shards, the summary files.
It knows nothing about ScanNet or videos: the caller passes the unit ids, a
``load_unit(unit_id)`` function and a :class:`~common.runs.tracks.TrackRegistry`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .results import FAILED, ResultsStore, read_done, row_key
from .summary import markdown_table, summarize_rows, unresolved_failures, write_plots
from .tracks import Setting, Track, TrackContext, TrackRegistry

log = logging.getLogger(__name__)

__all__ = [
    "RunConfig",
    "RunError",
    "RunSummary",
    "check_device",
    "check_out_dir",
    "cli_exit",
    "dist_info",
    "run",
]


class RunError(Exception):
    """A run that cannot start or produced nothing; ``str(e)`` is one line for the user.

    ``exit_code``: 2 for bad arguments or inputs, 1 when every unit failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunConfig:
    """What the runner itself needs (track options live in each track's dataclass).

    Attributes:
        out: results folder (``rows.jsonl``, ``summary.json``, ``summary.md``,
            ``plots/``, ``visuals/``).
        tracks: names of the tracks to run, in order.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (``cuda`` becomes ``cuda:<local
            rank>`` under torchrun).
        seed: ``torch.manual_seed`` before the tracks are built, and
            ``TrackContext.seed`` for the tracks' own generators.
        visualize: write the tracks' pictures for the first unit of each.
        unit_name: what a unit is called: rows key on ``<unit_name>_id``, the
            summary counts ``num_<unit_name>s`` and lists ``failed_<unit_name>s``.
        ratios: the kept-ratio sweep handed to every track.
        name: the progress bar's label.
    """

    out: Path
    tracks: list[str]
    device: str = "cpu"
    seed: int = 0
    visualize: bool = True
    unit_name: str = "scene"
    ratios: tuple[float, ...] = ()
    name: str = "eval"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.tracks:
            raise ValueError("RunConfig.tracks: at least one track name is needed")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"RunConfig.seed must be an int >= 0, got {self.seed!r}")
        if not self.unit_name.isidentifier():
            raise ValueError(f"RunConfig.unit_name must be an identifier, got {self.unit_name!r}")
        self.ratios = tuple(float(r) for r in self.ratios)
        if any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"RunConfig.ratios: each must be in (0, 1], got {self.ratios}")

    @property
    def unit_field(self) -> str:
        return f"{self.unit_name}_id"

    @property
    def count_field(self) -> str:
        return f"num_{self.unit_name}s"


@dataclass
class RunSummary:
    """What a finished run returns (rank 0 only).

    Attributes:
        groups: one entry per (track, setting), as in ``summary.json``.
        failed_units: units with a failure no rerun has made up for.
        num_units: units of the run (all shards).
        out: the results folder.
        files: what the folder holds, e.g. ``["rows.jsonl", "summary.json", ...]``.
        markdown: the text of ``summary.md``.
    """

    groups: list[dict]
    failed_units: list[str]
    num_units: int
    out: Path
    files: list[str] = field(default_factory=list)
    markdown: str = ""
    unit_name: str = "scene"

    @property
    def all_failed(self) -> bool:
        return self.num_units > 0 and len(self.failed_units) >= self.num_units

    def problem(self) -> str | None:
        """One line when the run produced nothing usable (every unit failed), else None."""
        if self.all_failed:
            return (
                f"all {self.num_units} {self.unit_name}s failed "
                f"(errors in {self.out / 'rows.jsonl'})"
            )
        return None


def cli_exit(
    start: Callable[[], RunSummary | None],
    *,
    usage_errors: tuple[type[Exception], ...] = (ValueError,),
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The end every batch script shares: run ``start()``, report, return the exit status.

    A :class:`RunError` is one ``error:`` line and its ``exit_code``; one of
    ``usage_errors`` (bad option values, named by their field) is one line and 2.
    ``None`` (a torchrun rank other than 0) is 0. Otherwise the summary table is
    written to ``out`` and the results folder named; a run whose every unit
    failed is one ``error:`` line and 1. Writes to the streams on purpose: this
    is the scripts' user-facing output, not logging.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        summary = start()
    except RunError as e:
        err.write(f"error: {e}\n")
        return e.exit_code
    except usage_errors as e:
        err.write(f"error: {e}\n")
        return 2
    if summary is None:
        return 0
    out.write(summary.markdown + "\n")
    problem = summary.problem()
    if problem:
        err.write(f"error: {problem}\n")
        return 1
    out.write(f"results: {summary.out}/ ({', '.join(summary.files)})\n")
    return 0


def check_out_dir(out: Path) -> Path:
    """Make sure ``out`` is (or can become) a writable folder, before any work.

    Raises :class:`RunError` with one line when it is a file or not writable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"--out {out} is not writable ({e.strerror or e})") from None
    return out


def check_device(device: str, local_rank: int = 0, world: int = 1):
    """``torch.device`` for ``device``; ``cuda`` under torchrun becomes ``cuda:<local rank>``.

    Raises :class:`RunError` with one line when CUDA is asked for but absent.
    """
    import torch

    text = str(device or "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise RunError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                f"--device {text}: this torch has no CUDA (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
            )
        if world > 1 and dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun announces them (1 process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _barrier(world: int) -> None:
    """Wait for every rank (a no-op for one process).

    Ranks finish their shards at different times; with the default 30-minute
    process-group timeout a rank that waits longer than that for a slow rank
    would fail and the merge would never happen, so the group is created with
    a long timeout (torchrun still stops all ranks when one of them dies).
    """
    if world <= 1:
        return
    from datetime import timedelta

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()
    if created:
        dist.destroy_process_group()


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("rows.rank*.jsonl"))


def _failed_row(unit_field, unit_id, track, error, settings: list[str]) -> dict:
    """A failure of ``track`` on a unit; ``settings``: the labels left without a row."""
    return {
        unit_field: unit_id,
        "track": track,
        "setting": FAILED,
        "settings": list(settings),
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "time": time.time(),
    }


def run(
    config: RunConfig,
    *,
    units: Sequence[str],
    load_unit: Callable[[str], Any],
    registry: TrackRegistry | Mapping[str, type[Track]],
    options: Mapping[str, Any] | None = None,
    data: Any = None,
    shard: tuple[int, int] | None = None,
) -> RunSummary | None:
    """Run every track of ``config.tracks`` on every unit of this shard.

    Args:
        config: the run's settings (:class:`RunConfig`).
        units: unit ids of the whole run; under torchrun rank r takes
            ``units[r::world]``, and rank 0 merges the shards at the end.
        load_unit: unit id -> the unit a track's ``run_unit`` receives. A unit
            that fails to load is recorded as failed for every track and the
            run goes on.
        registry: the tracks by name (a :class:`TrackRegistry` or a mapping).
        options: track name -> that track's ``Options`` instance (default: ``Options()``).
        data: passed to the tracks as ``TrackContext.data``.
        shard: ``(index, count)`` to run ``units[index::count]`` without torchrun
            (e.g. array jobs). There is no barrier then: shard 0 merges the shard
            files present when it finishes, so run it last (or rerun it).

    Returns:
        On rank 0 the :class:`RunSummary` (also written as ``summary.json``,
        ``summary.md``, ``plots/``); ``None`` on other ranks.

    Raises:
        RunError: before any work, for a bad ``--out``, device or track list,
            no units, or a track that cannot be built from its options (a
            missing or unreadable file: ``OSError`` / ``ValueError``).

    Example::

        from common.runs import RunConfig, Setting, Track, TrackRegistry, run

        class Echo(Track):
            name = "echo"

            def settings(self):
                return [Setting("full", "full"), Setting("half", "full", series="echo")]

            def run_unit(self, unit, settings, progress):
                for s in settings:
                    progress(s.label)
                    yield {"setting": s.label, "kept_ratio": 1.0, "score": len(unit)}

        summary = run(
            RunConfig(out="results/echo", tracks=["echo"], unit_name="sample"),
            units=["a", "bb"], load_unit=str.upper, registry=TrackRegistry({"echo": Echo}),
        )
        print(summary.markdown)
    """
    import torch
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if shard is None:
        rank, world, local_rank = dist_info()
        barrier = world > 1
    else:
        (rank, world), local_rank, barrier = shard, 0, False
        if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
            raise RunError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    device = check_device(config.device, local_rank, world)
    out = check_out_dir(config.out)
    units = [str(u) for u in units]
    if not units:
        raise RunError(f"no {config.unit_name}s found")
    if len(set(units)) != len(units):
        raise RunError(f"{config.unit_name} ids are repeated: {sorted(units)}")

    classes = registry.available() if isinstance(registry, TrackRegistry) else dict(registry)
    missing = [t for t in config.tracks if t not in classes]
    if missing:
        raise RunError(
            f"--tracks: {', '.join(missing)} not available here (available: "
            f"{', '.join(sorted(classes)) or 'none'}); a track is unavailable when its "
            "optional dependency is not installed"
        )

    unit_field = config.unit_field
    store = ResultsStore(out, rank=rank if world > 1 else None, unit_field=unit_field)
    # rows finished by any earlier run: merged rows and every shard file, this
    # store's included (a run with another number of ranks, or one that died
    # before rank 0 merged)
    done = set().union(
        *(read_done(p, unit_field) for p in [out / "rows.jsonl", *_shard_files(out)])
    )

    torch.manual_seed(config.seed)
    context = TrackContext(device=device, seed=config.seed, data=data, ratios=config.ratios)
    options = dict(options or {})
    tracks: list[Track] = []
    for name in config.tracks:
        cls = classes[name]
        try:
            tracks.append(cls(options.get(name, cls.Options()), context))
        except (OSError, ValueError) as e:  # a missing or unreadable file its options name
            log.info("track %s could not be built", name, exc_info=True)  # traceback with -v
            raise RunError(f"track {name}: {e}") from e
    settings = {t.name: t.settings() for t in tracks}

    mine = units[rank::world]
    per_unit = sum(len(s) for s in settings.values())
    bar = tqdm(
        total=len(mine) * per_unit, desc=f"{config.name}[{rank}]", disable=rank != 0, unit="row"
    )
    visualized: set[str] = set()
    with logging_redirect_tqdm():  # warnings go above the bar, not through it
        for unit_id in mine:
            todos: dict[str, list[Setting]] = {
                t.name: [s for s in settings[t.name] if (unit_id, t.name, s.label) not in done]
                for t in tracks
            }
            wants_visual = config.visualize and any(
                t.name not in visualized and t.has_visuals() for t in tracks
            )
            bar.update(per_unit - sum(len(v) for v in todos.values()))
            if not any(todos.values()) and not wants_visual:
                continue  # every row done: no need to load the unit
            bar.set_postfix_str(f"{unit_id}: loading")
            try:
                unit = load_unit(unit_id)
            except Exception as e:  # one bad unit is recorded and the run goes on
                log.error("%s %s failed to load: %s", config.unit_name, unit_id, e)
                for t in tracks:
                    if todos[t.name]:
                        store.drop_failures(unit_id, t.name)
                        labels = [s.label for s in todos[t.name]]
                        store.append(_failed_row(unit_field, unit_id, t.name, e, labels))
                        bar.update(len(labels))
                continue
            for track in tracks:
                todo = todos[track.name]
                if todo:
                    _run_track_unit(track, unit_id, unit, todo, store, done, bar, unit_field)
                if wants_visual and track.name not in visualized and track.has_visuals():
                    bar.set_postfix_str(f"{unit_id} {track.name}: pictures")
                    try:
                        track.visualize(unit, out / "visuals")
                        visualized.add(track.name)
                    except Exception as e:
                        log.warning("visualisation of %s failed: %s", track.name, e)
    bar.close()

    if barrier:
        _barrier(world)
    if rank != 0:
        return None
    shards = _shard_files(out)
    if shards:  # this run's shards, or those of an earlier run that never merged
        ResultsStore.merge(out, shards, unit_field)
    return write_summary(out, tracks, config, num_units=len(units))


def _run_track_unit(track, unit_id, unit, todo, store, done, bar, unit_field) -> None:
    """The rows of one track on one unit; a crash becomes one failure record."""
    by_label = {s.label: s for s in todo}
    finished: set[str] = set()
    store.drop_failures(unit_id, track.name)  # this attempt replaces the old record

    def progress(detail: str) -> None:
        bar.set_postfix_str(f"{unit_id} {track.name}: {detail}", refresh=True)

    try:
        for row in track.run_unit(unit, todo, progress):
            label = str(row["setting"])
            setting = by_label.get(label)
            if setting is None:
                raise ValueError(f"track {track.name} yielded a row for unrequested {label!r}")
            row = {
                "method": setting.method,
                "series": setting.line,
                **row,
                unit_field: unit_id,
                "track": track.name,
                "status": "ok",
            }
            store.append(row)
            done.add(row_key(row, unit_field))
            finished.add(label)
            bar.update(1)
    except Exception as e:
        log.error("track %s failed on %s:\n%s", track.name, unit_id, traceback.format_exc())
        left = [s.label for s in todo if s.label not in finished]
        store.append(_failed_row(unit_field, unit_id, track.name, e, left))
        bar.update(len(left))
        return
    # settings a track chose not to produce (e.g. nothing to ground) just advance the bar
    bar.update(len(todo) - len(finished))


def write_summary(
    out: Path, tracks: Sequence[Track], config: RunConfig, *, num_units: int
) -> RunSummary:
    """``summary.json``, ``summary.md`` and ``plots/`` from ``rows.jsonl``."""
    from .results import read_rows

    unit_field, count_field = config.unit_field, config.count_field
    rows = read_rows(out / "rows.jsonl")
    groups = summarize_rows(rows, unit_field=unit_field, count_field=count_field)
    # per (unit, track): a unit that failed in one track and succeeded in another is failed
    failed = sorted(set().union(*unresolved_failures(rows, unit_field).values()))
    failed_key = f"failed_{config.unit_name}s"
    (out / "summary.json").write_text(
        json.dumps({"groups": groups, failed_key: failed}, indent=2, sort_keys=True)
    )
    columns = {t.name: t.table_columns for t in tracks if t.table_columns}
    md = markdown_table(
        groups,
        columns=columns,
        notes={t.name: t.notes() for t in tracks},
        empty_reasons={t.name: t.empty_reasons for t in tracks},
    )
    if failed:
        md += f"\nFailed {config.unit_name}s: {', '.join(failed)} (see rows.jsonl for the errors)\n"
    (out / "summary.md").write_text(md)
    if groups:
        try:
            write_plots(
                groups,
                out / "plots",
                metrics=columns,
                labels={t.name: t.labels for t in tracks},
            )
        except ModuleNotFoundError as e:  # matplotlib is optional: the rows and tables stand
            if e.name != "matplotlib" and not (e.name or "").startswith("matplotlib."):
                raise
            log.warning("no plots: matplotlib is not installed")
    files = [
        name
        for name in ("rows.jsonl", "summary.json", "summary.md", "plots/", "visuals/")
        if (out / name.rstrip("/")).exists()
        and (not name.endswith("/") or any((out / name.rstrip("/")).iterdir()))
    ]
    return RunSummary(groups, failed, num_units, out, files, md, config.unit_name)
