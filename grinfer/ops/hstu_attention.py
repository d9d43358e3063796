"""Jagged HSTU attention: one entry point that checks shapes once and picks the kernel.

    kernel="reference"  grinfer.ops.reference.hstu_attention (plain PyTorch, any device, the definition)
    kernel="triton"     grinfer.ops.triton.hstu_attention (forward only, no relative bias)
    kernel="auto"       triton for CUDA tensors when Triton is importable, no bias tables are given,
                        the head dims are at most 256 and no gradient is needed; else the reference

The signature is the reference's, plus `kernel`. 8-bit K/V (int8 / fp8 e4m3) come with k_scale, v_scale
[Tk, H] (grinfer.ops.reference.kv_quant); both kernels dequantise them.
"""

from __future__ import annotations

import torch

from grinfer.ops.dispatch import auto_picks_triton, check_kernel
from grinfer.ops.reference import hstu_attention as reference

TRITON_MAX_HEAD_DIM = 256
EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)  # K/V dtypes that come with scales


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str, normalizer: str, q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the first argument whose shape, dtype or device does not fit (no host sync)."""
    if mode not in ("dynamic", "causal"):
        raise ValueError(f"mask mode: expected 'dynamic' or 'causal', got {mode!r}")
    if normalizer not in ("visible", "max_len"):
        raise ValueError(f"normalizer: expected 'visible' or 'max_len', got {normalizer!r}")
    _check_qkv(q, k, v, k_scale, v_scale)
    _check_layout(q_offsets, k_offsets, (("q_group", q_group, q.shape[0]), ("q_pos", q_pos, q.shape[0]),
                                         ("k_group", k_group, k.shape[0]), ("k_pos", k_pos, k.shape[0])))
    if (pos_table is None) != (time_table is None):
        raise ValueError("pos_table, time_table: give both relative-bias tables or neither")
    if pos_table is not None and (q_ts is None or k_ts is None):
        raise ValueError("q_ts, k_ts: the relative bias needs the query and key timestamps")
    device = q.device
    for name, t in (("k", k), ("v", v), ("q_offsets", q_offsets), ("k_offsets", k_offsets), ("q_group", q_group),
                    ("q_pos", q_pos), ("k_group", k_group), ("k_pos", k_pos)):
        if t.device != device:
            raise ValueError(f"{name}: expected the device of q ({device}), got {t.device}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
               v_scale: torch.Tensor | None = None) -> None:
    for name, t, scale in (("q", q, None), ("k", k, k_scale), ("v", v, v_scale)):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if scale is not None:
            if t.dtype not in EIGHT_BIT or scale.shape != t.shape[:2] or not scale.is_floating_point():
                raise ValueError(f"{name}_scale: expected 8-bit {name} ({', '.join(map(str, EIGHT_BIT))}) and "
                                 f"float scales {tuple(t.shape[:2])}, got {t.dtype} and {tuple(scale.shape)}")
        elif not t.is_floating_point() or t.dtype in EIGHT_BIT:
            raise ValueError(f"{name}: expected a floating-point tensor (8-bit only with {name}_scale), got {t.dtype}")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k: expected [Tk, {q.shape[1]}, {q.shape[2]}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: expected [{k.shape[0]}, {k.shape[1]}, Dv] to match k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")


def _check_layout(q_offsets: torch.Tensor, k_offsets: torch.Tensor,
                  per_token: tuple[tuple[str, torch.Tensor, int], ...]) -> None:
    """Offsets [B + 1] of one batch size; each (name, tensor, tokens) one integer per token."""
    for name, off in (("q_offsets", q_offsets), ("k_offsets", k_offsets)):
        if off.dim() != 1 or len(off) < 1 or off.is_floating_point():
            raise ValueError(f"{name}: expected integer offsets [B + 1], got {off.dtype} {tuple(off.shape)}")
    if len(q_offsets) != len(k_offsets):
        raise ValueError(f"q_offsets, k_offsets: expected the same batch size, got {len(q_offsets) - 1} and "
                         f"{len(k_offsets) - 1} sequences")
    for name, t, n in per_token:
        if t.shape != (n,) or t.is_floating_point():
            raise ValueError(f"{name}: expected {n} integers (one per token), got {t.dtype} {tuple(t.shape)}")


def choose_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  has_bias: bool) -> str:
    """'reference' or 'triton' for this call (see the module docstring)."""
    check_kernel(kernel)
    head_dim = max(q.shape[2], v.shape[2])
    if kernel == "triton":
        if has_bias:
            raise ValueError("kernel='triton': the Triton kernel has no relative bias; use 'reference' or 'auto'")
        if head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"kernel='triton': head dims up to {TRITON_MAX_HEAD_DIM}, got {head_dim}")
        return "triton"
    if kernel == "auto" and not has_bias and head_dim <= TRITON_MAX_HEAD_DIM and auto_picks_triton(q, k, v):
        return "triton"
    return "reference"


def hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
    *, mode: str = "dynamic", normalizer: str = "visible", max_seq_len: int = 256,
    alpha: float | None = None,
    q_ts: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None, time_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Jagged HSTU attention q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv] (q's dtype).

    See `grinfer.ops.reference.hstu_attention.hstu_attention` for the arguments and the maths.
    """
    check_inputs(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode, normalizer=normalizer,
                 q_ts=q_ts, k_ts=k_ts, pos_table=pos_table, time_table=time_table, k_scale=k_scale, v_scale=v_scale)
    if choose_kernel(kernel, q, k, v, has_bias=pos_table is not None) == "reference":
        return reference.hstu_attention(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                        normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, q_ts=q_ts,
                                        k_ts=k_ts, pos_table=pos_table, time_table=time_table, k_scale=k_scale,
                                        v_scale=v_scale)
    from grinfer.ops.triton.hstu_attention import triton_hstu_attention

    return triton_hstu_attention(q, k, v, q_offsets, k_offsets, q_group, q_pos, k_group, k_pos, mode=mode,
                                 normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, k_scale=k_scale,
                                 v_scale=v_scale)
