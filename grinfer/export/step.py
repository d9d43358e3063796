"""The cached MTGR step as an exportable module: new context tokens and candidates over a paged K/V pool.

Per user b, context positions [0, ctx_start) are cached in the pool (position p at slot
block_table[b, p // block_size] * block_size + p % block_size, as engine/kv_cache.py lays pages out);
positions [ctx_start, ctx_end) are computed now from their input embeddings `x_new`, and the
user's candidates `x_cand` attend over the whole context plus themselves. Inputs (STEP_INPUTS):

    x_new [B, Ln, d]  x_cand [B, Lc, d]     input embeddings (MTGR.embed) of the new tokens
    ctx_start, ctx_end, static_tokens [B]   cached prefix, context length, U + S tokens
    ctx_ts [B, Lk]                          timestamp of every context position (Lk >= max ctx_end)
    cand_len, request_ts [B]                candidates per user (<= Lc), their timestamp
    block_table [B, NB], k_pool, v_pool [num_layers, slots, H, D]

Outputs (STEP_OUTPUTS): probabilities [B, Lc, T] (0 at padded candidates), the new context
tokens' K and V [num_layers, B, Ln, H, D] (0 at padded rows) for the caller to write into the pool (the step
is a pure function: the pool is read, never written) and the candidates' final hidden states [B, Lc, d] (0 at
padded candidates; what the engine's backend interface hands to the heads). Candidates sit after the context,
as in the full sequence; a step computes every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from grinfer.export.attention import PaddedTokens, attend_padded, plan_padded
from grinfer.export.forward import positions
from grinfer.model.layers import HSTULayer
from grinfer.model.mtgr import MTGR
from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U

STEP_INPUTS = ("x_new", "x_cand", "ctx_start", "ctx_end", "static_tokens", "ctx_ts", "cand_len", "request_ts",
               "block_table", "k_pool", "v_pool")
STEP_OUTPUTS = ("probabilities", "k_new", "v_new", "cand_states")


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] at per-user row indices [B, M] (in range) -> [B, M, ...]."""
    b, n = x.shape[0], x.shape[1]
    flat = (index + (torch.ones_like(index[:, :1]).cumsum(0) - 1) * n).reshape(-1)  # user b's rows start at b * L
    return x.reshape(b * n, *x.shape[2:]).index_select(0, flat).reshape(*index.shape, *x.shape[2:])


class CachedStep(nn.Module):
    """MTGR layers and heads over new tokens and a paged K/V pool (STEP_INPUTS -> STEP_OUTPUTS)."""

    def __init__(self, model: MTGR, block_size: int):
        super().__init__()
        self.model, self.block_size = model, block_size

    def forward(self, x_new, x_cand, ctx_start, ctx_end, static_tokens, ctx_ts, cand_len, request_ts,
                block_table, k_pool, v_pool):
        m, page = self.model, self.block_size
        nu = len(m.cfg.profile_cardinalities)
        b, n_new, n_cand = x_new.shape[0], x_new.shape[1], x_cand.shape[1]

        def group_of(p: torch.Tensor) -> torch.Tensor:
            return torch.where(p < nu, GROUP_U, torch.where(p < static_tokens[:, None], GROUP_S, GROUP_R))

        key_pos = positions(ctx_ts).expand(b, -1)  # [B, Lk]
        new_pos = ctx_start[:, None] + positions(x_new[:, :, 0])  # [B, Ln]
        cand_pos = ctx_end[:, None] + positions(x_cand[:, :, 0])
        cand_ts = torch.zeros_like(cand_pos) + request_ts[:, None]
        cand_valid = positions(cand_pos) < cand_len[:, None]
        cand = PaddedTokens(torch.full_like(cand_pos, GROUP_C), cand_pos, cand_ts, cand_valid)
        queries = PaddedTokens(
            torch.cat([group_of(new_pos), cand.group], 1), torch.cat([new_pos, cand_pos], 1),
            torch.cat([_rows(ctx_ts, new_pos.clamp(max=ctx_ts.shape[1] - 1)), cand.ts], 1),
            torch.cat([new_pos < ctx_end[:, None], cand.valid], 1))
        keys = PaddedTokens(torch.cat([group_of(key_pos), cand.group], 1), torch.cat([key_pos, cand_pos], 1),
                            torch.cat([ctx_ts, cand.ts], 1), torch.cat([key_pos < ctx_end[:, None], cand.valid], 1))
        plan = plan_padded(m.cfg, queries, keys)

        # each context key: computed now (ctx_start <= p < ctx_end) or read from the user's pages
        is_new = (key_pos >= ctx_start[:, None])[:, :, None, None]
        new_index = (key_pos - ctx_start[:, None]).clamp(0, n_new - 1)
        page_of = (key_pos // page).clamp(max=block_table.shape[1] - 1)
        slots = (torch.gather(block_table, 1, page_of) * page + key_pos % page).reshape(-1)

        new_valid = queries.valid[:, :n_new, None, None]
        x = torch.cat([x_new, x_cand], 1)
        group, d = queries.group.reshape(-1), x.shape[2]
        k_out, v_out = [], []
        for i, layer in enumerate(m.layers):
            assert isinstance(layer, HSTULayer)
            flat = x.reshape(-1, d)
            u, v, q, k = (t.reshape(b, n_new + n_cand, *t.shape[1:]) for t in layer.project(flat, group))
            k_out.append(torch.where(new_valid, k[:, :n_new], torch.zeros_like(k[:, :n_new])))
            v_out.append(torch.where(new_valid, v[:, :n_new], torch.zeros_like(v[:, :n_new])))
            ctx_k, ctx_v = (torch.where(is_new, _rows(t[:, :n_new], new_index),
                                        pool[i].index_select(0, slots).reshape(*key_pos.shape, *pool.shape[2:])
                                        .to(t.dtype)) for t, pool in ((k, k_pool), (v, v_pool)))
            attn = attend_padded(layer, q, torch.cat([ctx_k, k[:, n_new:]], 1), torch.cat([ctx_v, v[:, n_new:]], 1),
                                 plan)
            x = layer.finish(flat, attn.reshape(-1, d), u.reshape(-1, d), group).reshape(x.shape)
        states = torch.where(cand.valid[:, :, None], x[:, n_new:], torch.zeros_like(x[:, n_new:]))
        probs = torch.sigmoid(m.head_logits(states).float())
        probs = torch.where(cand.valid[:, :, None], probs, torch.zeros_like(probs))
        return probs, torch.stack(k_out), torch.stack(v_out), states
