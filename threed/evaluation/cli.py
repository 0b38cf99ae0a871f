"""What the command lines share: quiet, readable logging."""

from __future__ import annotations

import logging
import warnings


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
