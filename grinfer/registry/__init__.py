"""The model registry: versions of named models (with content hashes, configs and training metrics) and
A/B experiments, kept in the metadata store beside users and items.

    registry = open_registry("sqlite:///path.db")      # or postgresql://..., or Registry(store)
    v = registry.register(Path("model-dir"), "ranker")  # next version of "ranker", stage staging
    registry.promote("ranker", v.version)               # the production version (the old one archived)
    registry.start_experiment("ab1", "ranker", [Arm("control", 0.98), Arm("treatment", 0.02, v.version)])

`assign(experiment, user, arms)` puts a user in an arm by a stable hash; `plan_for(registry, model)`
says which versions a server should hold and how traffic goes between them.
"""

from __future__ import annotations

from typing import cast

from grinfer.registry.assign import assign
from grinfer.registry.plan import ServingPlan, plan_for
from grinfer.registry.records import STAGES, Arm, Experiment, ModelVersion, RegistryError
from grinfer.registry.store import HashMismatch, Registry, SQLStore


def open_registry(url: str) -> Registry:
    """The registry in the store at `url` (opened, and migrated, here; `close()` closes it)."""
    from grinfer.storage import open_store

    return Registry(cast(SQLStore, open_store(url)), owns_store=True)  # both SQL stores have transaction()


__all__ = ["STAGES", "Arm", "Experiment", "HashMismatch", "ModelVersion", "Registry", "RegistryError",
           "ServingPlan", "assign", "open_registry", "plan_for"]
