"""A generative-recommenders HSTU state dict laid out with that project's names and shapes, and an independent
dense re-statement of its forward (per sequence, padded to N) to check converted models against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LAYER = "_hstu._attention_layers.{}."


def gr_state_dict(num_items=9, d=8, heads=2, dqk=3, dv=2, n=8, layers=2, buckets=128, seed=0, ddp=True,
                  bias=True) -> dict[str, torch.Tensor]:
    """Random tensors under their names (`module.` prefixed, as DDP saves them, when ddp)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"_embedding_module._item_emb.weight": torch.randn(num_items + 1, d, generator=g),
          "_input_features_preproc._pos_emb.weight": torch.randn(n, d, generator=g) * 0.5,
          "_attn_mask": torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)}
    sd["_embedding_module._item_emb.weight"][0] = 0
    for i in range(layers):
        p = LAYER.format(i)
        sd[p + "_uvqk"] = torch.randn(d, 2 * heads * (dv + dqk), generator=g) * 0.5
        sd[p + "_o.weight"] = torch.randn(d, heads * dv, generator=g) * 0.5
        sd[p + "_o.bias"] = torch.randn(d, generator=g) * 0.1
        if bias:
            sd[p + "_rel_attn_bias._pos_w"] = torch.randn(2 * n - 1, generator=g)
            sd[p + "_rel_attn_bias._ts_w"] = torch.randn(buckets + 1, generator=g)
    return {("module." + k if ddp else k): v for k, v in sd.items()}


def gr_user_embedding(sd: dict[str, torch.Tensor], heads: int, dqk: int, dv: int, items: list[int], ts: list[int],
                      next_ts: int, num_buckets: int = 128) -> torch.Tensor:
    """Their user embedding for one history: position i's time bias uses ts[i + 1] - ts[j] (the target's
    timestamp after the last event), alpha 1, LayerNorms without affine (eps 1e-6), sum / N, L2 (eps 1e-6)."""
    sd = {k.removeprefix("module."): v.double() for k, v in sd.items()}
    table, pos = sd["_embedding_module._item_emb.weight"], sd["_input_features_preproc._pos_emb.weight"]
    n, d = pos.shape
    length = len(items)
    x = table[torch.tensor(items)] * math.sqrt(d) + pos[:length]
    stamps = torch.tensor([*ts, next_ts], dtype=torch.float64)
    i_idx, j_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
    causal = (j_idx <= i_idx).double()
    layer = 0
    while LAYER.format(layer) + "_uvqk" in sd:
        p = LAYER.format(layer)
        h = F.silu(F.layer_norm(x, (d,), eps=1e-6) @ sd[p + "_uvqk"])
        u, v, q, k = h.split([heads * dv, heads * dv, heads * dqk, heads * dqk], -1)
        bias = torch.zeros(length, length, dtype=torch.float64)
        if p + "_rel_attn_bias._pos_w" in sd:
            bias = bias + sd[p + "_rel_attn_bias._pos_w"][j_idx - i_idx + n - 1]
            dt = (stamps[1:][:, None] - stamps[:-1][None, :]).abs().clamp(min=1)
            bucket = (torch.log(dt.float()) / 0.301).long().clamp(0, num_buckets)
            bias = bias + sd[p + "_rel_attn_bias._ts_w"][bucket]
        outs = []
        for hd in range(heads):
            qh, kh = q[:, hd * dqk:(hd + 1) * dqk], k[:, hd * dqk:(hd + 1) * dqk]
            att = F.silu(qh @ kh.T + bias) / n * causal
            outs.append(att @ v[:, hd * dv:(hd + 1) * dv])
        y = u * F.layer_norm(torch.cat(outs, -1), (heads * dv,), eps=1e-6)
        x = x + y @ sd[p + "_o.weight"].T + sd[p + "_o.bias"]
        layer += 1
    last = x[-1]
    return last / last.norm().clamp(min=1e-6)


def gr_item_table(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Their L2-normalised item embeddings (item_l2_norm, eps 1e-6)."""
    table = {k.removeprefix("module."): v for k, v in sd.items()}["_embedding_module._item_emb.weight"].double()
    return table / table.norm(dim=-1, keepdim=True).clamp(min=1e-6)
