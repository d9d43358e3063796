"""The indices and per-sequence metadata of one step, built on the host and copied to the device at once.

A step's queries are each work item's new context tokens then its candidates; its keys are each item's
context [0, ctx_end) (read from the paged KV cache) then its candidates (never cached: their K/V live
for one step in scratch pages). Backends get a `StepIndex`: the eager path gathers keys with
`ctx_slots`/`cand_src`, the fused path hands the block tables to the attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from grinfer.engine.kv_pool import KVPool
from grinfer.features.device import take, upload
from grinfer.model.layers import TokenMeta


@dataclass(eq=False)  # identity: a step looks its sequences' batches up by object
class TokenBatch:
    """Tokens embedded together (one featurizing pass): per-token metadata, and their embeddings `x` where the
    runner keeps them; sequences are row ranges of it (SequenceRows)."""

    group: torch.Tensor
    pos: torch.Tensor
    ts: torch.Tensor
    x: torch.Tensor | None = None


@dataclass
class SequenceRows:
    """One sequence's rows [start, start + length) of a TokenBatch."""

    batch: TokenBatch
    start: int
    length: int


def split_batch(batch: TokenBatch, lengths) -> list[SequenceRows]:
    """The batch's consecutive sequences of `lengths` rows."""
    starts = np.cumsum(lengths) - lengths
    return [SequenceRows(batch, int(a), int(n)) for a, n in zip(starts, lengths)]


def batch_rows(batches: list[TokenBatch], name: str) -> torch.Tensor:
    """Field `name` of the batches, one after another (the batch's own tensor when there is one: no copy)."""
    parts = [getattr(b, name) for b in batches]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class StepIndex:
    """Gather/scatter indices of one step, shared by all its layers."""

    q_rows: torch.Tensor  # rows of the step's concatenated sequences that are computed now
    q_meta: TokenMeta
    k_meta: TokenMeta
    write_src: torch.Tensor  # rows of the new-token tensor that are context tokens
    write_slots: torch.Tensor  # their cache slots
    # the gather of a dense key tensor, for backends that do not read every key from the pool (None otherwise):
    ctx_dest: torch.Tensor | None  # rows of the key tensor filled from the cache
    ctx_slots: torch.Tensor | None
    cand_dest: torch.Tensor | None  # rows of the key tensor filled with the step's candidate K/V
    cand_src: torch.Tensor  # rows of the new-token tensor that are candidates
    q_slots: torch.Tensor  # [Tq] cache slot of each query row (candidates: scratch, or -1 without)
    block_table: torch.Tensor  # [B, max_blocks] each sequence's pages: its context's, then its candidates'
    k_counts: torch.Tensor  # [B, 2] U/S keys and context keys per sequence (the kernel's loop bounds)
    max_len_q: int  # the longest query sequence
    # the batches the rows above index, one after another (batch_rows): the step's sequences' tokens
    batches: list[TokenBatch]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + length) over the pairs, without a Python loop."""
    lengths = np.asarray(lengths, np.int64)
    shift = np.asarray(starts, np.int64) - _exclusive_cumsum(lengths)
    return np.repeat(shift, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def build_step_index(items, seqs: list[SequenceRows], pool: KVPool, device: torch.device,
                     dense_keys: bool = True) -> StepIndex:
    """All of a step's indices for the plan's work items (`seqs`: each item's sequence, rows of the runner's
    embedded batches), vectorised over the items, from the pages each item carries; one host-to-device copy.

    With scratch pages in the pool (backends that read every key from the pool), each sequence's
    candidates get slots after its context (the free tail of its last page, then scratch pages) and its
    block table covers them; without, candidates have slot -1 and the tables cover the context only. The
    dense-key gather indices are built with `dense_keys` (a backend that reads every key from the pool needs
    none: a step that falls back to one that does is indexed afresh). Rows index the sequences' distinct
    batches one after another (`StepIndex.batches`), not a per-step copy of the sequences."""
    page = pool.block_size
    batches = list(dict.fromkeys(s.batch for s in seqs))  # in order of first use
    batch_start = dict(zip(batches, np.cumsum([0, *(len(b.group) for b in batches[:-1])]).tolist()))
    ctx_start, ctx_end, cand_start, cand_end, ctx_len, base, n_static = np.array(
        [(it.ctx_start, it.ctx_end, it.cand_start, it.cand_end, it.state.context_len,
          batch_start[s.batch] + s.start, it.state.signature.static_tokens) for it, s in zip(items, seqs)], np.int64).T
    n_new, n_cand = ctx_end - ctx_start, cand_end - cand_start
    n_q, n_k = n_new + n_cand, ctx_end + n_cand
    q_off, k_off = _exclusive_cumsum(n_q), _exclusive_cumsum(n_k)

    # block tables: each sequence's own pages up to ctx_end, then scratch pages for its candidates
    own = -(-ctx_end // page)
    extra = (-(-n_k // page) - own) if len(pool.scratch) else np.zeros_like(own)
    if extra.sum() > len(pool.scratch):
        raise RuntimeError(f"kv cache: the step's candidates need {extra.sum()} scratch pages, the pool has "
                           f"{len(pool.scratch)}")
    table = np.zeros((len(items), max(int((own + extra).max()), 1)), np.int64)
    seq = np.repeat(np.arange(len(items)), own)
    pages = np.fromiter(chain.from_iterable(it.blocks[:n] for it, n in zip(items, own.tolist())), np.int64, len(seq))
    table[seq, _ranges(np.zeros_like(own), own)] = pages
    seq = np.repeat(np.arange(len(items)), extra)
    table[seq, own[seq] + _ranges(np.zeros_like(extra), extra)] = pool.scratch[:int(extra.sum())]

    def slots(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        pos, seq = _ranges(starts, lengths), np.repeat(np.arange(len(items)), lengths)
        return table[seq, pos // page] * page + pos % page

    write_src, cand_src = _ranges(q_off, n_new), _ranges(q_off + n_new, n_cand)
    write_slots = slots(ctx_start, n_new)
    q_slots = np.full(int(n_q.sum()), -1, np.int64)
    q_slots[write_src] = write_slots
    if len(pool.scratch):
        q_slots[cand_src] = slots(ctx_end, n_cand)
    gather = {"ctx_dest": _ranges(k_off, ctx_end), "ctx_slots": slots(np.zeros_like(ctx_end), ctx_end),
              "cand_dest": _ranges(k_off + ctx_end, n_cand)} if dense_keys else {}
    cand_rows = base + ctx_len + cand_start
    parts = {
        "q": _ranges(np.stack([base + ctx_start, cand_rows], 1).ravel(), np.stack([n_new, n_cand], 1).ravel()),
        "k": _ranges(np.stack([base, cand_rows], 1).ravel(), np.stack([ctx_end, n_cand], 1).ravel()),
        "write_src": write_src, "write_slots": write_slots, **gather, "cand_src": cand_src, "q_slots": q_slots,
        "q_offsets": np.r_[0, np.cumsum(n_q)], "k_offsets": np.r_[0, np.cumsum(n_k)],
        "counts": np.stack([np.minimum(n_static, ctx_end), ctx_end], 1).ravel(), "table": table.ravel(),
    }
    t = dict(zip(parts, upload(device, [[a] for a in parts.values()], torch.int64)))
    group, pos, ts = (batch_rows(batches, f) for f in ("group", "pos", "ts"))

    def meta(rows: torch.Tensor, offsets: torch.Tensor) -> TokenMeta:
        return TokenMeta(offsets, take(group, rows), take(pos, rows), take(ts, rows))

    return StepIndex(t["q"], meta(t["q"], t["q_offsets"]), meta(t["k"], t["k_offsets"]), t["write_src"],
                     t["write_slots"], t.get("ctx_dest"), t.get("ctx_slots"), t.get("cand_dest"), t["cand_src"],
                     t["q_slots"],
                     t["table"].view(table.shape), t["counts"].view(-1, 2), int(n_q.max(initial=0)), batches)
