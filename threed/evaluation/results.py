"""Append-only JSONL results that survive a crash and let a rerun resume.

Every finished row is written and flushed to disk at once, so a killed run
loses at most the row in flight.  Rows are keyed by (scene, track, setting).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["ResultsStore", "row_key", "read_rows", "read_done"]


def row_key(row: dict) -> tuple[str, str, str]:
    """The identity of a row: (scene_id, track, setting)."""
    return (str(row["scene_id"]), str(row["track"]), str(row["setting"]))


def _jsonable(value):
    """Turn numpy / torch scalars and NaN into plain JSON values."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a truncated last line (killed mid-write) is ignored."""
    rows: list[dict] = []
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


def read_done(path: Path) -> set[tuple[str, str, str]]:
    """Keys of the ``ok`` rows of a JSONL file (failed rows are retried on rerun)."""
    return {row_key(r) for r in read_rows(path) if r.get("status", "ok") == "ok"}


class ResultsStore:
    """One JSONL file of rows (``rows.jsonl``, or ``rows.rank{r}.jsonl`` per shard)."""

    def __init__(self, out_dir: Path, *, rank: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = "rows.jsonl" if rank is None else f"rows.rank{rank}.jsonl"
        self.path = self.out_dir / name

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def done(self) -> set[tuple[str, str, str]]:
        """Keys of rows already finished (failed rows are retried on rerun)."""
        return read_done(self.path)

    def append(self, row: dict) -> None:
        line = json.dumps(_jsonable(row), sort_keys=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.append(row)

    @staticmethod
    def merge(out_dir: Path, parts: Iterable[Path]) -> Path:
        """Merge shard files into ``rows.jsonl`` (last row of a key wins, but a
        failed row never replaces an ``ok`` one)."""
        out_dir = Path(out_dir)
        merged: dict[tuple[str, str, str], dict] = {}
        for p in [out_dir / "rows.jsonl", *parts]:
            for r in read_rows(p):
                key = row_key(r)
                prev = merged.get(key)
                if r.get("status", "ok") == "ok" or prev is None or prev.get("status") != "ok":
                    merged[key] = r
        target = out_dir / "rows.jsonl"
        tmp = target.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for r in merged.values():
                f.write(json.dumps(r, sort_keys=True) + "\n")
        tmp.replace(target)
        return target
