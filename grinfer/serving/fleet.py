"""Replicas in a fleet: a history roll through any replica frees that user's stale K/V on every replica.

The engine keys K/V by (user, history version), so a replica that still holds a rolled user's old K/V
never serves it (the next request carries the new version and misses); the K/V just sits in the pool
until then. With a shared Redis cache, each replica subscribes to the cache's roll announcements and,
on each one, drops that user's device entry of an older version on the engine's thread; the replica
that rolled announces it. Without Redis the roll is applied locally only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from grinfer.engine import Engine
from grinfer.serving.engine_set import EngineSet
from grinfer.serving.models import ModelSet
from grinfer.serving.service import RecommenderService

log = logging.getLogger("grinfer.fleet")


@runtime_checkable
class RollAnnouncer(Protocol):
    """A shared cache that carries roll announcements between replicas (RedisFeatureCache)."""

    errors: tuple[type[BaseException], ...]

    def publish_roll(self, user: str, history_version: int) -> None: ...

    def subscribe_rolls(self, on_roll: Callable[[str, int], None]) -> Callable[[], None]: ...


def forget_rolled(engine: Engine | EngineSet | ModelSet) -> Callable[[str, int], None]:
    """on_roll(user, version) that frees the user's older K/V on this replica's engine thread."""
    def on_roll(user: str, version: int) -> None:
        try:
            engine.forget_user(user, version)
        except Exception as exc:  # a full or stopped engine: the version check still voids the K/V
            log.debug("roll of %s not applied to the KV cache now: %s", user, exc)
    return on_roll


def join_fleet(service: RecommenderService, engine: Engine | EngineSet | ModelSet) -> Callable[[], None]:
    """Wire roll announcements for this replica; returns the function that stops listening."""
    forget = forget_rolled(engine)
    cache = service.cache
    if not isinstance(cache, RollAnnouncer):
        service.on_roll = forget
        return lambda: None
    stop = cache.subscribe_rolls(forget)

    def announce(user: str, version: int) -> None:
        forget(user, version)  # this replica at once, whatever Redis does
        try:
            cache.publish_roll(user, version)
        except cache.errors as exc:  # Redis down: the others keep the old K/V until the user's next request
            log.warning("roll of %s not announced to the fleet: %s", user, exc)
    service.on_roll = announce
    return stop
