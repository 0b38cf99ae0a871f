"""The one error type of the ScanNet readers."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ScanNetDataError"]


class ScanNetDataError(ValueError):
    """A ScanNet file is missing or malformed.

    The message names the file and what was expected; ``path`` holds the file
    (or folder) as a :class:`~pathlib.Path` (``None`` when not about one file).
    """

    def __init__(self, path: str | Path | None, expected: str) -> None:
        self.path = None if path is None else Path(path)
        self.expected = expected
        where = "" if path is None else f"{self.path}: "
        super().__init__(f"{where}{expected}")
