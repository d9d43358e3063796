"""The causal retrieval HSTU over cached history K/V: per (user, history version), new events appended.

A retrieval's window (the user's last `max_seq_len` events) splits into a context, every event but the
last, and the query, the last event, whose output embedding scores the item table. The context's K/V sit
in a paged KV cache of their own (a block manager and a device pool sized for the retrieval model, wired
by kv_cache.KVCache as ranking contexts are); a returning user's retrieval reuses the longest cached prefix
of its context and computes only the events after it and the query, in one batch with the turn's others.

A context token's K/V depend on its item, its position in the window, its timestamp, the query timestamp
of its time bias (the next event's under generative-recommenders' convention, time_bias_from="next") and
the same of every token before it. The signature lists exactly (item, timestamp, query timestamp) per
token, so a shared prefix is shared K/V: the last cached token's query timestamp changes when an event is
appended after it, so that token is recomputed; a window that slid (a history longer than max_seq_len)
moves every event to another position and shares nothing. The query is never cached: its own query
timestamp is only known for the last event, and its final state is needed anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grinfer.engine.backends.eager import EagerLayers
from grinfer.engine.block_manager import BlockManager
from grinfer.engine.kv_cache import CacheHandle, KVCache
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.signature import CacheLookup, ContextSignature
from grinfer.engine.step import TokenBatch, build_step_index, split_batch
from grinfer.features.device import upload
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.layers import TokenMeta
from grinfer.ops.groups import GROUP_S

ANONYMOUS = "\x00anonymous-"  # key prefix of retrievals without a user: computed in the pool, never kept


@dataclass(frozen=True)
class History:
    """One retrieval's window: its events' items and timestamps, and whose history (None: keep nothing)."""

    items: np.ndarray  # [n] int64, n >= 1
    timestamps: np.ndarray  # [n] int64
    user: str | None = None
    version: int = 0


def query_timestamps(timestamps: np.ndarray, time_bias_from: str) -> np.ndarray:
    """Each token's timestamp as a query of the time bias: its own, or ("next") the next event's (the last
    event's own), as `HSTURetrieval.encode` uses them."""
    if time_bias_from != "next" or len(timestamps) == 0:
        return timestamps
    return np.append(timestamps[1:], timestamps[-1:])


def history_signature(key: str, version: int, items: np.ndarray, timestamps: np.ndarray,
                      query_ts: np.ndarray) -> ContextSignature:
    """The cache identity of a window's context (every event but the last): (item, ts, query ts) per token."""
    rows = np.stack([items[:-1], timestamps[:-1], query_ts[:-1]], 1).astype(np.int64)
    return ContextSignature(key, version, 0, rows)


@dataclass
class _Sequence:
    """One history of a batch as `build_step_index` reads a work item (and its request state): context
    positions [ctx_start, ctx_end) computed now, then the query as the one "candidate"."""

    signature: ContextSignature
    ctx_start: int
    blocks: list[int]
    cand_start: int = 0
    cand_end: int = 1

    @property
    def state(self) -> _Sequence:
        return self

    @property
    def ctx_end(self) -> int:
        return self.signature.num_tokens

    @property
    def context_len(self) -> int:
        return self.signature.num_tokens


class HistoryCache:
    """User embeddings of the retrieval model over a paged cache of history K/V (`cache_bytes` of it)."""

    def __init__(self, model: HSTURetrieval, cache_bytes: int, block_size: int, device: torch.device):
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        heads, qk, v = cfg.num_heads, cfg.head_qk_dim, cfg.head_v_dim
        per_token = KVPool.bytes_per_token(cfg.num_layers, heads, qk, dtype, v_head_dim=v)
        manager = BlockManager(cache_bytes // (per_token * block_size), block_size)
        if not manager.fits(cfg.max_seq_len):
            raise ValueError(f"retrieval_cache_bytes: {cache_bytes} bytes hold {manager.num_blocks} blocks of "
                             f"{block_size} tokens, fewer than one window of {cfg.max_seq_len} events")
        pool = KVPool(cfg.num_layers, heads, qk, block_size, manager.num_blocks, dtype, device, v_head_dim=v)
        self.model, self.device = model, device
        self.cache = KVCache(manager, pool)
        self.layers = EagerLayers(model.layers)

    @torch.inference_mode()
    def user_embeddings(self, histories: list[History]) -> torch.Tensor:
        """[B, d] each history's output embedding at its last event (as `HSTURetrieval.user_embedding`).

        The histories run in as few batches as the pool and "one writer per entry" allow: a batch ends
        before a user it already holds, or when the pool cannot make room for the next history."""
        out: list[torch.Tensor] = []
        batch: list[tuple[History, _Sequence, CacheHandle, bool]] = []
        for i, h in enumerate(histories):
            key = h.user if h.user is not None else f"{ANONYMOUS}{i}"
            sig = history_signature(key, h.version, h.items, h.timestamps,
                                    query_timestamps(h.timestamps, self.model.cfg.time_bias_from))
            if any(s.signature.user == key for _, s, _, _ in batch):
                out.append(self._run(batch))
                batch = []
            reserved = self._reserve(sig)
            if reserved is None and batch:  # the pool is full of this batch's pinned entries: run them first
                out.append(self._run(batch))
                batch = []
                reserved = self._reserve(sig)
            if reserved is None:
                raise RuntimeError(f"retrieval kv cache: {sig.num_tokens} context tokens do not fit the pool")
            lookup, handle = reserved
            batch.append((h, _Sequence(sig, lookup.cached_tokens, handle.blocks), handle, h.user is not None))
        if batch:
            out.append(self._run(batch))
        return torch.cat(out)

    def _reserve(self, sig: ContextSignature) -> tuple[CacheLookup, CacheHandle] | None:
        lookup, handle = self.cache.acquire(sig)
        if self.cache.reserve(handle, lookup, sig):
            return lookup, handle
        self.cache.release(handle)
        return None

    def _run(self, batch: list[tuple[History, _Sequence, CacheHandle, bool]]) -> torch.Tensor:
        """One forward over the batch's uncached tokens; commits the contexts of kept histories and unpins."""
        try:
            emb = self._forward([h for h, *_ in batch], [s for _, s, *_ in batch])
        except Exception:
            for *_, handle, _keep in batch:
                self.cache.release(handle, keep=False)  # K/V may be half-written
            raise
        for _, seq, handle, keep in batch:
            if keep:
                self.cache.commit(handle, seq.ctx_end)
            self.cache.release(handle, keep=keep)
        return emb

    def _forward(self, histories: list[History], seqs: list[_Sequence]) -> torch.Tensor:
        lengths = [len(h.items) for h in histories]
        qts = [query_timestamps(h.timestamps, self.model.cfg.time_bias_from) for h in histories]
        pos = [np.arange(n) for n in lengths]
        items, positions, ts, query_ts = upload(self.device, [[h.items for h in histories], pos,
                                                              [h.timestamps for h in histories], qts], torch.int64)
        tokens = split_batch(TokenBatch(torch.full_like(items, GROUP_S), positions, ts), lengths)
        idx = build_step_index(seqs, tokens, self.cache.pool, self.device)
        q = idx.q_meta
        idx.q_meta = TokenMeta(q.offsets, q.group, q.pos, query_ts[idx.q_rows])
        x = self.model.embed(items[idx.q_rows], positions[idx.q_rows])
        x = self.layers.run_layers(x, idx, self.cache.pool, 0, len(self.model.layers))
        return self.model.output(x[idx.cand_src])
