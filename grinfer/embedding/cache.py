"""A device cache of hot, dequantised rows over a table's full store, within a byte budget.

Set-associative: row r may sit in any of `ways` slots of set r mod num_sets, and a miss replaces the
least recently used slot of its set (LRU within a set, which approximates a global LRU the way CPU
caches do). Everything is tensor arithmetic on the cache's device: one batched lookup per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TAG_BYTES = 16  # a slot's tag and LRU stamp (int64 each)


class RowCache:
    """Hot rows of one table: `lookup(rows, fetch)` serves hits from the cache and the misses from `fetch`."""

    def __init__(self, budget_bytes: int, dim: int, dtype: torch.dtype, device: torch.device, ways: int = 8):
        slot_bytes = dim * dtype.itemsize + TAG_BYTES
        self.ways = ways
        self.num_sets = max(budget_bytes // (slot_bytes * ways), 1)
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        with torch.inference_mode(False):  # normal tensors: updated in place in and outside inference mode
            self.tags = torch.full((self.num_sets * ways,), -1, dtype=torch.int64, device=device)
            self.stamps = torch.zeros(self.num_sets * ways, dtype=torch.int64, device=device)
            self.data = torch.zeros(self.num_sets * ways, dim, dtype=dtype, device=device)
        self.clock = self.hits = self.misses = 0

    @property
    def capacity(self) -> int:
        """Rows the cache can hold."""
        return self.num_sets * self.ways

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.tags.nbytes + self.stamps.nbytes

    def _slots(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(set of each row, [n, ways] whether each of its set's slots holds it)."""
        sets = rows % self.num_sets
        ways = sets[:, None] * self.ways + torch.arange(self.ways, device=rows.device)
        return sets, self.tags[ways] == rows[:, None]

    def lookup(self, rows: torch.Tensor, fetch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """[n, dim] values of the distinct `rows` (int64 on the cache's device); misses come from `fetch(rows)`
        (any device, any float dtype) and are inserted, evicting each set's least recently used slots."""
        self.clock += 1
        sets, match = self._slots(rows)
        hit = match.any(1)
        slot = sets * self.ways + match.to(torch.int8).argmax(1)
        out = torch.empty(len(rows), self.dim, dtype=self.dtype, device=self.device)
        hits = hit.nonzero().squeeze(1)
        out[hits] = self.data[slot[hits]]
        self.stamps[slot[hits]] = self.clock
        misses = (~hit).nonzero().squeeze(1)
        self.hits += len(hits)
        self.misses += len(misses)
        if not len(misses):
            return out
        fetched = fetch(rows[misses]).to(self.device, self.dtype)
        out[misses] = fetched
        self._insert(rows[misses], sets[misses], fetched)
        return out

    def _insert(self, rows: torch.Tensor, sets: torch.Tensor, values: torch.Tensor) -> None:
        """The k-th miss of a set takes its set's k-th oldest slot, unless that slot was used by this call."""
        order = torch.argsort(sets, stable=True)
        rows, sets, values = rows[order], sets[order], values[order]
        rank = torch.arange(len(sets), device=sets.device) - torch.searchsorted(sets, sets)
        base = sets * self.ways
        ways = base[:, None] + torch.arange(self.ways, device=sets.device)
        oldest = self.stamps[ways].argsort(1)
        victim = base + oldest.gather(1, rank.clamp(max=self.ways - 1)[:, None]).squeeze(1)
        ok = (rank < self.ways) & (self.stamps[victim] < self.clock)
        victim = victim[ok]
        self.tags[victim] = rows[ok]
        self.stamps[victim] = self.clock
        self.data[victim] = values[ok]

    def invalidate(self, rows: torch.Tensor) -> None:
        """Forget the given rows (their stored values changed)."""
        if not len(rows):
            return
        rows = rows.to(self.device)
        sets, match = self._slots(rows)
        slots = (sets[:, None] * self.ways + torch.arange(self.ways, device=self.device))[match]
        self.tags[slots] = -1
        self.stamps[slots] = 0

    def stats(self) -> dict:
        """Hits and misses (distinct rows per lookup), hit ratio, capacity and bytes."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_ratio": self.hits / total if total else 0.0,
                "capacity_rows": self.capacity, "bytes": self.nbytes}
