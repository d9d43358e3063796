"""Version 1 of the Triton HSTU attention kernel: superseded by `hstu_attention` (version 2), kept to
time the two side by side (`python3 -m grinfer.ops.triton.check --compare-v1`; KERNELS.md has the numbers).

It adds each candidate's own key exactly, as a row-wise dot product before the key loop (the
"diagonal"), and leaves every candidate key out of the tile loops; at head dim 256 those
[BLOCK_M, head_dim] fp32 temporaries spill registers. Not used by the dispatcher.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from grinfer.ops.reference.hstu_attention import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.triton.hstu_attention import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    KernelConfig,
    _check_offsets,
    default_config,
    interpreted,
    key_counts,
)

_U = tl.constexpr(GROUP_U)
_S = tl.constexpr(GROUP_S)
_R = tl.constexpr(GROUP_R)
_C = tl.constexpr(GROUP_C)
# The mask as one or two integer compares per (query, key) pair (positions lie in (-2**30, 2**30)):
#   visible(i, j) = rank_j <= lim_i  or  cpos_j == qself_i
# rank_j: _ALWAYS for a U/S key, its position for an R key, _NEVER for a C key or a padding column;
# lim_i: _LIM_ALL for a candidate query, its position for an R query, _LIM_CTX for any other query;
# cpos_j: a C key's position, else _NO_KEY; qself_i: the query's position, or _NO_QUERY once its self-key is
# handled on the diagonal. Causal: rank_j = key position, lim_i = query position.
_ALWAYS = tl.constexpr(-(2**30) - 1)
_LIM_CTX = tl.constexpr(-(2**30))
_LIM_ALL = tl.constexpr(2**30)
_NEVER = tl.constexpr(2**30 + 1)
_NO_KEY = tl.constexpr(-(2**30) - 3)
_NO_QUERY = tl.constexpr(-(2**30) - 4)



@triton.jit
def _key_codes(kg, kp, n_valid, DYNAMIC: tl.constexpr):
    """(rank, cpos) of a tile's keys: see the constants above."""
    if DYNAMIC:
        rank = tl.where((kg == _U) | (kg == _S), _ALWAYS, tl.where(kg == _R, kp, _NEVER))
        cpos = tl.where(n_valid & (kg == _C), kp, _NO_KEY)
    else:
        rank = kp
        cpos = kp
    return tl.where(n_valid, rank, _NEVER), cpos


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32; UPCAST multiplies fp32 copies (exact products, as the tensor cores give)
    for Triton's interpreter, whose bf16 dot multiplies the raw bit patterns (triton-lang/triton#11584)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to `dtype` (to nearest even). UPCAST: kept in fp32 holding bf16 values, rounded by bit
    arithmetic, since the interpreter's fp32 -> bf16 cast truncates where the GPU rounds."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _silu(x, alpha, FAST: tl.constexpr):
    """SiLU(alpha x) in fp32. FAST: 0.5 y (1 + tanh(0.5 y)) with the GPU's tanh.approx (one special-function
    op where exp + reciprocal take two; relative error about 2**-11, for bf16/fp16 inputs only)."""
    if FAST:
        h = x * (0.5 * alpha)
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32, is_pure=True,
                                      pack=1)
        y = h + h * t
    else:
        s = x * alpha
        y = s / (1.0 + tl.exp(-s))
    return y


@triton.jit
def _tile(acc, cnt, q, lim, qself, start_n, lk, k_rows0, Kh, Vh, k_group, k_pos, stride_kt, stride_vt,
          alpha, offs_dqk, offs_dv, D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr,
          DYNAMIC: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
          FAST_SILU: tl.constexpr):
    """acc += (SiLU(alpha q K^T) * M) V and cnt += row sums of M over key tile [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < lk
    rows = k_rows0 + offs_n
    kg = tl.load(k_group + rows, mask=n_valid, other=-1).to(tl.int32)
    kp = tl.load(k_pos + rows, mask=n_valid, other=0).to(tl.int32)
    rank, cpos = _key_codes(kg, kp, n_valid, DYNAMIC)
    kt = tl.load(Kh + rows[None, :] * stride_kt + offs_dqk[:, None],
                 mask=n_valid[None, :] & (offs_dqk < D_QK)[:, None], other=0.0)
    s = _dot(q, kt, PRECISION, UPCAST)
    m = rank[None, :] <= lim[:, None]
    if DYNAMIC:
        m |= cpos[None, :] == qself[:, None]
    p = tl.where(m, _silu(s, alpha, FAST_SILU), 0.0)
    v = tl.load(Vh + rows[:, None] * stride_vt + offs_dv[None, :],
                mask=n_valid[:, None] & (offs_dv < D_V)[None, :], other=0.0)
    acc += _dot(_round(p, v.dtype, UPCAST), v, PRECISION, UPCAST)
    if COUNT:
        cnt += tl.sum(m.to(tl.float32), axis=1)
    return acc, cnt


@triton.jit
def _hstu_attention_fwd(
    Q, K, V, Out, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, k_counts,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    alpha, inv_norm,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DYNAMIC: tl.constexpr, VISIBLE_NORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FAST_SILU: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(q_offsets + b).to(tl.int64)
    lq = (tl.load(q_offsets + b + 1) - q_start).to(tl.int32)
    if pid_m * BLOCK_M >= lq:
        return
    k_start = tl.load(k_offsets + b).to(tl.int64)
    lk = (tl.load(k_offsets + b + 1) - k_start).to(tl.int32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < lq
    q_rows = q_start + offs_m
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qg = tl.load(q_group + q_rows, mask=m_valid, other=-1).to(tl.int32)
    qp = tl.load(q_pos + q_rows, mask=m_valid, other=-1).to(tl.int32)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                mask=m_valid[:, None] & (offs_dqk < D_QK)[None, :], other=0.0)
    Kh = K + h * stride_kh
    Vh = V + h * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    if DYNAMIC:
        # 1. the diagonal: each query's own candidate key, guessed and then checked
        last_pos = tl.load(k_pos + k_start + lk - 1, mask=lk > 0, other=0).to(tl.int32)
        self_n = lk - 1 - (last_pos - qp)
        in_range = m_valid & (self_n >= 0) & (self_n < lk)
        self_rows = k_start + self_n
        sg = tl.load(k_group + self_rows, mask=in_range, other=-1).to(tl.int32)
        sp = tl.load(k_pos + self_rows, mask=in_range, other=-1).to(tl.int32)
        diag = in_range & (sg == _C) & (sp == qp)
        k_self = tl.load(Kh + self_rows[:, None] * stride_kt + offs_dqk[None, :],
                         mask=diag[:, None] & (offs_dqk < D_QK)[None, :], other=0.0)
        s_self = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1) * alpha
        p_self = tl.where(diag, s_self / (1.0 + tl.exp(-s_self)), 0.0)
        v_self = tl.load(Vh + self_rows[:, None] * stride_vt + offs_dv[None, :],
                         mask=diag[:, None] & (offs_dv < D_V)[None, :], other=0.0)
        acc += p_self[:, None] * v_self.to(tl.float32)
        cnt += diag.to(tl.float32)

        # the main loop's bound, from the per-sequence key counts (keys in [U | S | R | C] order)
        n_us = tl.load(k_counts + 2 * b)
        n_ctx = tl.load(k_counts + 2 * b + 1)
        has_c = tl.max((m_valid & (qg == _C)).to(tl.int32), axis=0) > 0
        max_r_pos = tl.max(tl.where(m_valid & (qg == _R), qp, -1), axis=0)
        hi = tl.where(has_c, n_ctx, tl.maximum(n_us, tl.minimum(n_ctx, max_r_pos + 1)))
        lim = tl.where(qg == _C, _LIM_ALL, tl.where(qg == _R, qp, _LIM_CTX))
        qself = tl.where(diag, _NO_QUERY, qp)
        # for the remainder's test: the range of qself over the real rows
        off_diag = m_valid & (diag == 0)
        min_qself = tl.min(tl.where(off_diag, qp, _LIM_ALL), axis=0)
        max_qself = tl.max(tl.where(off_diag, qp, _NO_QUERY), axis=0)
    else:
        lim = qp
        qself = qp
        hi = tl.max(tl.where(m_valid, qp, -1), axis=0) + 1
    max_lim = tl.max(tl.where(m_valid, lim, _LIM_CTX), axis=0)
    hi = tl.minimum(hi, lk)

    # 2. the main loop: every key tile that (with the usual layout) holds visible keys
    for start_n in range(0, hi, BLOCK_N):
        acc, cnt = _tile(acc, cnt, q, lim, qself, start_n, lk, k_start, Kh, Vh, k_group, k_pos,
                         stride_kt, stride_vt, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC, VISIBLE_NORM,
                         PRECISION, UPCAST, FAST_SILU)

    # 3. the remainder: test each tile's key metadata, compute it only if something in it is visible
    for start_n in range((hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < lk
        kg = tl.load(k_group + k_start + offs_n, mask=n_valid, other=-1).to(tl.int32)
        kp = tl.load(k_pos + k_start + offs_n, mask=n_valid, other=0).to(tl.int32)
        rank, cpos = _key_codes(kg, kp, n_valid, DYNAMIC)
        seen = rank <= max_lim
        if DYNAMIC:
            seen |= (cpos >= min_qself) & (cpos <= max_qself)
        if tl.max(seen.to(tl.int32), axis=0) > 0:
            acc, cnt = _tile(acc, cnt, q, lim, qself, start_n, lk, k_start, Kh, Vh, k_group, k_pos,
                             stride_kt, stride_vt, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC,
                             VISIBLE_NORM, PRECISION, UPCAST, FAST_SILU)

    if VISIBLE_NORM:
        out = acc / tl.maximum(cnt, 1.0)[:, None]
    else:
        out = acc * inv_norm
    out = _round(out, Out.dtype.element_ty, UPCAST).to(Out.dtype.element_ty)
    tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], out,
             mask=m_valid[:, None] & (offs_dv < D_V)[None, :])


def triton_hstu_attention_v1(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256, alpha: float | None = None,
    max_len_q: int | None = None, k_counts: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: KernelConfig | None = None, fast_silu: bool | None = None,
) -> torch.Tensor:
    """Jagged HSTU attention without relative bias: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv].

    Shapes are checked by the dispatcher (`grinfer.ops.attention.hstu_attention`). What depends only on
    the token layout can be computed once and shared by every layer: `max_len_q` (the longest query
    sequence; without it the offsets are checked and it is read, one host sync) and `k_counts`
    (`key_counts(k_group, k_offsets)`). `out` is written in place. `fast_silu` (default: on for bf16/fp16
    on the GPU) evaluates SiLU with one tanh.approx instead of exp + reciprocal.
    """
    if mode not in ("dynamic", "causal"):
        raise ValueError(f"mask mode: expected 'dynamic' or 'causal', got {mode!r}")
    if normalizer not in ("visible", "max_len"):
        raise ValueError(f"normalizer: expected 'visible' or 'max_len', got {normalizer!r}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v: expected one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    t_q, heads, d_qk = q.shape
    d_v = v.shape[2]
    if max(d_qk, d_v) > MAX_HEAD_DIM:
        raise ValueError(f"head dim: the Triton kernel takes at most {MAX_HEAD_DIM}, got {max(d_qk, d_v)}")
    batch = len(q_offsets) - 1
    if out is None:
        out = torch.empty((t_q, heads, d_v), dtype=q.dtype, device=q.device)
    elif out.shape != (t_q, heads, d_v) or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out: expected a {(t_q, heads, d_v)} {q.dtype} tensor with unit last stride, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if batch == 0:
        return out
    if max_len_q is None:
        max_len_q = _check_offsets(q_offsets, k_offsets, t_q, k.shape[0])
    if batch == 0 or max_len_q == 0 or heads == 0 or t_q == 0:
        return out
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    cfg = config or default_config(d_qk, d_v, q.dtype)
    alpha = 1.0 / math.sqrt(d_qk) if alpha is None else float(alpha)
    counts = key_counts(k_group, k_offsets) if k_counts is None else k_counts
    grid = (triton.cdiv(max_len_q, cfg.block_m), batch, heads)
    if fast_silu is None:
        fast_silu = q.dtype != torch.float32
    _hstu_attention_fwd[grid](
        q, k, v, out, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, counts,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        alpha, 1.0 / float(max_seq_len),
        D_QK=d_qk, D_V=d_v,
        BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)), BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DYNAMIC=mode == "dynamic", VISIBLE_NORM=normalizer == "visible",
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreted() and q.dtype == torch.bfloat16,
        FAST_SILU=bool(fast_silu) and not interpreted(),  # inline PTX does not run in the interpreter
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
