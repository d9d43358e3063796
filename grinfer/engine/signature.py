"""What identifies a user's cached context, and the scheduler's view of a lookup."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grinfer.engine.request import RankRequest


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
        key = (self.user, self.version, self.static_tokens, self.profile)
        if key != (other.user, other.version, other.static_tokens, other.profile):
            return 0
        n = min(len(self.realtime), len(other.realtime))
        mine, theirs = self.realtime[:n], other.realtime[:n]
        if mine.dtype == theirs.dtype and mine.tobytes() == theirs.tobytes():  # the usual case: one memcmp
            return self.static_tokens + n
        same = np.all(mine == theirs, axis=1)
        return self.static_tokens + (n if same.all() else int(np.argmin(same)))

    def to_json(self) -> dict:
        """A JSON-ready form (the disk tier's index)."""
        return {"user": self.user, "version": self.version, "static_tokens": self.static_tokens,
                "realtime": self.realtime.tolist(), "profile": list(self.profile)}

    @classmethod
    def from_json(cls, data: dict) -> ContextSignature:
        realtime = np.asarray(data["realtime"], np.int64).reshape(-1, 3)
        return cls(data["user"], int(data["version"]), int(data["static_tokens"]), realtime,
                   tuple(int(v) for v in data["profile"]))


@dataclass(frozen=True)
class CacheLookup:
    """The scheduler's view of a request's context: what is cached and what must be computed."""

    cached_tokens: int
    compute_tokens: int
    source: str  # "device", a tier's name ("host", "disk") or "none"

    @property
    def status(self) -> str:
        if self.cached_tokens == 0:
            return "miss"
        return "hit" if self.compute_tokens == 0 else "partial"


def context_signature(request: RankRequest, num_profile_tokens: int) -> ContextSignature:
    """The cache identity of a request's context."""
    ctx = request.context
    n = ctx.num_static
    realtime = np.stack([ctx.items[n:], ctx.timestamps[n:], ctx.ratings[n:]], 1).astype(np.int64)
    return ContextSignature(request.user, request.history_version, num_profile_tokens + n, realtime,
                            tuple(int(v) for v in ctx.profile))
