"""The indices and per-sequence metadata of one step, built on the host and copied to the device at once.

A step's queries are each work item's new context tokens then its candidates; its keys are each item's
context [0, ctx_end) (read from the paged KV cache) then its candidates (never cached: their K/V live
for one step in scratch pages). Backends get a `StepIndex`: the eager path gathers keys with
`ctx_slots`/`cand_src`, the fused path hands the block tables to the attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grinfer.engine.kv_cache import KVCache
from grinfer.features.device import upload
from grinfer.model.layers import TokenMeta
from grinfer.ops.jagged import offsets_of


@dataclass
class StepIndex:
    """Gather/scatter indices of one step, shared by all its layers."""

    q_rows: torch.Tensor  # rows of the step's concatenated sequences that are computed now
    q_meta: TokenMeta
    k_meta: TokenMeta
    write_src: torch.Tensor  # rows of the new-token tensor that are context tokens
    write_slots: torch.Tensor  # their cache slots
    ctx_dest: torch.Tensor  # rows of the key tensor filled from the cache
    ctx_slots: torch.Tensor
    cand_dest: torch.Tensor  # rows of the key tensor filled with the step's candidate K/V
    cand_src: torch.Tensor
    q_slots: torch.Tensor  # [Tq] cache slot of each query row (candidates: scratch, or -1 without)
    block_table: torch.Tensor  # [B, max_blocks] each sequence's pages: its context's, then its candidates'
    k_counts: torch.Tensor  # [B, 2] U/S keys and context keys per sequence (the kernel's loop bounds)
    max_len_q: int  # the longest query sequence


def build_step_index(items, cache: KVCache, device: torch.device) -> StepIndex:
    """All of a step's indices for work items whose states are embedded; one host-to-device copy.

    With scratch pages in the cache, each sequence's candidates get slots after its context (the free
    tail of its last page, then scratch pages) and its block table covers them, so a kernel can read
    every key from the pool; without, candidates have slot -1 and the tables cover the context only."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "q", "k", "write_src", "write_slots", "ctx_dest", "ctx_slots", "cand_dest", "cand_src", "q_slots")}
    q_len, k_len, ctx_lens, n_us, tables = [], [], [], [], []
    base = q_off = k_off = scratch_used = 0
    page = cache.block_size
    for it in items:
        state = it.state
        ctx_len, n_seq = state.context_len, len(state.embedded.group)
        new_ctx = np.arange(it.ctx_start, it.ctx_end)
        cands = np.arange(ctx_len + it.cand_start, ctx_len + it.cand_end)
        n_new, n_q, n_k = len(new_ctx), len(new_ctx) + len(cands), it.ctx_end + len(cands)
        table = np.asarray(state.handle.entry.blocks[:-(-it.ctx_end // page)], np.int64)
        if len(cache.scratch):
            extra = -(-n_k // page) - len(table)
            table = np.concatenate([table, cache.scratch[scratch_used:scratch_used + extra]])
            scratch_used += extra
            key_pos = np.arange(it.ctx_end, n_k)
            cand_slots = table[key_pos // page] * page + key_pos % page
        else:
            cand_slots = np.full(len(cands), -1)
        new_slots = cache.slot_array(state.handle, it.ctx_start, it.ctx_end)
        parts["q"].append(base + np.concatenate([new_ctx, cands]))
        parts["k"].append(base + np.concatenate([np.arange(it.ctx_end), cands]))
        parts["write_src"].append(np.arange(q_off, q_off + n_new))
        parts["write_slots"].append(new_slots)
        parts["ctx_dest"].append(np.arange(k_off, k_off + it.ctx_end))
        parts["ctx_slots"].append(cache.slot_array(state.handle, 0, it.ctx_end))
        parts["cand_dest"].append(np.arange(k_off + it.ctx_end, k_off + n_k))
        parts["cand_src"].append(np.arange(q_off + n_new, q_off + n_q))
        parts["q_slots"].append(np.concatenate([new_slots, cand_slots]))
        tables.append(table)
        q_len.append(n_q)
        k_len.append(n_k)
        ctx_lens.append(it.ctx_end)
        n_us.append(min(state.signature.static_tokens, it.ctx_end))
        base, q_off, k_off = base + n_seq, q_off + n_q, k_off + n_k
    if scratch_used > len(cache.scratch):
        raise RuntimeError(f"kv cache: the step's candidates need {scratch_used} scratch pages, the cache has "
                           f"{len(cache.scratch)}")
    block_table = np.zeros((len(items), max(map(len, tables), default=1) or 1), np.int64)
    for i, table in enumerate(tables):
        block_table[i, :len(table)] = table
    flat = [*parts.values(), [np.asarray(q_len)], [np.asarray(k_len)], [np.stack([n_us, ctx_lens], 1).ravel()],
            [block_table.ravel()]]
    t = dict(zip([*parts, "q_len", "k_len", "counts", "table"], upload(device, flat, torch.int64)))
    embedded = [it.state.embedded for it in items]
    group, pos, ts = (torch.cat([getattr(e, f) for e in embedded]) for f in ("group", "pos", "ts"))

    def meta(rows: torch.Tensor, lengths: torch.Tensor) -> TokenMeta:
        return TokenMeta(offsets_of(lengths), group[rows], pos[rows], ts[rows])

    return StepIndex(t["q"], meta(t["q"], t["q_len"]), meta(t["k"], t["k_len"]), t["write_src"], t["write_slots"],
                     t["ctx_dest"], t["ctx_slots"], t["cand_dest"], t["cand_src"], t["q_slots"],
                     t["table"].view(block_table.shape), t["counts"].view(-1, 2), max(q_len, default=0))
