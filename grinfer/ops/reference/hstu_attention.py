"""HSTU pointwise attention under the MTGR dynamic mask, on jagged tensors (the definition).

Queries are any subset of a sequence's tokens and keys any superset that contains every key the
queries may see, so the same op serves a whole uncached sequence and "new tokens attend over
cached K/V plus themselves". Tokens are identified by their token group (U/S/R/C) and their
position in the full sequence [U | S | R | C].

    A[i, j] = SiLU(alpha * q_i . k_j + bias(i, j)) * M[i, j] / N_i ;  out_i = sum_j A[i, j] v_j

M is the MTGR dynamic mask (or the plain causal mask); N_i is a constant (max_seq_len) or the
number of keys query i may see. Neither depends on tokens a context query cannot see, so a
context token's output never changes when candidates or later events are added.

`paged_hstu_attention` is the same op with K/V read from a paged pool through per-sequence block tables
(the engine's cache): key j of sequence b lives at slot block_table[b, j // page_size] * page_size + j % page_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grinfer.ops.groups import GROUP_C, relative_index, time_bucket, visible
from grinfer.ops.jagged import jagged_to_padded, max_length, padded_index, padded_to_jagged
from grinfer.ops.reference.kv_quant import dequantize_kv


@dataclass
class AttentionPlan:
    """Everything about one attention call that does not depend on Q, K, V: layout, mask and bias
    indices. Built once per forward (or engine step) and shared by all layers."""

    q_offsets: torch.Tensor
    k_offsets: torch.Tensor
    lq: int
    lk: int
    scale: torch.Tensor  # [B, Lq, Lk] float32: mask / normaliser (0 where a key is not visible)
    q_index: tuple[torch.Tensor, torch.Tensor]  # padded_index of the queries and of the keys
    k_index: tuple[torch.Tensor, torch.Tensor]
    rel: torch.Tensor | None = None  # [B, Lq, Lk] relative-position index into pos_table
    bucket: torch.Tensor | None = None  # [B, Lq, Lk] time-bucket index into time_table


def plan_attention(
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    bias_reach: int | None = None, num_time_buckets: int | None = None,
) -> AttentionPlan:
    """The mask, normaliser and (with bias_reach) relative-bias indices of an attention call.

    Candidate queries and keys take the context length as their position for the bias, so a
    candidate's score does not depend on its place in the candidate list.
    """
    lq, lk = max_length(q_offsets), max_length(k_offsets)
    qi, ki = padded_index(q_offsets, len(q_group)), padded_index(k_offsets, len(k_group))
    qg, q_valid = jagged_to_padded(q_group, q_offsets, lq, pad=-1, index=qi)
    qpos, _ = jagged_to_padded(q_pos, q_offsets, lq, index=qi)
    kg, k_valid = jagged_to_padded(k_group, k_offsets, lk, pad=-1, index=ki)
    kpos, _ = jagged_to_padded(k_pos, k_offsets, lk, index=ki)
    mask = visible(qg[:, :, None], qpos[:, :, None], kg[:, None, :], kpos[:, None, :], mode)
    mask &= q_valid[:, :, None] & k_valid[:, None, :]  # [B, Lq, Lk]
    if normalizer == "visible":
        scale = mask / mask.sum(-1, keepdim=True).clamp(min=1)
    elif normalizer == "max_len":
        scale = mask / float(max_seq_len)
    else:
        raise ValueError(f"normalizer: expected 'visible' or 'max_len', got {normalizer!r}")
    plan = AttentionPlan(q_offsets, k_offsets, lq, lk, scale.float(), qi, ki)
    if bias_reach is not None:
        if q_ts is None or k_ts is None or num_time_buckets is None:
            raise ValueError("q_ts, k_ts, num_time_buckets: the relative bias needs the timestamps and bucket count")
        ctx_len = ((kg != GROUP_C) & k_valid).sum(1, keepdim=True)  # [B, 1]
        qpos_b = torch.where(qg == GROUP_C, ctx_len, qpos)
        kpos_b = torch.where(kg == GROUP_C, ctx_len, kpos)
        qts, _ = jagged_to_padded(q_ts, q_offsets, lq, index=qi)
        kts, _ = jagged_to_padded(k_ts, k_offsets, lk, index=ki)
        plan.rel = relative_index(qpos_b[:, :, None], kpos_b[:, None, :], bias_reach)
        plan.bucket = time_bucket(qts[:, :, None] - kts[:, None, :], num_time_buckets)
    return plan


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, alpha: float | None = None,
           pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Jagged HSTU attention under a plan: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv].

    8-bit K/V (int8 or fp8 e4m3, `grinfer.ops.reference.kv_quant`) come with their scales k_scale, v_scale
    [Tk, H] and are dequantised here. Computed in float32 whatever the input dtype; the result has q's dtype.
    """
    alpha = 1.0 / math.sqrt(q.shape[2]) if alpha is None else alpha
    k = k.float() if k_scale is None else dequantize_kv(k, k_scale)
    v = v.float() if v_scale is None else dequantize_kv(v, v_scale)
    qp, _ = jagged_to_padded(q.float(), plan.q_offsets, plan.lq, index=plan.q_index)  # [B, Lq, H, D]
    kp, _ = jagged_to_padded(k, plan.k_offsets, plan.lk, index=plan.k_index)
    vp, _ = jagged_to_padded(v, plan.k_offsets, plan.lk, index=plan.k_index)
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) * alpha
    if pos_table is not None:
        # F.embedding rather than table[index]: its backward reduces sorted indices instead of piling
        # millions of atomic adds onto a few hundred table entries (227 ms -> ~1 ms per layer on an H200)
        lookup = lambda table, idx: F.embedding(idx, table.float()[:, None]).squeeze(-1)
        scores = scores + (lookup(pos_table, plan.rel) + lookup(time_table, plan.bucket))[:, None]
    out = torch.einsum("bhqk,bkhd->bqhd", F.silu(scores) * plan.scale[:, None], vp)
    return padded_to_jagged(out, plan.q_offsets, plan.q_index).to(q.dtype)


def hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    alpha: float | None = None,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jagged HSTU attention in one call (plan + attend); see `plan_attention` and `attend`."""
    plan = plan_attention(q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode, normalizer=normalizer,
                          max_seq_len=max_seq_len, q_ts=q_ts, k_ts=k_ts,
                          bias_reach=None if pos_table is None else (pos_table.shape[0] - 1) // 2,
                          num_time_buckets=None if time_table is None else time_table.shape[0])
    return attend(q, k, v, plan, alpha, pos_table, time_table, k_scale, v_scale)


def paged_slots(block_table: torch.Tensor, page_size: int, k_offsets: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[num_keys] pool slot of each logical key: key j of sequence b at block_table[b, j // page_size] * page_size
    + j % page_size. Raises ValueError if a sequence has more keys than its block-table row holds."""
    longest = max_length(k_offsets)
    if longest > block_table.shape[1] * page_size:
        raise ValueError(f"block_table: a sequence has {longest} keys, more than its {block_table.shape[1]} pages "
                         f"of {page_size} hold")
    seq, j = padded_index(k_offsets, num_keys)
    return block_table.long()[seq, j // page_size] * page_size + j % page_size


def paged_hstu_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, page_size: int,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    alpha: float | None = None,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`hstu_attention` over keys in a paged pool: k_pool [slots, H, Dqk], v_pool [slots, H, Dv] (8-bit ones with
    k_scale, v_scale [slots, H]) and block_table [B, max_blocks]; k_offsets, k_group, k_pos (and k_ts) describe the
    logical keys. Each sequence's K/V rows are gathered through its block table, then attended as jagged keys."""
    slots = paged_slots(block_table, page_size, k_offsets, len(k_group))
    gather = lambda t: None if t is None else t[slots]
    return hstu_attention(q, k_pool[slots], v_pool[slots], q_offsets, k_offsets, q_group, q_pos, k_group, k_pos,
                          mode=mode, normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, q_ts=q_ts,
                          k_ts=k_ts, pos_table=pos_table, time_table=time_table, k_scale=gather(k_scale),
                          v_scale=gather(v_scale))
