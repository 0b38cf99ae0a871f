"""The frame of ``scripts/eval_scannet.py``: results store, tracks, summary, sharding."""

from .results import ResultsStore, row_key
from .runner import TRACKS, EvalConfig, available_tracks, run_eval
from .summary import markdown_table, summarize_rows, write_plots

__all__ = [
    "TRACKS",
    "EvalConfig",
    "ResultsStore",
    "available_tracks",
    "markdown_table",
    "row_key",
    "run_eval",
    "summarize_rows",
    "write_plots",
]
