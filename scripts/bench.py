#!/usr/bin/env python
"""Benchmarks: every area's side-by-side ratios in one run -> bench/results.json.

    python scripts/bench.py                 # all areas
    python scripts/bench.py --only engine,vggt --quick

Each area lives in ``benchmarks/<area>.py`` and returns rows measured side by
side (pruned / full on the same model and inputs, interleaved), so a ratio is
meaningful even on a busy machine; absolute seconds are not.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

# benchmarks/ is not installed (pyproject: packages.find): this script finds it, and the
# packages, in its own checkout
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.cli import setup_logging  # noqa: E402

AREAS = ["primitives", "engine", "vggt", "tsp3d", "video", "adagate"]


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import os

        info["cpu_count"] = os.cpu_count()
    except Exception:
        pass
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "median_s" in v:
        return f"{v['median_s'] * 1e3:.1f} ms"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", help=f"comma-separated areas (default: {','.join(AREAS)})")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = p.parse_args(argv)
    setup_logging()
    areas = [a.strip() for a in args.only.split(",") if a.strip()] if args.only else AREAS
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        p.error(f"--only: unknown areas {unknown}; choose from {AREAS}")

    results = {"machine": machine(), "quick": args.quick, "areas": {}}
    for area in areas:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{area}")
            rows = module.run(quick=args.quick)
            status = "ok"
        except Exception as e:
            traceback.print_exc()
            rows, status = [], f"failed: {type(e).__name__}: {e}"
        results["areas"][area] = {
            "status": status,
            "wall_s": time.perf_counter() - t0,
            "rows": rows,
        }
        print(f"\n## {area} ({status}, {time.perf_counter() - t0:.0f} s)")
        for row in rows:
            figures = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "name")
            print(f"- {row.get('name')}: {figures}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0 if all(a["status"] == "ok" for a in results["areas"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
