"""Executes a step: one jagged batch of new tokens through the backend over the paged KV cache.

New requests are featurized and embedded once; the step's indices (engine/step.py) are built; the
backend runs the layers over the step's new tokens (`Backend.run_layers`: new context K/V written into
the cache, each query attending over its user's cached context plus the step's candidates).
Candidates' final states go through the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from grinfer.engine.backends import Backend
from grinfer.engine.kv_cache import KVCache
from grinfer.engine.scheduler import RequestState, StepPlan
from grinfer.engine.step import build_step_index
from grinfer.features.device import DeviceFeaturizer
from grinfer.features.featurizer import RankRequest as FeatureRequest


@dataclass
class _Embedded:
    x: torch.Tensor  # [L, d] the request's full sequence [U | S | R | C]
    group: torch.Tensor
    pos: torch.Tensor
    ts: torch.Tensor


class ModelRunner:
    """Runs StepPlans with a backend over the KV cache; candidate logits go back to the request states."""

    def __init__(self, backend: Backend, cache: KVCache, featurizer: DeviceFeaturizer, device: torch.device):
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
            idx = build_step_index(items, self.cache, self.device)
        first, last = plan.layers
        if first == 0:
            x = torch.cat([it.state.embedded.x for it in items])[idx.q_rows]
        else:
            x = items[0].state.layer_state
        x = self.backend.run_layers(x, idx, self.cache, first, last)
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

    def _embed(self, states: list[RequestState]) -> None:
        """Embed the full sequences of newly started requests, in one batch."""
        if not states:
            return
        reqs = [FeatureRequest(s.request.context, s.request.candidates, s.request.request_ts) for s in states]
        raw = self.featurizer.prepare(reqs)  # features are built on the device, with the embedding
        x, meta = self.backend.featurize_embed(self.featurizer, raw)
        x = x.to(self.dtype)
        lengths = [len(r.context.profile) + len(r.context.items) + len(r.candidates) for r in reqs]
        lo = 0
        for state, n in zip(states, lengths):
            hi = lo + n  # the sequence lengths are known on the host: no device sync
            state.embedded = _Embedded(x[lo:hi], meta.group[lo:hi], meta.pos[lo:hi], meta.ts[lo:hi])
            lo = hi
