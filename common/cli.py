"""What the command lines share: quiet, readable logging and a thread count that
holds up on a busy machine.

Threads. torch's default is one intra-op thread per core, and its OpenMP
threads spin while they wait for each other. When other processes compete
for the cores, a spinning thread burns the time slice its partner needs and
a run collapses. Measured on the 2-core development machine, already busy
with 8-10 runnable processes of other users, on a cut-down ``make eval``
(one generated scene, vggt at 4 frames + grounding with one expression,
``--ratios 1.0``; time for the 6 rows, excluding start-up and plots):

=============================  =====================  =======================
setting                        background load only   + 2 ``while True: pass``
=============================  =====================  =======================
2 threads, OpenMP default      5 of 6 rows in 154 s   0 rows in 240 s
2 threads, OMP_WAIT_POLICY=    12 s                   60 s
PASSIVE
1 thread                       15 s                   59 s
=============================  =====================  =======================

So the scripts default to one thread (:data:`DEFAULT_THREADS`; ``--threads``
to change it) and ``scripts/eval_scannet.py``, ``scripts/train_grounding.py`` and
``scripts/video_qa.py`` set ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (unless
the user set it), so ``--threads N`` does not spin either. An idle machine was
not available to measure what one thread costs there; on an idle many-core machine
``--threads 0`` (one per core) is the faster choice.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["setup_logging", "add_threads_argument", "configure_threads", "DEFAULT_THREADS"]

DEFAULT_THREADS = 1
"""Intra-op threads of the scripts unless ``--threads`` says otherwise."""


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (``verbose``) or WARNING, and silence known third-party noise.

    spconv 2.3.6 uses torch's deprecated ``torch.cuda.amp.custom_fwd/bwd`` (a
    FutureWarning per decorator at import) and calls ``is_fx_tracing`` (a torch
    warning per call); neither says anything about the user's run.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_", category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def add_threads_argument(parser: Any) -> None:
    """The scripts' ``--threads N`` flag (``None`` unless given: :data:`DEFAULT_THREADS`);
    pass its value to :func:`configure_threads`. ``parser``: an argparse parser or group."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"intra-op CPU threads (default: {DEFAULT_THREADS}, which holds up on a busy "
        "machine; 0 = torch's choice, one per core)",
    )


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count for a script; returns the count in effect.

    ``threads``: a count >= 1, ``0`` for torch's own choice (one per core), or
    ``None`` for :data:`DEFAULT_THREADS`.
    """
    import torch

    if threads is None:
        threads = DEFAULT_THREADS
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = torch's default), got {threads!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
