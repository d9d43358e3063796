# pyright: reportArgumentType=false, reportOperatorIssue=false, reportGeneralTypeIssues=false, reportCallIssue=false
# (Triton's JIT language: constexpr parameters, tl.range and tl tensors are not typed for pyright)
"""Jagged HSTU attention under the MTGR dynamic (or causal) mask: a Triton forward kernel.

The twin of `grinfer.ops.reference.hstu_attention` without the relative bias (the dispatcher in
`grinfer.ops.hstu_attention` falls back to the reference when bias tables are given):

    out_i = sum_j SiLU(alpha * q_i . k_j) * M(i, j) / N_i * v_j

One launch covers a whole jagged batch (q_offsets, k_offsets; no padding); keys and values are rows of
k, v or, given block tables, pages of a KV pool read in place (the engine's cache). Program (m, b, h)
computes query tile m of sequence b for head h. M is evaluated in the kernel from the tokens'
group ids and positions, exactly as `visible()`; N_i is the number of visible keys (counted in
the kernel) or the constant max_seq_len. Inputs bf16/fp16/fp32, fp32 accumulation, the output in
q's dtype; head dims up to 256 (padded to a power of two, masked). K/V may be 8-bit (int8 or fp8 e4m3,
with a float32 scale per key and head: grinfer.ops.reference.kv_quant), dequantised in the tile loop.

How the key loop is cut. The usual layout (the engine's and the model's): within a sequence, keys
in position order [U | S | R | C] with key index == position for the context keys, queries a
subset in the same order. For a query tile:

1. Range A, key tiles [0, hi): U/S queries need the U/S keys, R queries also the R keys up to
   their own position, candidate queries every context key (causal: keys up to the tile's last
   position). hi comes from the tile's query groups/positions and the per-sequence key counts.
2. The band: a candidate sees exactly one candidate key, itself. Its index is guessed as if the
   candidates were the keys' consecutive suffix, and the key tiles spanning the tile's guessed
   self-keys are added, so the candidate x candidate block costs the tiles on its diagonal
   (about BLOCK_M + BLOCK_N keys per query tile) instead of every candidate key.
   Range A and the band run as one loop with no tests, so the loads pipeline.
3. The remainder: every other key tile is tested on its keys' metadata alone (a conservative
   test that never drops a visible key) and computed only if something in it is visible; with
   the usual layout every such tile is skipped.

Only the speed relies on the layout: the mask is exact in every computed tile and the remainder
catches any visible key outside range A and the band, so any key order gives the reference's
result (the tests shuffle and reverse keys). Positions must lie in (-2**30, 2**30).

(The first version computed the exact diagonal as a row-wise dot product before the loop; its
[BLOCK_M, head_dim] fp32 temporaries spilled registers at head dim 256: see KERNELS.md.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.hstu_attention import check_block_table, check_modes
from grinfer.ops.triton.rounding import round_to

_U = tl.constexpr(GROUP_U)
_S = tl.constexpr(GROUP_S)
_R = tl.constexpr(GROUP_R)
_C = tl.constexpr(GROUP_C)
# The mask as one or two integer compares per (query, key) pair (positions lie in (-2**30, 2**30)):
#   visible(i, j) = rank_j <= lim_i  or  cpos_j == pos_i
# rank_j: _ALWAYS for a U/S key, its position for an R key, _NEVER for a C key or a padding column;
# lim_i: _LIM_ALL for a candidate query, its position for an R query, _LIM_CTX for any other query;
# cpos_j: a C key's position, else _NO_KEY. Causal: rank_j = key position, lim_i = query position.
_ALWAYS = tl.constexpr(-(2**30) - 1)
_LIM_CTX = tl.constexpr(-(2**30))
_LIM_ALL = tl.constexpr(2**30)
_NEVER = tl.constexpr(2**30 + 1)
_NO_KEY = tl.constexpr(-(2**30) - 3)

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)  # 8-bit K/V, with per (key, head) scales


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
def _key_rows(start_n, offs_n, n_valid, k_rows0, bt_row, PAGED: tl.constexpr, PAGE: tl.constexpr,
              BLOCK_N: tl.constexpr, SAFE: tl.constexpr = False):
    """Rows of K/V holding keys offs_n = start_n + [0, BLOCK_N) of the sequence: k_rows0 + offs_n, or, PAGED,
    their slots in the pool through the sequence's block table: one block id per tile when tiles never
    straddle pages (PAGE a multiple of BLOCK_N; tiles start at multiples of BLOCK_N), else one per key.
    SAFE: the tile may lie past the sequence's keys (a prefetch), so its one block id is read under a mask."""
    if PAGED:
        if PAGE % BLOCK_N == 0:
            if SAFE:
                blk = tl.load(bt_row + start_n // PAGE, mask=tl.max(n_valid.to(tl.int32), axis=0) > 0,
                              other=0).to(tl.int64)
            else:
                blk = tl.load(bt_row + start_n // PAGE).to(tl.int64)
            rows = blk * PAGE + start_n % PAGE + tl.arange(0, BLOCK_N)
        else:
            blk = tl.load(bt_row + offs_n // PAGE, mask=n_valid, other=0).to(tl.int64)
            rows = blk * PAGE + offs_n % PAGE
    else:
        rows = k_rows0 + offs_n
    return rows


@triton.jit
def _tile_rows(start_n, lk, k_rows0, bt_row, PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               SAFE: tl.constexpr = False):
    """`_key_rows` of the key tile starting at start_n."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return _key_rows(start_n, offs_n, offs_n < lk, k_rows0, bt_row, PAGED, PAGE, BLOCK_N, SAFE)


@triton.jit
def _tile_start(t, n_a, band_lo, BLOCK_N: tl.constexpr):
    """First key of the main loop's t-th tile: range A's tiles, then the band's."""
    return tl.where(t < n_a, t * BLOCK_N, band_lo + (t - n_a) * BLOCK_N)


@triton.jit
def _scores(q, start_n, lk, kv_rows, Kh, KSh, stride_kt, stride_st, offs_dqk, D_QK: tl.constexpr,
            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, QUANT: tl.constexpr):
    """q K^T over key tile [start_n, start_n + BLOCK_N) (keys at K rows kv_rows), fp32.

    QUANT: K is 8-bit with one scale per (key, head): the tile is widened to q's dtype (exactly: int8 and
    e4m3 fit in bf16) and key j's scale multiplies score column j, K dequantised outside the dot product."""
    n_valid = start_n + tl.arange(0, BLOCK_N) < lk
    kt = tl.load(Kh + kv_rows[None, :] * stride_kt + offs_dqk[:, None],
                 mask=n_valid[None, :] & (offs_dqk < D_QK)[:, None], other=0.0)
    if QUANT:  # (the interpreter's int8 -> bf16 cast is wrong: there, fp32, which _dot upcasts to anyway)
        kt = kt.to(tl.float32) if UPCAST else kt.to(q.dtype)
    s = _dot(q, kt, PRECISION, UPCAST)
    if QUANT:
        s *= tl.load(KSh + kv_rows * stride_st, mask=n_valid, other=0.0)[None, :]
    return s


@triton.jit
def _mask(lim, qp, start_n, lk, k_rows0, k_group, k_pos, BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr):
    """M of key tile [start_n, start_n + BLOCK_N): which (query, key) pairs are visible."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < lk
    rows = k_rows0 + offs_n
    kg = tl.load(k_group + rows, mask=n_valid, other=-1).to(tl.int32)
    kp = tl.load(k_pos + rows, mask=n_valid, other=0).to(tl.int32)
    rank, cpos = _key_codes(kg, kp, n_valid, DYNAMIC)
    m = rank[None, :] <= lim[:, None]
    if DYNAMIC:
        m |= cpos[None, :] == qp[:, None]
    return m


@triton.jit
def _probs(s, m, q, start_n, lk, kv_rows, VSh, stride_st, alpha, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
           FAST_SILU: tl.constexpr, QUANT: tl.constexpr):
    """P = SiLU(alpha s) * M of a key tile from its scores s, in q's dtype (QUANT: column j times key j's V
    scale, V dequantised outside the dot product)."""
    p = tl.where(m, _silu(s, alpha, FAST_SILU), 0.0)
    if QUANT:
        n_valid = start_n + tl.arange(0, BLOCK_N) < lk
        p *= tl.load(VSh + kv_rows * stride_st, mask=n_valid, other=0.0)[None, :]
    return round_to(p, q.dtype, UPCAST)


@triton.jit
def _pv(acc, p, start_n, lk, kv_rows, Vh, stride_vt, offs_dv, D_V: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, QUANT: tl.constexpr):
    """acc + P V over key tile [start_n, start_n + BLOCK_N) (values at V rows kv_rows)."""
    n_valid = start_n + tl.arange(0, BLOCK_N) < lk
    v = tl.load(Vh + kv_rows[:, None] * stride_vt + offs_dv[None, :],
                mask=n_valid[:, None] & (offs_dv < D_V)[None, :], other=0.0)
    if QUANT:
        v = v.to(tl.float32) if UPCAST else v.to(p.dtype)
    return acc + _dot(p, v, PRECISION, UPCAST)


@triton.jit
def _tile(acc, cnt, q, lim, qp, start_n, lk, k_rows0, kv_rows, Kh, Vh, KSh, VSh, k_group, k_pos, stride_kt,
          stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK: tl.constexpr, D_V: tl.constexpr,
          BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
          UPCAST: tl.constexpr, FAST_SILU: tl.constexpr, QUANT: tl.constexpr):
    """acc += (SiLU(alpha q K^T) * M) V and cnt += row sums of M over key tile [start_n, start_n + BLOCK_N)."""
    m = _mask(lim, qp, start_n, lk, k_rows0, k_group, k_pos, BLOCK_N, DYNAMIC)
    s = _scores(q, start_n, lk, kv_rows, Kh, KSh, stride_kt, stride_st, offs_dqk, D_QK, BLOCK_N, PRECISION,
                UPCAST, QUANT)
    p = _probs(s, m, q, start_n, lk, kv_rows, VSh, stride_st, alpha, BLOCK_N, UPCAST, FAST_SILU, QUANT)
    acc = _pv(acc, p, start_n, lk, kv_rows, Vh, stride_vt, offs_dv, D_V, BLOCK_N, PRECISION, UPCAST, QUANT)
    if COUNT:
        cnt += tl.sum(m.to(tl.float32), axis=1)
    return acc, cnt


@triton.jit
def _seen(start, lk, keys, k_group, k_pos, max_lim, min_pos, max_pos, WIDTH: tl.constexpr, DYNAMIC: tl.constexpr):
    """Per key of [start, start + WIDTH): whether some query of the tile may see it (a test on the keys'
    metadata alone that never says no to a visible key: see the constants above)."""
    offs_n = start + tl.arange(0, WIDTH)
    n_valid = offs_n < lk
    kg = tl.load(k_group + keys + offs_n, mask=n_valid, other=-1).to(tl.int32)
    kp = tl.load(k_pos + keys + offs_n, mask=n_valid, other=0).to(tl.int32)
    rank, cpos = _key_codes(kg, kp, n_valid, DYNAMIC)
    seen = rank <= max_lim
    if DYNAMIC:
        seen |= (cpos >= min_pos) & (cpos <= max_pos)
    return seen


@triton.jit
def _main_loop(acc, cnt, q, lim, qp, n_a, n_main, band_lo, lk, k_start, bt_row, Kh, Vh, KSh, VSh, k_group, k_pos,
               stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK: tl.constexpr, D_V: tl.constexpr,
               BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, FAST_SILU: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
               QUANT: tl.constexpr, PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr,
               WARP_SPEC: tl.constexpr):
    """Range A and the band, n_main tiles with no tests, so the loads pipeline. PREFETCH: each tile's K/V rows
    (its block id) are read one iteration ahead and carried, so the K/V loads do not wait on them."""
    if PREFETCH:
        rows_next = _tile_rows(_tile_start(0, n_a, band_lo, BLOCK_N), tl.where(n_main > 0, lk, 0), k_start, bt_row,
                               PAGED, PAGE, BLOCK_N, True)
    for t in tl.range(0, n_main, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL, warp_specialize=WARP_SPEC):
        start_n = _tile_start(t, n_a, band_lo, BLOCK_N)
        if PREFETCH:
            kv_rows = rows_next
            # the last iteration re-reads its own tile's block id (in bounds, unused)
            start_next = tl.where(t + 1 < n_main, _tile_start(t + 1, n_a, band_lo, BLOCK_N), start_n)
            rows_next = _tile_rows(start_next, lk, k_start, bt_row, PAGED, PAGE, BLOCK_N)
        else:
            kv_rows = _tile_rows(start_n, lk, k_start, bt_row, PAGED, PAGE, BLOCK_N)
        acc, cnt = _tile(acc, cnt, q, lim, qp, start_n, lk, k_start, kv_rows, Kh, Vh, KSh, VSh, k_group, k_pos,
                         stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC,
                         COUNT, PRECISION, UPCAST, FAST_SILU, QUANT)
    return acc, cnt


@triton.jit
def _main_loop_overlapped(acc, cnt, q, lim, qp, n_a, n_main, band_lo, lk, k_start, bt_row, Kh, Vh, KSh, VSh,
                          k_group, k_pos, stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv,
                          D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr,
                          COUNT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          FAST_SILU: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
                          PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr,
                          WARP_SPEC: tl.constexpr):
    """`_main_loop` restructured (version 6): iteration t issues S = q K^T of tile t + 1 before P V of tile t
    and evaluates SiLU and the mask of tile t + 1 after it, so the SiLU can run while the tensor cores do P V.
    Tile 0's scores come before the loop (all masked when n_main == 0) and the last tile's P V after it.
    PREFETCH: the K/V rows of tile t + 2 are read in iteration t."""
    lk0 = tl.where(n_main > 0, lk, 0)  # no keys in tile 0 when the loop is empty
    start_n = _tile_start(0, n_a, band_lo, BLOCK_N)
    kv_rows = _tile_rows(start_n, lk0, k_start, bt_row, PAGED, PAGE, BLOCK_N, True)
    if PREFETCH:
        rows_ahead = _tile_rows(_tile_start(1, n_a, band_lo, BLOCK_N), tl.where(n_main > 1, lk, 0), k_start,
                                bt_row, PAGED, PAGE, BLOCK_N, True)
    m = _mask(lim, qp, start_n, lk0, k_start, k_group, k_pos, BLOCK_N, DYNAMIC)
    s = _scores(q, start_n, lk0, kv_rows, Kh, KSh, stride_kt, stride_st, offs_dqk, D_QK, BLOCK_N, PRECISION,
                UPCAST, QUANT)
    p = _probs(s, m, q, start_n, lk0, kv_rows, VSh, stride_st, alpha, BLOCK_N, UPCAST, FAST_SILU, QUANT)
    if COUNT:
        cnt += tl.sum(m.to(tl.float32), axis=1)
    for t in tl.range(0, n_main - 1, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL,
                      warp_specialize=WARP_SPEC):
        start_next = _tile_start(t + 1, n_a, band_lo, BLOCK_N)
        if PREFETCH:
            rows_next = rows_ahead
            # the last iteration re-reads tile t + 1's block id (in bounds, unused)
            start_ahead = tl.where(t + 2 < n_main, _tile_start(t + 2, n_a, band_lo, BLOCK_N), start_next)
            rows_ahead = _tile_rows(start_ahead, lk, k_start, bt_row, PAGED, PAGE, BLOCK_N)
        else:
            rows_next = _tile_rows(start_next, lk, k_start, bt_row, PAGED, PAGE, BLOCK_N)
        m = _mask(lim, qp, start_next, lk, k_start, k_group, k_pos, BLOCK_N, DYNAMIC)
        s = _scores(q, start_next, lk, rows_next, Kh, KSh, stride_kt, stride_st, offs_dqk, D_QK, BLOCK_N,
                    PRECISION, UPCAST, QUANT)
        acc = _pv(acc, p, start_n, lk, kv_rows, Vh, stride_vt, offs_dv, D_V, BLOCK_N, PRECISION, UPCAST, QUANT)
        p = _probs(s, m, q, start_next, lk, rows_next, VSh, stride_st, alpha, BLOCK_N, UPCAST, FAST_SILU, QUANT)
        if COUNT:
            cnt += tl.sum(m.to(tl.float32), axis=1)
        start_n = start_next
        kv_rows = rows_next
    acc = _pv(acc, p, start_n, lk0, kv_rows, Vh, stride_vt, offs_dv, D_V, BLOCK_N, PRECISION, UPCAST, QUANT)
    return acc, cnt


@triton.jit
def _tile_row0(start_n, valid, k_start, bt_row, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """K/V row (int32, a TMA coordinate) of the key tile starting at start_n, a whole tile of one page; its block id
    read only if valid (0 else)."""
    if PAGED:
        row0 = (tl.load(bt_row + start_n // PAGE, mask=valid, other=0) * PAGE + start_n % PAGE).to(tl.int32)
    else:
        row0 = (k_start + start_n).to(tl.int32)
    return row0


@triton.jit
def _main_loop_tma(acc, cnt, q, lim, qp, n_a, n_main, band_lo, lk, k_start, bt_row, h, K_desc, V_desc, Kh, Vh, KSh,
                   VSh, k_group, k_pos, stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK: tl.constexpr,
                   D_V: tl.constexpr, BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr, COUNT: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST_SILU: tl.constexpr, PAGED: tl.constexpr,
                   PAGE: tl.constexpr, PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr,
                   WARP_SPEC: tl.constexpr):
    """`_main_loop` with K/V tiles through TMA tensor descriptors (version 7; whole tiles of BLOCK_N rows of one
    page, head h's columns) so Triton's Hopper warp specialisation can split loads from math. A tile holding the
    sequence's last key would read slots no key owns (garbage, maybe NaN, times P = 0): the last tile of the loop,
    if it holds the end, goes through the masked loads instead."""
    last_start = _tile_start(n_main - 1, n_a, band_lo, BLOCK_N)
    n_whole = n_main - ((n_main > 0) & (last_start + BLOCK_N > lk)).to(tl.int32)
    if PREFETCH:
        row_next = _tile_row0(_tile_start(0, n_a, band_lo, BLOCK_N), n_whole > 0, k_start, bt_row, PAGED, PAGE)
    for t in tl.range(0, n_whole, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL, warp_specialize=WARP_SPEC):
        start_n = _tile_start(t, n_a, band_lo, BLOCK_N)
        if PREFETCH:
            row0 = row_next
            row_next = _tile_row0(_tile_start(t + 1, n_a, band_lo, BLOCK_N), t + 1 < n_whole, k_start, bt_row, PAGED,
                                  PAGE)
        else:
            row0 = _tile_row0(start_n, True, k_start, bt_row, PAGED, PAGE)
        m = _mask(lim, qp, start_n, lk, k_start, k_group, k_pos, BLOCK_N, DYNAMIC)
        kt = K_desc.load([row0, h * D_QK])
        s = _dot(q, kt.T, PRECISION, UPCAST)
        p = _probs(s, m, q, start_n, lk, row0, VSh, stride_st, alpha, BLOCK_N, UPCAST, FAST_SILU, False)
        acc += _dot(p, V_desc.load([row0, h * D_V]), PRECISION, UPCAST)
        if COUNT:
            cnt += tl.sum(m.to(tl.float32), axis=1)
    if n_whole < n_main:
        kv_rows = _tile_rows(last_start, lk, k_start, bt_row, PAGED, PAGE, BLOCK_N)
        acc, cnt = _tile(acc, cnt, q, lim, qp, last_start, lk, k_start, kv_rows, Kh, Vh, KSh, VSh, k_group, k_pos,
                         stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC,
                         COUNT, PRECISION, UPCAST, FAST_SILU, False)
    return acc, cnt


@triton.jit
def _remainder_tile(acc, cnt, q, lim, qp, start_n, lk, k_start, bt_row, band_lo, band_end, max_lim, min_pos,
                    max_pos, Kh, Vh, KSh, VSh, k_group, k_pos, stride_kt, stride_vt, stride_st, alpha, offs_dqk,
                    offs_dv, D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr, DYNAMIC: tl.constexpr,
                    COUNT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST_SILU: tl.constexpr,
                    PAGED: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr):
    """One key tile past range A: computed if it lies outside the band and a query may see one of its keys."""
    seen = _seen(start_n, lk, k_start, k_group, k_pos, max_lim, min_pos, max_pos, BLOCK_N, DYNAMIC)
    outside = (start_n < band_lo) | (start_n >= band_end)
    if outside & (tl.max(seen.to(tl.int32), axis=0) > 0):  # pyright: ignore[reportOperatorIssue] (Triton's jit typing)
        kv_rows = _tile_rows(start_n, lk, k_start, bt_row, PAGED, PAGE, BLOCK_N)
        acc, cnt = _tile(acc, cnt, q, lim, qp, start_n, lk, k_start, kv_rows, Kh, Vh, KSh, VSh, k_group, k_pos,
                         stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC,
                         COUNT, PRECISION, UPCAST, FAST_SILU, QUANT)
    return acc, cnt


@triton.jit
def _query_tile(
    pid_m, b, h,
    Q, K, V, Out, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, k_counts, K_scale, V_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_st, stride_sh,
    alpha, inv_norm, block_table, stride_bt, K_desc, V_desc,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DYNAMIC: tl.constexpr, VISIBLE_NORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FAST_SILU: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, LAYOUT_COUNT: tl.constexpr,
    COUNT: tl.constexpr, QUANT: tl.constexpr, PREFETCH: tl.constexpr, OVERLAP: tl.constexpr,
    LOOP_STAGES: tl.constexpr, UNROLL: tl.constexpr, WARP_SPEC: tl.constexpr, SCAN: tl.constexpr, TMA: tl.constexpr,
):
    """Query tile pid_m of sequence b, head h (nothing when the sequence has fewer queries)."""
    q_start = tl.load(q_offsets + b).to(tl.int64)
    lq = (tl.load(q_offsets + b + 1) - q_start).to(tl.int32)
    if pid_m * BLOCK_M < lq:
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
        KSh = K_scale + h * stride_sh
        VSh = V_scale + h * stride_sh
        bt_row = block_table + b * stride_bt

        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
        if DYNAMIC:
            lim = tl.where(qg == _C, _LIM_ALL, tl.where(qg == _R, qp, _LIM_CTX))
            # range A, from the per-sequence key counts (keys in [U | S | R | C] order, index == position)
            n_us = tl.load(k_counts + 2 * b)
            n_ctx = tl.load(k_counts + 2 * b + 1)
            is_c = m_valid & (qg == _C)
            has_c = tl.max(is_c.to(tl.int32), axis=0) > 0  # pyright: ignore[reportOperatorIssue] (Triton's jit typing)
            max_r_pos = tl.max(tl.where(m_valid & (qg == _R), qp, -1), axis=0)
            hi = tl.where(has_c, n_ctx, tl.maximum(n_us, tl.minimum(n_ctx, max_r_pos + 1)))  # pyright: ignore[reportOperatorIssue] (Triton's jit typing)
            # the band: the candidate queries' own keys, as if the candidates were the keys' consecutive suffix
            last_pos = tl.load(k_pos + k_start + lk - 1, mask=lk > 0, other=0).to(tl.int32)
            self_n = lk - 1 - (last_pos - qp)
            band_lo = tl.maximum(tl.min(tl.where(is_c, self_n, _LIM_ALL), axis=0), 0)
            band_hi = tl.minimum(tl.max(tl.where(is_c, self_n, -1), axis=0) + 1, lk)  # pyright: ignore[reportOperatorIssue] (Triton's jit typing)
        else:
            lim = qp
            hi = tl.max(tl.where(m_valid, qp, -1), axis=0) + 1  # pyright: ignore[reportOperatorIssue] (Triton's jit typing)
            band_lo = lk
            band_hi = 0
        hi = tl.minimum(hi, lk)
        a_end = (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        band_lo = tl.maximum(a_end, band_lo // BLOCK_N * BLOCK_N)
        band_end = tl.maximum(band_lo, (band_hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
        n_a = a_end // BLOCK_N
        n_main = n_a + (band_end - band_lo) // BLOCK_N

        # 1. the main loop over range A, then the band
        if TMA:
            acc, cnt = _main_loop_tma(
                acc, cnt, q, lim, qp, n_a, n_main, band_lo, lk, k_start, bt_row, h, K_desc, V_desc, Kh, Vh, KSh, VSh,
                k_group, k_pos, stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N,
                DYNAMIC, COUNT, PRECISION, UPCAST, FAST_SILU, PAGED, PAGE, PREFETCH, LOOP_STAGES, UNROLL, WARP_SPEC)
        elif OVERLAP:
            acc, cnt = _main_loop_overlapped(
                acc, cnt, q, lim, qp, n_a, n_main, band_lo, lk, k_start, bt_row, Kh, Vh, KSh, VSh, k_group, k_pos,
                stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC, COUNT,
                PRECISION, UPCAST, FAST_SILU, PAGED, PAGE, QUANT, PREFETCH, LOOP_STAGES, UNROLL, WARP_SPEC)
        else:
            acc, cnt = _main_loop(
                acc, cnt, q, lim, qp, n_a, n_main, band_lo, lk, k_start, bt_row, Kh, Vh, KSh, VSh, k_group, k_pos,
                stride_kt, stride_vt, stride_st, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC, COUNT,
                PRECISION, UPCAST, FAST_SILU, PAGED, PAGE, QUANT, PREFETCH, LOOP_STAGES, UNROLL, WARP_SPEC)

        # 2. the remainder (any tile past range A and outside the band), tested on its keys' metadata first;
        # with the usual layout every such tile is skipped. SCAN: the test runs on SCAN keys at a time and only
        # a chunk with a visible key outside the band is gone through tile by tile.
        max_lim = tl.max(tl.where(m_valid, lim, _LIM_CTX), axis=0)
        min_pos = tl.min(tl.where(m_valid, qp, _LIM_ALL), axis=0)
        max_pos = tl.max(tl.where(m_valid, qp, _LIM_CTX), axis=0)
        if SCAN > 0:
            for chunk in range(a_end, lk, SCAN):
                offs = chunk + tl.arange(0, SCAN)
                seen = _seen(chunk, lk, k_start, k_group, k_pos, max_lim, min_pos, max_pos, SCAN, DYNAMIC)
                seen &= (offs < band_lo) | (offs >= band_end)  # the band is tile-aligned
                if tl.max(seen.to(tl.int32), axis=0) > 0:  # pyright: ignore[reportOperatorIssue] (Triton's jit typing)
                    for start_n in range(chunk, tl.minimum(chunk + SCAN, lk), BLOCK_N):
                        acc, cnt = _remainder_tile(
                            acc, cnt, q, lim, qp, start_n, lk, k_start, bt_row, band_lo, band_end, max_lim,
                            min_pos, max_pos, Kh, Vh, KSh, VSh, k_group, k_pos, stride_kt, stride_vt, stride_st,
                            alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC, COUNT, PRECISION, UPCAST,
                            FAST_SILU, PAGED, PAGE, QUANT)
        else:
            for start_n in range(a_end, lk, BLOCK_N):
                acc, cnt = _remainder_tile(
                    acc, cnt, q, lim, qp, start_n, lk, k_start, bt_row, band_lo, band_end, max_lim, min_pos,
                    max_pos, Kh, Vh, KSh, VSh, k_group, k_pos, stride_kt, stride_vt, stride_st, alpha, offs_dqk,
                    offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC, COUNT, PRECISION, UPCAST, FAST_SILU, PAGED, PAGE, QUANT)

        if VISIBLE_NORM:
            if LAYOUT_COUNT:  # the engine's layout: U/S queries see the U/S keys, R at p p + 1, C the context + self
                cnt = tl.where(qg == _C, n_ctx + 1, tl.where(qg == _R, qp + 1, n_us)).to(tl.float32)
            out = acc / tl.maximum(cnt, 1.0)[:, None]
        else:
            out = acc * inv_norm
        out = round_to(out, Out.dtype.element_ty, UPCAST).to(Out.dtype.element_ty)
        tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], out,
                 mask=m_valid[:, None] & (offs_dv < D_V)[None, :])


@triton.jit
def _hstu_attention_fwd(
    Q, K, V, Out, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, k_counts, K_scale, V_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_st, stride_sh,
    alpha, inv_norm,
    block_table, stride_bt,
    n_tiles_m, n_seq, n_heads,  # the work of a PERSISTENT grid: query tiles per sequence, sequences, heads
    K_desc, V_desc,  # TMA: tensor descriptors over K and V as [rows, heads * head dim] (else None)
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DYNAMIC: tl.constexpr, VISIBLE_NORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FAST_SILU: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, LAYOUT_COUNT: tl.constexpr,
    COUNT: tl.constexpr,  # VISIBLE_NORM and not LAYOUT_COUNT: count the visible keys tile by tile
    QUANT: tl.constexpr,  # 8-bit K/V with scales [slots, heads] in K_scale / V_scale
    PREFETCH: tl.constexpr = False, OVERLAP: tl.constexpr = False,  # KernelConfig's variants
    LOOP_STAGES: tl.constexpr = None, UNROLL: tl.constexpr = None, WARP_SPEC: tl.constexpr = False,
    SCAN: tl.constexpr = 0, PERSISTENT: tl.constexpr = False, TMA: tl.constexpr = False,
):
    if PERSISTENT:  # a grid of a few programs per SM, each taking work items (query tile, sequence, head)
        n_work = n_tiles_m * n_seq * n_heads
        for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
            # the last query tiles first: the candidates', which see the most keys
            pid_m = n_tiles_m - 1 - w // (n_seq * n_heads)
            _query_tile(pid_m, w // n_heads % n_seq, w % n_heads, Q, K, V, Out, q_offsets, k_offsets, q_group,
                        q_pos, k_group, k_pos, k_counts, K_scale, V_scale, stride_qt, stride_qh, stride_kt,
                        stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_st, stride_sh, alpha, inv_norm,
                        block_table, stride_bt, K_desc, V_desc, D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N,
                        DYNAMIC, VISIBLE_NORM, PRECISION, UPCAST, FAST_SILU, PAGED, PAGE, LAYOUT_COUNT, COUNT, QUANT,
                        PREFETCH, OVERLAP, LOOP_STAGES, UNROLL, WARP_SPEC, SCAN, TMA)
    else:  # program (query tile, sequence, head)
        _query_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), Q, K, V, Out, q_offsets, k_offsets,
                    q_group, q_pos, k_group, k_pos, k_counts, K_scale, V_scale, stride_qt, stride_qh, stride_kt,
                    stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_st, stride_sh, alpha, inv_norm,
                    block_table, stride_bt, K_desc, V_desc, D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N,
                    DYNAMIC, VISIBLE_NORM, PRECISION, UPCAST, FAST_SILU, PAGED, PAGE, LAYOUT_COUNT, COUNT, QUANT,
                    PREFETCH, OVERLAP, LOOP_STAGES, UNROLL, WARP_SPEC, SCAN, TMA)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape (query rows and key rows per tile, warps per program, software-pipelining depth) and the
    kernel's opt-in variants (KERNELS.md, versions 5+; off, the kernel is version 4):

    prefetch: each tile's block id (K/V rows) read one iteration ahead of its K/V loads (version 5).
    overlap: q K^T of tile t + 1 issued before P V of tile t, its SiLU after (version 6).
    loop_stages / unroll / warp_specialize: `tl.range` hints on the main loop (0 / False: none).
    scan: the remainder's metadata test on this many keys at a time (a multiple of block_n; 0: per tile).
    persistent: programs per SM of a persistent grid over (query tile, sequence, head) (0: one per tile).
    tma: K/V tiles through TMA tensor descriptors (version 7; not with overlap or 8-bit K/V; head dims
    powers of two >= 16, pages a multiple of block_n), for warp_specialize on Hopper.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False
    overlap: bool = False
    loop_stages: int = 0
    unroll: int = 0
    warp_specialize: bool = False
    scan: int = 0
    persistent: int = 0
    tma: bool = False

    def __str__(self) -> str:
        variants = [name for name in ("prefetch", "overlap", "tma") if getattr(self, name)]
        variants += [f"{tag}{getattr(self, name)}" for tag, name in
                     (("ls", "loop_stages"), ("u", "unroll"), ("scan", "scan"), ("p", "persistent"))
                     if getattr(self, name)]
        variants += ["ws"] if self.warp_specialize else []
        return " ".join([f"m{self.block_m} n{self.block_n} w{self.num_warps} s{self.num_stages}", *variants])

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
        for name in ("loop_stages", "unroll", "persistent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.scan and (self.scan < self.block_n or self.scan & (self.scan - 1)):
            raise ValueError(f"scan: expected 0 or a power of two >= block_n ({self.block_n}), got {self.scan}")
        if self.tma and self.overlap:
            raise ValueError("tma: a main loop of its own, not combined with overlap")


def default_config(d_qk: int, d_v: int, dtype: torch.dtype = torch.bfloat16,
                   layout_counts: bool = False) -> KernelConfig:
    """The launch shape used when none is given. Head dim 256 (every MTGR preset) was tuned on an H200 at the
    R1 shapes, with and without `layout_counts` (without the per-tile count, 64-row tiles win); smaller head
    dims use shapes that compile for sm_90 without register spills, untimed (KERNELS.md)."""
    d = max(triton.next_power_of_2(d_qk), triton.next_power_of_2(d_v))
    if dtype == torch.float32:  # twice the bytes per tile: half the keys per tile
        return KernelConfig(64, 32, num_warps=4, num_stages=2)
    if layout_counts and d > 128:  # versions 5 + scan (H200, R1: cold 0.719 / warm 0.330 ms against v4's 0.820 / 0.369)
        return KernelConfig(128, 32, num_warps=8, num_stages=3, prefetch=True, scan=256)
    if d <= 64:
        return KernelConfig(64, 32, num_warps=4, num_stages=3)
    if d <= 128:
        return KernelConfig(128, 32, num_warps=8, num_stages=3)
    return KernelConfig(128, 32, num_warps=8, num_stages=3)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter's CPU programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _descriptors(cfg: KernelConfig, k: torch.Tensor, v: torch.Tensor, quant: bool, page: int) -> tuple:
    """(K, V) TMA descriptors over [rows, heads * head dim] for cfg.tma, else (None, None)."""
    if not cfg.tma:
        return None, None
    d_qk, d_v = k.shape[2], v.shape[2]
    if quant or max(16, triton.next_power_of_2(d_qk)) != d_qk or max(16, triton.next_power_of_2(d_v)) != d_v:
        raise ValueError(f"config.tma: needs model-dtype K/V and head dims powers of two >= 16, got {k.dtype}, "
                         f"{d_qk}, {d_v}")
    if page % cfg.block_n or any(t.stride(1) != t.shape[2] for t in (k, v)) or not len(k):
        raise ValueError(f"config.tma: needs pages a multiple of block_n {cfg.block_n} (got {page}) and K/V rows "
                         "of contiguous heads")
    return tuple(TensorDescriptor(t, [t.shape[0], t.shape[1] * t.shape[2]], [t.stride(0), 1], [cfg.block_n, t.shape[2]])
                 for t in (k, v))


def _grid(cfg: KernelConfig, n_tiles_m: int, batch: int, heads: int, device: torch.device) -> tuple[int, ...]:
    """One program per (query tile, sequence, head), or a persistent grid of cfg.persistent programs per SM."""
    if cfg.persistent:
        return (min(n_tiles_m * batch * heads, cfg.persistent * _sm_count(device)),)
    return (n_tiles_m, batch, heads)


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return type(_hstu_attention_fwd).__name__ == "InterpretedFunction"


@triton.jit
def _key_counts_kernel(k_offsets, k_group, counts, BLOCK: tl.constexpr):
    """counts[b] = (number of U/S keys, number of U/S/R keys) of sequence b: one program per sequence."""
    b = tl.program_id(0)
    start = tl.load(k_offsets + b)
    end = tl.load(k_offsets + b + 1)
    n_us = tl.zeros([BLOCK], dtype=tl.int32)
    n_ctx = tl.zeros([BLOCK], dtype=tl.int32)
    for lo in range(start, end, BLOCK):
        offs = lo + tl.arange(0, BLOCK)
        g = tl.load(k_group + offs, mask=offs < end, other=_C).to(tl.int32)
        n_us += ((g == _U) | (g == _S)).to(tl.int32)
        n_ctx += ((g == _U) | (g == _S) | (g == _R)).to(tl.int32)
    tl.store(counts + 2 * b, tl.sum(n_us, axis=0))
    tl.store(counts + 2 * b + 1, tl.sum(n_ctx, axis=0))


def key_counts(k_group: torch.Tensor, k_offsets: torch.Tensor) -> torch.Tensor:
    """[B, 2] int32: per sequence, the number of U/S keys and of context (U/S/R) keys; one launch, no host sync.

    Depends only on the key layout: compute it once per step and pass it to every layer's call."""
    counts = torch.empty((len(k_offsets) - 1, 2), dtype=torch.int32, device=k_group.device)
    if len(counts):
        _key_counts_kernel[(len(counts),)](k_offsets, k_group, counts, BLOCK=1024)  # pyright: ignore[reportArgumentType] (Triton's jit typing)
    return counts


def _check_offsets(q_offsets: torch.Tensor, k_offsets: torch.Tensor, t_q: int, t_k: int) -> int:
    """The longest query sequence, after checking that both offsets are monotone and span q and k (one sync)."""
    q_len, k_len = q_offsets[1:] - q_offsets[:-1], k_offsets[1:] - k_offsets[:-1]
    max_q, min_q, min_k, q0, q_end, k0, k_end = torch.stack(
        [q_len.max(), q_len.min(), k_len.min(), q_offsets[0], q_offsets[-1], k_offsets[0], k_offsets[-1]]).tolist()
    if q0 != 0 or q_end != t_q or min_q < 0:
        raise ValueError(f"q_offsets: expected non-decreasing offsets from 0 to {t_q} (the query tokens), "
                         f"got {q0}..{q_end}")
    if k0 != 0 or k_end != t_k or min_k < 0:
        raise ValueError(f"k_offsets: expected non-decreasing offsets from 0 to {t_k} (the key tokens), "
                         f"got {k0}..{k_end}")
    return int(max_q)


def _check_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> bool:
    """Whether K/V are 8-bit (with matching scales), after checking the dtypes and the scales' shapes."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: expected one dtype of {SUPPORTED_DTYPES}, got {q.dtype}")
    if k_scale is None and v_scale is None:
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"k, v: expected q's dtype {q.dtype} (or 8-bit with scales), got {k.dtype}, {v.dtype}")
        return False
    if k.dtype not in QUANT_DTYPES or v.dtype != k.dtype:
        raise ValueError(f"k, v: with scales, expected one 8-bit dtype of {QUANT_DTYPES}, got {k.dtype}, {v.dtype}")
    for name, scale, t in (("k_scale", k_scale, k), ("v_scale", v_scale, v)):
        if scale is None or scale.shape != t.shape[:2] or scale.dtype != torch.float32 or scale.stride(1) != 1:
            raise ValueError(f"{name}: expected float32 {tuple(t.shape[:2])} with unit last stride, got "
                             f"{None if scale is None else (scale.dtype, tuple(scale.shape))}")
    if k_scale is not None and v_scale is not None and k_scale.stride() != v_scale.stride():
        raise ValueError("k_scale, v_scale: expected the same strides")
    return True


def triton_hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256, alpha: float | None = None,
    max_len_q: int | None = None, k_counts: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: KernelConfig | None = None, fast_silu: bool | None = None,
    block_table: torch.Tensor | None = None, page_size: int = 0, layout_counts: bool = False,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jagged HSTU attention without relative bias: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv].

    Shapes are checked by the dispatcher (`grinfer.ops.hstu_attention.hstu_attention`). What depends only on
    the token layout can be computed once and shared by every layer: `max_len_q` (the longest query
    sequence; without it the offsets are checked and it is read, one host sync) and `k_counts`
    (`key_counts(k_group, k_offsets)`). `out` is written in place. `fast_silu` (default: on for bf16/fp16
    on the GPU) evaluates SiLU with one tanh.approx instead of exp + reciprocal.

    Paged keys (the engine's KV cache, read in place): with `block_table` [B, max_blocks], k and v are
    pools [slots, H, D] and key j of sequence b lives at slot block_table[b, j // page_size] * page_size
    + j % page_size; k_offsets, k_group and k_pos still describe the logical keys.

    `layout_counts` (dynamic mask, 'visible' normaliser): the caller promises the engine's layout (each
    sequence's keys are its context, index == position, then its candidates; its queries see every context
    key a query of their kind may see), so the visible-key counts follow from k_counts instead of being
    counted tile by tile.

    8-bit K/V (int8 or fp8 e4m3, as `grinfer.ops.reference.kv_quant` makes them, e.g. the engine's 8-bit
    pool): k and v hold the 8-bit values and k_scale, v_scale [Tk (or slots), H] float32 their scales; the
    kernel dequantises them on the fly.
    """
    return launch_hstu_attention(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                 normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, max_len_q=max_len_q,
                                 k_counts=k_counts, out=out, config=config, fast_silu=fast_silu,
                                 block_table=block_table, page_size=page_size, layout_counts=layout_counts,
                                 k_scale=k_scale, v_scale=v_scale)[0]


def launch_hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256, alpha: float | None = None,
    max_len_q: int | None = None, k_counts: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: KernelConfig | None = None, fast_silu: bool | None = None,
    block_table: torch.Tensor | None = None, page_size: int = 0, layout_counts: bool = False,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, object | None]:
    """`triton_hstu_attention`, also returning the launched compiled kernel (None when nothing ran), whose
    registers, spills and shared memory check.py reports."""
    check_modes(mode, normalizer)
    quant = _check_dtypes(q, k, v, k_scale, v_scale)
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
        return out, None
    cfg = config or default_config(d_qk, d_v, q.dtype, layout_counts)
    if layout_counts and mode != "dynamic":
        raise ValueError("layout_counts: the layout's visible-key counts are those of the dynamic mask")
    if block_table is not None:
        check_block_table(block_table, page_size, batch)
    if max_len_q is None:
        max_len_q = _check_offsets(q_offsets, k_offsets, t_q, k.shape[0] if block_table is None else len(k_group))
    if max_len_q == 0 or heads == 0 or t_q == 0:
        return out, None
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    alpha = 1.0 / math.sqrt(d_qk) if alpha is None else float(alpha)
    counts = key_counts(k_group, k_offsets) if k_counts is None else k_counts
    n_tiles_m = triton.cdiv(max_len_q, cfg.block_m)
    grid = _grid(cfg, n_tiles_m, batch, heads, q.device)
    if fast_silu is None:
        fast_silu = q.dtype != torch.float32
    k_sc = k_scale if quant and k_scale is not None else counts  # any tensor: unread without 8-bit K/V
    v_sc = v_scale if quant and v_scale is not None else counts
    stride_st, stride_sh = k_sc.stride() if quant else (0, 0)
    compiled = _hstu_attention_fwd[grid](
        q, k, v, out, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, counts, k_sc, v_sc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        stride_st, stride_sh,
        alpha, 1.0 / float(max_seq_len),
        k_offsets if block_table is None else block_table, 0 if block_table is None else block_table.stride(0),
        n_tiles_m, batch, heads, *_descriptors(cfg, k, v, quant, page_size if block_table is not None else cfg.block_n),
        D_QK=d_qk, D_V=d_v,
        BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)), BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DYNAMIC=mode == "dynamic", VISIBLE_NORM=normalizer == "visible",
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreted() and q.dtype == torch.bfloat16,
        FAST_SILU=bool(fast_silu) and not interpreted(),  # inline PTX does not run in the interpreter
        PAGED=block_table is not None, PAGE=page_size if block_table is not None else 1,
        LAYOUT_COUNT=layout_counts, COUNT=normalizer == "visible" and not layout_counts, QUANT=quant,
        PREFETCH=cfg.prefetch, OVERLAP=cfg.overlap, LOOP_STAGES=cfg.loop_stages or None, UNROLL=cfg.unroll or None,
        WARP_SPEC=cfg.warp_specialize, SCAN=cfg.scan, PERSISTENT=cfg.persistent > 0, TMA=cfg.tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,  # pyright: ignore[reportCallIssue] (Triton's jit typing)
    )
    return out, compiled
