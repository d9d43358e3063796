"""Run the real `grinfer` command in a subprocess (its own interpreter, environment and exit code)."""

from __future__ import annotations

import os
import subprocess
import sys


def grinfer(*args: str, env: dict[str, str] | None = None, home=None, timeout: float = 120):
    """`python -m grinfer.cli ARGS` with GRINFER_* cleared (then `env` added, GRINFER_HOME=home if given)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
    if home is not None:
        clean["GRINFER_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "grinfer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **(env or {})})


def one_error_line(proc) -> str:
    """The single `error:` line of a failed run (asserting exit code 2, one line and no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "errors.pydantic.dev" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]
