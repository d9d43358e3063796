"""Paged per-user KV cache: a preallocated block pool, per-(user, history version) block tables, LRU
eviction by user and an optional host tier.

The scheduler sees `CacheLookup` (how many context tokens are cached, how many must be computed) and
passes the opaque `CacheHandle` on to the runner. The pool's layout is shared with the step indices
(engine/step.py) and the attention kernels: an entry's `blocks` are its pages, position p of the
context lives at slot blocks[p // block_size] * block_size + p % block_size of every layer's K and V.

A cached entry holds the K/V of a context prefix [U | S | R_1..R_n]. U+S are fixed for a history
version; R is causal, so a request whose R events extend (or are a prefix of) the cached ones reuses
every cached token it shares and computes only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class ContextSignature:
    """What identifies a context's tokens: user, history version, U+S length and the R events."""

    user: str
    version: int
    static_tokens: int  # U + S tokens
    realtime: np.ndarray  # [n, 3] int64 (item, timestamp, action) of the R events, in order
    profile: tuple[int, ...] = ()  # U: a profile change invalidates the context even without a roll

    @property
    def num_tokens(self) -> int:
        return self.static_tokens + len(self.realtime)

    def shared_prefix(self, other: ContextSignature) -> int:
        """Number of leading context tokens the two signatures have in common."""
        mine = (self.user, self.version, self.static_tokens, self.profile)
        if mine != (other.user, other.version, other.static_tokens, other.profile):
            return 0
        n = min(len(self.realtime), len(other.realtime))
        same = np.all(self.realtime[:n] == other.realtime[:n], axis=1)
        return self.static_tokens + (n if same.all() else int(np.argmin(same)))


@dataclass(frozen=True)
class CacheLookup:
    """The scheduler's view of a request's context: what is cached and what must be computed."""

    cached_tokens: int
    compute_tokens: int
    source: str  # "device", "host" or "none"

    @property
    def status(self) -> str:
        if self.cached_tokens == 0:
            return "miss"
        return "hit" if self.compute_tokens == 0 else "partial"


@dataclass
class _Entry:
    signature: ContextSignature
    blocks: list[int] = field(default_factory=list)
    tokens: int = 0  # committed (computed through every layer) context tokens
    pins: int = 0


@dataclass
class CacheHandle:
    """Opaque reference to a pinned entry, held by a request while it runs."""

    key: str
    entry: _Entry


@dataclass
class CacheStats:
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    evictions: int = 0
    host_hits: int = 0
    host_evictions: int = 0


class KVCache:
    """Block pool [layers, blocks * block_size, heads, head_dim] for K and V, plus per-user tables.

    `scratch_blocks` more pages follow the pool, owned by no user: a step's candidates' K/V go there
    (and into the free tail of their user's last page) when the backend reads every key from the pool."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device | str, host_bytes: int = 0, scratch_blocks: int = 0):
        if num_blocks < 1:
            raise ValueError("kv cache: the memory budget holds no block; raise kv_cache_bytes")
        self.block_size, self.num_blocks = block_size, num_blocks
        # pages past the pool for one step's candidate K/V (backends that read every key from the pool)
        self.scratch = np.arange(num_blocks, num_blocks + scratch_blocks, dtype=np.int64)
        shape = (num_layers, (num_blocks + scratch_blocks) * block_size, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self.host = HostTier(host_bytes, pin=torch.device(device).type == "cuda")
        self.stats = CacheStats()

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K + V bytes one context token takes across all layers."""
        return 2 * num_layers * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    # ---- scheduler-facing -------------------------------------------------------------------
    def acquire(self, sig: ContextSignature) -> tuple[CacheLookup, CacheHandle]:
        """Pin the user's entry (restoring it from the host tier if needed) and say what is reusable."""
        entry, source = self.entries.get(sig.user), "device"
        if entry is not None and entry.signature.version != sig.version:
            self._drop(sig.user)
            entry = None
        if entry is None:
            entry, source = self._restore(sig), "host"
        if entry is None:
            entry, source = _Entry(sig), "none"
            self.entries[sig.user] = entry
        self.entries.move_to_end(sig.user)
        cached = min(entry.tokens, entry.signature.shared_prefix(sig), sig.num_tokens)
        entry.pins += 1
        lookup = CacheLookup(cached, sig.num_tokens - cached, source if cached else "none")
        return lookup, CacheHandle(sig.user, entry)

    def reserve(self, handle: CacheHandle, lookup: CacheLookup, sig: ContextSignature) -> bool:
        """Make room for the whole context: the entry keeps the looked-up cached tokens, then holds sig's.

        Evicts unpinned users (LRU) when the pool is short; False when it still cannot fit. A lookup
        counts in the hit/miss stats once, when its reservation succeeds.
        """
        if not self._reserve(handle, lookup.cached_tokens, sig):
            return False
        s = self.stats
        if lookup.status == "miss":
            s.misses += 1
        elif lookup.status == "hit":
            s.hits += 1
        else:
            s.partial_hits += 1
        s.host_hits += lookup.source == "host"
        return True

    def _reserve(self, handle: CacheHandle, cached_tokens: int, sig: ContextSignature) -> bool:
        entry = handle.entry
        needed = -(-sig.num_tokens // self.block_size) - len(entry.blocks)
        while needed > len(self.free):
            if not self._evict_one():
                return False
        for _ in range(max(needed, 0)):
            entry.blocks.append(self.free.pop())
        entry.tokens = min(entry.tokens, cached_tokens)
        entry.signature = sig
        return True

    def commit(self, handle: CacheHandle, tokens: int) -> None:
        """The entry's first `tokens` context tokens are now computed through every layer."""
        handle.entry.tokens = max(handle.entry.tokens, tokens)

    def release(self, handle: CacheHandle, keep: bool = True) -> None:
        """Unpin; with keep=False (a failed request) the entry is dropped."""
        handle.entry.pins -= 1
        if not keep and self.entries.get(handle.key) is handle.entry:
            self._drop(handle.key)

    def fits(self, tokens: int) -> bool:
        """Whether a context of `tokens` could ever fit the pool."""
        return -(-tokens // self.block_size) <= self.num_blocks

    # ---- stats --------------------------------------------------------------------------------
    def occupancy(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def snapshot(self) -> dict:
        """Plain stats for metrics and benchmarks."""
        s = self.stats
        lookups = s.hits + s.partial_hits + s.misses
        return {"hits": s.hits, "partial_hits": s.partial_hits, "misses": s.misses, "evictions": s.evictions,
                "host_hits": s.host_hits, "host_evictions": s.host_evictions,
                "hit_ratio": (s.hits + s.partial_hits) / lookups if lookups else 0.0,
                "occupancy": self.occupancy(), "users": len(self.entries), "blocks": self.num_blocks,
                "block_size": self.block_size, "host_users": len(self.host.entries),
                "host_bytes_used": self.host.used}

    # ---- internals -----------------------------------------------------------------------------
    def _slots(self, handle: CacheHandle, start: int, end: int) -> torch.Tensor:
        """Flat slot indices of context positions [start, end) of the entry, on the pool's device."""
        pos = np.arange(start, end)
        blocks = np.asarray(handle.entry.blocks, dtype=np.int64)
        return torch.from_numpy(blocks[pos // self.block_size] * self.block_size + pos % self.block_size).to(
            self.k.device)

    def _evict_one(self) -> bool:
        for key, entry in self.entries.items():
            if entry.pins == 0:
                if entry.tokens:
                    slots = self._slots(CacheHandle(key, entry), 0, entry.tokens)
                    self.host.put(key, entry.signature, entry.tokens, self.k[:, slots], self.v[:, slots])
                    self.stats.host_evictions = self.host.evictions
                self._drop(key)
                self.stats.evictions += 1
                return True
        return False

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self.free.extend(reversed(entry.blocks))
        entry.blocks, entry.tokens = [], 0

    def _restore(self, sig: ContextSignature) -> _Entry | None:
        saved = self.host.get(sig.user, sig.version)
        if saved is None:
            return None
        signature, tokens, k, v = saved
        entry = _Entry(signature)
        self.entries[sig.user] = entry
        entry.pins += 1  # protect it from the evictions its own reservation may cause
        ok = self._reserve(CacheHandle(sig.user, entry), 0, signature)
        entry.pins -= 1
        if not ok:  # no room now: the host copy stays for a later attempt
            self._drop(sig.user)
            return None
        self.host.take(sig.user, sig.version)
        slots = self._slots(CacheHandle(sig.user, entry), 0, tokens)
        self.k[:, slots] = k.to(self.k.device, non_blocking=True)
        self.v[:, slots] = v.to(self.v.device, non_blocking=True)
        entry.tokens = tokens
        return entry


class HostTier:
    """Evicted entries' K/V in host memory (pinned on CUDA), LRU within a byte budget."""

    def __init__(self, capacity_bytes: int, pin: bool):
        self.capacity, self.pin, self.used, self.evictions = capacity_bytes, pin, 0, 0
        self.entries: OrderedDict[str, tuple[ContextSignature, int, torch.Tensor, torch.Tensor]] = OrderedDict()

    def put(self, key: str, sig: ContextSignature, tokens: int, k: torch.Tensor, v: torch.Tensor) -> None:
        size = 2 * k.numel() * k.element_size()
        if size > self.capacity:
            return
        self._remove(key)
        while self.used + size > self.capacity:
            self._remove(next(iter(self.entries)))
            self.evictions += 1
        k_host = torch.empty(k.shape, dtype=k.dtype, pin_memory=self.pin)
        v_host = torch.empty(v.shape, dtype=v.dtype, pin_memory=self.pin)
        k_host.copy_(k)
        v_host.copy_(v)
        self.entries[key] = (sig, tokens, k_host, v_host)
        self.used += size

    def get(self, key: str, version: int):
        """(signature, tokens, k, v) of the user's entry at `version`, if held; a copy of an older
        version is useless from now on and is dropped."""
        item = self.entries.get(key)
        if item is not None and item[0].version != version:
            self._remove(key)
            return None
        return item

    def take(self, key: str, version: int):
        """Remove and return the user's entry at `version`, if held (see `get`)."""
        item = self.get(key, version)
        if item is not None:
            self._remove(key)
        return item

    def _remove(self, key: str) -> None:
        item = self.entries.pop(key, None)
        if item is not None:
            self.used -= 2 * item[2].numel() * item[2].element_size()
