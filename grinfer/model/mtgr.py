"""MTGR: one token sequence [U | S | R | C] per ranking request, HSTU layers, multi-task heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from grinfer.config import ModelConfig
from grinfer.features.batch import EventTokens, MTGRBatch
from grinfer.model.layers import HSTULayer, TokenMeta
from grinfer.model.tables import make_table, table_shapes
from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.jagged import offsets_of, positions_in_seq, seq_ids


def mlp(d_in: int, d_out: int) -> nn.Sequential:
    """The per-group input MLP: Linear -> SiLU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))


class MTGR(nn.Module):
    """MTGR ranking model over jagged batches; forward returns per-candidate logits [N_c, num_tasks].

    Its sparse tables (model.tables.table_shapes) are trainable nn.Embedding modules unless `tables` gives
    served ones (grinfer.embedding.ServedTable: quantised, memory-mapped, cached) by module path."""

    def __init__(self, cfg: ModelConfig, tables: Mapping[str, nn.Module] | None = None):
        super().__init__()
        if cfg.kind != "mtgr":
            raise ValueError(f"kind: MTGR needs an 'mtgr' config, got {cfg.kind!r}")
        self.cfg = cfg
        e, s, d = cfg.item_emb_dim, cfg.side_emb_dim, cfg.d_model
        shapes = table_shapes(cfg)
        self.item_emb = make_table("item_emb", shapes["item_emb"], tables)
        self.genre_proj = nn.Linear(cfg.num_genres, s, bias=False)
        self.year_emb = make_table("year_emb", shapes["year_emb"], tables)
        self.action_emb = make_table("action_emb", shapes["action_emb"], tables)
        self.gap_emb = make_table("gap_emb", shapes["gap_emb"], tables)
        self.profile_emb = nn.ModuleList(make_table(f"profile_emb.{i}", shapes[f"profile_emb.{i}"], tables)
                                         for i in range(len(cfg.profile_cardinalities)))
        self.field_emb = nn.Embedding(len(cfg.profile_cardinalities), e)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.user_mlp = mlp(e, d)
        self.history_mlp = mlp(e + 4 * s, d)
        self.realtime_mlp = mlp(e + 4 * s, d)
        self.candidate_mlp = mlp(e + 3 * s + cfg.num_cross_features, d)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
                                    for t in cfg.tasks})

    # ---- token embedding -------------------------------------------------------------------
    def _item_side(self, ev: EventTokens, item_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Item, genre and year features of item tokens; `item_rows`: their item-table rows, if looked up."""
        genres = ev.genres.to(self.genre_proj.weight.dtype)  # the batch is float32; the model may be bf16
        rows = self.item_emb(ev.items) if item_rows is None else item_rows
        return [rows, self.genre_proj(genres), self.year_emb(ev.years)]

    def _item_rows(self, *tokens: EventTokens) -> tuple[torch.Tensor, ...]:
        """The item-table rows of several token groups in one lookup (one embedding-service call per step)."""
        rows = self.item_emb(torch.cat([ev.items for ev in tokens]))
        return rows.split([len(ev.items) for ev in tokens])

    def _events(self, ev: EventTokens, proj: nn.Module, first_index: torch.Tensor,
                item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """S or R event tokens; `first_index` [B] is each user's event index of its first token."""
        feats = torch.cat([*self._item_side(ev, item_rows), self.action_emb(ev.actions), self.gap_emb(ev.gaps)], -1)
        index = positions_in_seq(ev.offsets, len(ev.items)) + first_index[seq_ids(ev.offsets, len(ev.items))]
        return proj(feats) + self.pos_emb(index.clamp(max=self.cfg.max_seq_len - 1))

    def embed(self, batch: MTGRBatch) -> tuple[torch.Tensor, TokenMeta]:
        """Assemble the jagged token sequence [U | S | R | C] per user and its metadata."""
        b, nu = batch.profile.shape
        hist, rt, cand = batch.history, batch.realtime, batch.candidates
        ns, nr, nc = hist.lengths, rt.lengths, cand.lengths
        offsets = offsets_of(nu + ns + nr + nc)
        total, base = b * nu + len(hist.items) + len(rt.items) + len(cand.items), offsets[:-1]  # no device sync
        dev = batch.profile.device

        fields = torch.arange(nu, device=dev)
        u_emb = torch.stack([emb(batch.profile[:, i]) for i, emb in enumerate(self.profile_emb)], 1)
        u_tok = self.user_mlp(u_emb + self.field_emb(fields)).reshape(b * nu, -1)
        s_rows, r_rows, c_rows = self._item_rows(hist, rt, cand)
        s_tok = self._events(hist, self.history_mlp, torch.zeros_like(ns), s_rows)
        r_tok = self._events(rt, self.realtime_mlp, ns, r_rows)
        c_feats = [*self._item_side(cand, c_rows), self.gap_emb(cand.gaps),
                   batch.cross.to(self.genre_proj.weight.dtype)]
        c_tok = self.candidate_mlp(torch.cat(c_feats, -1))

        def slots(ev: EventTokens, skip: torch.Tensor) -> torch.Tensor:
            ids = seq_ids(ev.offsets, len(ev.items))
            return base[ids] + skip[ids] + positions_in_seq(ev.offsets, len(ev.items))

        index = [(base[:, None] + fields).reshape(-1), slots(hist, torch.full_like(ns, nu)),
                 slots(rt, nu + ns), slots(cand, nu + ns + nr)]
        x = u_tok.new_empty(total, self.cfg.d_model)
        group = torch.empty(total, dtype=torch.int64, device=dev)
        ts = torch.zeros(total, dtype=torch.int64, device=dev)
        for idx, tok, g, stamps in zip(index, (u_tok, s_tok, r_tok, c_tok), (GROUP_U, GROUP_S, GROUP_R, GROUP_C),
                                       (None, hist.timestamps, rt.timestamps, cand.timestamps)):
            x[idx] = tok.to(x.dtype)
            group[idx] = g
            if stamps is not None:
                ts[idx] = stamps
        return x, TokenMeta(offsets, group, positions_in_seq(offsets, total), ts)

    # ---- layers and heads ----------------------------------------------------------------
    def head_logits(self, x_candidates: torch.Tensor) -> torch.Tensor:
        """Per-task logits [N, num_tasks] from final candidate states."""
        h = self.final_norm(x_candidates)
        return torch.cat([head(h) for head in self.heads.values()], -1)

    def forward(self, batch: MTGRBatch) -> torch.Tensor:
        x, meta = self.embed(batch)
        plan = cast(HSTULayer, self.layers[0]).plan(meta, meta)
        for layer in self.layers:
            x = layer(x, meta, plan)
        return self.head_logits(x[meta.group == GROUP_C])
