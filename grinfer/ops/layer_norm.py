"""The HSTU layer's pointwise epilogues (GroupLN, SiLU + K/V scatter, GroupLN * U): one entry point per op.

    kernel="reference"  grinfer.ops.reference.layer_norm (plain PyTorch, any device, the definition)
    kernel="triton"     grinfer.ops.triton.layer_norm (forward only; d up to its MAX_DIM)
    kernel="auto"       triton for CUDA tensors when Triton is importable, d fits and no gradient is
                        needed; else the reference

The signatures and in-place effects are the reference's, plus `kernel`; `LayerNormKernels(kernel)`
holds the three with one choice bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from grinfer.ops.dispatch import auto_picks_triton, check_kernel
from grinfer.ops.reference import layer_norm as reference


def choose_kernel(kernel: str, d: int, *tensors: torch.Tensor) -> str:
    """'reference' or 'triton' for a call over rows of width d (see the module docstring)."""
    check_kernel(kernel)
    if kernel == "reference" or (kernel == "auto" and not auto_picks_triton(*tensors)):
        return "reference"
    if kernel == "auto" and not 0 < d <= _triton().MAX_DIM:
        return "reference"
    return "triton"


def _triton() -> ModuleType:
    from grinfer.ops.triton import layer_norm as triton_kernels  # imports Triton

    return triton_kernels


def _kernels(kernel: str, d: int, *tensors: torch.Tensor) -> ModuleType:
    """The module (reference or Triton) whose function runs this call."""
    return reference if choose_kernel(kernel, d, *tensors) == "reference" else _triton()


def group_layer_norm(x: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5, *, add: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     kernel: str = "auto") -> torch.Tensor:
    """LN(x') * weight[group] + bias[group], x' = x + add (a [d] vector, then written back into x in place)."""
    ops = _kernels(kernel, x.shape[-1], x, weight, bias)
    return ops.group_layer_norm(x, group, weight, bias, eps, add=add, out=out)


def silu_scatter_kv(h: torch.Tensor, d: int, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    *, kernel: str = "auto") -> None:
    """In place h = SiLU(h) ([T, 4d]: u|v|q|k); rows with slots[t] >= 0 copy their v, k blocks to the caches[slot]."""
    _kernels(kernel, d, h).silu_scatter_kv(h, d, slots, k_cache, v_cache)


def group_norm_mul(a: torch.Tensor, u: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-5, *, out: torch.Tensor | None = None,
                   kernel: str = "auto") -> torch.Tensor:
    """(LN(a) * weight[group] + bias[group]) * u; a is [T, d] or [T, H, Dh], the result [T, d]."""
    ops = _kernels(kernel, a.shape[1:].numel(), a, u, weight, bias)
    return ops.group_norm_mul(a, u, group, weight, bias, eps, out=out)


@dataclass(frozen=True)
class LayerNormKernels:
    """The three ops with one kernel choice bound: a backend picks its kernel once (`fused`: "triton")."""

    kernel: str = "auto"

    def __post_init__(self):
        check_kernel(self.kernel)

    def group_layer_norm(self, x: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float = 1e-5, *, add: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """`group_layer_norm` with this kernel."""
        return group_layer_norm(x, group, weight, bias, eps, add=add, out=out, kernel=self.kernel)

    def silu_scatter_kv(self, h: torch.Tensor, d: int, slots: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor) -> None:
        """`silu_scatter_kv` with this kernel."""
        silu_scatter_kv(h, d, slots, k_cache, v_cache, kernel=self.kernel)

    def group_norm_mul(self, a: torch.Tensor, u: torch.Tensor, group: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float = 1e-5, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """`group_norm_mul` with this kernel."""
        return group_norm_mul(a, u, group, weight, bias, eps, out=out, kernel=self.kernel)
