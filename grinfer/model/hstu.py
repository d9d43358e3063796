"""HSTU in causal mode for generative retrieval: next-item prediction with L2-normalised embeddings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from grinfer.config import ModelConfig
from grinfer.features.batch import RetrievalBatch
from grinfer.model.layers import HSTULayer, TokenMeta
from grinfer.model.tables import table_shapes
from grinfer.ops.groups import GROUP_S
from grinfer.ops.jagged import positions_in_seq


def next_timestamps(batch: RetrievalBatch, last: torch.Tensor | None = None) -> torch.Tensor:
    """[N] each event's next timestamp in its sequence; a sequence's last event gets `last` [B] (default: its own)."""
    ts = batch.timestamps
    out = torch.cat([ts[1:], ts[-1:]])
    ends = batch.offsets[1:] - 1
    ends = ends[batch.offsets[1:] > batch.offsets[:-1]]  # empty sequences have no last event
    out[ends] = ts[ends] if last is None else last.to(ts)[batch.offsets[1:] > batch.offsets[:-1]]
    return out


class HSTURetrieval(nn.Module):
    """Causal HSTU over item sequences; the item embedding table is shared by input and output (a trainable
    nn.Embedding, or the served table `tables["item_emb"]` of a quantised checkpoint)."""

    def __init__(self, cfg: ModelConfig, tables: Mapping[str, nn.Module] | None = None):
        super().__init__()
        if cfg.kind != "hstu":
            raise ValueError(f"kind: HSTURetrieval needs an 'hstu' config, got {cfg.kind!r}")
        self.cfg = cfg
        if tables and "item_emb" in tables:
            self.item_emb = tables["item_emb"]
        else:
            self.item_emb = nn.Embedding(table_shapes(cfg)["item_emb"].rows, cfg.d_model, padding_idx=0)
            nn.init.normal_(self.item_emb.weight, std=0.02)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()  # the padding row stays zero (it never gets a gradient)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # absolute position from the window start
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))

    def encode(self, batch: RetrievalBatch, next_ts: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised output embedding [N, d] at every position (L2, or LayerNorm with cfg.output_norm).

        With cfg.time_bias_from == "next", a query's time bias uses the next event's timestamp; `next_ts` [B]
        gives the one after each sequence's last event (default: that event's own timestamp)."""
        cfg = self.cfg
        pos = positions_in_seq(batch.offsets, len(batch.items))
        x = self.embed(batch.items, pos)
        keys = TokenMeta(batch.offsets, torch.full_like(batch.items, GROUP_S), pos, batch.timestamps)
        queries = keys
        if cfg.time_bias_from == "next":
            queries = TokenMeta(keys.offsets, keys.group, pos, next_timestamps(batch, next_ts))
        plan = cast(HSTULayer, self.layers[0]).plan(queries, keys)
        for layer in self.layers:
            x = layer(x, keys, plan)
        return self.output(x)

    def embed(self, items: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[T, d] input embeddings of tokens: the item's (scaled) plus their position's in the window."""
        x = self.item_emb(items) * math.sqrt(self.cfg.d_model)
        return self.input_dropout(x + self.pos_emb(pos.clamp(max=self.cfg.max_seq_len - 1)))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] normalised output embeddings of final hidden states (L2, or LayerNorm with cfg.output_norm)."""
        if self.cfg.output_norm == "layer_norm":
            return F.layer_norm(x, x.shape[-1:], eps=self.cfg.norm_eps)
        return F.normalize(x, dim=-1, eps=self.cfg.norm_eps)

    def user_embedding(self, batch: RetrievalBatch, next_ts: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] the last position's embedding per sequence (sequences must be non-empty)."""
        return self.encode(batch, next_ts)[batch.offsets[1:] - 1]

    def item_table(self) -> torch.Tensor:
        """[num_items + 1, d] L2-normalised item embeddings (row 0 is padding)."""
        return F.normalize(cast(torch.Tensor, self.item_emb.weight), dim=-1, eps=self.cfg.norm_eps)

    def sampled_softmax_loss(self, batch: RetrievalBatch, num_negatives: int,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Next-item sampled softmax: each position's target against its own uniform random negatives."""
        if batch.targets is None:
            raise ValueError("batch: the sampled softmax needs a batch built with targets")
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
