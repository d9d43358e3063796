"""Row formats of an embedding table: how rows are stored and how they are read back as floats.

fp32 / fp16 / bf16 store the rows as they are. int8 and int4 are row-wise affine, as FBGEMM's
fused rows: each row keeps a scale and a bias (fp32 for int8, fp16 for int4) and its values as unsigned
codes, value = code * scale + bias; int4 packs two codes per byte (dim must be even). The worst-case
round-trip error of a row is half a step, scale / 2 = (max - min) / (2 * levels), plus the rounding of the
stored scale and bias (`max_abs_error`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

RowFormat = Literal["fp32", "fp16", "bf16", "int8", "int4"]
ROW_FORMATS: tuple[str, ...] = get_args(RowFormat)
FLOAT_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LEVELS = {"int8": 255, "int4": 15}  # the largest code
PARAM_DTYPES = {"int8": torch.float32, "int4": torch.float16}  # scale and bias of the quantised formats


def check_format(fmt: str, dim: int) -> RowFormat:
    """`fmt` as a RowFormat, or a ValueError naming the field."""
    if fmt not in ROW_FORMATS:
        raise ValueError(f"format: unknown row format {fmt!r}; choose one of {', '.join(ROW_FORMATS)}")
    if fmt == "int4" and dim % 2:
        raise ValueError(f"format: int4 packs two values per byte and needs an even row width, got {dim}")
    return fmt  # type: ignore[return-value]


def part_names(fmt: str) -> tuple[str, ...]:
    """The stored tensors of a table in this format (suffixes of its checkpoint names)."""
    return ("weight",) if fmt in FLOAT_STORAGE else ("data", "scale", "bias")


def bytes_per_row(fmt: str, dim: int) -> int:
    """Storage bytes of one row."""
    if fmt in FLOAT_STORAGE:
        return dim * FLOAT_STORAGE[fmt].itemsize
    codes = dim if fmt == "int8" else dim // 2
    return codes + 2 * PARAM_DTYPES[fmt].itemsize


def encode_rows(rows: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Float rows [n, dim] -> the stored parts of format `fmt` (see part_names)."""
    check_format(fmt, rows.shape[-1])
    if fmt in FLOAT_STORAGE:
        return {"weight": rows.to(FLOAT_STORAGE[fmt]).contiguous()}
    x = rows.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels, dtype = LEVELS[fmt], PARAM_DTYPES[fmt]
    # the stored scale and bias are the ones the codes are computed against, so decoding is exact to them
    bias = lo.to(dtype)
    scale = ((hi - bias.float()) / levels).clamp_min(_smallest(dtype)).to(dtype)
    codes = ((x - bias.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    if fmt == "int4":
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"data": codes.contiguous(), "scale": scale.reshape(-1), "bias": bias.reshape(-1)}


def decode_rows(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """Stored parts (of any number of rows) -> float32 rows [n, dim]."""
    if fmt in FLOAT_STORAGE:
        return parts["weight"].float()
    codes = parts["data"]
    if fmt == "int4":
        codes = torch.stack([codes & 0xF, codes >> 4], -1).reshape(codes.shape[0], -1)
    return codes.float() * parts["scale"].float()[:, None] + parts["bias"].float()[:, None]


def row_dim(parts: dict[str, torch.Tensor], fmt: str) -> int:
    """The row width of a table stored in these parts."""
    width = (parts["weight"] if fmt in FLOAT_STORAGE else parts["data"]).shape[1]
    return width * 2 if fmt == "int4" else width


def max_abs_error(rows: torch.Tensor, fmt: str) -> torch.Tensor:
    """[n] the bound on each row's round-trip error in format `fmt` (0 for fp32)."""
    x = rows.float()
    if fmt == "fp32":
        return torch.zeros(len(x))
    if fmt in FLOAT_STORAGE:
        eps = torch.finfo(FLOAT_STORAGE[fmt]).eps
        return x.abs().amax(-1) * eps
    levels, dtype = LEVELS[fmt], PARAM_DTYPES[fmt]
    span, eps = x.amax(-1) - x.amin(-1), torch.finfo(dtype).eps
    # half a step; the stored step's rounding (relative, or a subnormal's absolute) times the largest code; the bias's
    step_err = torch.maximum(span / levels * eps, torch.full_like(span, _smallest(dtype))) * levels
    return span / (2 * levels) + step_err + x.amin(-1).abs() * eps + 1e-7


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) value of a float dtype."""
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)
