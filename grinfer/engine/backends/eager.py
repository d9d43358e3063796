"""`eager`: the PyTorch reference forward, on any device.

`EagerLayers` runs any HSTU layer stack over the paged KV pool (MTGR's here; the causal retrieval HSTU's
in engine/retrieval_cache.py); `EagerBackend` adds MTGR's token embedding and heads.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from grinfer.config import EngineConfig
from grinfer.engine.backends.base import Backend
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.step import StepIndex
from grinfer.features.device import DeviceFeaturizer, RawBatch
from grinfer.model.layers import HSTULayer, TokenMeta
from grinfer.model.mtgr import MTGR


class EagerLayers:
    """Per-layer pieces of an HSTU layer stack and the loop over them, against the paged KV pool.

    Faster backends override these methods (and may read K/V straight from the paged cache).
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def layer(self, index: int) -> HSTULayer:
        """Layer `index` (typed: nn.ModuleList's items are plain Modules)."""
        return cast(HSTULayer, self.layers[index])

    def project(self, layer: int, x: torch.Tensor, group: torch.Tensor):
        """U, V, Q, K of the tokens being computed."""
        return self.layer(layer).project(x, group)

    def plan(self, q_meta: TokenMeta, k_meta: TokenMeta):
        """The step's attention plan (mask, normaliser, bias indices), shared by all layers."""
        return self.layer(0).plan(q_meta, k_meta)

    def attend(self, layer: int, q, k, v, plan) -> torch.Tensor:
        """Attention of the queries over their keys (cached context + new tokens)."""
        return self.layer(layer).attend(q, k, v, plan)

    def finish(self, layer: int, x, attn, u, group) -> torch.Tensor:
        """Residual update of the layer."""
        return self.layer(layer).finish(x, attn, u, group)

    def run_layers(self, x: torch.Tensor, idx: StepIndex, pool: KVPool, first: int, last: int) -> torch.Tensor:
        """Layers [first, last) over the step's new tokens x: each writes its new context K/V into the pool,
        then the queries attend over their context K/V (gathered from the pool) plus the step's candidates."""
        plan = self.plan(idx.q_meta, idx.k_meta)
        for layer in range(first, last):
            u, v, q, k = self.project(layer, x, idx.q_meta.group)
            k_cache, v_cache = pool.k[layer], pool.v[layer]
            k_cache[idx.write_slots] = k[idx.write_src].to(k_cache.dtype)
            v_cache[idx.write_slots] = v[idx.write_src].to(v_cache.dtype)
            attn = self.attend(layer, q, _keys(k, k_cache, idx), _keys(v, v_cache, idx), plan)
            x = self.finish(layer, x, attn, u, idx.q_meta.group)
        return x


class EagerBackend(EagerLayers, Backend):
    """MTGR's step in plain PyTorch: the reference backend."""

    name = "eager"

    def __init__(self, model: MTGR, config: EngineConfig | None = None):
        Backend.__init__(self, model, config)
        EagerLayers.__init__(self, model.layers)

    def featurize_embed(self, featurizer: DeviceFeaturizer, raw: RawBatch) -> tuple[torch.Tensor, TokenMeta]:
        return featurize_embed(self.model, featurizer, *raw.tensors(), *raw.sizes())

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(x)


def _keys(new: torch.Tensor, cached: torch.Tensor, idx: StepIndex) -> torch.Tensor:
    """The step's key (or value) tensor: each sequence's context rows from the cache, then its candidates'."""
    out = new.new_empty((len(idx.k_meta.group), *new.shape[1:]))
    out[idx.ctx_dest] = cached[idx.ctx_slots].to(new.dtype)
    out[idx.cand_dest] = new[idx.cand_src]
    return out


def featurize_embed(model: MTGR, featurizer: DeviceFeaturizer, *raw) -> tuple[torch.Tensor, TokenMeta]:
    """model.embed(featurizer.build_from(*raw)): RawBatch's tensors and sizes as plain arguments, so that
    torch.compile(dynamic=True) of this function keeps the sizes symbolic."""
    return model.embed(featurizer.build_from(*raw))
