"""GPU utilisation and memory sampled through NVML in a background thread, for the serving benchmarks.

NVML sees the whole device, so the numbers cover the server process however it was started. Without
NVML (no `pynvml`, no driver, a CPU run) a sampler is unavailable and reports no statistics.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuStats:
    """Utilisation in percent (NVML's busy-time share over its own sample period) and memory in MiB."""

    samples: int
    util_median: float
    util_max: float
    mem_used_max_mib: float
    mem_total_mib: float


def summarise(util: list[float], mem_used_mib: list[float], mem_total_mib: float) -> GpuStats | None:
    """Median / max utilisation and peak memory of a list of samples; None when there are none."""
    if not util:
        return None
    return GpuStats(samples=len(util), util_median=statistics.median(util), util_max=max(util),
                    mem_used_max_mib=max(mem_used_mib), mem_total_mib=mem_total_mib)


def nvml_index(device: str) -> int | None:
    """NVML's index of 'cuda' / 'cuda:N' (NVML ignores CUDA_VISIBLE_DEVICES); None for other devices."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    try:
        return int(index or 0)
    except ValueError:
        raise ValueError(f"--device: expected cuda or cuda:N, got {device!r}") from None


class GpuSampler:
    """`with GpuSampler(index) as s: ...; s.stats()`: samples every `interval_s` while the block runs.

    `available` is False (and `stats()` None) when NVML cannot be loaded or has no such device; the
    reason is in `unavailable_reason`.
    """

    def __init__(self, index: int | None, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.unavailable_reason: str | None = None
        self._nvml = self._handle = None
        self._util: list[float] = []
        self._mem: list[float] = []
        self._total_mib = 0.0
        self.gpu_name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if index is None:
            self.unavailable_reason = "not a CUDA device"
            return
        try:
            import pynvml  # pyright: ignore[reportMissingImports] (optional, GPU hosts)

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._total_mib = pynvml.nvmlDeviceGetMemoryInfo(self._handle).total / 2**20
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = name.decode() if isinstance(name, bytes) else name
            self._nvml = pynvml
        except Exception as exc:  # ImportError, or any NVMLError (no driver, no such device)
            self.unavailable_reason = f"NVML unavailable: {type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _sample(self) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        self._util.append(float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
        self._mem.append(nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> GpuSampler:
        self._util.clear()
        self._mem.clear()
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def stats(self) -> GpuStats | None:
        """Statistics of the samples of the last `with` block (None without NVML)."""
        return summarise(self._util, self._mem, self._total_mib) if self.available else None

    def close(self) -> None:
        """Shut NVML down (once; the sampler is unusable afterwards)."""
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
