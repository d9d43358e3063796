"""The backend interface, implemented by `eager`: the PyTorch reference forward, any device."""

from __future__ import annotations

import torch

from grinfer.model.layers import TokenMeta
from grinfer.model.mtgr import MTGR


class Backend:
    """Per-layer pieces of the MTGR forward; the runner owns batching and the paged KV cache.

    Faster backends override these methods (and may read K/V straight from the paged cache).
    """

    name = "eager"

    def __init__(self, model: MTGR):
        self.model = model

    def embed(self, batch):
        """Token embeddings and metadata of whole request sequences."""
        return self.model.embed(batch)

    def project(self, layer: int, x: torch.Tensor, group: torch.Tensor):
        """U, V, Q, K of the tokens being computed."""
        return self.model.layers[layer].project(x, group)

    def plan(self, q_meta: TokenMeta, k_meta: TokenMeta):
        """The step's attention plan (mask, normaliser, bias indices), shared by all layers."""
        return self.model.layers[0].plan(q_meta, k_meta)

    def attend(self, layer: int, q, k, v, plan) -> torch.Tensor:
        """Attention of the queries over their keys (cached context + new tokens)."""
        return self.model.layers[layer].attend(q, k, v, plan)

    def finish(self, layer: int, x, attn, u, group) -> torch.Tensor:
        """Residual update of the layer."""
        return self.model.layers[layer].finish(x, attn, u, group)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Per-task logits of final candidate states."""
        return self.model.head_logits(x)
