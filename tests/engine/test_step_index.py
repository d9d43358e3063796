"""Unit tests of a step's indices (engine/step.py) against a per-item, per-token Python reference, on
random ragged work items, with and without scratch pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grinfer.engine.kv_pool import KVPool
from grinfer.engine.request import RankRequest
from grinfer.engine.scheduler import RequestState, WorkItem
from grinfer.engine.signature import ContextSignature
from grinfer.engine.step import SequenceRows, TokenBatch, batch_rows, build_step_index
from grinfer.features import UserContext


def random_items(rng: np.random.Generator, pool: KVPool, n: int):
    """n work items over disjoint random pages, and their sequences: rows of a few embedded batches (in any
    order, between sequences of requests not in the step), each row's metadata a value of its own."""
    pages = list(rng.permutation(pool.num_blocks))
    items, layout = [], []
    for i in range(n):
        static, ctx_len, cands = int(rng.integers(0, 6)), int(rng.integers(1, 14)), int(rng.integers(0, 6))
        static = min(static, ctx_len)
        ctx_end = ctx_len
        ctx_start = int(rng.integers(0, ctx_end + 1))
        cand_start = int(rng.integers(0, cands + 1))
        cand_end = int(rng.integers(cand_start, cands + 1))
        need = -(-ctx_len // pool.block_size)
        blocks = [int(pages.pop()) for _ in range(need)]
        realtime = np.zeros((ctx_len - static, 3), np.int64)
        request = RankRequest(f"u{i}", 0, UserContext(np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                      np.zeros(0, np.int64), np.zeros(0, np.int64), 0),
                              np.arange(cands), 0)
        state = RequestState(request, ContextSignature(f"u{i}", 0, static, realtime))
        items.append(WorkItem(state, ctx_start, ctx_end, cand_start, cand_end, blocks))
        layout.append((int(rng.integers(0, 3)), ctx_len + cands))  # (batch, sequence length)
    sizes, starts = [0, 0, 0], []
    for b, length in layout:
        sizes[b] += int(rng.integers(0, 4))  # a sequence of a request outside the step
        starts.append(sizes[b])
        sizes[b] += length
    batches = []
    for b, size in enumerate(sizes):
        rows = torch.arange(size) + 1000 * (b + 1)
        batches.append(TokenBatch(rows, rows + 1, rows + 2, torch.zeros(size, 1)))
    seqs = [SequenceRows(batches[b], start, length) for (b, length), start in zip(layout, starts)]
    return items, seqs


def reference(items, seqs, pool: KVPool):
    """Per-token lists: query and key metadata (group values), written slots and each query's slot."""
    page, q_rows, k_rows, write_slots, q_slots = pool.block_size, [], [], [], []
    scratch = list(pool.scratch)
    for it, seq in zip(items, seqs):
        ctx_len = it.state.context_len
        slot = lambda p, pages: pages[p // page] * page + p % page
        n_cand = it.cand_end - it.cand_start
        pages = list(it.blocks[:-(-it.ctx_end // page)])
        if len(pool.scratch):  # candidates continue after the context, on scratch pages past its own
            while len(pages) * page < it.ctx_end + n_cand:
                pages.append(scratch.pop(0))
        rows = seq.batch.group[seq.start:seq.start + seq.length].tolist()
        for p in range(it.ctx_start, it.ctx_end):
            q_rows.append(rows[p])
            write_slots.append(slot(p, pages))
            q_slots.append(slot(p, pages))
        for j in range(n_cand):
            q_rows.append(rows[ctx_len + it.cand_start + j])
            q_slots.append(slot(it.ctx_end + j, pages) if len(pool.scratch) else -1)
        k_rows += rows[:it.ctx_end] + rows[ctx_len + it.cand_start:ctx_len + it.cand_end]
    return q_rows, k_rows, write_slots, q_slots


@pytest.mark.parametrize("scratch", [0, 40])
@pytest.mark.parametrize("seed", range(12))
def test_step_indices_match_a_token_by_token_reference(seed, scratch):
    rng = np.random.default_rng(seed)
    pool = KVPool(1, 1, 2, block_size=int(rng.choice([1, 3, 4])), num_blocks=80, dtype=torch.float32,
                  device="cpu", scratch_blocks=scratch)
    items, seqs = random_items(rng, pool, int(rng.integers(1, 6)))
    idx = build_step_index(items, seqs, pool, torch.device("cpu"))
    q_rows, k_rows, write_slots, q_slots = reference(items, seqs, pool)
    assert batch_rows(idx.batches, "group")[idx.q_rows].tolist() == q_rows  # the rows the runner's x is read at
    assert idx.write_slots.tolist() == write_slots
    assert idx.q_slots.tolist() == q_slots
    assert idx.q_meta.group.tolist() == q_rows and idx.q_meta.pos.tolist() == [r + 1 for r in q_rows]
    assert idx.k_meta.group.tolist() == k_rows and idx.k_meta.ts.tolist() == [r + 2 for r in k_rows]
    assert idx.k_meta.offsets.tolist() == np.r_[0, np.cumsum([it.ctx_end + it.cand_end - it.cand_start
                                                                for it in items])].tolist()
    n_q = [it.tokens for it in items]
    assert idx.q_meta.offsets.tolist() == np.r_[0, np.cumsum(n_q)].tolist() and idx.max_len_q == max(n_q)
    assert idx.k_counts.tolist() == [[min(it.state.signature.static_tokens, it.ctx_end), it.ctx_end] for it in items]
    # the dense-key gather: context rows from the pool slots, candidates from the new tokens
    page = pool.block_size
    ctx = [it.blocks[p // page] * page + p % page for it in items for p in range(it.ctx_end)]
    assert idx.ctx_slots.tolist() == ctx
    keys = idx.k_meta.group
    assert keys[idx.ctx_dest].tolist() == [r for it, s in zip(items, seqs) for r in
                                           s.batch.group[s.start:s.start + it.ctx_end].tolist()]
    assert keys[idx.cand_dest].tolist() == idx.q_meta.group[idx.cand_src].tolist()
    assert sorted(torch.cat([idx.ctx_dest, idx.cand_dest]).tolist()) == list(range(len(k_rows)))


@pytest.mark.parametrize("seed", range(4))
def test_without_dense_keys_the_step_index_is_the_same_less_the_gather(seed):
    rng = np.random.default_rng(seed)
    pool = KVPool(1, 1, 2, block_size=3, num_blocks=80, dtype=torch.float32, device="cpu", scratch_blocks=40)
    items, seqs = random_items(rng, pool, int(rng.integers(1, 6)))
    full, paged = (build_step_index(items, seqs, pool, torch.device("cpu"), dense_keys=d) for d in (True, False))
    assert paged.ctx_dest is None and paged.ctx_slots is None and paged.cand_dest is None
    assert paged.batches == full.batches and paged.max_len_q == full.max_len_q
    for name in ("q_rows", "write_src", "write_slots", "cand_src", "q_slots", "block_table", "k_counts"):
        assert torch.equal(getattr(paged, name), getattr(full, name)), name
    for meta in ("q_meta", "k_meta"):
        for name in ("offsets", "group", "pos", "ts"):
            assert torch.equal(getattr(getattr(paged, meta), name), getattr(getattr(full, meta), name)), (meta, name)
