"""The HSTU layer's pointwise epilogues around its two GEMMs (the definition).

    xn = GroupLN_in(x, group);  h = SiLU(xn W_uvqk^T + b);  u, v, q, k = split(h, d)
    y = GroupLN_attn(a, group) * u;  x = x + y W_o^T + b_o

GroupLN is a LayerNorm without affine followed by the token group's row of a [G, d] weight and
bias (G = 1: a plain LayerNorm with affine; the group ids are then ignored and may be None).
Everything is computed in fp32 and rounded once to the output's dtype (the input's unless `out`
is given); group ids must lie in [0, G). Inputs: [T, d] with any row stride.
`grinfer.ops.triton.layer_norm` has the same functions with the same signatures and effects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _affine_rows(weight: torch.Tensor, bias: torch.Tensor,
                 group: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weight and bias rows ([d], or [T, d] per token group) broadcasting against [T, d]."""
    if weight.shape[0] == 1:
        return weight[0].float(), bias[0].float()
    if group is None:
        raise ValueError(f"group: expected token group ids (weight has {weight.shape[0]} rows), got None")
    # F.embedding rather than index_select: its backward reduces sorted indices instead of piling T atomic
    # adds onto G rows (the models train through this op)
    return F.embedding(group, weight.float()), F.embedding(group, bias.float())


def _emit(y: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """The fp32 result rounded to `dtype`, or copied (rounded to its dtype) into `out`."""
    if out is None:
        return y.to(dtype)
    out.copy_(y)
    return out


def group_layer_norm(x: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5, *, add: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """LN(x') * weight[group] + bias[group], x' = x + add (a [d] vector, then written back into x in place)."""
    if add is not None:
        x.copy_(x.float() + add.float())
    xf = x.float()
    w, b = _affine_rows(weight, bias, group)
    return _emit(F.layer_norm(xf, xf.shape[-1:], eps=eps) * w + b, x.dtype, out)


def silu_scatter_kv(h: torch.Tensor, d: int, slots: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor) -> None:
    """In place h = SiLU(h) ([T, 4d]: u|v|q|k); rows with slots[t] >= 0 copy their v, k blocks to the caches[slot]."""
    h.copy_(F.silu(h.float()))
    rows = (slots >= 0).nonzero().squeeze(1)
    dest = slots.index_select(0, rows).long()
    picked = h.index_select(0, rows)
    v_cache.index_copy_(0, dest, picked[:, d:2 * d].reshape(-1, *v_cache.shape[1:]).to(v_cache.dtype))
    k_cache.index_copy_(0, dest, picked[:, 3 * d:4 * d].reshape(-1, *k_cache.shape[1:]).to(k_cache.dtype))


def group_norm_mul(a: torch.Tensor, u: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-5, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """(LN(a) * weight[group] + bias[group]) * u; a is [T, d] or [T, H, Dh], the result [T, d]."""
    af = a.reshape(a.shape[0], a.shape[1:].numel()).float()
    w, b = _affine_rows(weight, bias, group)
    return _emit((F.layer_norm(af, af.shape[-1:], eps=eps) * w + b) * u.float(), a.dtype, out)
