"""`--backend auto`'s probe (engine/probe.py): every backend is checked against eager and timed; one that
cannot run or disagrees is reported unhealthy with the reason and never chosen."""

from __future__ import annotations

import time

import pytest
import torch

from grinfer.config import EngineConfig
from grinfer.engine.backends import BACKENDS, EagerBackend
from grinfer.engine.probe import Probe, available_backends, choose, format_probes, probe_backends


class Unavailable(EagerBackend):
    """A backend that cannot be built here."""

    name = "unavailable"

    def __init__(self, model, config=None):
        raise ValueError("backend: 'unavailable' runs on a device this machine does not have")


class Skewed(EagerBackend):
    """Eager with its logits shifted: it runs, but disagrees."""

    name = "skewed"

    def head(self, x):
        return super().head(x) + 0.1


def test_the_probe_checks_times_and_reports_each_backend(model, catalog, monkeypatch):
    monkeypatch.setitem(BACKENDS, "skewed", Skewed)
    monkeypatch.setitem(BACKENDS, "unavailable", Unavailable)
    config = EngineConfig()
    names = ["eager", "unavailable", "skewed", "compiled"]
    # compiled is skipped (as auto skips aoti while its package is exported); eager, the reference, cannot be
    probes = {p.backend: p for p in probe_backends(model, catalog, config, names, repeats=2,
                                                   skipped={"compiled": "exporting", "eager": "ignored"})}
    assert list(probes) == ["eager", "unavailable", "skewed", "compiled"]
    assert probes["compiled"] == Probe("compiled", False, error="not probed: exporting")
    eager = probes["eager"]
    assert eager.healthy and eager.max_error == 0.0 and eager.probe_ms > 0 and eager.ready_s > 0
    assert not probes["unavailable"].healthy and "does not have" in probes["unavailable"].error
    assert not probes["skewed"].healthy and "disagrees with eager" in probes["skewed"].error
    assert choose(list(probes.values())).backend == "eager"
    table = format_probes(list(probes.values()), "eager")
    assert "serving" in table.splitlines()[1] and "disagrees with eager" in table


class Slow(EagerBackend):
    """Eager with a build that takes longer than the probe's budget."""

    name = "slow"

    def __init__(self, model, config=None):
        time.sleep(1.0)
        super().__init__(model, config)


def test_a_backend_over_the_budget_is_not_probed(model, catalog, monkeypatch):
    monkeypatch.setitem(BACKENDS, "slow", Slow)
    probes = probe_backends(model, catalog, EngineConfig(), ["eager", "slow"], repeats=3, budget_s=0.3)
    assert probes[0].healthy and probes[0].probe_ms > 0  # eager has no budget; one timed round past it
    assert probes[1] == Probe("slow", False, ready_s=0.3, error="not probed: over budget (its build took more "
                                                                "than 0.3 s)")
    assert choose(probes).backend == "eager"


def test_the_fastest_healthy_backend_is_chosen():
    probes = [Probe("eager", True, 9.0), Probe("compiled", True, 3.0), Probe("fused", False, error="x")]
    assert choose(probes).backend == "compiled"


def test_available_backends_on_the_cpu():
    names = available_backends(torch.device("cpu"))
    assert names[0] == "eager" and "fused" not in names
    assert ("aoti" in names) == ("compiled" in names)  # both need the C++ compiler here


def test_auto_is_the_served_default():
    from grinfer.config import ServerConfig

    assert ServerConfig().engine.backend == "auto"
    with pytest.raises(ValueError):
        ServerConfig(engine={"backend": "nope"})
