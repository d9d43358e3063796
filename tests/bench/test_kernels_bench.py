"""`python -m grinfer.bench.kernels --smoke`: the kernel benchmark runs end to end in Triton's interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None and os.environ.get("GRINFER_SKIP_TRITON")
                                == "1", reason="triton is not installed (skipped because GRINFER_SKIP_TRITON=1)")


def test_smoke_run_writes_checked_rows(tmp_path):
    out = tmp_path / "kernels.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "grinfer.bench.kernels", "--smoke", "--batch", "1", "--cases", "warm",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| warm B=1 | triton" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    checked = [r for r in rows if r["impl"].startswith("triton") and r.get("rel") is not None]
    assert checked and all(r["finite"] and r["rel"] < 2e-2 for r in checked)
    assert {r["case"] for r in rows} == {"warm"}
