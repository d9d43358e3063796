"""Errors raised while reading dataset files."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A malformed line in a data file; the message always starts with ``<file>:<line>:``.

    ``file`` is the file's name (e.g. ``ratings.dat``) and ``line`` the 1-based line number in the
    (decompressed) text, so ``str(err)`` reads like
    ``ratings.dat:17: expected 4 fields 'user::movie::rating::timestamp', got 3``.
    """

    def __init__(self, file: str | Path, line: int, problem: str) -> None:
        self.file = Path(file).name
        self.line = line
        self.problem = problem
        super().__init__(f"{self.file}:{line}: {problem}")
