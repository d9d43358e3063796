"""Inputs of the cached step from a ranking batch, with a K/V pool filled by the eager model, and the
outputs eager gives uncached: what the exported step is checked against."""

from __future__ import annotations

import numpy as np
import torch

from grinfer.features.batch import MTGRBatch
from grinfer.model.layers import HSTULayer, TokenMeta
from grinfer.model.mtgr import MTGR


@torch.no_grad()
def context_kv(model: MTGR, batch: MTGRBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      TokenMeta]:
    """Eager uncached pass: input embeddings x [T, d], every layer's K and V [layers, T, H, D], the final hidden
    states [T, d], token meta."""
    x, meta = model.embed(batch)
    first = model.layers[0]
    assert isinstance(first, HSTULayer)
    plan = first.plan(meta, meta)
    ks, vs, h = [], [], x
    for layer in model.layers:
        assert isinstance(layer, HSTULayer)
        u, v, q, k = layer.project(h, meta.group)
        ks.append(k)
        vs.append(v)
        h = layer.finish(h, layer.attend(q, k, v, plan), u, meta.group)
    return x, torch.stack(ks), torch.stack(vs), h, meta


@torch.no_grad()
def step_sample(model: MTGR, batch: MTGRBatch, cached: list[int], block_size: int,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(STEP_INPUTS, expected STEP_OUTPUTS) for users whose first `cached[b]` context tokens are in the pool.

    Pages are shuffled over a pool with spare pages; every slot that holds no cached token is random noise,
    so a step that read one would be wrong. Expected values come from the eager uncached model."""
    rng = np.random.default_rng(seed)
    x, k, v, h, meta = context_kv(model, batch)
    b, nu = batch.profile.shape
    ctx_len = (nu + batch.history.lengths + batch.realtime.lengths).tolist()
    n_cand = batch.candidates.lengths.tolist()
    start = meta.offsets[:-1].tolist()
    if len(cached) != b or any(not 0 <= c <= n for c, n in zip(cached, ctx_len)):
        raise ValueError(f"cached: expected {b} prefix lengths within the context lengths {ctx_len}, got {cached}")
    ln, lc, lk = max(max(n - c for n, c in zip(ctx_len, cached)), 1), max(max(n_cand), 1), max(max(ctx_len), 1)
    pages = [-(-n // block_size) for n in ctx_len]
    nb, total = max(max(pages), 2), sum(pages) + 2  # >= 2 table columns; two spare pages nobody owns
    order = rng.permutation(total)
    layers, _, heads, dim = k.shape
    k_pool = torch.randn(layers, total * block_size, heads, dim, dtype=k.dtype)
    v_pool = torch.randn_like(k_pool)
    table = torch.zeros(b, nb, dtype=torch.int64)
    d = x.shape[1]
    inputs = {"x_new": x.new_zeros(b, ln, d), "x_cand": x.new_zeros(b, lc, d), "ctx_ts": torch.zeros(b, lk,
              dtype=torch.int64)}
    expected = {"k_new": k.new_zeros(layers, b, ln, heads, dim), "v_new": v.new_zeros(layers, b, ln, heads, dim),
                "cand_states": x.new_zeros(b, lc, d)}
    used = 0
    for i in range(b):
        first, n, c = start[i], ctx_len[i], cached[i]
        table[i, :pages[i]] = torch.from_numpy(order[used:used + pages[i]])
        used += pages[i]
        slots = table[i, torch.arange(c) // block_size] * block_size + torch.arange(c) % block_size
        k_pool[:, slots], v_pool[:, slots] = k[:, first:first + c], v[:, first:first + c]
        inputs["x_new"][i, :n - c] = x[first + c:first + n]
        inputs["x_cand"][i, :n_cand[i]] = x[first + n:first + n + n_cand[i]]
        inputs["ctx_ts"][i, :n] = meta.ts[first:first + n]
        expected["k_new"][:, i, :n - c] = k[:, first + c:first + n]
        expected["v_new"][:, i, :n - c] = v[:, first + c:first + n]
        expected["cand_states"][i, :n_cand[i]] = h[first + n:first + n + n_cand[i]]
    as_long = lambda values: torch.tensor(values, dtype=torch.int64)
    inputs.update(ctx_start=as_long(cached), ctx_end=as_long(ctx_len),
                  static_tokens=nu + batch.history.lengths, cand_len=batch.candidates.lengths,
                  request_ts=batch.request_ts, block_table=table, k_pool=k_pool, v_pool=v_pool)
    probs = torch.sigmoid(model(batch).float())
    padded = probs.new_zeros(b, lc, probs.shape[1])
    offsets = np.r_[0, np.cumsum(n_cand)]
    for i in range(b):
        padded[i, :n_cand[i]] = probs[offsets[i]:offsets[i + 1]]
    return inputs, {"probabilities": padded, **expected}
