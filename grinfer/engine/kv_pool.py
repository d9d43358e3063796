"""The device K/V tensors the runner reads and writes: [layers, slots, heads, head_dim] for K and for V
(V's head dim may differ: `v_head_dim`, for models whose value heads are wider or narrower than their keys).

Slot `b * block_size + i` holds token i of page b. `scratch` pages follow the pool's pages, owned by no
user: a step's candidates' K/V go there when the backend reads every key from the pool. One spare slot
after them takes the writes of rows that have no slot (-1: a CUDA graph's padding rows).

`kv_dtype` "model" stores K/V in the model's dtype; "int8" and "fp8" (e4m3) store them in 8 bits with a
float32 scale per (layer, slot, head) in `k_scale` / `v_scale` [layers, slots, heads]
(grinfer.ops.reference.kv_quant), which the attention reads beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from grinfer.ops.reference.kv_quant import SCALE_DTYPE, kv_dtype_of, quantize_kv, storage_dtype


@dataclass
class KVData:
    """K/V [layers, tokens, heads, head_dim] of some tokens in a pool's format; with 8-bit K/V also their
    scales [layers, tokens, heads] (None otherwise)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """K, V, then the scales if any: the order copies and files keep."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KVData:
        """The same K/V with `fn` applied to each tensor (a copy to another device, a slice)."""
        def optional(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return KVData(fn(self.k), fn(self.v), optional(self.k_scale), optional(self.v_scale))

    @property
    def kv_dtype(self) -> str:
        return kv_dtype_of(self.k.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVPool:
    """K and V of `num_blocks` pages (+ scratch pages) on one device, in the model's dtype or 8 bits."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device | str, scratch_blocks: int = 0, kv_dtype: str = "model",
                 v_head_dim: int | None = None):
        self.block_size, self.num_blocks, self.kv_dtype = block_size, num_blocks, kv_dtype
        self.scratch = np.arange(num_blocks, num_blocks + scratch_blocks, dtype=np.int64)
        self.spare = (num_blocks + scratch_blocks) * block_size
        shape = (num_layers, self.spare + 1, num_heads, head_dim)
        store = storage_dtype(kv_dtype, dtype)
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros((*shape[:-1], v_head_dim or head_dim), dtype=store, device=device)
        self.device = self.k.device
        quantized = kv_dtype != "model"
        self.k_scale = torch.ones(shape[:-1], dtype=SCALE_DTYPE, device=device) if quantized else None
        self.v_scale = torch.ones(shape[:-1], dtype=SCALE_DTYPE, device=device) if quantized else None

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                        kv_dtype: str = "model", v_head_dim: int | None = None) -> int:
        """K + V bytes (scales included) one context token takes across all layers."""
        size = torch.empty((), dtype=storage_dtype(kv_dtype, dtype)).element_size()
        scales = 2 * torch.empty((), dtype=SCALE_DTYPE).element_size() if kv_dtype != "model" else 0
        return num_layers * num_heads * ((head_dim + (v_head_dim or head_dim)) * size + scales)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., heads, head_dim] in the pool's format: (8-bit values, their scales) or (x in the pool's
        dtype, None)."""
        if self.k_scale is None:
            return x.to(self.k.dtype), None
        return quantize_kv(x, self.kv_dtype)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [n, heads, head_dim] of n tokens (the model's dtype) at `slots` of one layer; a slot -1
        is not written (it goes to the spare slot; no host sync)."""
        slots = torch.where(slots >= 0, slots, self.spare)
        for t, data, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, s = self.quantize(t)
            data[layer, slots] = q
            if scale is not None and s is not None:
                scale[layer, slots] = s

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One layer's K and V scales [slots, heads] (None, None for a model-dtype pool)."""
        if self.k_scale is None or self.v_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of context positions [start, end) of a page list, on the pool's device."""
        pos = np.arange(start, end)
        pages = np.asarray(blocks, dtype=np.int64)
        return torch.from_numpy(pages[pos // self.block_size] * self.block_size + pos % self.block_size).to(
            self.device)

    def _parts(self) -> KVData:
        return KVData(self.k, self.v, self.k_scale, self.v_scale)

    def gather(self, blocks: list[int], tokens: int) -> KVData:
        """K/V (and scales) of the first `tokens` positions of a page list (new tensors on the pool's device;
        queued on the current stream)."""
        slots = self.slots(blocks, 0, tokens)
        return self._parts().map(lambda t: t[:, slots])

    def scatter(self, blocks: list[int], kv: KVData) -> None:
        """Write K/V (and scales) of positions [0, len) into a page list (non-blocking from pinned host
        memory); `kv` must be in the pool's format."""
        if kv.kv_dtype != self.kv_dtype:
            raise ValueError(f"kv_dtype: the pool stores {self.kv_dtype}, the K/V given are {kv.kv_dtype}")
        slots = self.slots(blocks, 0, kv.k.shape[1])
        for dest, src in zip(self._parts().tensors(), kv.tensors(), strict=True):
            dest[:, slots] = src.to(self.device, non_blocking=True)

    def nbytes(self) -> int:
        return self._parts().nbytes
