"""HSTU in causal mode for generative retrieval: next-item prediction with L2-normalised embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grinfer.config import ModelConfig
from grinfer.features.batch import RetrievalBatch
from grinfer.model.layers import HSTULayer, TokenMeta
from grinfer.ops import GROUP_S
from grinfer.ops.jagged import positions_in_seq


class HSTURetrieval(nn.Module):
    """Causal HSTU over item sequences; the item embedding table is shared by input and output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind != "hstu":
            raise ValueError(f"kind: HSTURetrieval needs an 'hstu' config, got {cfg.kind!r}")
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # the padding row stays zero (it never gets a gradient)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # absolute position from the window start
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))

    def encode(self, batch: RetrievalBatch) -> torch.Tensor:
        """L2-normalised output embedding [N, d] at every position."""
        pos = positions_in_seq(batch.offsets, len(batch.items))
        x = self.item_emb(batch.items) * math.sqrt(self.cfg.d_model)
        x = self.input_dropout(x + self.pos_emb(pos.clamp(max=self.cfg.max_seq_len - 1)))
        meta = TokenMeta(batch.offsets, torch.full_like(batch.items, GROUP_S), pos, batch.timestamps)
        plan = self.layers[0].plan(meta, meta)
        for layer in self.layers:
            x = layer(x, meta, plan)
        return F.normalize(x, dim=-1)

    def user_embedding(self, batch: RetrievalBatch) -> torch.Tensor:
        """[B, d] the last position's embedding per sequence (sequences must be non-empty)."""
        return self.encode(batch)[batch.offsets[1:] - 1]

    def item_table(self) -> torch.Tensor:
        """[num_items + 1, d] L2-normalised item embeddings (row 0 is padding)."""
        return F.normalize(self.item_emb.weight, dim=-1)

    def sampled_softmax_loss(self, batch: RetrievalBatch, num_negatives: int,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Next-item sampled softmax: each position's target against its own uniform random negatives."""
        out = self.encode(batch)
        keep = batch.targets > 0
        out, targets = out[keep], batch.targets[keep]
        table = self.item_table()
        negatives = torch.randint(1, self.cfg.num_items + 1, (len(targets), num_negatives), device=out.device,
                                  generator=generator)
        pos = (out * table[targets]).sum(-1, keepdim=True)
        neg = torch.einsum("nd,nkd->nk", out, F.embedding(negatives, table))
        neg = neg.masked_fill(negatives == targets[:, None], float("-inf"))
        logits = torch.cat([pos, neg], -1) / self.cfg.temperature
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=out.device))
