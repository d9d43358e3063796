"""The API key check both adapters share: `X-API-Key: <key>` or `Authorization: Bearer <key>`, in constant time."""

from __future__ import annotations

import hmac

KEY_FIELD = "x-api-key"  # the field a refused key is reported under (REST `field`, gRPC `grinfer-field`)
KEY_MESSAGE = "missing or wrong API key (X-API-Key: <key> or Authorization: Bearer <key>)"


def key_accepted(api_key: str, x_api_key: str | None, authorization: str | None) -> bool:
    """Whether the request carries `api_key`: as X-API-Key, or as Authorization with the Bearer scheme.

    A bare key in Authorization (no scheme, or another scheme) is refused. The comparison takes the
    same time wherever the given key first differs (hmac.compare_digest).
    """
    given = x_api_key
    if not given and authorization:
        scheme, _, token = authorization.strip().partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())
