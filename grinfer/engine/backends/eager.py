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
from grinfer.engine.kv_pool import KVData, KVPool
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

    def attend(self, layer: int, q, k, v, plan, k_scale=None, v_scale=None) -> torch.Tensor:
        """Attention of the queries over their keys (cached context + new tokens; 8-bit with their scales)."""
        return self.layer(layer).attend(q, k, v, plan, k_scale, v_scale)

    def finish(self, layer: int, x, attn, u, group) -> torch.Tensor:
        """Residual update of the layer."""
        return self.layer(layer).finish(x, attn, u, group)

    def run_layers(self, x: torch.Tensor, idx: StepIndex, pool: KVPool, first: int, last: int) -> torch.Tensor:
        """Layers [first, last) over the step's new tokens x: each writes its new context K/V into the pool,
        then the queries attend over their context K/V (gathered from the pool) plus the step's candidates."""
        plan = self.plan(idx.q_meta, idx.k_meta)
        for layer in range(first, last):
            u, v, q, k = self.project(layer, x, idx.q_meta.group)
            pool.write(layer, idx.write_slots, k[idx.write_src], v[idx.write_src])
            keys = _step_kv(pool, layer, k, v, idx)
            attn = self.attend(layer, q, keys.k, keys.v, plan, keys.k_scale, keys.v_scale)
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


def _step_kv(pool: KVPool, layer: int, k: torch.Tensor, v: torch.Tensor, idx: StepIndex) -> KVData:
    """The step's keys and values in the pool's format (8-bit ones with their scales): each sequence's
    context rows from the pool, then its candidates' own."""
    (kq, ks), (vq, vs) = pool.quantize(k), pool.quantize(v)
    cached = KVData(pool.k[layer], pool.v[layer], *pool.scales(layer))
    return KVData(*(_keys(n, c, idx) for n, c in zip(KVData(kq, vq, ks, vs).tensors(), cached.tensors())))


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
