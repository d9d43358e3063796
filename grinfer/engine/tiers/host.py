"""The host tier: evicted entries' K/V in host memory (pinned on CUDA), LRU within a byte budget.

On CUDA the device-to-host copy runs on a side stream and completes with an event; on the CPU the
gathered tensors already live in host memory and are kept as they are. Entries pushed out by the budget
go on to the next tier (disk), if any.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from grinfer.engine.kv_pool import KVData
from grinfer.engine.signature import ContextSignature
from grinfer.engine.tiers.base import Held, Tier


class HostTier:
    name = "host"

    def __init__(self, capacity_bytes: int, lower: Tier | None = None):
        self.capacity, self.lower, self.used, self.evictions = capacity_bytes, lower, 0, 0
        self.entries: OrderedDict[str, Held] = OrderedDict()
        self._stream: torch.cuda.Stream | None = None

    def offload_launch(self, key: str, signature: ContextSignature, tokens: int, kv: KVData,
                       done: Callable[[], None] | None = None) -> None:
        self.discard(key)
        held = Held(signature, tokens, kv, done)
        if held.nbytes > self.capacity:
            self._pass_down(key, held)
            return
        while self.used + held.nbytes > self.capacity:
            old_key = next(iter(self.entries))
            self._pass_down(old_key, self._remove(old_key))
            self.evictions += 1
        if kv.k.device.type == "cuda":
            held.kv, held.done = self._copy_to_host(kv)
        self.entries[key] = held
        self.used += held.nbytes

    def take(self, key: str, version: int) -> Held | None:
        held = self.entries.get(key)
        if held is None:
            return self.lower.take(key, version) if self.lower is not None else None
        self._remove(key)
        if held.signature.version != version:  # useless from now on
            if self.lower is not None:
                self.lower.discard(key)
            return None
        return held

    def discard(self, key: str) -> None:
        if key in self.entries:
            self._remove(key)

    def discard_older(self, key: str, version: int) -> None:
        held = self.entries.get(key)
        if held is not None and held.signature.version < version:
            self._remove(key)
        if self.lower is not None:
            self.lower.discard_older(key, version)

    def flush(self) -> None:
        for held in self.entries.values():
            held.wait()
        if self.lower is not None:
            self.lower.flush()

    def close(self) -> None:
        self.flush()
        if self.lower is not None:
            self.lower.close()

    def snapshot(self) -> dict:
        own = {"host_users": len(self.entries), "host_bytes_used": self.used, "host_evictions": self.evictions}
        return {**own, **self.lower.snapshot()} if self.lower is not None else own

    def _copy_to_host(self, kv: KVData) -> tuple[KVData, Callable[[], None]]:
        """Pinned host copies of device K/V (and scales) on a side stream (after the current stream's gather);
        the second value blocks until they are whole."""
        device = kv.k.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        host = kv.map(lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
        with torch.cuda.stream(stream):
            for dst, src in zip(host.tensors(), kv.tensors()):
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        for src in kv.tensors():
            src.record_stream(stream)  # the gathered device tensors stay alive until the copy has read them
        return host, event.synchronize

    def _pass_down(self, key: str, held: Held) -> None:
        if self.lower is not None:
            self.lower.offload_launch(key, held.signature, held.tokens, held.kv, held.done)

    def _remove(self, key: str) -> Held:
        held = self.entries.pop(key)
        self.used -= held.nbytes
        return held
