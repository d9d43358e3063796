"""Request / response / event types of the public API (REST and gRPC share them) and their limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_CANDIDATES = 2000
MAX_EVENTS = 1000
MAX_K = 500
USER_ID = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$",
                description="User id (letters, digits, _ . : @ -).")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventIn(_Model):
    """A behaviour event: item (catalogue id), unix seconds (default: now), action (rating 1..5)."""

    item: int = Field(ge=0)
    ts: int | None = Field(None, ge=0, le=4_102_444_800)
    action: int = Field(4, ge=1, le=5)


class Candidate(_Model):
    item: int = Field(ge=0, description="Catalogue item id.")


class RankIn(_Model):
    user: str = USER_ID
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    events: list[EventIn] = Field(default_factory=list, max_length=MAX_EVENTS,
                                  description="Extra real-time events for this request only (not stored).")
    deadline_ms: int | None = Field(None, ge=1, le=600_000)


class RecommendIn(_Model):
    user: str = USER_ID
    k: int = Field(10, ge=1, le=MAX_K)
    retrieve: int = Field(200, ge=1, le=MAX_CANDIDATES, description="Retrieval candidates ranked by MTGR.")
    deadline_ms: int | None = Field(None, ge=1, le=600_000)


class EventsIn(_Model):
    user: str = USER_ID
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class RollIn(_Model):
    user: str = USER_ID


class ScoredItem(BaseModel):
    item: int
    score: float
    probabilities: dict[str, float]
    title: str = ""


class RankOut(BaseModel):
    user: str
    items: list[ScoredItem]
    cache: str  # KV cache status of the user's context: hit, partial, miss
    history_version: int
    cold_start: bool
    latency_ms: float


class EventsOut(BaseModel):
    user: str
    appended: int
    realtime_events: int


class RollOut(BaseModel):
    user: str
    history_version: int


class EventOut(BaseModel):
    item: int
    ts: int
    action: int
    title: str = ""


class UserOut(BaseModel):
    user: str
    profile: dict[str, int]
    history_version: int
    static_events: int
    realtime_events: int
    recent: list[EventOut]


class ErrorOut(BaseModel):
    error: str
    field: str | None = None
