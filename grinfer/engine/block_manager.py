"""Block bookkeeping of the paged KV cache, with no tensors: per-user entries, free list, pins, LRU, stats.

An entry holds the pages of one user's context prefix [U | S | R_1..R_n] for one history version; position
p of the context lives at slot blocks[p // block_size] * block_size + p % block_size of every layer's K
and V in the device pool (kv_pool.py). The manager knows nothing of tensors or tiers: it picks victims,
and its caller (kv_cache.py) moves their K/V to a lower tier before it frees their pages.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from grinfer.engine.signature import ContextSignature


@dataclass
class Entry:
    """One user's cached context: its signature, its pages, how many tokens are committed, its pins."""

    signature: ContextSignature
    blocks: list[int] = field(default_factory=list)
    tokens: int = 0  # committed (computed through every layer) context tokens
    pins: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    evictions: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)  # lookups served by a lower tier, by tier name


class BlockManager:
    """`num_blocks` pages of `block_size` tokens shared by per-user entries, least recently used first."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("kv cache: the memory budget holds no block; raise kv_cache_bytes")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # LRU order: oldest first
        self.stats = CacheStats()

    def get(self, user: str) -> Entry | None:
        return self.entries.get(user)

    def add(self, signature: ContextSignature) -> Entry:
        """A new, empty entry for the signature's user (most recently used)."""
        entry = self.entries[signature.user] = Entry(signature)
        return entry

    def touch(self, user: str) -> None:
        self.entries.move_to_end(user)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether a context of `tokens` could ever fit the pool."""
        return self.blocks_for(tokens) <= self.num_blocks

    def shortfall(self, entry: Entry, tokens: int) -> int:
        """Pages the entry lacks to hold `tokens`, beyond the free list (0 when it fits now)."""
        return max(0, self.blocks_for(tokens) - len(entry.blocks) - len(self.free))

    def grow(self, entry: Entry, tokens: int) -> None:
        """Give the entry pages up to `tokens` from the free list (the caller checked `shortfall`)."""
        for _ in range(self.blocks_for(tokens) - len(entry.blocks)):
            entry.blocks.append(self.free.pop())

    def victim(self) -> tuple[str, Entry] | None:
        """The least recently used unpinned entry, if any."""
        return next(((k, e) for k, e in self.entries.items() if e.pins == 0), None)

    def drop(self, user: str) -> Entry:
        """Remove the user's entry and free its pages."""
        entry = self.entries.pop(user)
        self.free.extend(reversed(entry.blocks))
        entry.blocks, entry.tokens = [], 0
        return entry

    def count_lookup(self, status: str, source: str) -> None:
        """Count one successful reservation's lookup (status hit/partial/miss; source device/tier/none)."""
        s = self.stats
        if status == "miss":
            s.misses += 1
        elif status == "hit":
            s.hits += 1
        else:
            s.partial_hits += 1
        if source not in ("device", "none"):
            s.tier_hits[source] = s.tier_hits.get(source, 0) + 1

    def occupancy(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks
