"""Jagged HSTU attention: the entry points that check shapes once and pick the kernel.

    hstu_attention        q, k, v jagged tokens
    paged_hstu_attention  keys and values in a paged pool, read through per-sequence block tables (the
                          engine's KV cache): the reference gathers each sequence's rows, the kernel reads them
                          in place
    plan_attention, attend  the planned path the model takes: the mask, normaliser and bias indices built once
                          per forward (an AttentionPlan) and shared by every layer; the reference kernel only

    kernel="reference"  grinfer.ops.reference.hstu_attention (plain PyTorch, any device, the definition)
    kernel="triton"     grinfer.ops.triton.hstu_attention (forward only, no relative bias)
    kernel="auto"       triton for CUDA tensors when Triton is importable, no bias tables are given,
                        the head dims are at most 256 and no gradient is needed; else the reference

The signatures are the reference's, plus `kernel` (and, paged, the kernel's launch hints). 8-bit K/V (int8 /
fp8 e4m3) come with k_scale, v_scale [Tk (or slots), H] (grinfer.ops.reference.kv_quant); both kernels
dequantise them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from grinfer.ops.dispatch import auto_picks_triton, check_kernel
from grinfer.ops.reference import hstu_attention as reference
from grinfer.ops.reference.hstu_attention import AttentionPlan

if TYPE_CHECKING:
    from grinfer.ops.triton.hstu_attention import KernelConfig

TRITON_MAX_HEAD_DIM = 256
EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)  # K/V dtypes that come with scales


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str, normalizer: str, q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the first argument whose shape, dtype or device does not fit (no host sync)."""
    check_modes(mode, normalizer)
    _check_qkv(q, (("k", k, k_scale), ("v", v, v_scale)))
    _check_keys(q, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, k.shape[0], (("k", k), ("v", v)))
    _check_bias(q_ts, k_ts, pos_table, time_table)


def check_paged_inputs(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, page_size: int,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str, normalizer: str, q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """`check_inputs` for keys in a paged pool: k_pool, v_pool [slots, H, D] (scales [slots, H]), k_group and k_pos
    one per logical key, block_table [B, max_blocks] integers, page_size a power of two (no host sync)."""
    check_modes(mode, normalizer)
    _check_qkv(q, (("k_pool", k_pool, k_scale), ("v_pool", v_pool, v_scale)))
    _check_keys(q, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, k_group.numel(),
                (("k_pool", k_pool), ("v_pool", v_pool), ("block_table", block_table)))
    _check_bias(q_ts, k_ts, pos_table, time_table)
    check_block_table(block_table, page_size, len(q_offsets) - 1)


def check_block_table(block_table: torch.Tensor, page_size: int, batch: int) -> None:
    """Raise ValueError unless block_table is integer [batch, max_blocks] and page_size a power of two (no host
    sync); the Triton kernel's launch checks its block tables here too."""
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.is_floating_point():
        raise ValueError(f"block_table: expected integer [{batch}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size: expected a power of two, got {page_size!r}")


def check_modes(mode: str, normalizer: str) -> None:
    """Raise ValueError naming the mask mode or normaliser that no kernel has."""
    if mode not in ("dynamic", "causal"):
        raise ValueError(f"mask mode: expected 'dynamic' or 'causal', got {mode!r}")
    if normalizer not in ("visible", "max_len"):
        raise ValueError(f"normalizer: expected 'visible' or 'max_len', got {normalizer!r}")


def _check_bias(q_ts: torch.Tensor | None, k_ts: torch.Tensor | None, pos_table: torch.Tensor | None,
                time_table: torch.Tensor | None) -> None:
    if (pos_table is None) != (time_table is None):
        raise ValueError("pos_table, time_table: give both relative-bias tables or neither")
    if pos_table is not None and (q_ts is None or k_ts is None):
        raise ValueError("q_ts, k_ts: the relative bias needs the query and key timestamps")


def _check_qkv(q: torch.Tensor, kv: tuple[tuple[str, torch.Tensor, torch.Tensor | None], ...]) -> None:
    """q [T, H, Dqk]; kv: (name, tensor, its scale or None) of the keys, then of the values."""
    (k_name, k, _), (v_name, v, _) = kv
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if not q.is_floating_point() or q.dtype in EIGHT_BIT:
        raise ValueError(f"q: expected a floating-point tensor wider than 8 bits, got {q.dtype}")
    for name, t, scale in kv:
        scale_name = f"{name[0]}_scale"
        if scale is not None:
            if t.dtype not in EIGHT_BIT or scale.shape != t.shape[:2] or not scale.is_floating_point():
                raise ValueError(f"{scale_name}: expected 8-bit {name} ({', '.join(map(str, EIGHT_BIT))}) and "
                                 f"float scales {tuple(t.shape[:2])}, got {t.dtype} and {tuple(scale.shape)}")
        elif not t.is_floating_point() or t.dtype in EIGHT_BIT:
            raise ValueError(f"{name}: expected a floating-point tensor (8-bit only with {scale_name}), got {t.dtype}")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"{k_name}: expected [Tk, {q.shape[1]}, {q.shape[2]}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{v_name}: expected [{k.shape[0]}, {k.shape[1]}, Dv] to match {k_name} "
                         f"{tuple(k.shape)}, got {tuple(v.shape)}")


def _check_keys(q: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor, q_group: torch.Tensor,
                q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor, num_keys: int,
                kv: tuple[tuple[str, torch.Tensor], ...]) -> None:
    """The layout of num_keys keys, and every tensor on q's device."""
    _check_layout(q_offsets, k_offsets, (("q_group", q_group, q.shape[0]), ("q_pos", q_pos, q.shape[0]),
                                         ("k_group", k_group, num_keys), ("k_pos", k_pos, num_keys)))
    device = q.device
    for name, t in (*kv, ("q_offsets", q_offsets), ("k_offsets", k_offsets), ("q_group", q_group),
                    ("q_pos", q_pos), ("k_group", k_group), ("k_pos", k_pos)):
        if t.device != device:
            raise ValueError(f"{name}: expected the device of q ({device}), got {t.device}")


def _check_layout(q_offsets: torch.Tensor, k_offsets: torch.Tensor,
                  per_token: tuple[tuple[str, torch.Tensor, int], ...]) -> None:
    """Offsets [B + 1] of one batch size; each (name, tensor, tokens) one integer per token."""
    for name, off in (("q_offsets", q_offsets), ("k_offsets", k_offsets)):
        if off.dim() != 1 or len(off) < 1 or off.is_floating_point():
            raise ValueError(f"{name}: expected integer offsets [B + 1], got {off.dtype} {tuple(off.shape)}")
    if len(q_offsets) != len(k_offsets):
        raise ValueError(f"q_offsets, k_offsets: expected the same batch size, got {len(q_offsets) - 1} and "
                         f"{len(k_offsets) - 1} sequences")
    for name, t, n in per_token:
        if t.shape != (n,) or t.is_floating_point():
            raise ValueError(f"{name}: expected {n} integers (one per token), got {t.dtype} {tuple(t.shape)}")


def choose_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  has_bias: bool) -> str:
    """'reference' or 'triton' for this call (see the module docstring)."""
    check_kernel(kernel)
    head_dim = max(q.shape[2], v.shape[2])
    if kernel == "triton":
        if has_bias:
            raise ValueError("kernel='triton': the Triton kernel has no relative bias; use 'reference' or 'auto'")
        if head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"kernel='triton': head dims up to {TRITON_MAX_HEAD_DIM}, got {head_dim}")
        return "triton"
    if kernel == "auto" and not has_bias and head_dim <= TRITON_MAX_HEAD_DIM and auto_picks_triton(q, k, v):
        return "triton"
    return "reference"


def hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    alpha: float | None = None,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Jagged HSTU attention q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv] (q's dtype).

    See `grinfer.ops.reference.hstu_attention.hstu_attention` for the arguments and the maths.
    """
    check_inputs(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode, normalizer=normalizer,
                 q_ts=q_ts, k_ts=k_ts, pos_table=pos_table, time_table=time_table, k_scale=k_scale, v_scale=v_scale)
    if choose_kernel(kernel, q, k, v, has_bias=pos_table is not None) == "reference":
        return reference.hstu_attention(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                        normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, q_ts=q_ts,
                                        k_ts=k_ts, pos_table=pos_table, time_table=time_table, k_scale=k_scale,
                                        v_scale=v_scale)
    from grinfer.ops.triton.hstu_attention import triton_hstu_attention

    return triton_hstu_attention(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                 normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, k_scale=k_scale,
                                 v_scale=v_scale)


def paged_hstu_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, page_size: int,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    alpha: float | None = None,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    max_len_q: int | None = None, k_counts: torch.Tensor | None = None, layout_counts: bool = False,
    config: KernelConfig | None = None, kernel: str = "auto",
) -> torch.Tensor:
    """HSTU attention over keys in a paged pool -> [Tq, H, Dv] (q's dtype): key j of sequence b is row
    block_table[b, j // page_size] * page_size + j % page_size of k_pool [slots, H, Dqk] and v_pool [slots, H, Dv]
    (8-bit ones with k_scale, v_scale [slots, H]); k_offsets, k_group, k_pos (and k_ts) describe the logical keys.

    See `grinfer.ops.reference.hstu_attention.paged_hstu_attention`. The Triton kernel's launch hints change
    nothing in the result and the reference ignores them: `max_len_q` (the longest query sequence), `k_counts`
    (`key_counts(k_group, k_offsets)`), `layout_counts` (a promise that the keys follow the engine's layout, so the
    visible-key counts follow from k_counts) and `config` (the launch shape). Each sequence's keys must fit its
    block-table row: the reference checks (a host sync), the kernel trusts it.
    """
    check_paged_inputs(q, k_pool, v_pool, block_table, page_size, q_offsets, k_offsets, q_group, q_pos, k_group,
                       k_pos, mode=mode, normalizer=normalizer, q_ts=q_ts, k_ts=k_ts, pos_table=pos_table,
                       time_table=time_table, k_scale=k_scale, v_scale=v_scale)
    if choose_kernel(kernel, q, k_pool, v_pool, has_bias=pos_table is not None) == "reference":
        return reference.paged_hstu_attention(q, k_pool, v_pool, block_table, page_size, q_offsets, k_offsets,
                                              q_group, q_pos, k_group, k_pos, mode=mode, normalizer=normalizer,
                                              max_seq_len=max_seq_len, alpha=alpha, q_ts=q_ts, k_ts=k_ts,
                                              pos_table=pos_table, time_table=time_table, k_scale=k_scale,
                                              v_scale=v_scale)
    from grinfer.ops.triton.hstu_attention import triton_hstu_attention

    return triton_hstu_attention(q, k_pool, v_pool, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                 normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, max_len_q=max_len_q,
                                 k_counts=k_counts, config=config, block_table=block_table, page_size=page_size,
                                 layout_counts=layout_counts, k_scale=k_scale, v_scale=v_scale)


def plan_attention(
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    bias_reach: int | None = None, num_time_buckets: int | None = None,
) -> AttentionPlan:
    """The mask, normaliser and (with bias_reach) relative-bias indices of the queries over the keys, shared by
    every layer's `attend` (see `grinfer.ops.reference.hstu_attention.plan_attention`)."""
    check_modes(mode, normalizer)
    tq, tk = q_group.numel(), k_group.numel()
    _check_layout(q_offsets, k_offsets, (("q_group", q_group, tq), ("q_pos", q_pos, tq), ("k_group", k_group, tk),
                                         ("k_pos", k_pos, tk)))
    return reference.plan_attention(q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                    normalizer=normalizer, max_seq_len=max_seq_len, q_ts=q_ts, k_ts=k_ts,
                                    bias_reach=bias_reach, num_time_buckets=num_time_buckets)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, alpha: float | None = None,
           pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Jagged HSTU attention of q [Tq, H, Dqk] over k [Tk, H, Dqk], v [Tk, H, Dv] under a plan -> [Tq, H, Dv] (the
    reference: a plan is its padded mask; see `grinfer.ops.reference.hstu_attention.attend`)."""
    _check_qkv(q, (("k", k, k_scale), ("v", v, v_scale)))
    for name, t, index in (("q", q, plan.q_index), ("k", k, plan.k_index)):
        if t.shape[0] != index[0].shape[0]:
            raise ValueError(f"{name}: expected the plan's {index[0].shape[0]} tokens, got {t.shape[0]}")
    if (pos_table is None) != (time_table is None):
        raise ValueError("pos_table, time_table: give both relative-bias tables or neither")
    if pos_table is not None and plan.rel is None:
        raise ValueError("pos_table: the plan has no relative-bias indices (plan_attention without bias_reach)")
    return reference.attend(q, k, v, plan, alpha, pos_table, time_table, k_scale, v_scale)
