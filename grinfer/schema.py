"""Request / response / event types of the public API (REST and gRPC share them) and their limits."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_CANDIDATES = 2000
MAX_EVENTS = 1000
MAX_K = 500
DEFAULT_RETRIEVE = 200
MAX_USERS_PAGE = 1000
MAX_OFFSET = 2**31  # list offsets beyond any store's size (SQLite and PostgreSQL take int64: no overflow)
MAX_ITEM_ID = 2**63 - 1  # catalogue ids are int64 in the stores and the model
MAX_TS = 4_102_444_800  # 2100-01-01: event times are unix seconds within int64 and the time buckets
USER_ID_RULES = {"min_length": 1, "max_length": 128, "pattern": r"^[A-Za-z0-9_.:@-]+$",
                 "description": "User id (1-128 letters, digits, _ . : @ -)."}
USER_ID = Field(**USER_ID_RULES)
IDEMPOTENCY_KEY_RULES = {"min_length": 1, "max_length": 128, "pattern": r"^[!-~]+$",
                         "description": "Client id of this batch (1-128 printable ASCII, no spaces; or the "
                                        "Idempotency-Key header): a retry with the same key appends nothing and "
                                        "gets the first answer; the same key with other events is refused (422)."}
DEADLINE_MS = Field(default=None, ge=1, le=600_000,
                    description="Answer within this many ms of arrival or fail (504 / DEADLINE_EXCEEDED); checked "
                                "before each engine step and when the scores are ready. Default: no deadline.")


class _Model(BaseModel):
    """A request body: unknown fields are errors, and types are strict (`"10"` or `true` is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EventIn(_Model):
    """A behaviour event: item (catalogue id), unix seconds (default: now), action (rating 1..5)."""

    item: int = Field(ge=0, le=MAX_ITEM_ID, description="Catalogue item id.")
    ts: int | None = Field(default=None, ge=0, le=MAX_TS, description="Unix seconds (default: now).")
    action: int = Field(default=4, ge=1, le=5, description="Rating 1..5.")


class Candidate(_Model):
    item: int = Field(ge=0, le=MAX_ITEM_ID, description="Catalogue item id.")


class RankIn(_Model):
    user: str = USER_ID
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    events: list[EventIn] = Field(default_factory=list, max_length=MAX_EVENTS,
                                  description="Extra real-time events for this request only (not stored).")
    deadline_ms: int | None = DEADLINE_MS


class RecommendIn(_Model):
    user: str = USER_ID
    # retrieve comes before k so that k's check can see it
    retrieve: int | None = Field(default=None, ge=1, le=MAX_CANDIDATES,
                                 description="Retrieval candidates ranked by MTGR, >= k "
                                             f"(default: max({DEFAULT_RETRIEVE}, k)).")
    k: int = Field(default=10, ge=1, le=MAX_K, description="Items returned (at most retrieve).")
    deadline_ms: int | None = DEADLINE_MS

    @field_validator("k")
    @classmethod
    def _k_within_retrieve(cls, k: int, info: ValidationInfo) -> int:
        retrieve = info.data.get("retrieve")
        if retrieve is not None and k > retrieve:
            raise PydanticCustomError("k_above_retrieve", "k={k} exceeds retrieve={retrieve}: ask for retrieve >= k",
                                      {"k": k, "retrieve": retrieve})
        return k

    @model_validator(mode="after")
    def _default_retrieve(self) -> RecommendIn:
        if self.retrieve is None:
            self.retrieve = max(DEFAULT_RETRIEVE, self.k)
        return self


class EventsIn(_Model):
    user: str = USER_ID
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)
    idempotency_key: str | None = Field(default=None, **IDEMPOTENCY_KEY_RULES)


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
    arm: str = ""  # the A/B arm that answered ("production" outside an experiment)
    model_version: str = ""  # the model version that scored ("name:version" of the registry)


class EventsOut(BaseModel):
    user: str
    appended: int
    realtime_events: int


class RollOut(BaseModel):
    user: str
    history_version: int  # unchanged when there was nothing to fold
    folded: int  # real-time events moved into the static history by this roll


class UsersQuery(BaseModel):
    """A page of user ids (query parameters, so not strict: they arrive as text)."""

    limit: int = Field(default=50, ge=1, le=MAX_USERS_PAGE)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)


class UsersOut(BaseModel):
    users: list[str]
    total: int


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


class BackendProbe(BaseModel):
    backend: str
    healthy: bool
    probe_ms: float | None = None  # median time of the probe's representative batch
    max_error: float | None = None  # vs eager: absolute (float32) or relative (bf16)
    ready_s: float | None = None
    error: str | None = None


class ChainBackend(BaseModel):
    backend: str
    healthy: bool  # its circuit breaker is closed
    opened: int  # times its breaker opened


class Fallback(BaseModel):
    from_: str = Field(alias="from")
    to: str
    reason: str  # exception, non_finite or timeout
    count: int

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class BackendsOut(BaseModel):
    configured: str  # the --backend setting (auto, eager, compiled, fused)
    primary: str  # the backend steps run on first
    active: str  # the first backend whose breaker lets a step run now
    chain: list[ChainBackend]  # fallback order, ending with baseline (the uncached model)
    fallbacks: list[Fallback]
    probes: list[BackendProbe]  # auto's start-up probes (empty otherwise)


class ErrorOut(BaseModel):
    error: str  # "field: message" when a field is known
    field: str | None = None


def field_path(loc: Sequence[str | int]) -> str:
    """A validation error's location as the dotted path both APIs report ("candidates.0.item")."""
    return ".".join(str(part) for part in loc)
