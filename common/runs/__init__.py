"""The run frame every batch script uses: tracks over units, resumable, sharded, summarised.

* :mod:`common.runs.tracks`: the track contract (:class:`Track`, :class:`Setting`,
  :class:`TrackContext`, :class:`TrackRegistry`, options dataclasses from flags);
* :mod:`common.runs.runner`: :func:`run`, :class:`RunConfig`, :class:`RunSummary`;
* :mod:`common.runs.results`: the JSONL rows (torn-tail repair, failure records, shard merge);
* :mod:`common.runs.summary`: summary, Markdown table, plots.

See :func:`common.runs.runner.run` for an example.
"""

from .results import ResultsStore, read_rows, repair_tail, row_key
from .runner import (
    RunConfig,
    RunError,
    RunSummary,
    check_device,
    check_out_dir,
    cli_exit,
    dist_info,
    run,
)
from .summary import axis_label, markdown_table, summarize_rows, write_plots
from .tracks import (
    FULL,
    NoOptions,
    Progress,
    Setting,
    Track,
    TrackContext,
    TrackRegistry,
    add_options,
    option,
    options_from_args,
)

__all__ = [
    "FULL",
    "NoOptions",
    "Progress",
    "ResultsStore",
    "RunConfig",
    "RunError",
    "RunSummary",
    "Setting",
    "Track",
    "TrackContext",
    "TrackRegistry",
    "add_options",
    "axis_label",
    "check_device",
    "check_out_dir",
    "cli_exit",
    "dist_info",
    "markdown_table",
    "option",
    "options_from_args",
    "read_rows",
    "repair_tail",
    "row_key",
    "run",
    "summarize_rows",
    "write_plots",
]
