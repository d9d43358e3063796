"""HSTU attention over padded [B, L] tensors with validity masks: the export twin of the jagged reference.

The jagged reference (`ops.reference.hstu_attention`) sizes its padded scratch from the longest
sequence (a host sync, data-dependent); exported graphs take tensors already padded to symbolic
sizes and a validity mask instead, and build the same mask, normaliser and bias from the same
definitions (`visible`, `relative_index`, `time_bucket`). Padded rows and keys get a zero weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grinfer.config import ModelConfig
from grinfer.model.layers import HSTULayer
from grinfer.ops.groups import GROUP_C, relative_index, time_bucket, visible


@dataclass
class PaddedTokens:
    """Per-token metadata of a padded batch: [B, L] each."""

    group: torch.Tensor
    pos: torch.Tensor
    ts: torch.Tensor
    valid: torch.Tensor  # bool


@dataclass
class PaddedPlan:
    """Mask / normaliser weights [B, Lq, Lk] and the optional relative-bias indices, shared by all layers."""

    scale: torch.Tensor
    rel: torch.Tensor | None
    bucket: torch.Tensor | None


def plan_padded(cfg: ModelConfig, q: PaddedTokens, k: PaddedTokens) -> PaddedPlan:
    """The attention plan of padded queries over padded keys (as `plan_attention` for jagged ones)."""
    mask = visible(q.group[:, :, None], q.pos[:, :, None], k.group[:, None, :], k.pos[:, None, :], cfg.mask)
    mask = mask & q.valid[:, :, None] & k.valid[:, None, :]
    weight = mask.to(torch.float32)
    if cfg.normalizer == "visible":
        scale = weight / weight.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        scale = weight / float(cfg.max_seq_len)
    if not cfg.rel_bias:
        return PaddedPlan(scale, None, None)
    # candidates take the context length as their position, so their place in the list does not matter
    ctx_len = ((k.group != GROUP_C) & k.valid).sum(1, keepdim=True)
    q_pos = torch.where(q.group == GROUP_C, ctx_len, q.pos)
    k_pos = torch.where(k.group == GROUP_C, ctx_len, k.pos)
    rel = relative_index(q_pos[:, :, None], k_pos[:, None, :], cfg.max_seq_len)
    bucket = time_bucket(q.ts[:, :, None] - k.ts[:, None, :], cfg.num_time_buckets)
    return PaddedPlan(scale, rel, bucket)


def attend_padded(layer: HSTULayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  plan: PaddedPlan) -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H * D], in float32 (the layer's bias tables)."""
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = torch.matmul(qh, kh.transpose(2, 3)) * (1.0 / math.sqrt(q.shape[-1]))
    if layer.rel_bias is not None and plan.rel is not None and plan.bucket is not None:
        bias = F.embedding(plan.rel, layer.rel_bias.pos_table.float()[:, None]).squeeze(-1)
        bias = bias + F.embedding(plan.bucket, layer.rel_bias.time_table.float()[:, None]).squeeze(-1)
        scores = scores + bias[:, None]
    out = torch.matmul(F.silu(scores) * plan.scale[:, None], vh)  # [B, H, Lq, D]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1).to(q.dtype)


def run_layer(layer: HSTULayer | nn.Module, x: torch.Tensor, tokens: PaddedTokens, plan: PaddedPlan) -> torch.Tensor:
    """One HSTU layer over padded tokens x [B, L, d] whose keys are the tokens themselves."""
    assert isinstance(layer, HSTULayer)
    b, n, d = x.shape
    flat, group = x.reshape(b * n, d), tokens.group.reshape(b * n)
    u, v, q, k = layer.project(flat, group)
    shape = (b, n, *q.shape[1:])
    attn = attend_padded(layer, q.reshape(shape), k.reshape(shape), v.reshape(shape), plan)
    return layer.finish(flat, attn.reshape(b * n, d), u, group).reshape(b, n, d)
