"""Embedding tables as the models see them: a module whose forward maps ids to rows.

- `HashedEmbedding`: a trainable nn.Embedding whose ids are hashed into its rows first.
- `ServedTable`: the serve-time table: id map (identity, hashed or managed) -> distinct rows -> the device
  row cache (if it has a budget) over the full `RowStore` (host memory or memory-mapped, any row format),
  dequantised to the module's dtype on its device. One call looks up all of a step's ids.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import nn

from grinfer.embedding.cache import RowCache
from grinfer.embedding.hashing import HashedIds
from grinfer.embedding.managed import FALLBACK_ROW, ManagedIds
from grinfer.embedding.store import RowStore


class IdMap(Protocol):
    """Ids (any shape, int64) -> rows (same shape)."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor: ...


class HashedEmbedding(nn.Embedding):
    """nn.Embedding over hashed ids (trainable; its checkpoint tensor is `weight`, as nn.Embedding's)."""

    def __init__(self, num_rows: int, dim: int, seed: int = 0):
        super().__init__(num_rows, dim)
        self.hash = HashedIds(num_rows, seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.hash.rows(ids))


class ServedTable(nn.Module):
    """A table served from a RowStore through an optional device row cache (see the module docstring).

    The store's tensors are not buffers: moving the module (`.to(device, dtype)`) moves only where the cache
    lives and what dtype lookups return; the full table stays where it is (memory-mapped, for a big one)."""

    _probe: torch.Tensor

    def __init__(self, store: RowStore, ids: IdMap, cache_bytes: int = 0, ways: int = 8):
        super().__init__()
        self.store, self.ids = store, ids
        self.cache_bytes, self.ways = cache_bytes, ways
        self.cache: RowCache | None = None
        self.lookups, self.seconds = 0, 0.0  # ids looked up, host seconds spent on them
        self.register_buffer("_probe", torch.empty(0), persistent=False)  # follows .to(): the output device/dtype

    @property
    def embedding_dim(self) -> int:
        return self.store.dim

    @property
    def num_embeddings(self) -> int:
        return self.store.num_rows

    @property
    def weight(self) -> torch.Tensor:
        """Every row, dequantised (small tables only: retrieval scores the whole item table)."""
        return self.store.dense().to(self._probe.device, self._probe.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[*ids.shape, dim] rows of `ids`, in the module's dtype on its device."""
        start = time.perf_counter()
        rows = self.ids.rows(ids)
        if isinstance(self.ids, ManagedIds) and len(self.ids.assigned):  # a new id's row starts as the fallback's
            self.store.copy_row(FALLBACK_ROW, self.ids.assigned)
            if self.cache is not None:
                self.cache.invalidate(self.ids.assigned)
        self.lookups += ids.numel()
        unique, inverse = rows.reshape(-1).to(self._probe.device).unique(return_inverse=True)
        values = self._cache().lookup(unique, self._fetch) if self.cache_bytes else self._fetch(unique)
        out = values[inverse].reshape(*ids.shape, self.store.dim)
        self.seconds += time.perf_counter() - start
        return out

    def _fetch(self, rows: torch.Tensor) -> torch.Tensor:
        return self.store.gather(rows.cpu()).to(self._probe.device, self._probe.dtype)

    def _cache(self) -> RowCache:
        probe = self._probe
        if self.cache is None or self.cache.device != probe.device or self.cache.dtype != probe.dtype:
            self.cache = RowCache(self.cache_bytes, self.store.dim, probe.dtype, probe.device, self.ways)
        return self.cache

    def stats(self) -> dict:
        """Ids looked up (and host seconds on them), the row format, table and cache sizes, and the cache's hits
        (see RowCache.stats)."""
        out = {"lookups": self.lookups, "seconds": self.seconds, "format": self.store.fmt, "rows": self.store.num_rows,
               "table_bytes": self.store.nbytes}
        return {**out, **(self.cache.stats() if self.cache is not None else {"hit_ratio": 0.0, "bytes": 0})}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # a checkpoint of a served model holds its tables as stored (see load_checkpoint)
        for name, part in self.store.parts.items():
            destination[prefix + name] = part

    def extra_repr(self) -> str:
        return f"{self.store.num_rows}, {self.store.dim}, format={self.store.fmt}, cache_bytes={self.cache_bytes}"
