"""`compiled`: torch.compile of the same per-layer forward (dynamic shapes).

The compiled functions take the layer module as an argument, so all layers share one compiled
graph per function (parameters are graph inputs) instead of compiling each layer separately.
"""

from __future__ import annotations

import torch

from grinfer.config import EngineConfig
from grinfer.engine.backends.eager import EagerBackend, featurize_embed
from grinfer.model.mtgr import MTGR


def _project(layer, x, group):
    return layer.project(x, group)


def _attend(layer, q, k, v, plan, k_scale, v_scale):
    return layer.attend(q, k, v, plan, k_scale, v_scale)


def _finish(layer, x, attn, u, group):
    return layer.finish(x, attn, u, group)


def compile_featurize_embed(model: MTGR):
    """Featurizing and embedding through torch.compile: ~200 small device ops fused into a few kernels, one
    graph, sizes symbolic (a recompile only for batches without S or R events). Inductor's matmul padding is
    off: its choice guards on the sizes (e.g. `18 <= tokens`), and on an H200 a request the warm-up's sizes had
    not covered recompiled this graph in the request path (11 s; the first 1-client requests waited seconds)."""
    compiled = torch.compile(featurize_embed, dynamic=True, fullgraph=True, options={"shape_padding": False})
    return lambda featurizer, raw: compiled(model, featurizer, *raw.tensors(), *raw.sizes())


class CompiledBackend(EagerBackend):
    name = "compiled"

    def __init__(self, model: MTGR, config: EngineConfig | None = None):
        super().__init__(model, config)
        self._project = torch.compile(_project, dynamic=True)
        self._attend = torch.compile(_attend, dynamic=True)
        self._finish = torch.compile(_finish, dynamic=True)
        self._head = torch.compile(model.head_logits, dynamic=True)
        self.featurize_embed = compile_featurize_embed(model)

    def project(self, layer, x, group):
        return self._project(self.model.layers[layer], x, group)

    def attend(self, layer, q, k, v, plan, k_scale=None, v_scale=None):
        return self._attend(self.model.layers[layer], q, k, v, plan, k_scale, v_scale)

    def finish(self, layer, x, attn, u, group):
        return self._finish(self.model.layers[layer], x, attn, u, group)

    def head(self, x):
        return self._head(x)
