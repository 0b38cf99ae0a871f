"""What the command lines share: quiet, readable logging and a thread count that
holds up on a busy machine."""

from __future__ import annotations

import logging
import warnings

__all__ = ["setup_logging", "configure_threads", "DEFAULT_THREADS"]

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
