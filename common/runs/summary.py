"""Summaries of result rows: a JSON-ready summary, a Markdown table, PNG plots.

Rows carry ``track``, ``setting``, ``method``, ``series`` (the plot line a
setting belongs to: the settings of one sweep share it, nothing else does),
``kept_ratio`` and any numeric measurements.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from .results import is_ok

__all__ = [
    "axis_label",
    "markdown_table",
    "plot_lines",
    "summarize_rows",
    "unresolved_failures",
    "write_plots",
]

# Row fields that identify a row rather than measure something.
_ID_FIELDS = {"track", "setting", "method", "series", "status", "error", "accuracy_valid"}

# unit suffix of a field name -> words
_UNITS = {
    "s": "s",
    "ms": "ms",
    "mb": "MB",
    "gb": "GB",
    "deg": "degrees",
    "m": "m",
    "pct": "%",
}


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def axis_label(name: str, labels: Mapping[str, str] | None = None) -> str:
    """Words and units for a field: ``labels[name]``, else ``peak_mem_mb`` -> ``peak mem (MB)``."""
    if labels and name in labels:
        return labels[name]
    m = re.fullmatch(r"(.+?)_(" + "|".join(_UNITS) + r")", name)
    if m:
        return f"{m.group(1).replace('_', ' ')} ({_UNITS[m.group(2)]})"
    return name.replace("_", " ")


def unresolved_failures(rows: list[dict], unit_field: str = "scene_id") -> dict[str, set[str]]:
    """Track -> unit ids with a failure that no ``ok`` row has made up for.

    A failure record lists the ``settings`` it left without a result; it is
    resolved once each of them has an ``ok`` row for its (unit, track) (a
    partly failed unit stays failed). A record without ``settings`` (older
    files) is resolved by any ``ok`` row of its (unit, track).
    """
    ok: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if is_ok(r):
            ok[(str(r[unit_field]), str(r["track"]))].add(str(r["setting"]))
    failed: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if is_ok(r):
            continue
        pair = (str(r[unit_field]), str(r["track"]))
        settings = r.get("settings")
        if settings is None:
            missing = not ok.get(pair)
        else:
            missing = any(str(s) not in ok.get(pair, ()) for s in settings)
        if missing:
            failed[pair[1]].add(pair[0])
    return dict(failed)


def summarize_rows(
    rows: list[dict], *, unit_field: str = "scene_id", count_field: str = "num_scenes"
) -> list[dict]:
    """Mean of every numeric field per (track, setting) over the units that succeeded.

    Returns one dict per (track, setting), sorted by track, the setting
    ``full`` first, then kept ratio (descending), with ``count_field`` (units
    averaged), ``num_failed`` (units of the track with an unresolved failure)
    and ``accuracy_valid`` (true only if every contributing row says so).
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if is_ok(r):
            groups[(str(r["track"]), str(r["setting"]))].append(r)
    failed = unresolved_failures(rows, unit_field)
    out = []
    for (track, setting), members in groups.items():
        sums: dict[str, list[float]] = defaultdict(list)
        for r in members:
            for k, v in r.items():
                if k not in _ID_FIELDS and k != unit_field and _numeric(v):
                    sums[k].append(float(v))
        entry = {
            "track": track,
            "setting": setting,
            "method": members[0].get("method", setting),
            "series": members[0].get("series", setting),
            count_field: len({r[unit_field] for r in members}),
            "num_failed": len(failed.get(track, ())),
            "accuracy_valid": all(bool(r.get("accuracy_valid", False)) for r in members),
        }
        entry.update({k: sum(v) / len(v) for k, v in sorted(sums.items())})
        out.append(entry)
    out.sort(
        key=lambda e: (e["track"], e["setting"] != "full", -e.get("kept_ratio", 1.0), e["setting"])
    )
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def _empty(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and not math.isfinite(value))


def markdown_table(
    summary: list[dict],
    *,
    columns: Mapping[str, list[str]] | None = None,
    notes: Mapping[str, list[str]] | None = None,
    empty_reasons: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """One Markdown table per track.

    Args:
        summary: entries of :func:`summarize_rows`.
        columns: the columns per track (default: every field but ``track``,
            ``series`` and ``num_failed``).
        notes: lines printed under a track's table (caps, baselines...).
        empty_reasons: per track, why a column may be empty; a column empty
            in every row is left out and listed under the table with its reason.
    """
    by_track: dict[str, list[dict]] = defaultdict(list)
    for e in summary:
        by_track[e["track"]].append(e)
    parts = []
    for track, entries in by_track.items():
        if columns and track in columns:
            cols = list(columns[track])
        else:
            seen: dict[str, None] = {}
            for e in entries:
                for k in e:
                    if k not in ("track", "series", "num_failed"):
                        seen.setdefault(k, None)
            cols = list(seen)
        empty = [c for c in cols if all(_empty(e.get(c)) for e in entries)]
        cols = [c for c in cols if c not in empty]
        parts.append(f"### {track}\n")
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + "|".join("---" for _ in cols) + "|")
        for e in entries:
            parts.append(
                "| " + " | ".join("" if _empty(e.get(c)) else _fmt(e.get(c)) for c in cols) + " |"
            )
        parts.append("")
        reasons = (empty_reasons or {}).get(track, {})
        if empty:
            said = [f"{c} ({reasons[c]})" if c in reasons else c for c in empty]
            parts.append(f"Not shown, empty in every row: {'; '.join(said)}.")
        blank = sorted(
            {
                c
                for c in cols
                if c in reasons and any(_empty(e.get(c)) for e in entries) and c not in empty
            }
        )
        for c in blank:
            parts.append(f"Empty cells of {c}: {reasons[c]}.")
        if not all(e["accuracy_valid"] for e in entries):
            parts.append(
                "Accuracy columns of this track come from random weights: they measure "
                "agreement and cost only, not task accuracy."
            )
        for line in (notes or {}).get(track, []):
            parts.append(line)
        parts.append("")
    return "\n".join(parts)


def write_plots(
    summary: list[dict],
    out_dir: Path,
    *,
    metrics: Mapping[str, list[str]] | None = None,
    labels: Mapping[str, Mapping[str, str]] | None = None,
    skip: tuple[str, ...] = ("kept_ratio", "num_failed"),
) -> list[Path]:
    """One PNG per (track, metric): the metric against the kept ratio, a line per series.

    Settings of one sweep (same ``series``) make one line; every other
    setting is its own line (a single point when it is a single setting).
    Axis labels come from ``labels[track]`` (words and units), else from
    :func:`axis_label`.

    Args:
        metrics: the metrics to plot per track (default: every numeric one).
        labels: per track, field -> axis label (``kept_ratio`` included).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_track: dict[str, list[dict]] = defaultdict(list)
    for e in summary:
        if _numeric(e.get("kept_ratio")):
            by_track[e["track"]].append(e)
    for track, entries in by_track.items():
        names = (labels or {}).get(track, {})
        numeric = {k for e in entries for k, v in e.items() if _numeric(v)}
        wanted = metrics.get(track) if metrics and track in metrics else sorted(numeric)
        for metric in [
            m for m in wanted if m in numeric and m not in skip and not m.startswith("num_")
        ]:
            fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
            for series, pts in plot_lines(entries, metric).items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=series)
            ax.set_xlabel(axis_label("kept_ratio", names), fontsize=8)
            ax.set_ylabel(axis_label(metric, names), fontsize=8)
            ax.set_title(f"{track}: {axis_label(metric, names)}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{track}_{_file_safe(metric)}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def plot_lines(entries: list[dict], metric: str) -> dict[str, list[tuple[float, float]]]:
    """Series -> ``(kept_ratio, metric)`` points sorted by kept ratio: the lines of a plot.

    Entries share a line only when they share ``series`` (one sweep).
    """
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in entries:
        if _numeric(e.get(metric)) and _numeric(e.get("kept_ratio")):
            lines[str(e.get("series") or e["setting"])].append((e["kept_ratio"], e[metric]))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
