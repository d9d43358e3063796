"""`compiled`: torch.compile of the same per-layer forward (dynamic shapes, no recompiles per length)."""

from __future__ import annotations

import torch

from grinfer.engine.backends.base import Backend
from grinfer.model.mtgr import MTGR


class CompiledBackend(Backend):
    name = "compiled"

    def __init__(self, model: MTGR):
        super().__init__(model)
        compile_ = lambda fn: torch.compile(fn, dynamic=True)
        self._project = [compile_(layer.project) for layer in model.layers]
        self._attend = [compile_(layer.attend) for layer in model.layers]
        self._finish = [compile_(layer.finish) for layer in model.layers]
        self._head = compile_(model.head_logits)

    def project(self, layer, x, group):
        return self._project[layer](x, group)

    def attend(self, layer, q, k, v, q_meta, k_meta):
        return self._attend[layer](q, k, v, q_meta, k_meta)

    def finish(self, layer, x, attn, u, group):
        return self._finish[layer](x, attn, u, group)

    def head(self, x):
        return self._head(x)
