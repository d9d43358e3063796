"""The HSTU layer's pointwise epilogues around its two GEMMs (which stay on cuBLAS): Triton kernels.

    xn = GroupLN_in(x, group)                      group_layer_norm(x, group, w, b, add=b_o)
    h = xn W_uvqk^T + b                            (cuBLAS)
    h = SiLU(h); v, k -> KV cache                  silu_scatter_kv(h, d, slots, k_cache, v_cache)
    a = attention(q, k, v)                         (hstu_attention)
    y = GroupLN_attn(a, group) * u                 group_norm_mul(a, u, group, w, b)
    x = x + y W_o^T                                (cuBLAS; b_o folded into the next layer's
                                                    group_layer_norm through `add`)

The twins of `grinfer.ops.reference.layer_norm`, with the same signatures and in-place effects.
GroupLN is a LayerNorm without affine followed by the token group's row of a [G, d] weight and
bias; G = 1 is a plain LayerNorm with affine (group ids ignored, may be None). Group ids must lie
in [0, G): they are not checked (no host sync). Each kernel is one program per block of rows that
holds whole rows, the columns padded to a power of two and masked: fp32 statistics (two passes
over the row in registers, biased variance as F.layer_norm) and fp32 arithmetic, one rounding to
the output's dtype. Tensors bf16, fp16 or fp32 (each may differ), d up to MAX_DIM, rows of any
stride with unit column stride (column slices of a [T, 4d] tensor work).

In Triton's interpreter a fp32 -> bf16 cast truncates where the GPU rounds to nearest even: there
bf16 outputs are rounded by bit arithmetic first (`round_to`), so the interpreter's results are the
GPU's up to fp32 reassociation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grinfer.ops.triton.rounding import round_to

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 8192
TILE_ELEMENTS = 4096  # elements per program and column block (rows x padded d); read at each call


@triton.jit
def _normalized(x, mask, D: tl.constexpr, eps):
    """(x - mean) / sqrt(var + eps) per row of an fp32 tile whose masked elements are 0; masked elements 0."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc * (1.0 / tl.sqrt(var + eps))[:, None]


@triton.jit
def _affine(y, rows, row_ok, cols, col_ok, Group, W, B, stride_w, stride_b, GROUPED: tl.constexpr):
    """y * weight[group] + bias[group] (GROUPED) or y * weight[0] + bias[0], in fp32."""
    if GROUPED:
        g = tl.load(Group + rows, mask=row_ok, other=0).to(tl.int64)
        m = row_ok[:, None] & col_ok[None, :]
        w = tl.load(W + g[:, None] * stride_w + cols[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + g[:, None] * stride_b + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = y * w + b
    else:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :] + b[None, :]
    return y


@triton.jit
def _row_block(T, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows and the padded columns, their bounds and the [BLOCK_M, BLOCK_D] tile mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < D
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _group_layer_norm_fwd(
    X, Add, Group, W, B, Y, T, stride_x, stride_y, stride_w, stride_b, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_ADD: tl.constexpr, GROUPED: tl.constexpr, ROUND_X: tl.constexpr, ROUND_Y: tl.constexpr,
):
    rows, cols, row_ok, col_ok, mask = _row_block(T, D, BLOCK_M, BLOCK_D)
    r = rows.to(tl.int64)[:, None]
    x_ptrs = X + r * stride_x + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        add = tl.load(Add + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = round_to(x + add[None, :], X.dtype.element_ty, ROUND_X).to(tl.float32)  # the residual as stored
        tl.store(x_ptrs, x.to(X.dtype.element_ty), mask=mask)
    y = _affine(_normalized(x, mask, D, eps), rows, row_ok, cols, col_ok, Group, W, B, stride_w, stride_b, GROUPED)
    tl.store(Y + r * stride_y + cols[None, :], round_to(y, Y.dtype.element_ty, ROUND_Y).to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _silu_scatter_kv_fwd(
    H, Slots, KC, VC, T, stride_h, stride_k, stride_v,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ROUND_H: tl.constexpr, ROUND_K: tl.constexpr, ROUND_V: tl.constexpr,
):
    rows, cols, row_ok, col_ok, mask = _row_block(T, D, BLOCK_M, BLOCK_D)
    slot = tl.load(Slots + rows, mask=row_ok, other=-1).to(tl.int64)
    cache_mask = (row_ok & (slot >= 0))[:, None] & col_ok[None, :]
    h_rows = H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    for j in tl.static_range(4):  # pyright: ignore[reportGeneralTypeIssues] (Triton's jit typing); u, v, q, k blocks
        ptrs = h_rows + j * D
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        s = round_to(x / (1.0 + tl.exp(-x)), H.dtype.element_ty, ROUND_H).to(tl.float32)  # SiLU as stored in h
        tl.store(ptrs, s.to(H.dtype.element_ty), mask=mask)
        if j == 1:
            tl.store(VC + slot[:, None] * stride_v + cols[None, :],
                     round_to(s, VC.dtype.element_ty, ROUND_V).to(VC.dtype.element_ty), mask=cache_mask)
        if j == 3:
            tl.store(KC + slot[:, None] * stride_k + cols[None, :],
                     round_to(s, KC.dtype.element_ty, ROUND_K).to(KC.dtype.element_ty), mask=cache_mask)


@triton.jit
def _group_norm_mul_fwd(
    A, U, Group, W, B, Y, T, stride_a, stride_u, stride_y, stride_w, stride_b, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUPED: tl.constexpr, ROUND_Y: tl.constexpr,
):
    rows, cols, row_ok, col_ok, mask = _row_block(T, D, BLOCK_M, BLOCK_D)
    r = rows.to(tl.int64)[:, None]
    a = tl.load(A + r * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _affine(_normalized(a, mask, D, eps), rows, row_ok, cols, col_ok, Group, W, B, stride_w, stride_b, GROUPED)
    y = y * u
    tl.store(Y + r * stride_y + cols[None, :], round_to(y, Y.dtype.element_ty, ROUND_Y).to(Y.dtype.element_ty),
             mask=mask)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return type(_group_layer_norm_fwd).__name__ == "InterpretedFunction"


def _bf16_bits(t: torch.Tensor) -> bool:
    """Whether stores into `t` must round bf16 by bit arithmetic (the interpreter's casts truncate)."""
    return interpreted() and t.dtype == torch.bfloat16


def launch_shape(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps): whole rows padded to a power of two, about TILE_ELEMENTS per program."""
    block_d = max(16, triton.next_power_of_2(d))
    block_m = max(1, min(64, TILE_ELEMENTS // block_d))
    return block_d, block_m, 4 if block_m * block_d <= 4096 else 8


def _launch(kernel, rows: int, d: int, *args, **constexprs) -> None:
    """One program per block of rows (whole rows of d columns, padded to a power of two)."""
    block_d, block_m, warps = launch_shape(d)
    kernel[(triton.cdiv(rows, block_m),)](*args, D=d, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=warps,
                                         **constexprs)


def _check_rows(name: str, t: torch.Tensor, rows: int, d: int) -> None:
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != d:
        raise ValueError(f"{name}: expected [{rows}, {d}], got {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: expected one dtype of {SUPPORTED_DTYPES}, got {t.dtype}")


def _check_dim(d: int) -> None:
    if not 0 < d <= MAX_DIM:
        raise ValueError(f"d: the Triton kernels take 1 to {MAX_DIM} columns, got {d}")


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _affine_args(weight: torch.Tensor, bias: torch.Tensor, group: torch.Tensor | None, rows: int, d: int):
    """(group, weight, bias, grouped) for the kernels, after checking the shapes (no host sync)."""
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1 or bias.shape != weight.shape:
        raise ValueError(f"weight, bias: expected [G, {d}] each, got {tuple(weight.shape)} and {tuple(bias.shape)}")
    grouped = weight.shape[0] > 1
    if grouped and (group is None or group.shape != (rows,) or group.is_floating_point()):
        got = None if group is None else f"{group.dtype} {tuple(group.shape)}"
        raise ValueError(f"group: expected {rows} integer group ids (weight has {weight.shape[0]} rows), got {got}")
    weight, bias = _unit_columns(weight), _unit_columns(bias)
    return (group if grouped else weight), weight, bias, grouped


def _output(out: torch.Tensor | None, like: torch.Tensor, rows: int, d: int) -> torch.Tensor:
    if out is None:
        return torch.empty((rows, d), dtype=like.dtype, device=like.device)
    _check_rows("out", out, rows, d)
    if out.stride(1) != 1 and d > 1:
        raise ValueError("out: expected a unit column stride")
    return out


def group_layer_norm(x: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5, *, add: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """LN(x') * weight[group] + bias[group], x' = x + add (a [d] vector, then written back into x in place)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected [T, d], got {tuple(x.shape)}")
    rows, d = x.shape
    _check_dim(d)
    _check_rows("x", x, rows, d)
    if add is not None:
        if add.shape != (d,):
            raise ValueError(f"add: expected [{d}], got {tuple(add.shape)}")
        if x.stride(1) != 1 and d > 1:
            raise ValueError("x: with `add` (written back in place) expected a unit column stride")
        add = add.contiguous()
    x = _unit_columns(x)
    group, weight, bias, grouped = _affine_args(weight, bias, group, rows, d)
    out = _output(out, x, rows, d)
    if rows == 0:
        return out
    _launch(_group_layer_norm_fwd, rows, d, x, x if add is None else add, group, weight, bias, out, rows,
            x.stride(0), out.stride(0), weight.stride(0), bias.stride(0), float(eps),
            HAS_ADD=add is not None, GROUPED=grouped, ROUND_X=_bf16_bits(x), ROUND_Y=_bf16_bits(out))
    return out


def silu_scatter_kv(h: torch.Tensor, d: int, slots: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor) -> None:
    """In place h = SiLU(h) ([T, 4d]: u|v|q|k); rows with slots[t] >= 0 copy their v, k blocks to the caches[slot]."""
    _check_dim(d)
    if h.dim() != 2:
        raise ValueError(f"h: expected [T, 4d], got {tuple(h.shape)}")
    rows = h.shape[0]
    _check_rows("h", h, rows, 4 * d)
    if h.stride(1) != 1:
        raise ValueError("h: expected a unit column stride (it is written in place)")
    if slots.shape != (rows,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots: expected {rows} int32/int64 slots (-1: not written), got {slots.dtype} "
                         f"{tuple(slots.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 3 or cache.shape[1] * cache.shape[2] != d or cache.dtype not in SUPPORTED_DTYPES
                or cache.stride(2) != 1 or (cache.shape[1] > 1 and cache.stride(1) != cache.shape[2])):
            raise ValueError(f"{name}: expected [S, H, Dh] with H * Dh = {d}, contiguous in the last two dims, "
                             f"one dtype of {SUPPORTED_DTYPES}, got {tuple(cache.shape)} {cache.dtype} "
                             f"strides {cache.stride()}")
    if rows == 0:
        return
    _launch(_silu_scatter_kv_fwd, rows, d, h, slots, k_cache, v_cache, rows, h.stride(0), k_cache.stride(0),
            v_cache.stride(0), ROUND_H=_bf16_bits(h), ROUND_K=_bf16_bits(k_cache), ROUND_V=_bf16_bits(v_cache))


def group_norm_mul(a: torch.Tensor, u: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-5, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(LN(a) * weight[group] + bias[group]) * u; a is [T, d] or [T, H, Dh], the result [T, d]."""
    if a.dim() not in (2, 3):
        raise ValueError(f"a: expected [T, d] or [T, H, Dh], got {tuple(a.shape)}")
    a = _unit_columns(a.reshape(a.shape[0], a.shape[1:].numel()))  # a view when the heads are contiguous
    rows, d = a.shape
    _check_dim(d)
    _check_rows("a", a, rows, d)
    _check_rows("u", u, rows, d)
    u = _unit_columns(u)
    group, weight, bias, grouped = _affine_args(weight, bias, group, rows, d)
    out = _output(out, a, rows, d)
    if rows == 0:
        return out
    _launch(_group_norm_mul_fwd, rows, d, a, u, group, weight, bias, out, rows, a.stride(0), u.stride(0),
            out.stride(0), weight.stride(0), bias.stride(0), float(eps), GROUPED=grouped, ROUND_Y=_bf16_bits(out))
    return out
