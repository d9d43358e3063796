from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("item", "ts", "action")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    item: int
    ts: int
    action: int
    def __init__(self, item: _Optional[int] = ..., ts: _Optional[int] = ..., action: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: int
    def __init__(self, item: _Optional[int] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user", "candidates", "events", "deadline_ms")
    USER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    user: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    deadline_ms: int
    def __init__(self, user: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user", "k", "retrieve", "deadline_ms")
    USER_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    user: str
    k: int
    retrieve: int
    deadline_ms: int
    def __init__(self, user: _Optional[str] = ..., k: _Optional[int] = ..., retrieve: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item", "score", "probabilities", "title")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    item: int
    score: float
    probabilities: _containers.ScalarMap[str, float]
    title: str
    def __init__(self, item: _Optional[int] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., title: _Optional[str] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("user", "items", "cache", "history_version", "cold_start", "latency_ms")
    USER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    user: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    cache: str
    history_version: int
    cold_start: bool
    latency_ms: float
    def __init__(self, user: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., cache: _Optional[str] = ..., history_version: _Optional[int] = ..., cold_start: _Optional[bool] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class AppendEventsRequest(_message.Message):
    __slots__ = ("user", "events", "idempotency_key")
    USER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    user: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    idempotency_key: str
    def __init__(self, user: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AppendEventsResponse(_message.Message):
    __slots__ = ("user", "appended", "realtime_events")
    USER_FIELD_NUMBER: _ClassVar[int]
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    REALTIME_EVENTS_FIELD_NUMBER: _ClassVar[int]
    user: str
    appended: int
    realtime_events: int
    def __init__(self, user: _Optional[str] = ..., appended: _Optional[int] = ..., realtime_events: _Optional[int] = ...) -> None: ...

class RollHistoryRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class RollHistoryResponse(_message.Message):
    __slots__ = ("user", "history_version", "folded")
    USER_FIELD_NUMBER: _ClassVar[int]
    HISTORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FOLDED_FIELD_NUMBER: _ClassVar[int]
    user: str
    history_version: int
    folded: int
    def __init__(self, user: _Optional[str] = ..., history_version: _Optional[int] = ..., folded: _Optional[int] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class UserEvent(_message.Message):
    __slots__ = ("item", "ts", "action", "title")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    item: int
    ts: int
    action: int
    title: str
    def __init__(self, item: _Optional[int] = ..., ts: _Optional[int] = ..., action: _Optional[int] = ..., title: _Optional[str] = ...) -> None: ...

class UserResponse(_message.Message):
    __slots__ = ("user", "profile", "history_version", "static_events", "realtime_events", "recent")
    class ProfileEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    USER_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATIC_EVENTS_FIELD_NUMBER: _ClassVar[int]
    REALTIME_EVENTS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    user: str
    profile: _containers.ScalarMap[str, int]
    history_version: int
    static_events: int
    realtime_events: int
    recent: _containers.RepeatedCompositeFieldContainer[UserEvent]
    def __init__(self, user: _Optional[str] = ..., profile: _Optional[_Mapping[str, int]] = ..., history_version: _Optional[int] = ..., static_events: _Optional[int] = ..., realtime_events: _Optional[int] = ..., recent: _Optional[_Iterable[_Union[UserEvent, _Mapping]]] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ("limit", "offset")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    limit: int
    offset: int
    def __init__(self, limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ListUsersResponse(_message.Message):
    __slots__ = ("users", "total")
    USERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedScalarFieldContainer[str]
    total: int
    def __init__(self, users: _Optional[_Iterable[str]] = ..., total: _Optional[int] = ...) -> None: ...
