"""Rounding to a storage dtype inside Triton kernels, identical on the GPU and in Triton's interpreter."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, BF16_BITS: tl.constexpr):
    """fp32 x rounded to `dtype`, to nearest even. BF16_BITS (the interpreter, a bf16 target): kept in fp32
    holding the bf16 value, rounded by bit arithmetic, since the interpreter's fp32 -> bf16 cast truncates
    where the GPU rounds."""
    if BF16_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(dtype)
    return y
