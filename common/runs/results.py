"""Append-only JSONL rows that survive a crash and let a rerun resume.

Every finished row is written, flushed and fsync'ed at once, so a killed run
loses at most the row in flight. A row is keyed by ``(unit, track,
setting)``; the unit field is named by the run (``"scene_id"``,
``"sample_id"``...). Failure records use the setting ``"*"`` and list the
settings they left without a row.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["FAILED", "ResultsStore", "read_done", "read_rows", "repair_tail", "row_key"]

FAILED = "*"  # setting of a failure record (one per unit and track)


def row_key(row: dict, unit_field: str = "scene_id") -> tuple[str, str, str]:
    """The identity of a row: ``(unit id, track, setting)``."""
    return (str(row[unit_field]), str(row["track"]), str(row["setting"]))


def is_ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok"


def jsonable(value):
    """Numpy / torch scalars and non-finite floats as plain JSON values (NaN -> null)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn or malformed line is skipped with a warning."""
    rows: list[dict] = []
    path = Path(path)
    if not path.exists():
        return rows
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: ignoring a truncated or malformed row", path, lineno)
    return rows


def read_done(path: Path, unit_field: str = "scene_id") -> set[tuple[str, str, str]]:
    """Keys of the ``ok`` rows of a JSONL file (failed rows are retried on rerun)."""
    return {row_key(r, unit_field) for r in read_rows(path) if is_ok(r)}


def repair_tail(path: Path) -> int:
    """Cut a torn last line (a kill during a write) off ``path``; returns the bytes cut.

    Without this, the next append would continue the partial line and that
    row would be unreadable. Only the bytes after the last newline go.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # scan back for the last newline in blocks (rows are short)
        pos, keep = size, 0
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: cut a torn last row (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def _write_atomic(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def keep_latest_failures(rows: list[dict], unit_field: str = "scene_id") -> list[dict]:
    """``rows`` with each (unit, track)'s failure record reduced to the latest one,
    and dropped once every setting it names has an ``ok`` row."""
    ok: set[tuple[str, str, str]] = {row_key(r, unit_field) for r in rows if is_ok(r)}
    last: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        if not is_ok(r):
            last[(str(r[unit_field]), str(r["track"]))] = i
    out = []
    for i, r in enumerate(rows):
        if is_ok(r):
            out.append(r)
            continue
        pair = (str(r[unit_field]), str(r["track"]))
        if last[pair] != i:
            continue  # an older record of the same unit and track
        settings = r.get("settings")
        if settings is not None and all((*pair, str(s)) in ok for s in settings):
            continue  # every setting it named was made up for
        out.append(r)
    return out


class ResultsStore:
    """One JSONL file of rows (``rows.jsonl``, or ``rows.rank{r}.jsonl`` per shard).

    Opening the store repairs a torn last line, so appends always start on a
    fresh line.
    """

    def __init__(
        self, out_dir: Path, *, rank: int | None = None, unit_field: str = "scene_id"
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = "rows.jsonl" if rank is None else f"rows.rank{rank}.jsonl"
        self.path = self.out_dir / name
        self.unit_field = unit_field
        repair_tail(self.path)
        # (unit, track) pairs with a failure record in this file: drop_failures only
        # rewrites the file for these, so a long run does not re-read it per unit
        self._failed = {self._pair(r) for r in self.rows() if not is_ok(r)}

    def _pair(self, row: dict) -> tuple[str, str]:
        return (str(row[self.unit_field]), str(row["track"]))

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def done(self) -> set[tuple[str, str, str]]:
        """Keys of rows already finished (failed rows are retried on rerun)."""
        return read_done(self.path, self.unit_field)

    def append(self, row: dict) -> None:
        line = json.dumps(jsonable(row), sort_keys=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if not is_ok(row):
            self._failed.add(self._pair(row))

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.append(row)

    def drop_failures(self, unit_id: str, track: str) -> int:
        """Remove the failure records of ``(unit_id, track)`` before a new attempt
        (so reruns replace a unit's failure record instead of piling them up);
        returns how many were removed. The file is rewritten atomically."""
        pair = (str(unit_id), str(track))
        if pair not in self._failed:
            return 0
        rows = self.rows()
        kept = [r for r in rows if is_ok(r) or self._pair(r) != pair]
        if len(kept) != len(rows):
            _write_atomic(self.path, kept)
        self._failed.discard(pair)
        return len(rows) - len(kept)

    @staticmethod
    def merge(out_dir: Path, parts: Iterable[Path], unit_field: str = "scene_id") -> Path:
        """Merge shard files into ``rows.jsonl``.

        The last ``ok`` row of a key wins; of the failure records of a (unit,
        track) only the latest stays, and only while a setting it names still
        has no ``ok`` row.
        """
        out_dir = Path(out_dir)
        merged: dict[tuple[str, str, str], dict] = {}
        failures: list[dict] = []
        for p in [out_dir / "rows.jsonl", *parts]:
            for r in read_rows(p):
                if is_ok(r):
                    merged[row_key(r, unit_field)] = r
                else:
                    failures.append(r)
        failures.sort(key=lambda r: r.get("time") or 0.0)  # stable: file order on ties
        rows = keep_latest_failures([*merged.values(), *failures], unit_field)
        target = out_dir / "rows.jsonl"
        _write_atomic(target, rows)
        return target
