"""The serving plan of a model: which registered versions a server holds and how traffic splits.

Without a running experiment every request goes to the production version (arm "production"); with one,
each user goes to the arm `assign` gives them, and the experiment's shadow version (if any) scores a
sampled fraction of the traffic in the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grinfer.registry.assign import assign
from grinfer.registry.records import Arm, ModelVersion, RegistryError
from grinfer.registry.store import HashMismatch, Registry

PRODUCTION_ARM = "production"


@dataclass(frozen=True)
class PlannedArm(Arm):
    """An arm with its version resolved (`version` is that version's number)."""

    model_version: ModelVersion | None = None

    @property
    def key(self) -> str:
        assert self.model_version is not None  # plan_for always resolves it
        return self.model_version.key


@dataclass(frozen=True)
class ServingPlan:
    """What a server serves for one model: production, the arms (with their versions) and the shadow."""

    model: str
    production: ModelVersion
    arms: tuple[PlannedArm, ...]
    experiment: str | None = None
    shadow: ModelVersion | None = None
    shadow_fraction: float = 0.0

    def versions(self) -> dict[str, ModelVersion]:
        """Every version the plan needs loaded, by key (production first)."""
        out = {self.production.key: self.production}
        for arm in self.arms:
            assert arm.model_version is not None
            out.setdefault(arm.key, arm.model_version)
        if self.shadow is not None:
            out.setdefault(self.shadow.key, self.shadow)
        return out

    def arm_for(self, user: str, forced: str | None = None) -> PlannedArm:
        """The user's arm (`forced`: that arm by name, for debugging; RegistryError when there is none)."""
        if forced is not None:
            found = next((a for a in self.arms if a.name == forced), None)
            if found is None:
                raise RegistryError("arm", f"no arm {forced!r} now; arms: {', '.join(a.name for a in self.arms)}")
            return found
        if self.experiment is None:
            return self.arms[0]
        return assign(self.experiment, user, self.arms)

    def describe(self) -> dict:
        """The plan as plain data (GET /v1/admin/models)."""
        return {"model": self.model, "production": self.production.key, "experiment": self.experiment,
                "arms": [{"arm": a.name, "weight": a.weight, "model_version": a.key} for a in self.arms],
                "shadow": None if self.shadow is None else {"model_version": self.shadow.key,
                                                            "fraction": self.shadow_fraction}}


def plan_for(registry: Registry, model: str, now: float | None = None) -> ServingPlan:
    """The plan for `model` now: its production version, and its running experiment's arms and shadow."""
    production = registry.production(model)
    if production is None:
        known = registry.versions(model)
        hint = f"promote one: grinfer models promote {model} VERSION" if known else \
            f"register one: grinfer models register DIR --name {model}"
        raise RegistryError("model_name", f"model {model!r} has no production version; {hint}", status=404)
    experiment = registry.active_experiment(model, now)
    if experiment is None:
        return ServingPlan(model, production, (PlannedArm(PRODUCTION_ARM, 1.0, production.version, production),))
    arms = tuple(PlannedArm(a.name, a.weight, v.version, v) for a in experiment.arms
                 for v in [production if a.version is None else registry.get(model, a.version)])
    shadow = None if experiment.shadow_version is None else registry.get(model, experiment.shadow_version)
    return ServingPlan(model, production, arms, experiment.name, shadow, experiment.shadow_fraction)


def production_dir(store_url: str | None, model: str) -> Path:
    """The directory of `model`'s production version in the registry at `store_url`, once its content hash
    matched (what a server serving the registry's model starts from); RegistryError naming the setting."""
    from grinfer.registry import open_registry

    if store_url is None:
        raise RegistryError("model_name", "serving a registered model needs --store (GRINFER_STORE), the store "
                                          "that holds the registry")
    registry = open_registry(store_url)
    try:
        version = plan_for(registry, model).production
        registry.verify(version)
    except HashMismatch as exc:
        raise RegistryError("model_name", str(exc)) from None
    finally:
        registry.close()
    return Path(version.path)
