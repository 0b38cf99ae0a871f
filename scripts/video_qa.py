#!/usr/bin/env python
"""Multiple-choice video QA over a manifest, with token pruning methods side by side.

    python scripts/video_qa.py        # synthetic videos + tiny random model + HoliTom + 2 baselines
    python scripts/video_qa.py --manifest videomme.parquet --video-root DATA/videos \
        --model /models/llava-onevision-qwen2-7b-ov-hf --frames 32 --device cuda \
        --method holitom --retain-ratio 0.1,0.25 --method fastv --keep-ratio 0.25
    torchrun --nproc-per-node 4 scripts/video_qa.py ...   # samples sharded, rank 0 merges
    accelerate launch --multi_gpu --num_processes 4 scripts/video_qa.py ...   # the same

(accelerate 1.15 was checked with 2 CPU processes this way; ``accelerate launch
--cpu`` starts a single process.)

Each ``--method NAME`` is followed by that method's parameters as flags
(``--retain-ratio 0.1,0.25``: comma lists sweep). Rows go to OUT/rows.jsonl
(a rerun resumes), the summary to OUT/summary.{json,md}, plots to OUT/plots/.
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
from common.runs import (
    RunConfig,
    RunSummary,
    TrackContext,
    TrackRegistry,
    check_device,
    check_out_dir,
    cli_exit,
    dist_info,
    run,
)
from video.qa import (
    ManifestError,
    VideoQAData,
    VideoQAOptions,
    VideoQATrack,
    check_model,
    default_settings,
    read_manifest,
    rows_left,
    split_method_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data (default: the generated synthetic set)")
    data.add_argument("--manifest", type=Path, help="JSONL / JSON / CSV / parquet annotations")
    data.add_argument("--video-root", type=Path, help="folder relative video paths start from")
    data.add_argument("--answers", type=Path, help="separate answers file (EgoSchema)")
    data.add_argument("--limit", type=int, help="first N samples only")
    data.add_argument("--synthetic-root", type=Path, default=Path(".cache/synthetic_video_qa"))
    data.add_argument("--synthetic-videos", type=int, default=6, help="videos (3 questions each)")
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default="tiny-random-llava-onevision",
        help="local Hugging Face folder, or tiny-random-llava-onevision / tiny-random-qwen2-vl",
    )
    model.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    model.add_argument("--attn-implementation", help="sdpa, eager, flash_attention_2")
    model.add_argument("--random-weights", action="store_true", help="say accuracy is meaningless")
    model.add_argument("--frames", type=int, default=16, help="frames per video (uniform)")
    model.add_argument("--fps", type=float, help="sample at this rate instead of --frames")
    model.add_argument("--max-frames", type=int, help="cap on --fps sampling")
    model.add_argument("--batch-size", type=int, default=1)
    model.add_argument("--max-new-tokens", type=int, default=8)
    run_group = p.add_argument_group("run")
    run_group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run_group.add_argument("--seed", type=int, default=0)
    add_threads_argument(run_group)
    run_group.add_argument("--out", type=Path, default=Path("results/video_qa"))
    run_group.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--method",
        metavar="NAME",
        help="a registered method, followed by its parameters as flags; repeat for more",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        rest, specs = split_method_args(argv, parser)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    setup_logging(args.verbose)

    def start() -> RunSummary | None:
        configure_threads(args.threads)
        check_out_dir(args.out)
        rank, world, local_rank = dist_info()
        device = check_device(args.device, local_rank, world)
        check_model(args.model)
        tiny = args.model.startswith("tiny-random-")
        settings = tuple(specs) if specs else tuple(default_settings(tiny))
        options = VideoQAOptions(
            model=args.model,
            settings=settings,
            frames=None if args.fps else args.frames,
            fps=args.fps,
            max_frames=args.max_frames,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            random_weights=tiny or args.random_weights,
        )
        track = VideoQATrack(options, TrackContext(device=device, seed=args.seed))
        labels = [s.label for s in track.settings()]  # bad methods / parameters fail here
        if args.manifest is None:
            from video.synthetic import ensure_synthetic_video_qa

            syn = ensure_synthetic_video_qa(
                args.synthetic_root, num_videos=args.synthetic_videos, seed=args.seed
            )
            manifest, video_root = syn.manifest, syn.root
        else:
            manifest, video_root = args.manifest, args.video_root
        samples = read_manifest(
            manifest, video_root=video_root, answers=args.answers, limit=args.limit
        )
        ids = [s.id for s in samples]
        if rows_left(args.out, ids, labels):  # a finished run reruns without loading the model
            track.check_settings()  # settings the model cannot take fail before any work
        data = VideoQAData({s.id: s for s in samples}, ids[rank::world])
        return run(
            RunConfig(
                out=args.out,
                tracks=[VideoQATrack.name],
                device=args.device,
                seed=args.seed,
                visualize=False,
                unit_name="sample",
                name="video_qa",
            ),
            units=ids,
            load_unit=data.samples.__getitem__,
            registry=TrackRegistry({VideoQATrack.name: VideoQATrack}),
            options={VideoQATrack.name: options},
            data=data,
        )

    return cli_exit(start, usage_errors=(ValueError, ManifestError))


if __name__ == "__main__":
    sys.exit(main())
