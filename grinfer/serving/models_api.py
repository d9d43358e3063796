"""REST routes of the model registry and the A/B arms, and the admin-forced arm of a ranked request.

    GET  /v1/admin/models          the registry's versions and experiments, and what this server serves
    POST /v1/admin/models/promote  {"name", "version"}: promote, and (in registry mode) swap to it now
    GET  /v1/admin/arms            per arm and model version: requests, errors, latency

A ranked request may name an arm in `X-Grinfer-Arm` (debugging); with an API key configured it must carry
the key (401 otherwise).
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import cast

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from grinfer.registry import HashMismatch, Registry, RegistryError
from grinfer.registry.store import SQLStore
from grinfer.serving.auth import key_accepted
from grinfer.serving.service import FORCED_ARM, FieldError

ARM_HEADER = "x-grinfer-arm"


class PromoteIn(BaseModel):
    name: str = Field(max_length=64, description="The registered model's name")
    version: int = Field(ge=1, le=(1 << 63) - 1, description="The version to make production (a 64-bit integer)")


@contextmanager
def forcing_arm(request: Request, api_key: str | None):
    """While the block runs, the request's ranking uses the arm its X-Grinfer-Arm header names (if any)."""
    arm = request.headers.get(ARM_HEADER)
    if arm is not None and api_key is not None and not key_accepted(api_key, request.headers.get("x-api-key"),
                                                                    request.headers.get("authorization")):
        raise FieldError(ARM_HEADER, "forcing an arm needs the API key (X-API-Key)", status=401)
    token = FORCED_ARM.set(arm)
    try:
        yield
    finally:
        FORCED_ARM.reset(token)


def _registry_error(exc: RegistryError) -> FieldError:
    return FieldError(exc.field, str(exc).split(": ", 1)[1], status=exc.status)


def models_router(state) -> APIRouter:
    """The routes above over the app's state (its service's store holds the registry)."""
    router = APIRouter()
    service = state.service
    registry = Registry(cast(SQLStore, service.store))  # both SQL stores keep the registry's tables

    def served() -> dict | None:
        return service.engine.stats().get("models")

    @router.get("/v1/admin/models")
    async def list_models() -> dict:
        """Every registered version and experiment, and the serving plan, versions and swaps of this server."""
        def read() -> dict:
            return {"versions": [v.as_dict() for v in registry.versions()],
                    "experiments": [e.as_dict() for e in registry.experiments()], "served": served()}
        return await asyncio.to_thread(read)

    @router.post("/v1/admin/models/promote")
    async def promote(body: PromoteIn) -> dict:
        """Make a version production; a server in registry mode loads it beside the old one, warms it, switches
        traffic and drains the old one before answering (other servers pick it up at their next poll)."""
        def run() -> dict:
            try:
                version = registry.promote(body.name, body.version)
                swap = state.apply_registry() if state.apply_registry is not None else None
            except RegistryError as exc:
                raise _registry_error(exc) from None
            except HashMismatch as exc:
                raise FieldError("version", str(exc), status=409) from None
            return {"promoted": version.as_dict(), "swap": swap}
        return await asyncio.to_thread(run)

    @router.get("/v1/admin/arms")
    async def arms() -> dict:
        """Per arm and model version: answered and failed requests, engine latency (sum, p50, p99 bucket edges)."""
        models = await asyncio.to_thread(served)
        return {"arms": [] if models is None else models["arms"],
                "plan": None if models is None else models["plan"]}

    return router
