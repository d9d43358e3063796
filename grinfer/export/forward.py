"""The uncached forwards as exportable modules over padded tensors (ONNX and AOTInductor share them).

Ranking: per user [U | S | R | C] laid out as NU profile tokens, then S, R and C each padded to the
batch's longest (at least 1), with their true lengths; out: per-task probabilities [B, Lc, T] (0 at
padded candidates). Retrieval: items [B, L] padded with 0 and lengths; out: the L2-normalised user
embedding at each user's last event [B, d] and its scores against the item table [B, num_items + 1].
Every size is a tensor dimension and every branch is on the config, never on the data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grinfer.export.attention import PaddedTokens, plan_padded, run_layer
from grinfer.features.batch import EventTokens
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U

EVENT_FIELDS = ("items", "genres", "years", "actions", "ts", "gaps")
CANDIDATE_FIELDS = ("items", "genres", "years", "ts", "gaps", "cross")
RANKING_INPUTS = ("profile", *(f"s_{f}" for f in EVENT_FIELDS), "s_len", *(f"r_{f}" for f in EVENT_FIELDS), "r_len",
                  *(f"c_{f}" for f in CANDIDATE_FIELDS), "c_len")
RETRIEVAL_INPUTS = ("items", "ts", "lengths")


def positions(like: torch.Tensor) -> torch.Tensor:
    """[1, L] int64 positions 0..L-1 of a [B, L] tensor."""
    return torch.ones_like(like[:1], dtype=torch.int64).cumsum(1) - 1


def _item_side(model: MTGR, items: torch.Tensor, genres: torch.Tensor, years: torch.Tensor) -> list[torch.Tensor]:
    """MTGR's item features (`MTGR._item_side`, which reads only these fields) of padded item tokens."""
    return model._item_side(EventTokens(items, items, genres, years, items, items, items))


class RankingForward(nn.Module):
    """MTGR's uncached forward over padded inputs (RANKING_INPUTS, in that order) -> probabilities."""

    def __init__(self, model: MTGR):
        super().__init__()
        self.model = model

    def _events(self, proj: nn.Module, items, genres, years, actions, gaps, first: torch.Tensor) -> torch.Tensor:
        m = self.model
        feats = torch.cat([*_item_side(m, items, genres, years), m.action_emb(actions), m.gap_emb(gaps)], -1)
        index = first[:, None] + positions(items)
        return proj(feats) + m.pos_emb(index.clamp(max=m.cfg.max_seq_len - 1))

    def forward(self, profile, s_items, s_genres, s_years, s_actions, s_ts, s_gaps, s_len,
                r_items, r_genres, r_years, r_actions, r_ts, r_gaps, r_len,
                c_items, c_genres, c_years, c_ts, c_gaps, c_cross, c_len) -> torch.Tensor:
        m = self.model
        fields = positions(profile)  # [1, NU]
        u_emb = torch.stack([emb(profile[:, i]) for i, emb in enumerate(m.profile_emb)], 1)
        u_tok = m.user_mlp(u_emb + m.field_emb(fields))
        s_tok = self._events(m.history_mlp, s_items, s_genres, s_years, s_actions, s_gaps, torch.zeros_like(s_len))
        r_tok = self._events(m.realtime_mlp, r_items, r_genres, r_years, r_actions, r_gaps, s_len)
        c_side = _item_side(m, c_items, c_genres, c_years)
        c_tok = m.candidate_mlp(torch.cat([*c_side, m.gap_emb(c_gaps), c_cross.to(c_side[1].dtype)], -1))
        x = torch.cat([u_tok, s_tok, r_tok, c_tok], 1)

        nu, s_pos, r_pos, c_pos = profile.shape[1], positions(s_items), positions(r_items), positions(c_items)
        full = lambda p, g: torch.full_like(p, g).expand(profile.shape[0], -1)
        group = torch.cat([full(fields, GROUP_U), full(s_pos, GROUP_S), full(r_pos, GROUP_R), full(c_pos, GROUP_C)], 1)
        pos = torch.cat([fields.expand(profile.shape[0], -1), nu + s_pos.expand(profile.shape[0], -1),
                         nu + s_len[:, None] + r_pos, nu + (s_len + r_len)[:, None] + c_pos], 1)
        ts = torch.cat([torch.zeros_like(profile), s_ts, r_ts, c_ts], 1)
        c_valid = c_pos < c_len[:, None]
        valid = torch.cat([torch.ones_like(profile, dtype=torch.bool), s_pos < s_len[:, None],
                           r_pos < r_len[:, None], c_valid], 1)
        tokens = PaddedTokens(group, pos, ts, valid)
        plan = plan_padded(m.cfg, tokens, tokens)
        for layer in m.layers:
            x = run_layer(layer, x, tokens, plan)
        probs = torch.sigmoid(m.head_logits(x[:, x.shape[1] - c_items.shape[1]:]).float())
        return torch.where(c_valid[:, :, None], probs, torch.zeros_like(probs))


class RetrievalForward(nn.Module):
    """HSTU retrieval's forward over padded inputs (RETRIEVAL_INPUTS) -> (user embedding, item scores)."""

    def __init__(self, model: HSTURetrieval):
        super().__init__()
        self.model = model

    def forward(self, items, ts, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        pos = positions(items).expand(items.shape[0], -1)
        x = m.item_emb(items) * math.sqrt(m.cfg.d_model) + m.pos_emb(pos.clamp(max=m.cfg.max_seq_len - 1))
        tokens = PaddedTokens(torch.full_like(items, GROUP_S), pos, ts, pos < lengths[:, None])
        plan = plan_padded(m.cfg, tokens, tokens)
        for layer in m.layers:
            x = run_layer(layer, x, tokens, plan)
        last = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, x.shape[2])
        user = F.normalize(torch.gather(x, 1, last).squeeze(1), dim=-1)
        return user, user @ m.item_table().T
