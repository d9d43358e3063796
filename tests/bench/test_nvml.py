"""The NVML sampler: statistics of samples, device-index parsing, and the sampling thread (driven by a
stand-in `pynvml` module: this machine has no GPU; the GPU run uses the real one)."""

from __future__ import annotations

import sys
import time
import types

import pytest

from grinfer.bench.nvml import GpuSampler, nvml_index, summarise


def test_summarise_median_max_and_peak_memory():
    stats = summarise([0.0, 50.0, 90.0, 20.0], [100.0, 300.0, 200.0, 250.0], 1000.0)
    assert (stats.samples, stats.util_median, stats.util_max) == (4, 35.0, 90.0)
    assert (stats.mem_used_max_mib, stats.mem_total_mib) == (300.0, 1000.0)
    assert summarise([], [], 1000.0) is None


def test_nvml_index():
    assert nvml_index("cuda") == 0 and nvml_index("cuda:3") == 3
    assert nvml_index("cpu") is None
    with pytest.raises(ValueError, match="--device"):
        nvml_index("cuda:first")


def test_no_cuda_device_means_no_statistics():
    sampler = GpuSampler(None)
    with sampler:
        pass
    assert not sampler.available and sampler.stats() is None and sampler.unavailable_reason


def _stand_in_nvml(util: list[int]) -> types.ModuleType:
    """A pynvml with one 8 GiB device whose utilisation readings follow `util`, then repeat the last."""
    readings = iter(util)
    last = [util[0]]
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("dev", i)
    mod.nvmlDeviceGetName = lambda h: b"Stand-in GPU"
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=8 << 30, used=2 << 30)

    def rates(h):
        last[0] = next(readings, last[0])
        return types.SimpleNamespace(gpu=last[0])

    mod.nvmlDeviceGetUtilizationRates = rates
    return mod


def test_sampler_thread_collects_while_the_block_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_nvml([10, 80, 30]))
    sampler = GpuSampler(0, interval_s=0.01)
    assert sampler.available and sampler.gpu_name == "Stand-in GPU"
    with sampler:
        time.sleep(0.2)
    stats = sampler.stats()
    assert stats.samples >= 3 and stats.util_max == 80.0 and stats.util_median == 30.0
    assert stats.mem_used_max_mib == 2048.0 and stats.mem_total_mib == 8192.0
    with sampler:  # a new block starts from no samples
        pass
    assert sampler.stats().samples == 1
    sampler.close()
    assert not sampler.available


def test_a_missing_device_is_unavailable_not_an_error(monkeypatch):
    mod = _stand_in_nvml([0])

    def no_device(i):
        raise RuntimeError("Invalid Argument")

    mod.nvmlDeviceGetHandleByIndex = no_device
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    sampler = GpuSampler(7)
    assert not sampler.available and "Invalid Argument" in sampler.unavailable_reason
