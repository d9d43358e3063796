"""Profile engine steps of a workload (host and device time per phase):

    python scripts/profile_engine.py R1-warm 32 [eager|compiled|fused]
"""

import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from grinfer.bench.workloads import bench_catalog, make_requests, workload
from grinfer.config import EngineConfig
from grinfer.engine import EngineCore
from grinfer.model import build_model

name, batch = sys.argv[1], int(sys.argv[2])
backend = sys.argv[3] if len(sys.argv) > 3 else "eager"
dev = "cuda" if torch.cuda.is_available() else "cpu"
w = workload(name, batch=batch, **({} if dev == "cuda" else {"preset": "mtgr-tiny", "static": 200}))
settings = {"dtype": "bfloat16", "kv_cache_bytes": 8 << 30} if dev == "cuda" else {"dtype": "float32"}
core = EngineCore(build_model(w.model_config()), bench_catalog(),
                  EngineConfig(backend=backend, device=dev, max_batch_tokens=batch * 2000, max_batch_requests=batch,
                               **settings))
rng = np.random.default_rng(0)
users = [f"u{i}" for i in range(batch)]
base = None
if w.warm:
    warm = make_requests(w, users, rng, realtime=w.realtime - w.new_events, num_candidates=0)
    base = {r.user: r.context for r in warm}
    for r in warm:
        core.add(r)
    core.run_until_done()


def one_batch(i):
    fresh = [f"c{i}{u}" for u in users]
    reqs = make_requests(w, users, rng, base_events=base) if w.warm else make_requests(w, fresh, rng)
    for r in reqs:
        core.add(r)
    core.run_until_done()


for i in range(3):
    one_batch(i)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
with profile(activities=acts) as p:
    for i in range(3):
        one_batch(10 + i)
    if dev == "cuda":
        torch.cuda.synchronize()
table = p.key_averages()
print(table.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=45))
if dev == "cuda":
    print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=45))
