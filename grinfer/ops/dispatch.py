"""What every op dispatcher shares: the kernel names and whether Triton can run at all."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

KERNELS = ("auto", "reference", "triton")


@cache
def triton_available() -> bool:
    """Whether Triton can be imported (looked up once)."""
    return importlib.util.find_spec("triton") is not None


def check_kernel(kernel: str) -> None:
    """Raise ValueError unless `kernel` is one of KERNELS; ImportError for 'triton' without Triton."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if kernel == "triton" and not triton_available():
        raise ImportError("kernel='triton' needs the triton package (pip install 'triton>=3.2,<4')")


def auto_picks_triton(*tensors: torch.Tensor) -> bool:
    """kernel='auto': Triton for CUDA tensors when Triton is importable and no gradient is needed."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return tensors[0].is_cuda and not needs_grad and triton_available()
