"""The paged per-user KV cache: the block manager's bookkeeping, the device pool's tensors and the lower
tiers, wired together behind the small API the scheduler uses (acquire, reserve, commit, release).

A cached entry holds the K/V of a context prefix [U | S | R_1..R_n]. U+S are fixed for a history
version; R is causal, so a request whose R events extend (or are a prefix of) the cached ones reuses
every cached token it shares and computes only the rest.

Eviction moves an unpinned entry's K/V down to the first tier (a gather queued on the device, the copy
completing in the background); with no tier, its pages are simply freed. A lookup that misses the device
takes the entry from the tiers (host, then disk), allocates its pages and queues the copy up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grinfer.engine.block_manager import BlockManager, CacheStats, Entry
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.signature import CacheLookup, ContextSignature
from grinfer.engine.tiers.base import Tier

__all__ = ["CacheHandle", "CacheLookup", "CacheStats", "KVCache"]


@dataclass
class CacheHandle:
    """Opaque reference to a pinned entry, held by a request while it runs."""

    key: str
    entry: Entry

    @property
    def blocks(self) -> list[int]:
        return self.entry.blocks


class KVCache:
    """Block manager + device pool + tiers (the first tier chains to the next: host -> disk; a tier's stats,
    flush and close cover the ones below it)."""

    def __init__(self, manager: BlockManager, pool: KVPool, tiers: Sequence[Tier] = ()):
        self.manager, self.pool, self.tiers = manager, pool, list(tiers)
        self.block_size = manager.block_size

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    # ---- scheduler-facing -------------------------------------------------------------------
    def acquire(self, sig: ContextSignature) -> tuple[CacheLookup, CacheHandle]:
        """Pin the user's entry (restoring it from a tier if needed) and say what is reusable."""
        m = self.manager
        entry, source = m.get(sig.user), "device"
        if entry is not None and entry.signature.version != sig.version:
            m.drop(sig.user)
            entry = None
        if entry is None:
            entry, source = self._restore(sig)
        if entry is None:
            entry, source = m.add(sig), "none"
        m.touch(sig.user)
        cached = min(entry.tokens, entry.signature.shared_prefix(sig), sig.num_tokens)
        entry.pins += 1
        lookup = CacheLookup(cached, sig.num_tokens - cached, source if cached else "none")
        return lookup, CacheHandle(sig.user, entry)

    def reserve(self, handle: CacheHandle, lookup: CacheLookup, sig: ContextSignature) -> bool:
        """Make room for the whole context: the entry keeps the looked-up cached tokens, then holds sig's.

        Evicts unpinned users (LRU) when the pool is short; False when it still cannot fit. A lookup
        counts in the hit/miss stats once, when its reservation succeeds.
        """
        if not self._make_room(handle.entry, sig.num_tokens):
            return False
        entry = handle.entry
        entry.tokens = min(entry.tokens, lookup.cached_tokens)
        entry.signature = sig
        self.manager.count_lookup(lookup.status, lookup.source)
        return True

    def commit(self, handle: CacheHandle, tokens: int) -> None:
        """The entry's first `tokens` context tokens are now computed through every layer."""
        handle.entry.tokens = max(handle.entry.tokens, tokens)

    def release(self, handle: CacheHandle, keep: bool = True) -> None:
        """Unpin; with keep=False (a failed request) the entry is dropped."""
        handle.entry.pins -= 1
        if not keep and self.manager.get(handle.key) is handle.entry:
            self.manager.drop(handle.key)

    def drop_stale(self, user: str, version: int) -> bool:
        """Free the user's K/V of history versions before `version` (a roll elsewhere in the fleet): the
        device entry unless a running request pins it (the version check voids it at the next lookup), and
        any tier copies. Whether a device entry was freed."""
        for tier in self.tiers:
            tier.discard_older(user, version)
        entry = self.manager.get(user)
        if entry is None or entry.signature.version >= version or entry.pins:
            return False
        self.manager.drop(user)
        return True

    def fits(self, tokens: int) -> bool:
        """Whether a context of `tokens` could ever fit the pool."""
        return self.manager.fits(tokens)

    def persist(self) -> None:
        """Offload every unpinned device entry to the tiers and wait for the copies (a clean shutdown, so
        that the disk tier holds the warm users for the next start)."""
        if not self.tiers:
            return
        while (victim := self.manager.victim()) is not None:
            self._evict(*victim)
        for tier in self.tiers:
            tier.flush()

    def close(self) -> None:
        """`persist`, then stop the tiers' writers."""
        self.persist()
        for tier in self.tiers:
            tier.close()

    # ---- stats --------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Start counting lookups afresh (after warm-up, so that only real traffic is counted)."""
        self.manager.stats = CacheStats()

    def snapshot(self) -> dict:
        """Plain stats for metrics and benchmarks."""
        m, s = self.manager, self.manager.stats
        lookups = s.hits + s.partial_hits + s.misses
        out = {"hits": s.hits, "partial_hits": s.partial_hits, "misses": s.misses, "evictions": s.evictions,
               "host_hits": s.tier_hits.get("host", 0), "disk_hits": s.tier_hits.get("disk", 0),
               "hit_ratio": (s.hits + s.partial_hits) / lookups if lookups else 0.0,
               "occupancy": m.occupancy(), "users": len(m.entries), "blocks": m.num_blocks,
               "block_size": m.block_size, "host_users": 0, "host_bytes_used": 0, "host_evictions": 0,
               "disk_users": 0, "disk_bytes_used": 0, "disk_evictions": 0, "disk_restores": 0}
        for tier in self.tiers:
            out.update(tier.snapshot())
        return out

    # ---- internals -----------------------------------------------------------------------------
    def _make_room(self, entry: Entry, tokens: int) -> bool:
        while self.manager.shortfall(entry, tokens):
            victim = self.manager.victim()
            if victim is None:
                return False
            self._evict(*victim)
        self.manager.grow(entry, tokens)
        return True

    def _evict(self, key: str, entry: Entry) -> None:
        """Move the entry down to the first tier (no gather when there is none), then free its pages."""
        if self.tiers and entry.tokens:
            self.tiers[0].offload_launch(key, entry.signature, entry.tokens,
                                         self.pool.gather(entry.blocks, entry.tokens))
        self.manager.drop(key)
        self.manager.stats.evictions += 1

    def _restore(self, sig: ContextSignature) -> tuple[Entry | None, str]:
        """The user's entry at sig's version from the tiers, onboarded into fresh pages; (None, "none") when
        no tier holds it or there is no room now (the copy goes back to the first tier)."""
        held = self.tiers[0].take(sig.user, sig.version) if self.tiers else None
        if held is None:
            return None, "none"
        source = held.source
        entry = self.manager.add(held.signature)
        entry.pins += 1  # protect it from the evictions its own reservation may cause
        ok = self._make_room(entry, held.signature.num_tokens)
        entry.pins -= 1
        if not ok:
            self.manager.drop(sig.user)
            self.tiers[0].offload_launch(sig.user, held.signature, held.tokens, held.kv, held.done)
            return None, "none"
        self.pool.scatter(entry.blocks, held.wait())
        entry.tokens = held.tokens
        return entry, source
