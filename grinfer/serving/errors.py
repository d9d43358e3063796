"""One table of the errors REST and gRPC answer with: exception -> (HTTP status, gRPC code, field).

| exception | HTTP | gRPC | field | metric kind |
|---|---|---|---|---|
| request validation (pydantic) | 422 | INVALID_ARGUMENT | from the error's location | validation |
| FieldError (status s, field f) | s | GRPC_OF_HTTP[s] (INVALID_ARGUMENT for other 4xx) | f | field |
| Overloaded | 429 + Retry-After | RESOURCE_EXHAUSTED | - | overloaded |
| DeadlineExceeded | 504 | DEADLINE_EXCEEDED | deadline_ms | deadline |
| ContextTooLarge | 413 | INVALID_ARGUMENT | events | context_too_large |
| Unavailable (the store, the service), other EngineError | 503 + Retry-After | UNAVAILABLE | - | unavailable |

Anything else is an internal error (500 / INTERNAL). Messages read "field: message" when a field is named.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from grinfer.engine.request import ContextTooLarge, DeadlineExceeded, EngineError, Overloaded
from grinfer.serving.service import FieldError
from grinfer.storage.base import Unavailable

Code = grpc.StatusCode
GRPC_OF_HTTP = {401: Code.UNAUTHENTICATED, 404: Code.NOT_FOUND, 429: Code.RESOURCE_EXHAUSTED,
                503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}  # other 4xx: INVALID_ARGUMENT


@dataclass(frozen=True)
class Mapped:
    """How one error is answered: HTTP status, gRPC code, the field named, metric kind, Retry-After or not."""

    http: int
    grpc: grpc.StatusCode
    kind: str
    field: str | None = None
    retry: bool = False

    def message(self, exc: BaseException) -> str:
        """The error text: "field: message" when a field is named."""
        return f"{self.field}: {exc}" if self.field else str(exc)


VALIDATION = Mapped(422, Code.INVALID_ARGUMENT, "validation")  # its field comes from the error's location
TABLE: tuple[tuple[type[Exception], Mapped], ...] = (  # the first class the error is an instance of wins
    (Overloaded, Mapped(429, Code.RESOURCE_EXHAUSTED, "overloaded", retry=True)),
    (DeadlineExceeded, Mapped(504, Code.DEADLINE_EXCEEDED, "deadline", "deadline_ms")),
    (ContextTooLarge, Mapped(413, Code.INVALID_ARGUMENT, "context_too_large", "events")),
    (Unavailable, Mapped(503, Code.UNAVAILABLE, "unavailable", retry=True)),
    (EngineError, Mapped(503, Code.UNAVAILABLE, "unavailable", retry=True)),
)
MAPPED_TYPES = (FieldError, *(cls for cls, _ in TABLE))  # the exception classes the adapters answer from here


def mapped(exc: BaseException) -> Mapped | None:
    """How `exc` is answered, or None for an internal error."""
    if isinstance(exc, FieldError):
        return Mapped(exc.status, GRPC_OF_HTTP.get(exc.status, Code.INVALID_ARGUMENT), "field", exc.field)
    return next((m for cls, m in TABLE if isinstance(exc, cls)), None)
