#!/usr/bin/env python
"""Evaluate the 3D tracks on ScanNet, or on generated ScanNet-format scenes.

    python scripts/eval_scannet.py                       # embedded default, all tracks
    python scripts/eval_scannet.py --scannet-root DATA/scans \
        --posed-images-root DATA/posed_images --scenes scenes.txt \
        --tracks vggt --vggt-weights model.pt --ratios 1.0,0.5,0.25,0.1
    torchrun --nproc-per-node 4 scripts/eval_scannet.py ...   # shards scenes, rank 0 merges

Rows go to OUT/rows.jsonl (a rerun resumes), the summary to OUT/summary.{json,md},
plots to OUT/plots/, pictures of what was kept to OUT/visuals/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from threed.evaluation import EvalConfig, available_tracks, run_eval
from threed.evaluation.cli import setup_logging
from threed.evaluation.runner import DataPaths, resolve_scenes


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        msg = f"--ratios: expected numbers like 1.0,0.5, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from e
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise argparse.ArgumentTypeError(
            f"--ratios: each kept ratio must be in (0, 1], got {text!r}"
        )
    return ratios


def build_parser(tracks: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data (default: generated scenes)")
    data.add_argument("--scannet-root", type=Path, help="folder of raw sceneXXXX_YY/ folders")
    data.add_argument("--posed-images-root", type=Path, help="folder of the posed-images export")
    data.add_argument("--scanrefer", type=Path, help="ScanRefer JSON (grounding track)")
    data.add_argument("--scanqa", type=Path, help="ScanQA JSON")
    data.add_argument("--scenes", help="comma-separated scene ids, or a file with one id a line")
    data.add_argument(
        "--synthetic-root",
        type=Path,
        default=Path(".cache/synthetic_scannet"),
        help="where generated scenes are cached (default: %(default)s)",
    )
    data.add_argument("--num-synthetic-scenes", type=int, default=2)
    run = p.add_argument_group("run")
    run.add_argument(
        "--tracks",
        default=",".join(tracks),
        help=f"comma-separated tracks (available here: {','.join(tracks) or 'none'})",
    )
    run.add_argument(
        "--ratios",
        type=parse_ratios,
        default=[1.0, 0.5, 0.25, 0.1],
        help="kept ratios to sweep (default: 1.0,0.5,0.25,0.1)",
    )
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, default=Path("results/eval_scannet"))
    run.add_argument("--no-visuals", action="store_true", help="skip the pictures of what was kept")
    run.add_argument("-v", "--verbose", action="store_true")
    for cls in tracks.values():
        if hasattr(cls, "add_arguments"):
            cls.add_arguments(p.add_argument_group(f"track {cls.name}"))
    return p


def main(argv: list[str] | None = None) -> int:
    tracks = available_tracks()
    args = build_parser(tracks).parse_args(argv)
    setup_logging(args.verbose)
    torch.manual_seed(args.seed)

    if args.scannet_root is None:
        from threed.scannet import ensure_synthetic

        print(f"no --scannet-root: using generated scenes in {args.synthetic_root}")
        try:
            syn = ensure_synthetic(
                root=args.synthetic_root, num_scenes=args.num_synthetic_scenes, seed=args.seed
            )
        except ValueError as e:  # e.g. --num-synthetic-scenes out of range
            print(f"error: {e}", file=sys.stderr)
            return 2
        data = DataPaths(
            syn.scannet_root,
            syn.posed_images_root,
            syn.scanrefer_path,
            syn.scanqa_path,
            list(syn.scene_ids),
            synthetic=True,
        )
    else:
        if not args.scannet_root.is_dir():
            print(f"error: --scannet-root {args.scannet_root} is not a folder", file=sys.stderr)
            return 2
        data = DataPaths(args.scannet_root, args.posed_images_root, args.scanrefer, args.scanqa)

    names = [t.strip() for t in args.tracks.split(",") if t.strip()]
    config = EvalConfig(
        out=args.out,
        tracks=names,
        scenes=resolve_scenes(args.scenes, data),
        seed=args.seed,
        visualize=not args.no_visuals,
    )
    try:
        summary = run_eval(args, data, config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        print((args.out / "summary.md").read_text())
        print(f"results: {args.out}/ (rows.jsonl, summary.json, summary.md, plots/, visuals/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
