"""Importing Triton kernel modules under Triton's interpreter, for tests that run kernels on the CPU.

The interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET=1 is set while the module
is imported (re-imported if it was imported without it) and restored after; tests also set it while
they run (the interpreter reads it then). Without Triton, importing fails unless GRINFER_SKIP_TRITON=1
asks to skip the calling test module.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest


def interpreted_module(name: str) -> ModuleType:
    """The module `name` with its Triton kernels interpreted (skips the caller's module without Triton
    when GRINFER_SKIP_TRITON=1)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for loaded in [m for n, m in sys.modules.items() if n.startswith("grinfer.ops.triton.")]:
            if not _interpreted(loaded):  # imported earlier without the interpreter: decorate the kernels again,
                importlib.reload(loaded)  # helpers first (kernels call the jitted helpers of their globals)
        module = importlib.import_module(name)
        if not _interpreted(module):
            module = importlib.reload(module)
        return module
    except ModuleNotFoundError as exc:
        if exc.name != "triton":
            raise
        if os.environ.get("GRINFER_SKIP_TRITON") == "1":
            pytest.skip("triton is not installed (skipped because GRINFER_SKIP_TRITON=1)", allow_module_level=True)
        raise ImportError("these tests need triton: pip install 'triton>=3.2,<4' (the 'test' extra), "
                          "or set GRINFER_SKIP_TRITON=1 to skip them") from exc
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _interpreted(module: ModuleType) -> bool:
    kinds = {type(v).__name__ for v in vars(module).values()} & {"JITFunction", "InterpretedFunction"}
    return kinds <= {"InterpretedFunction"}
