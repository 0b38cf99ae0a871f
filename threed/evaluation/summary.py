"""Summaries of result rows: a JSON summary, a Markdown table, PNG plots."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

__all__ = ["summarize_rows", "markdown_table", "write_plots", "unresolved_failures"]

# Row fields that identify a row rather than measure something.
_ID_FIELDS = {"scene_id", "track", "setting", "method", "status", "error", "accuracy_valid"}


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def unresolved_failures(rows: list[dict]) -> dict[str, set[str]]:
    """Track -> scene ids with a failure that no ``ok`` row has made up for.

    A failed row lists the ``settings`` it left without a result; it is
    resolved once each of them has an ``ok`` row for its (scene, track) (a
    partly failed scene stays failed). A failed row without ``settings``
    (older files) is resolved by any ``ok`` row of its (scene, track).
    """
    ok: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r.get("status", "ok") == "ok":
            ok[(str(r["scene_id"]), str(r["track"]))].add(str(r["setting"]))
    failed: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("status", "ok") == "ok":
            continue
        pair = (str(r["scene_id"]), str(r["track"]))
        settings = r.get("settings")
        if settings is None:
            missing = not ok.get(pair)
        else:
            missing = any(str(s) not in ok.get(pair, ()) for s in settings)
        if missing:
            failed[pair[1]].add(pair[0])
    return dict(failed)


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Mean of every numeric field per (track, setting) over the scenes that succeeded.

    Returns one dict per (track, setting), sorted by track then kept ratio
    (descending), with ``num_scenes``, ``num_failed`` and ``accuracy_valid``
    (true only if every contributing row had real-weight accuracy).
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status", "ok") == "ok":
            groups[(str(r["track"]), str(r["setting"]))].append(r)
    failed = unresolved_failures(rows)  # a later rerun may have made up for a failure
    out = []
    for (track, setting), members in groups.items():
        sums: dict[str, list[float]] = defaultdict(list)
        for r in members:
            for k, v in r.items():
                if k not in _ID_FIELDS and _numeric(v):
                    sums[k].append(float(v))
        entry = {
            "track": track,
            "setting": setting,
            "method": members[0].get("method", setting),
            "num_scenes": len({r["scene_id"] for r in members}),
            "num_failed": len(failed.get(track, ())),
            "accuracy_valid": all(bool(r.get("accuracy_valid", False)) for r in members),
        }
        entry.update({k: sum(v) / len(v) for k, v in sorted(sums.items())})
        out.append(entry)
    # the unpruned setting first, then by kept ratio (descending)
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


def markdown_table(summary: list[dict], *, columns: dict[str, list[str]] | None = None) -> str:
    """One Markdown table per track (columns: every numeric field, or ``columns[track]``)."""
    by_track: dict[str, list[dict]] = defaultdict(list)
    for e in summary:
        by_track[e["track"]].append(e)
    parts = []
    for track, entries in by_track.items():
        if columns and track in columns:
            cols = columns[track]
        else:
            seen: dict[str, None] = {}
            for e in entries:
                for k in e:
                    if k not in ("track", "num_failed"):
                        seen.setdefault(k, None)
            cols = list(seen)
        parts.append(f"### {track}\n")
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + "|".join("---" for _ in cols) + "|")
        for e in entries:
            parts.append("| " + " | ".join(_fmt(e.get(c, "")) for c in cols) + " |")
        if not all(e["accuracy_valid"] for e in entries):
            parts.append(
                "\nAccuracy columns of this track come from random weights: they measure "
                "agreement and cost only, not task accuracy."
            )
        parts.append("")
    return "\n".join(parts)


def write_plots(
    summary: list[dict], out_dir: Path, *, metrics: dict[str, list[str]] | None = None
) -> list[Path]:
    """One PNG per (track, metric): the metric against the kept ratio, a line per method.

    ``metrics`` names the metrics to plot per track (default: every numeric one).
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
        numeric = {k for e in entries for k, v in e.items() if _numeric(v)}
        wanted = metrics.get(track) if metrics and track in metrics else sorted(numeric)
        skip = {"kept_ratio", "num_scenes", "num_failed"}
        for metric in [m for m in wanted if m in numeric and m not in skip]:
            fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
            methods: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for e in entries:
                if _numeric(e.get(metric)):
                    methods[str(e["method"])].append((e["kept_ratio"], e[metric]))
            for method, pts in sorted(methods.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xlabel("kept ratio")
            ax.set_ylabel(metric)
            ax.set_title(f"{track}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{track}_{metric}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written
