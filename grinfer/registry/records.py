"""The registry's records: model versions, experiments and their arms (plain frozen dataclasses)."""

from __future__ import annotations

import re
from dataclasses import dataclass

STAGES = ("staging", "production", "archived")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # model, experiment and arm names


class RegistryError(ValueError):
    """A registry operation the caller got wrong; `field` names the argument (CLI: one line, REST: 4xx)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def check_name(field_name: str, value: str) -> str:
    """`value` if it is a valid model / experiment / arm name, else RegistryError naming the field."""
    if not NAME_RE.fullmatch(value):
        raise RegistryError(field_name, f"{value!r} must be 1-64 letters, digits, _ . - (starting with a letter or "
                                        "digit)")
    return value


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a named model."""

    name: str
    version: int
    path: str
    content_hash: str
    config: dict
    metrics: dict
    stage: str
    created_at: float

    @property
    def key(self) -> str:
        """"name:version", the model_version label of metrics, responses and logs."""
        return f"{self.name}:{self.version}"

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "key": self.key, "path": self.path,
                "content_hash": self.content_hash, "config": self.config, "metrics": self.metrics,
                "stage": self.stage, "created_at": self.created_at}


@dataclass(frozen=True)
class Arm:
    """An experiment arm: its share of the traffic and the version it serves (None: the production one)."""

    name: str
    weight: float
    version: int | None = None


@dataclass(frozen=True)
class Experiment:
    """An A/B test of one model: weighted arms, an optional shadow version, a start and (once stopped) a stop."""

    name: str
    model: str
    arms: tuple[Arm, ...]
    started_at: float
    stopped_at: float | None = None
    shadow_version: int | None = None
    shadow_fraction: float = 0.0

    def active(self, now: float) -> bool:
        """Whether the experiment routes traffic at `now`."""
        return self.started_at <= now and (self.stopped_at is None or now < self.stopped_at)

    def as_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "started_at": self.started_at, "stopped_at": self.stopped_at,
                "arms": [{"arm": a.name, "weight": a.weight, "version": a.version} for a in self.arms],
                "shadow": None if self.shadow_version is None else {"version": self.shadow_version,
                                                                    "fraction": self.shadow_fraction}}
