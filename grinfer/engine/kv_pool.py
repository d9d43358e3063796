"""The device K/V tensors the runner reads and writes: [layers, slots, heads, head_dim] for K and for V.

Slot `b * block_size + i` holds token i of page b. `scratch` pages follow the pool's pages, owned by no
user: a step's candidates' K/V go there when the backend reads every key from the pool.
"""

from __future__ import annotations

import numpy as np
import torch


class KVPool:
    """K and V of `num_blocks` pages (+ scratch pages) on one device."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device | str, scratch_blocks: int = 0):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.scratch = np.arange(num_blocks, num_blocks + scratch_blocks, dtype=np.int64)
        shape = (num_layers, (num_blocks + scratch_blocks) * block_size, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.k.device

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K + V bytes one context token takes across all layers."""
        return 2 * num_layers * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of context positions [start, end) of a page list, on the pool's device."""
        pos = np.arange(start, end)
        pages = np.asarray(blocks, dtype=np.int64)
        return torch.from_numpy(pages[pos // self.block_size] * self.block_size + pos % self.block_size).to(
            self.device)

    def gather(self, blocks: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [layers, tokens, heads, head_dim] of the first `tokens` positions of a page list (new tensors
        on the pool's device; queued on the current stream)."""
        slots = self.slots(blocks, 0, tokens)
        return self.k[:, slots], self.v[:, slots]

    def scatter(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of positions [0, len) into a page list (non-blocking from pinned host memory)."""
        slots = self.slots(blocks, 0, k.shape[1])
        self.k[:, slots] = k.to(self.device, non_blocking=True)
        self.v[:, slots] = v.to(self.device, non_blocking=True)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
