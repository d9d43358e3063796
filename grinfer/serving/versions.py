"""Registered versions into served engines: the hash check before a load, the loader a `ModelSet` swaps
with, and the watch that applies the registry's plan (a `grinfer models promote` from any process, an
experiment started or stopped) to a running server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from grinfer.config import EngineConfig
from grinfer.registry import ModelVersion, Registry, ServingPlan, plan_for
from grinfer.registry.plan import PRODUCTION_ARM, PlannedArm
from grinfer.registry.store import SQLStore
from grinfer.serving.engine_set import members
from grinfer.serving.models import Loader, ModelSet, Served
from grinfer.serving.warmup import warm_up

log = logging.getLogger("grinfer.serve")
EngineFor = Callable[[Path, float, str], Served]  # (model directory, KV share, version key) -> an engine, not started


def warm_all(engine, progress: Callable[[float], None] = lambda f: None) -> None:
    """Warm every engine behind `engine` (a model set's versions, an engine set's devices) in turn."""
    engines = [m for version in (engine.engines_by_version() if isinstance(engine, ModelSet) else [engine])
               for m in members(version)]
    for i, member in enumerate(engines):
        warm_up(member, progress=lambda f, i=i: progress((i + f) / len(engines)))


def verified_dir(version: ModelVersion) -> Path:
    """The version's directory once its content hash matched (HashMismatch otherwise)."""
    Registry.verify(version)
    return Path(version.path)


def version_loader(engine_for: EngineFor) -> Loader:
    """A ModelSet loader: hash check, engine built with its KV share, started, warmed."""
    def load(version: ModelVersion, share: float):
        engine = engine_for(verified_dir(version), share, version.key)
        engine.start()
        try:
            warm_all(engine)
        except BaseException:
            engine.shutdown(drain=False)
            raise
        return engine
    return load


def local_version(model_path: Path) -> ModelVersion:
    """A model served by its path, not from the registry: version 0 of its directory's name."""
    return ModelVersion(model_path.name or "model", 0, str(model_path), "", {}, {}, "production", time.time())


def serving_plan(model_name: str | None, store, model_path: Path) -> tuple[ServingPlan, Registry | None]:
    """The plan a server starts with, and the registry it follows (None: `model_path` alone, unregistered)."""
    if model_name is None:
        version = local_version(model_path)
        return ServingPlan(version.name, version, (PlannedArm(PRODUCTION_ARM, 1.0, 0, version),)), None
    registry = Registry(cast(SQLStore, store))  # both SQL stores keep the registry's tables
    return plan_for(registry, model_name), registry


def version_settings(engine_cfg: EngineConfig, share: float, key: str) -> EngineConfig:
    """A version's engine settings: `share` of the KV budget (device and host tiers) and a disk-tier directory
    of its own (two versions with the same weights must not share one)."""
    update: dict = {"kv_cache_bytes": int(engine_cfg.kv_cache_bytes * share),
                    "host_cache_bytes": int(engine_cfg.host_cache_bytes * share)}
    if engine_cfg.disk_cache_dir:
        update["disk_cache_dir"] = str(Path(engine_cfg.disk_cache_dir) / key.replace(":", "-"))
    return engine_cfg.model_copy(update=update)


class RegistryWatch:
    """Polls the registry every `poll_s` (0: never) and applies a changed plan to the model set (on its own
    thread); `check` does it at once."""

    def __init__(self, registry: Registry, model: str, models: ModelSet, poll_s: float):
        self.registry, self.model, self.models, self.poll_s = registry, model, models, poll_s
        self._stop = threading.Event()
        self._failed: tuple[dict, str] | None = None  # the plan that last failed to apply, and why
        self._lock = threading.Lock()  # one check at a time (the poll and an admin's promote)
        self._thread = None
        if poll_s > 0:  # 0: no polling, only `check` calls (POST /v1/admin/models/promote)
            self._thread = threading.Thread(target=self._run, name="grinfer-registry-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def check(self) -> dict | None:
        """Apply the registry's plan now if it differs from the served one; the swap record, or None."""
        with self._lock:
            plan = plan_for(self.registry, self.model)
            wanted = plan.describe()
            if wanted == self.models.plan.describe() or (self._failed is not None and self._failed[0] == wanted):
                return None
            try:
                return self.models.apply(plan)
            except Exception as exc:  # a bad version must not stop the watch; the same plan is not retried
                self._failed = (wanted, f"{type(exc).__name__}: {exc}")
                log.error("registry plan for %s not applied: %s", self.model, self._failed[1])
                raise

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # the store is down, or the plan failed (logged): keep serving the current one
                log.debug("registry watch for %s: %s", self.model, exc)
