"""Executes a step: one jagged batch of new tokens through the backend over the paged KV cache.

Per layer: project the new tokens; write the new context tokens' K/V into the cache; each query
then attends over its user's context K/V [0, ctx_end) read from the cache plus the step's own
candidate K/V (candidate K/V are never cached); residual update. Candidates' final states go
through the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

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

    q_rows: torch.Tensor  # rows of the step's concatenated sequences that are computed now
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
        with record_function("grinfer.embed"):
            self._embed([it.state for it in items if it.state.embedded is None])
        with record_function("grinfer.index"):
            idx = self._index(items)
        first, last = plan.layers
        if first == 0:
            x = torch.cat([it.state.embedded.x for it in items])[idx.q_rows]
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
        """All of a step's gather/scatter indices, built on the host and copied to the device once."""
        rows = {k: [] for k in ("q", "k", "write_src", "write_slots", "ctx_dest", "ctx_slots", "cand_dest",
                                "cand_src")}
        q_len, k_len = [], []
        base = q_off = k_off = 0
        for it in items:
            ctx_len, n_seq = it.state.context_len, len(it.state.embedded.group)
            new_ctx = np.arange(it.ctx_start, it.ctx_end)
            cands = np.arange(ctx_len + it.cand_start, ctx_len + it.cand_end)
            n_new, n_q, n_k = len(new_ctx), len(new_ctx) + len(cands), it.ctx_end + len(cands)
            rows["q"].append(base + np.concatenate([new_ctx, cands]))
            rows["k"].append(base + np.concatenate([np.arange(it.ctx_end), cands]))
            rows["write_src"].append(np.arange(q_off, q_off + n_new))
            rows["write_slots"].append(self.cache.slot_array(it.state.handle, it.ctx_start, it.ctx_end))
            rows["ctx_dest"].append(np.arange(k_off, k_off + it.ctx_end))
            rows["ctx_slots"].append(self.cache.slot_array(it.state.handle, 0, it.ctx_end))
            rows["cand_dest"].append(np.arange(k_off + it.ctx_end, k_off + n_k))
            rows["cand_src"].append(np.arange(q_off + n_new, q_off + n_q))
            q_len.append(n_q)
            k_len.append(n_k)
            base, q_off, k_off = base + n_seq, q_off + n_q, k_off + n_k
        dev = self.device
        t = {k: torch.from_numpy(np.concatenate(v).astype(np.int64)).to(dev) for k, v in rows.items()}
        embedded = [it.state.embedded for it in items]
        group, pos, ts = (torch.cat([getattr(e, f) for e in embedded]) for f in ("group", "pos", "ts"))

        def meta(r: torch.Tensor, lengths: list[int]) -> TokenMeta:
            return TokenMeta(offsets_of(torch.tensor(lengths, device=dev)), group[r], pos[r], ts[r])

        return _StepIndex(t["q"], meta(t["q"], q_len), meta(t["k"], k_len), t["write_src"], t["write_slots"],
                          t["ctx_dest"], t["ctx_slots"], t["cand_dest"], t["cand_src"])
