"""The subset of gin-config that training configs use: `scope.name = value` lines with Python literals."""

from __future__ import annotations

import ast
from pathlib import Path

from grinfer.importers import CheckpointImportError


def read_gin(path: str | Path) -> dict[str, object]:
    """{"scope.name": value} of a gin file's bindings (comments and blank lines skipped, literals parsed)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CheckpointImportError(f"--gin {path}: {exc.strerror or exc}") from None
    out: dict[str, object] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith(("import ", "include ")):
            continue
        key, eq, value = (part.strip() for part in line.partition("="))
        if not eq or not key:
            raise CheckpointImportError(f"--gin {path}: line {number} is not 'name = value': {raw.strip()!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a gin reference (@name) or another form the importer does not read
    return out
