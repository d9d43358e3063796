"""The fused backend against eager on a GPU, compiled kernels (the tests run them in Triton's interpreter).

    python scripts/check_fused_engine.py            # exits 1 when a difference exceeds its bound
    TRITON_INTERPRET=1 python scripts/check_fused_engine.py --smoke   # mtgr-tiny on the CPU: the script runs

Per preset (head dims 16 and 256) and dtype: ragged cold requests, then new real-time events over the
cached contexts (partial hits), then exact repeats (hits), with CUDA graphs on and off; every result
is compared with the eager backend's on the same requests.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from grinfer.bench.workloads import bench_catalog, make_requests, workload
from grinfer.config import EngineConfig
from grinfer.engine import EngineCore, RankRequest
from grinfer.model import build_model

BOUNDS = {"float32": 2e-3, "bfloat16": 2e-2}  # max |fused - eager| of probabilities (eager's matmuls are TF32)


def rounds(preset: str, rng: np.random.Generator) -> list[list]:
    users = [f"u{i}" for i in range(6)]
    shapes = [workload("R2", preset=preset, batch=1, static=s, realtime=r, candidates=c)
              for s, r, c in [(40, 5, 30), (0, 3, 7), (90, 0, 12), (7, 9, 1), (33, 2, 64), (1, 1, 5)]]
    cold = [make_requests(w, [u], rng)[0] for w, u in zip(shapes, users)]
    warm = [make_requests(w, [r.user], rng, base_events={r.user: r.context})[0] for w, r in zip(shapes, cold)]
    again = [RankRequest(r.user, r.history_version, r.context, r.candidates, r.request_ts) for r in warm]
    return [cold, warm, again]


def run(preset: str, dtype: str, backend: str, graphs: bool, device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    cfg = workload("R2", preset=preset).model_config()
    core = EngineCore(build_model(cfg), bench_catalog(),
                      EngineConfig(backend=backend, device=device, dtype=dtype, kv_cache_bytes=1 << 30,
                                   cuda_graphs=graphs, block_size=32))
    out = []
    for requests in rounds(preset, np.random.default_rng(1)):
        for r in requests:
            core.add(r)
        results = {state.request.user: res for state, res in core.run_until_done()}
        out += [results[r.user].probabilities for r in requests]
    return out


def main() -> int:
    smoke = "--smoke" in sys.argv
    device = "cpu" if smoke else "cuda"
    worst = []
    for preset in ("mtgr-tiny",) if smoke else ("mtgr-tiny", "mtgr-small"):
        for dtype in ("float32",) if smoke else ("float32", "bfloat16"):
            eager = run(preset, dtype, "eager", False, device)
            for graphs in (False,) if smoke else (True, False):
                fused = run(preset, dtype, "fused", graphs, device)
                diff = max(float((a - b).abs().max()) for a, b in zip(fused, eager))
                ok = diff <= BOUNDS[dtype]
                worst.append(ok)
                print(f"{preset:<11} {dtype:<9} graphs={graphs!s:<5} max |fused - eager| = {diff:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    return 0 if all(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
