"""`Registry`: model versions and experiments in the metadata store (SQLite or PostgreSQL, one SQL text).

It runs on a store's `transaction()` (grinfer.storage: SQLiteStore, PostgresStore), whose tables the
store's migrations create (storage/registry_tables.py). Versions of a name are numbered 1, 2, ... in
registration order. Promoting a version makes it the one production version of its name (the previous
one is archived). A version whose directory no longer hashes to its registered content hash refuses to
load (`verify`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from grinfer.registry.content import content_hash, describe
from grinfer.registry.records import STAGES, Arm, Experiment, ModelVersion, RegistryError, check_name

_VERSION_COLUMNS = "name, version, path, content_hash, config, metrics, stage, created_at"
_EXPERIMENT_COLUMNS = "name, model, shadow_version, shadow_fraction, started_at, stopped_at"


class HashMismatch(RuntimeError):
    """A registered version's directory no longer hashes to its registered content hash."""


class SQLStore(Protocol):
    """What the registry needs of a store: its parameter marker and a transaction yielding a connection."""

    placeholder: str

    def transaction(self) -> AbstractContextManager[Any]: ...

    def close(self) -> None: ...


def _version(row: Sequence) -> ModelVersion:
    name, version, path, digest, config, metrics, stage, created = row
    return ModelVersion(name, int(version), path, digest, json.loads(config), json.loads(metrics), stage,
                        float(created))


class Registry:
    """Model versions and experiments; every method is one transaction (safe from several processes)."""

    def __init__(self, store: SQLStore, owns_store: bool = False):
        self.store, self.owns_store = store, owns_store

    def close(self) -> None:
        """Close the store when this registry opened it (`open_registry`)."""
        if self.owns_store:
            self.store.close()

    def _exec(self, conn, sql: str, args: Sequence = ()):
        return conn.execute(sql.replace("?", self.store.placeholder), tuple(args))

    # ---- versions ---------------------------------------------------------------------------
    def register(self, path: Path, name: str) -> ModelVersion:
        """Record the model directory at `path` as the next version of `name` (stage staging)."""
        check_name("name", name)
        path = path.expanduser().resolve()
        try:
            configs, metrics = describe(path)
            digest = content_hash(path)
        except ValueError as exc:
            raise RegistryError("path", str(exc)) from None
        with self.store.transaction() as c:
            latest = self._exec(c, "SELECT coalesce(max(version), 0) FROM model_versions WHERE name = ?",
                                (name,)).fetchone()[0]
            row = (name, int(latest) + 1, str(path), digest, json.dumps(configs, sort_keys=True),
                   json.dumps(metrics, sort_keys=True), "staging", time.time())
            self._exec(c, f"INSERT INTO model_versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        return _version(row)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every registered version (of `name`), by name then version."""
        where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        with self.store.transaction() as c:
            rows = self._exec(c, f"SELECT {_VERSION_COLUMNS} FROM model_versions {where} ORDER BY name, version",
                              args).fetchall()
        return [_version(r) for r in rows]

    def get(self, name: str, version: int) -> ModelVersion:
        """The version (RegistryError 404 naming `version` when it is not registered)."""
        with self.store.transaction() as c:
            row = self._exec(c, f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE name = ? AND version = ?",
                             (name, version)).fetchone()
        if row is None:
            raise RegistryError("version", f"model {name!r} has no version {version}", status=404)
        return _version(row)

    def production(self, name: str) -> ModelVersion | None:
        """The production version of `name`, or None when none was promoted."""
        with self.store.transaction() as c:
            row = self._exec(c, f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE name = ? AND stage = ?",
                             (name, "production")).fetchone()
        return None if row is None else _version(row)

    def promote(self, name: str, version: int) -> ModelVersion:
        """Make `version` the production version of `name`; the previous production version is archived.
        A version whose directory changed since it was registered is refused (HashMismatch)."""
        self.verify(self.get(name, version))
        with self.store.transaction() as c:
            self._exec(c, "UPDATE model_versions SET stage = ? WHERE name = ? AND stage = ? AND version <> ?",
                       ("archived", name, "production", version))
            self._exec(c, "UPDATE model_versions SET stage = ? WHERE name = ? AND version = ?",
                       ("production", name, version))
        return self.get(name, version)

    def set_stage(self, name: str, version: int, stage: str) -> ModelVersion:
        """Set a version's stage (staging or archived; `promote` makes production)."""
        if stage not in STAGES or stage == "production":
            raise RegistryError("stage", f"must be staging or archived (promote makes production), got {stage!r}")
        self.get(name, version)
        with self.store.transaction() as c:
            self._exec(c, "UPDATE model_versions SET stage = ? WHERE name = ? AND version = ?", (stage, name, version))
        return self.get(name, version)

    @staticmethod
    def verify(version: ModelVersion) -> None:
        """HashMismatch unless the version's directory still hashes to its registered content hash."""
        try:
            digest = content_hash(Path(version.path))
        except ValueError as exc:
            raise HashMismatch(f"{version.key}: {exc}") from None
        if digest != version.content_hash:
            raise HashMismatch(f"{version.key}: {version.path} hashes to {digest[:16]}..., not the registered "
                               f"{version.content_hash[:16]}...; refusing to load a checkpoint that changed since "
                               "it was registered (register it again as a new version)")

    # ---- experiments ------------------------------------------------------------------------
    def start_experiment(self, name: str, model: str, arms: Sequence[Arm], shadow_version: int | None = None,
                         shadow_fraction: float = 0.0, start: float | None = None,
                         stop: float | None = None) -> Experiment:
        """Define an experiment of `model` (arms with weights; a None version follows production), active from
        `start` (default now) until `stop` or `stop_experiment`. One active experiment per model at a time."""
        check_name("experiment", name)
        self._check_arms(model, arms)
        if shadow_version is not None:
            self.get(model, shadow_version)
        if not 0.0 <= shadow_fraction <= 1.0:
            raise RegistryError("shadow_fraction", f"must be in [0, 1], got {shadow_fraction}")
        started = time.time() if start is None else float(start)
        if stop is not None and stop <= started:
            raise RegistryError("stop", "must come after the start")
        if any(e.name == name for e in self.experiments()):
            raise RegistryError("experiment", f"{name!r} already exists; pick a new name", status=409)
        running = self.active_experiment(model, started)
        if running is not None:
            raise RegistryError("experiment", f"{running.name!r} already runs on {model!r}; stop it first", status=409)
        with self.store.transaction() as c:
            self._exec(c, f"INSERT INTO experiments ({_EXPERIMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (name, model, shadow_version, shadow_fraction, started, stop))
            for arm in arms:
                self._exec(c, "INSERT INTO experiment_arms (experiment, arm, version, weight) VALUES (?, ?, ?, ?)",
                           (name, arm.name, arm.version, arm.weight))
        return self.experiment(name)

    def _check_arms(self, model: str, arms: Sequence[Arm]) -> None:
        if not arms:
            raise RegistryError("arms", "an experiment needs at least one arm")
        names = [check_name("arms", a.name) for a in arms]
        if len(set(names)) != len(names):
            raise RegistryError("arms", f"arm names must be distinct, got {names}")
        for arm in arms:
            if not arm.weight > 0:
                raise RegistryError("arms", f"arm {arm.name!r}: weight must be > 0, got {arm.weight}")
            if arm.version is not None:
                self.get(model, arm.version)

    def stop_experiment(self, name: str) -> Experiment:
        """Stop the experiment now (traffic goes back to production alone)."""
        current = self.experiment(name)
        if current.stopped_at is None or current.stopped_at > time.time():
            with self.store.transaction() as c:
                self._exec(c, "UPDATE experiments SET stopped_at = ? WHERE name = ?", (time.time(), name))
        return self.experiment(name)

    def experiment(self, name: str) -> Experiment:
        """The named experiment (RegistryError 404 when there is none)."""
        found = [e for e in self.experiments() if e.name == name]
        if not found:
            raise RegistryError("experiment", f"no experiment {name!r}", status=404)
        return found[0]

    def experiments(self, model: str | None = None) -> list[Experiment]:
        """Every experiment (of `model`), oldest first."""
        where, args = ("WHERE model = ?", (model,)) if model is not None else ("", ())
        with self.store.transaction() as c:
            rows = self._exec(c, f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments {where} ORDER BY started_at, name",
                              args).fetchall()
            arms = self._exec(c, "SELECT experiment, arm, version, weight FROM experiment_arms ORDER BY experiment, "
                                 "arm").fetchall()
        by_experiment: dict[str, list[Arm]] = {}
        for experiment, arm, version, weight in arms:
            by_experiment.setdefault(experiment, []).append(Arm(arm, float(weight),
                                                                None if version is None else int(version)))
        return [Experiment(n, m, tuple(by_experiment.get(n, ())), float(start),
                           None if stop is None else float(stop), None if sv is None else int(sv), float(sf))
                for n, m, sv, sf, start, stop in rows]

    def active_experiment(self, model: str, now: float | None = None) -> Experiment | None:
        """The experiment routing `model`'s traffic at `now` (default: now), if any."""
        at = time.time() if now is None else now
        return next((e for e in self.experiments(model) if e.active(at)), None)
