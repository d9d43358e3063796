"""The HSTU layer shared by MTGR (dynamic mask, GroupLN) and the causal HSTU retrieval model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grinfer.config import ModelConfig
from grinfer.ops import layer_norm as norm_ops
from grinfer.ops.groups import NUM_GROUPS
from grinfer.ops.hstu_attention import AttentionPlan, attend, plan_attention


@dataclass
class TokenMeta:
    """Per-token metadata of a jagged sequence batch [U | S | R | C]."""

    offsets: torch.Tensor  # [B + 1]
    group: torch.Tensor  # [T] token group (GROUP_U .. GROUP_C)
    pos: torch.Tensor  # [T] position in the full sequence
    ts: torch.Tensor  # [T] timestamp (seconds) for the time-bucket bias


class GroupLayerNorm(nn.Module):
    """LayerNorm with one (weight, bias) per token group; one group = a plain LayerNorm; affine=False: none
    (an identity weight and bias that are not parameters: x * 1 + 0 is exact).

    Computed by the op's dispatcher (grinfer.ops.layer_norm) with its reference kernel: the model is the
    definition every backend is checked against; backends pick faster kernels of the same op."""

    def __init__(self, num_groups: int, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.weight: torch.Tensor
        self.bias: torch.Tensor
        if affine:
            self.weight = nn.Parameter(torch.ones(num_groups, dim))
            self.bias = nn.Parameter(torch.zeros(num_groups, dim))
        else:
            self.register_buffer("weight", torch.ones(1, dim), persistent=False)
            self.register_buffer("bias", torch.zeros(1, dim), persistent=False)
        self.affine = affine
        self.eps = eps

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        return norm_ops.group_layer_norm(x, group, self.weight, self.bias, self.eps, kernel="reference")


class RelativeBias(nn.Module):
    """Learned relative-position and time-bucket attention bias tables (shared by all heads); positions
    k - q are clamped to [-reach, reach]."""

    def __init__(self, reach: int, num_time_buckets: int):
        super().__init__()
        self.pos_table = nn.Parameter(torch.zeros(2 * reach + 1))
        self.time_table = nn.Parameter(torch.zeros(num_time_buckets))


class HSTULayer(nn.Module):
    """X += W_o · (GroupLN(A·V) ⊙ U), with U, V, Q, K = split(SiLU(GroupLN(X) · W_uvqk))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        groups = NUM_GROUPS if cfg.group_ln else 1
        d, h = cfg.d_model, cfg.num_heads
        self.cfg = cfg
        self.bias_reach = cfg.rel_pos_reach or cfg.max_seq_len
        self.norm_in = GroupLayerNorm(groups, d, cfg.ln_eps, cfg.ln_affine)
        self.uvqk = nn.Linear(d, 2 * h * (cfg.head_v_dim + cfg.head_qk_dim), bias=cfg.uvqk_bias)
        self.norm_attn = GroupLayerNorm(groups, h * cfg.head_v_dim, cfg.ln_eps, cfg.ln_affine)
        self.out = nn.Linear(h * cfg.head_v_dim, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rel_bias = RelativeBias(self.bias_reach, cfg.num_time_buckets) if cfg.rel_bias else None

    def _group(self, group: torch.Tensor) -> torch.Tensor:
        return group if self.cfg.group_ln else torch.zeros_like(group)

    def project(self, x: torch.Tensor, group: torch.Tensor):
        """U [T, d] and V, Q, K [T, H, d/H] of the given tokens."""
        cfg = self.cfg
        h = F.silu(self.uvqk(self.norm_in(x, self._group(group))))
        wv, wqk = cfg.num_heads * cfg.head_v_dim, cfg.num_heads * cfg.head_qk_dim
        u, v, q, k = h.split([wv, wv, wqk, wqk], dim=-1)
        t, heads = x.shape[0], cfg.num_heads
        return (u, v.reshape(t, heads, cfg.head_v_dim), q.reshape(t, heads, cfg.head_qk_dim),
                k.reshape(t, heads, cfg.head_qk_dim))

    def plan(self, q_meta: TokenMeta, k_meta: TokenMeta) -> AttentionPlan:
        """Mask, normaliser and bias indices for these queries and keys (the same for every layer)."""
        cfg = self.cfg
        return plan_attention(q_meta.offsets, k_meta.offsets, q_meta.group, q_meta.pos, k_meta.group, k_meta.pos,
                              mode=cfg.mask, normalizer=cfg.normalizer, max_seq_len=cfg.max_seq_len,
                              q_ts=q_meta.ts, k_ts=k_meta.ts,
                              bias_reach=self.bias_reach if cfg.rel_bias else None,
                              num_time_buckets=cfg.num_time_buckets)

    def attend(self, q, k, v, plan: AttentionPlan, k_scale: torch.Tensor | None = None,
               v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the queries over the keys (which include every key a query may see); 8-bit K/V come
        with their per (key, head) scales. The dispatcher's planned path: the reference kernel, the definition."""
        bias = self.rel_bias
        o = attend(q, k, v, plan, self.cfg.attn_alpha, pos_table=None if bias is None else bias.pos_table,
                   time_table=None if bias is None else bias.time_table, k_scale=k_scale, v_scale=v_scale)
        return o.reshape(o.shape[0], -1)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Residual update from the attention output."""
        y = self.dropout(self.norm_attn(attn, self._group(group)) * u)
        return x + (self.out(y) if self.cfg.layer_dropout == "before_out" else self.dropout(self.out(y)))

    def forward(self, x: torch.Tensor, meta: TokenMeta, plan: AttentionPlan | None = None) -> torch.Tensor:
        """One layer over a whole sequence batch (pass `plan` to share it across layers)."""
        u, v, q, k = self.project(x, meta.group)
        plan = self.plan(meta, meta) if plan is None else plan
        return self.finish(x, self.attend(q, k, v, plan), u, meta.group)
