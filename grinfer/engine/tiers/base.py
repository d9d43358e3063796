"""The tier protocol (after NVIDIA recsys-examples' KV manager: lookup -> allocate -> onboard -> offload).

    offload_launch(key, signature, tokens, kv)     start copying an evicted entry's K/V (a KVData: with
                                                   8-bit K/V, their scales too) into the tier; the copy
                                                   completes in the background (a CUDA event or a writer
                                                   thread) and never blocks a step
    take(key, version) -> Held | None              remove the user's entry at that history version from
                                                   the tier (an older version's copy is discarded)
    Held.wait() -> KVData                          block until the copy is whole, then its host tensors
    discard_older(key, version)                    drop the user's copy if it is of an older history version
    flush()                                        wait for every copy in flight
    close()                                        flush, then release what the tier runs (threads)
    snapshot()                                     its stats (a tier with a lower one includes the lower's)

An entry being copied is never read half-written: `take` hands out a Held whose `wait` joins the copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from grinfer.engine.kv_pool import KVData
from grinfer.engine.signature import ContextSignature


@dataclass
class Held:
    """One entry's K/V in a tier ([layers, tokens, heads, head_dim] each, with their scales when 8-bit),
    readable once `wait` returns."""

    signature: ContextSignature
    tokens: int
    kv: KVData
    done: Callable[[], None] | None = None  # blocks until the copy into the tier completed
    source: str = "host"  # the tier it was taken from

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def wait(self) -> KVData:
        if self.done is not None:
            self.done()
            self.done = None
        return self.kv


class Tier(Protocol):
    name: str

    def offload_launch(self, key: str, signature: ContextSignature, tokens: int, kv: KVData,
                       done: Callable[[], None] | None = None) -> None: ...

    def take(self, key: str, version: int) -> Held | None: ...

    def discard(self, key: str) -> None: ...

    def discard_older(self, key: str, version: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def snapshot(self) -> dict: ...
