"""8-bit K/V: symmetric quantisation with one float32 scale per (token, head) (the definition).

    int8   q = round(x / s) in [-127, 127],  s = max|x| / 127   (over the head's dim)
    fp8    q = e4m3(x / s),                  s = max|x| / 448   (448: e4m3's largest finite value)
    x ≈ q · s

A token's K (or V) of one head is its unit: its scale depends on nothing else, so a context token's
quantised K/V are the same whichever step computed them, and cached == uncached still holds within the
engine. The cost per (token, head) is head_dim bytes + 4 for the scale, against 2·head_dim (bf16) or
4·head_dim (fp32). The attention dequantises (reference: `dequantize_kv`; the Triton kernel folds the
scales into the scores and probabilities).
"""

from __future__ import annotations

import torch

KV_DTYPES = ("model", "int8", "fp8")  # "model": the model's own dtype, unquantised
SCALE_DTYPE = torch.float32
_LIMITS = {"int8": 127.0, "fp8": 448.0}
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_TINY = 1e-20  # the scale of an all-zero row (its values quantise to 0 whatever the scale)


def check_kv_dtype(kv_dtype: str) -> None:
    """Raise ValueError naming `kv_dtype` unless it is one of KV_DTYPES."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


def storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype K/V are stored in: the model's, or the 8-bit one."""
    check_kv_dtype(kv_dtype)
    return model_dtype if kv_dtype == "model" else _STORAGE[kv_dtype]


def kv_dtype_of(storage: torch.dtype) -> str:
    """The kv_dtype name of a storage dtype ('model' for any floating dtype wider than 8 bits)."""
    return next((name for name, d in _STORAGE.items() if d == storage), "model")


def quantize_kv(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q [..., D] in the 8-bit dtype, scale [...] float32)."""
    if kv_dtype not in _LIMITS:
        raise ValueError(f"kv_dtype: expected one of {', '.join(_LIMITS)} to quantise, got {kv_dtype!r}")
    xf = x.float()
    limit = _LIMITS[kv_dtype]
    scale = xf.abs().amax(-1).clamp(min=_TINY) / limit
    y = xf / scale[..., None]
    q = y.round().clamp(-limit, limit).to(torch.int8) if kv_dtype == "int8" else y.to(_STORAGE[kv_dtype])
    return q, scale.to(SCALE_DTYPE)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., D], scale [...]) -> q · scale in `dtype` (computed in float32)."""
    return (q.float() * scale.float()[..., None]).to(dtype)
