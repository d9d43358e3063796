"""Jagged HSTU attention under the MTGR dynamic (or causal) mask: a Triton forward kernel.

The twin of `grinfer.ops.reference.hstu_attention` without the relative bias (the dispatcher in
`grinfer.ops.attention` falls back to the reference when bias tables are given):

    out_i = sum_j SiLU(alpha * q_i . k_j) * M(i, j) / N_i * v_j

One launch covers a whole jagged batch (q_offsets, k_offsets; no padding). Program (m, b, h)
computes query tile m of sequence b for head h. M is evaluated in the kernel from the tokens'
group ids and positions, exactly as `visible()`; N_i is the number of visible keys (counted in
the kernel) or the constant max_seq_len. Inputs bf16/fp16/fp32, fp32 accumulation, the output in
q's dtype; head dims up to 256 (padded to a power of two, masked).

How the key loop is cut (the layout the engine and the model produce: within a sequence, keys in
position order [U | S | R | C], with key index == position for the context keys, and queries a
subset in the same order):

1. The diagonal. A candidate query sees exactly one candidate key, itself. Its index is guessed
   as if the candidates were the key sequence's consecutive suffix, then checked against the
   key's group and position; when the check holds, SiLU(alpha q_i . k_i) v_i is added on the
   diagonal (a row-wise dot product) and every candidate key is left out of that query's tile
   loop, so the candidate-candidate block costs one row per query instead of a dense tile.
2. Main loop over key tiles [0, hi): hi from the query tile and the per-sequence key counts —
   U/S queries need the U/S keys, R queries also the R keys up to their own position, candidate
   queries every context key (causal: keys up to the tile's last position). No branches, so the
   loads pipeline.
3. Remainder [hi, Lk): each tile is tested first on its keys' metadata alone (a conservative test
   that never drops a visible key) and skipped when nothing in it is visible — with the layout
   above every such tile is skipped.

Only the speed relies on that layout: the mask is exact in every tile that is computed, and the
remainder loop catches any visible key outside [0, hi), so any key order gives the reference's
result. One assumption: positions are unique within a sequence (a candidate key whose position
equals the query's is the query itself), as "position in the full sequence" implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grinfer.ops.reference.hstu_attention import GROUP_C, GROUP_R, GROUP_S, GROUP_U

_U = tl.constexpr(GROUP_U)
_S = tl.constexpr(GROUP_S)
_R = tl.constexpr(GROUP_R)
_C = tl.constexpr(GROUP_C)
_BIG = tl.constexpr(2**30)

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _visible(qg, qp, q_diag, kg, kp, DYNAMIC: tl.constexpr):
    """`visible()` on a [M, N] tile, minus the candidate self-keys that the diagonal already handles."""
    if DYNAMIC:
        context_key = (kg == _U) | (kg == _S)
        realtime_key = (kg == _R) & (((qg == _R) & (kp <= qp)) | (qg == _C))
        self_candidate = (kg == _C) & (kp == qp) & (q_diag == 0)
        m = context_key | realtime_key | self_candidate
    else:
        m = kp <= qp
    return m


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
def _round(x, dtype, UPCAST: tl.constexpr):
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
def _tile(acc, cnt, q, qg, qp, q_diag, start_n, lk, k_rows0, Kh, Vh, k_group, k_pos, stride_kt, stride_vt,
          alpha, offs_dqk, offs_dv, D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr,
          DYNAMIC: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += (SiLU(alpha q K^T) * M) V and cnt += row sums of M over key tile [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < lk
    rows = k_rows0 + offs_n
    kg = tl.load(k_group + rows, mask=n_valid, other=-1).to(tl.int32)
    kp = tl.load(k_pos + rows, mask=n_valid, other=0).to(tl.int32)
    kt = tl.load(Kh + rows[None, :] * stride_kt + offs_dqk[:, None],
                 mask=n_valid[None, :] & (offs_dqk < D_QK)[:, None], other=0.0)
    s = _dot(q, kt, PRECISION, UPCAST) * alpha
    m = _visible(qg[:, None], qp[:, None], q_diag[:, None], kg[None, :], kp[None, :], DYNAMIC) & n_valid[None, :]
    p = tl.where(m, s / (1.0 + tl.exp(-s)), 0.0)
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
        q_diag = diag.to(tl.int32)

        # the main loop's bound, from the per-sequence key counts (keys in [U | S | R | C] order)
        n_us = tl.load(k_counts + 2 * b)
        n_ctx = tl.load(k_counts + 2 * b + 1)
        has_c = tl.max((m_valid & (qg == _C)).to(tl.int32), axis=0) > 0
        max_r_pos = tl.max(tl.where(m_valid & (qg == _R), qp, -1), axis=0)
        hi = tl.where(has_c, n_ctx, tl.maximum(n_us, tl.minimum(n_ctx, max_r_pos + 1)))
        # for the remainder's test: the positions of queries whose self-key is not on the diagonal
        off_diag = m_valid & (q_diag == 0)
        min_od_pos = tl.min(tl.where(off_diag, qp, _BIG), axis=0)
        max_od_pos = tl.max(tl.where(off_diag, qp, -1), axis=0)
    else:
        q_diag = tl.zeros([BLOCK_M], dtype=tl.int32)
        max_pos = tl.max(tl.where(m_valid, qp, -1), axis=0)
        hi = max_pos + 1
    hi = tl.minimum(hi, lk)

    # 2. the main loop: every key tile that (with the usual layout) holds visible keys
    for start_n in range(0, hi, BLOCK_N):
        acc, cnt = _tile(acc, cnt, q, qg, qp, q_diag, start_n, lk, k_start, Kh, Vh, k_group, k_pos,
                         stride_kt, stride_vt, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC, VISIBLE_NORM,
                         PRECISION, UPCAST)

    # 3. the remainder: test each tile's key metadata, compute it only if something in it is visible
    for start_n in range((hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < lk
        kg = tl.load(k_group + k_start + offs_n, mask=n_valid, other=-1).to(tl.int32)
        kp = tl.load(k_pos + k_start + offs_n, mask=n_valid, other=0).to(tl.int32)
        if DYNAMIC:
            seen = (kg == _U) | (kg == _S)
            seen |= (kg == _R) & ((kp <= max_r_pos) | has_c)
            seen |= (kg == _C) & (kp >= min_od_pos) & (kp <= max_od_pos)
        else:
            seen = kp <= max_pos
        if tl.max((seen & n_valid).to(tl.int32), axis=0) > 0:
            acc, cnt = _tile(acc, cnt, q, qg, qp, q_diag, start_n, lk, k_start, Kh, Vh, k_group, k_pos,
                             stride_kt, stride_vt, alpha, offs_dqk, offs_dv, D_QK, D_V, BLOCK_N, DYNAMIC,
                             VISIBLE_NORM, PRECISION, UPCAST)

    if VISIBLE_NORM:
        out = acc / tl.maximum(cnt, 1.0)[:, None]
    else:
        out = acc * inv_norm
    out = _round(out, Out.dtype.element_ty, UPCAST).to(Out.dtype.element_ty)
    tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], out,
             mask=m_valid[:, None] & (offs_dv < D_V)[None, :])


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape: query rows and key rows per tile, warps per program, software-pipelining depth."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")


def default_config(d_qk: int, d_v: int) -> KernelConfig:
    """The launch shape used when none is given (tuned on an H100 at the R1 shapes; see KERNELS.md)."""
    d = max(triton.next_power_of_2(d_qk), triton.next_power_of_2(d_v))
    if d <= 64:
        return KernelConfig(128, 64, num_warps=4, num_stages=3)
    if d <= 128:
        return KernelConfig(128, 64, num_warps=8, num_stages=2)
    return KernelConfig(128, 64, num_warps=8, num_stages=2)


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return type(_hstu_attention_fwd).__name__ == "InterpretedFunction"


def key_counts(k_group: torch.Tensor, k_offsets: torch.Tensor) -> torch.Tensor:
    """[B, 2] int32: per sequence, the number of U/S keys and of context (U/S/R) keys (no host sync)."""
    flags = torch.stack([k_group <= GROUP_S, k_group <= GROUP_R], dim=1).to(torch.int32)
    csum = torch.nn.functional.pad(flags.cumsum(0, dtype=torch.int32), (0, 0, 1, 0))
    return (csum[k_offsets[1:]] - csum[k_offsets[:-1]]).contiguous()


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


def triton_hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256, alpha: float | None = None,
    max_len_q: int | None = None, out: torch.Tensor | None = None, config: KernelConfig | None = None,
) -> torch.Tensor:
    """Jagged HSTU attention without relative bias: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv].

    Shapes are checked by the dispatcher (`grinfer.ops.attention.hstu_attention`). `max_len_q`, the
    longest query sequence, saves a host sync when the caller knows it; `out` is written in place.
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
    cfg = config or default_config(d_qk, d_v)
    alpha = 1.0 / math.sqrt(d_qk) if alpha is None else float(alpha)
    counts = key_counts(k_group, k_offsets)
    grid = (triton.cdiv(max_len_q, cfg.block_m), batch, heads)
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
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
