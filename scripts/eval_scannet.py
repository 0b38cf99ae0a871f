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
import os
import sys
from pathlib import Path

# OpenMP reads this once, when torch loads it: idle threads sleep instead of spinning
# (see common/cli.py for the measurements); a value the user set wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common.cli import add_threads_argument, configure_threads, setup_logging  # noqa: E402
from common.runs import (  # noqa: E402
    RunConfig,
    RunSummary,
    check_device,
    check_out_dir,
    cli_exit,
    run,
)
from threed.evaluation import TRACKS, DataPaths, resolve_scenes, scene_loader  # noqa: E402


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
    run_group = p.add_argument_group("run")
    run_group.add_argument(
        "--tracks",
        default=",".join(tracks),
        help=f"comma-separated tracks (available here: {','.join(tracks) or 'none'})",
    )
    run_group.add_argument(
        "--ratios",
        type=parse_ratios,
        default=[1.0, 0.5, 0.25, 0.1],
        help="kept ratios to sweep (default: 1.0,0.5,0.25,0.1)",
    )
    run_group.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)"
    )
    run_group.add_argument("--seed", type=int, default=0)
    add_threads_argument(run_group)
    run_group.add_argument("--out", type=Path, default=Path("results/eval_scannet"))
    run_group.add_argument(
        "--no-visuals", action="store_true", help="skip the pictures of what was kept"
    )
    run_group.add_argument("-v", "--verbose", action="store_true")
    for cls in tracks.values():
        cls.add_arguments(p.add_argument_group(f"track {cls.name}"))
    return p


def _data(args) -> DataPaths:
    if args.scannet_root is None:
        from threed.scannet import ensure_synthetic

        print(f"no --scannet-root: using generated scenes in {args.synthetic_root}")
        syn = ensure_synthetic(
            root=args.synthetic_root, num_scenes=args.num_synthetic_scenes, seed=args.seed
        )
        return DataPaths(
            syn.scannet_root,
            syn.posed_images_root,
            syn.scanrefer_path,
            syn.scanqa_path,
            list(syn.scene_ids),
            synthetic=True,
        )
    if not args.scannet_root.is_dir():
        raise ValueError(f"--scannet-root {args.scannet_root} is not a folder")
    return DataPaths(args.scannet_root, args.posed_images_root, args.scanrefer, args.scanqa)


def main(argv: list[str] | None = None) -> int:
    tracks = TRACKS.available()
    args = build_parser(tracks).parse_args(argv)
    setup_logging(args.verbose)

    def start() -> RunSummary | None:
        configure_threads(args.threads)
        names = [t.strip() for t in args.tracks.split(",") if t.strip()]
        config = RunConfig(
            out=args.out,
            tracks=names,
            device=args.device,
            seed=args.seed,
            visualize=not args.no_visuals,
            unit_name="scene",
            ratios=tuple(args.ratios),
        )
        options = {n: cls.options_from_args(args) for n, cls in tracks.items() if n in names}
        check_out_dir(args.out)  # before generating data, not after the first scene
        check_device(args.device)
        data = _data(args)
        return run(
            config,
            units=resolve_scenes(args.scenes, data),
            load_unit=scene_loader(data),
            registry=TRACKS,
            options=options,
            data=data,
        )

    return cli_exit(start)


if __name__ == "__main__":
    sys.exit(main())
