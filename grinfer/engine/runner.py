"""Executes a step: one jagged batch of new tokens through the backend over the paged KV cache.

Per layer: project the new tokens; write the new context tokens' K/V into the cache; each query
then attends over its user's context K/V [0, ctx_end) read from the cache plus the step's own
candidate K/V (candidate K/V are never cached); residual update. Candidates' final states go
through the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grinfer.engine.backends import Backend
from grinfer.engine.kv_cache import KVCache
from grinfer.engine.scheduler import RequestState, StepPlan, WorkItem
from grinfer.features.featurizer import Featurizer
from grinfer.features.featurizer import RankRequest as FeatureRequest
from grinfer.model.layers import TokenMeta
from grinfer.ops.jagged import offsets_of


@dataclass
class _Embedded:
    x: torch.Tensor  # [L, d] the request's full sequence [U | S | R | C]
    group: torch.Tensor
    pos: torch.Tensor
    ts: torch.Tensor


@dataclass
class _StepIndex:
    """Gather/scatter indices of one step, shared by all its layers."""

    q_rows: list[torch.Tensor]  # per item: sequence rows of its new tokens
    q_meta: TokenMeta
    k_meta: TokenMeta
    write_src: torch.Tensor  # rows of the new-token tensor that are context tokens
    write_slots: torch.Tensor  # their cache slots
    ctx_dest: torch.Tensor  # rows of the key tensor filled from the cache
    ctx_slots: torch.Tensor
    cand_dest: torch.Tensor  # rows of the key tensor filled with the step's candidate K/V
    cand_src: torch.Tensor


class ModelRunner:
    """Runs StepPlans with a backend; writes K/V of new context tokens into the KV cache."""

    def __init__(self, backend: Backend, cache: KVCache, featurizer: Featurizer, device: torch.device):
        self.backend, self.cache, self.featurizer, self.device = backend, cache, featurizer, device
        self.dtype = next(backend.model.parameters()).dtype

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> None:
        """Compute the plan; candidate logits go to each state's `logits`, chunk states to `layer_state`."""
        items = [it for it in plan.items if it.tokens]
        if not items:
            return
        self._embed([it.state for it in items if it.state.embedded is None])
        idx = self._index(items)
        first, last = plan.layers
        if first == 0:
            x = torch.cat([it.state.embedded.x[rows] for it, rows in zip(items, idx.q_rows)])
        else:
            x = items[0].state.layer_state
        plan = self.backend.plan(idx.q_meta, idx.k_meta)
        for layer in range(first, last):
            u, v, q, k = self.backend.project(layer, x, idx.q_meta.group)
            k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
            k_cache[idx.write_slots] = k[idx.write_src].to(k_cache.dtype)
            v_cache[idx.write_slots] = v[idx.write_src].to(v_cache.dtype)
            keys = self._keys(k, k_cache, idx)
            values = self._keys(v, v_cache, idx)
            attn = self.backend.attend(layer, q, keys, values, plan)
            x = self.backend.finish(layer, x, attn, u, idx.q_meta.group)
        if last < len(self.backend.model.layers):
            items[0].state.layer_state = x
            return
        items[0].state.layer_state = None
        logits = self.backend.head(x[idx.cand_src]).float().cpu()
        offset = 0
        for it in items:
            n = it.cand_end - it.cand_start
            if n:
                it.state.logits.append(logits[offset:offset + n])
                offset += n

    def _keys(self, new: torch.Tensor, cached: torch.Tensor, idx: _StepIndex) -> torch.Tensor:
        out = new.new_empty((len(idx.k_meta.group), *new.shape[1:]))
        out[idx.ctx_dest] = cached[idx.ctx_slots].to(new.dtype)
        out[idx.cand_dest] = new[idx.cand_src]
        return out

    def _embed(self, states: list[RequestState]) -> None:
        """Embed the full sequences of newly started requests, in one batch."""
        if not states:
            return
        reqs = [FeatureRequest(s.request.context, s.request.candidates, s.request.request_ts) for s in states]
        batch = self.featurizer.rank_batch(reqs).to(self.device)
        x, meta = self.backend.embed(batch)
        x = x.to(self.dtype)
        for b, state in enumerate(states):
            lo, hi = int(meta.offsets[b]), int(meta.offsets[b + 1])
            state.embedded = _Embedded(x[lo:hi], meta.group[lo:hi], meta.pos[lo:hi], meta.ts[lo:hi])

    def _index(self, items: list[WorkItem]) -> _StepIndex:
        dev = self.device
        q_rows, k_rows, q_len, k_len = [], [], [], []
        write_src, write_slots, ctx_dest, ctx_slots, cand_dest, cand_src = [], [], [], [], [], []
        q_off = k_off = 0
        for it in items:
            ctx_len = it.state.context_len
            new_ctx = torch.arange(it.ctx_start, it.ctx_end, device=dev)
            cands = torch.arange(ctx_len + it.cand_start, ctx_len + it.cand_end, device=dev)
            rows = torch.cat([new_ctx, cands])
            q_rows.append(rows)
            k_rows.append(torch.cat([torch.arange(it.ctx_end, device=dev), cands]))
            n_new, n_cand = len(new_ctx), len(cands)
            write_src.append(torch.arange(q_off, q_off + n_new, device=dev))
            write_slots.append(self.cache.slots(it.state.handle, it.ctx_start, it.ctx_end))
            ctx_dest.append(torch.arange(k_off, k_off + it.ctx_end, device=dev))
            ctx_slots.append(self.cache.slots(it.state.handle, 0, it.ctx_end))
            cand_dest.append(torch.arange(k_off + it.ctx_end, k_off + it.ctx_end + n_cand, device=dev))
            cand_src.append(torch.arange(q_off + n_new, q_off + n_new + n_cand, device=dev))
            q_len.append(len(rows))
            k_len.append(it.ctx_end + n_cand)
            q_off += len(rows)
            k_off += it.ctx_end + n_cand

        def meta(rows: list[torch.Tensor], lengths: list[int]) -> TokenMeta:
            parts = [(it.state.embedded, r) for it, r in zip(items, rows)]
            return TokenMeta(offsets_of(torch.tensor(lengths, device=dev)),
                             torch.cat([e.group[r] for e, r in parts]), torch.cat([e.pos[r] for e, r in parts]),
                             torch.cat([e.ts[r] for e, r in parts]))

        cat = torch.cat
        return _StepIndex(q_rows, meta(q_rows, q_len), meta(k_rows, k_len), cat(write_src), cat(write_slots),
                          cat(ctx_dest), cat(ctx_slots), cat(cand_dest), cat(cand_src))
