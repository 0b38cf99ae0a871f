"""Spatial contribution analysis: how many spatial tokens a 3D LMM barely uses.

AdaToken-3D's observation ("over 60% of spatial tokens contribute under 5%
to the prediction") measured per decoder layer: a spatial token's
contribution at layer ``l`` is the attention it receives from the text
queries after the span (head-averaged, averaged over those queries),
relative to the most-attended spatial token of the same sample and layer
(so 1.0 is the top token, and "under 5%" means under 1/20 of it). The
attention is recomputed from each layer's q/k inside one unpruned forward
(see :func:`threed.adagate.measure_spatial_flow`), never all layers' maps
at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SpatialContribution", "spatial_contribution"]

logger = logging.getLogger(__name__)


@dataclass
class SpatialContribution:
    """Per-layer share of low-contribution spatial tokens.

    Attributes:
        threshold: relative contribution below which a token counts as low.
        low_share: ``[L]`` share of spatial tokens below ``threshold`` (mean over samples).
        low_share_per_sample: ``[num_samples][L]``.
        mass_of_low: ``[L]`` share of the spatial attention mass those tokens hold.
        mean_low_share: mean of ``low_share`` over layers.
        num_samples: samples measured; num_spatial: mean spatial tokens per sample.
        plot: path of the PNG, when written.
    """

    threshold: float
    low_share: list[float]
    low_share_per_sample: list[list[float]]
    mass_of_low: list[float]
    mean_low_share: float
    num_samples: int
    num_spatial: float
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spatial_contribution(
    model: nn.Module,
    samples: Iterable[dict[str, Any]],
    *,
    threshold: float = 0.05,
    out: str | Path | None = None,
    query_chunk: int = 512,
) -> SpatialContribution:
    """Per layer, the share of spatial tokens contributing less than ``threshold``.

    Args:
        model: the unpruned model (Hugging Face decoder LM or LLaVA-3D).
        samples: as for calibration (forward inputs + ``spatial_spans``, or
            LLaVA-3D ``generate`` inputs).
        threshold: relative contribution in (0, 1) (the paper's 5%: 0.05).
        out: a folder: writes ``spatial_contribution.json`` and
            ``spatial_contribution.png`` there (matplotlib).
        query_chunk: query rows recomputed at once.
    """
    from threed.adagate.calibrate import measure_spatial_flow

    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    flow = measure_spatial_flow(model, samples, query_chunk=query_chunk, keep_received=True)
    per_sample: list[list[float]] = []
    mass_low = torch.zeros(flow.intra.numel(), dtype=torch.float64)
    for recv in flow.received:  # [L, S]
        r = recv.double()
        rel = r / r.max(dim=1, keepdim=True).values.clamp(min=1e-30)
        low = rel < threshold
        per_sample.append(low.double().mean(1).tolist())
        tot = r.sum(1).clamp(min=1e-30)
        mass_low += (r * low).sum(1) / tot
    n = max(len(per_sample), 1)
    low_share = torch.tensor(per_sample, dtype=torch.float64).mean(0) if per_sample else None
    result = SpatialContribution(
        threshold=float(threshold),
        low_share=[float(v) for v in low_share] if low_share is not None else [],
        low_share_per_sample=per_sample,
        mass_of_low=[float(v) for v in mass_low / n],
        mean_low_share=float(low_share.mean()) if low_share is not None else 0.0,
        num_samples=len(per_sample),
        num_spatial=flow.num_spatial,
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        result.plot = str(_plot(result, folder / "spatial_contribution.png"))
        (folder / "spatial_contribution.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _plot(res: SpatialContribution, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(res.low_share)))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for row in res.low_share_per_sample:
        ax.plot(layers, [100 * v for v in row], color="0.8", linewidth=0.8)
    ax.plot(layers, [100 * v for v in res.low_share], color="C0", linewidth=2, label="mean")
    ax.plot(
        layers,
        [100 * v for v in res.mass_of_low],
        color="C1",
        linestyle="--",
        label="their share of spatial attention",
    )
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("% of spatial tokens")
    ax.set_title(f"spatial tokens contributing < {100 * res.threshold:g}% of the top token")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
