"""Profile a few training steps of retrieval (hstu-ml1m) and ranking (mtgr-small): where does the time go?"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from grinfer.config import preset
from grinfer.data import load_dataset
from grinfer.features import Featurizer, retrieval_batch
from grinfer.model import build_model
from grinfer.train.ranking import ContextLimits, training_requests
from grinfer.train.run import config_for

data = sys.argv[1] if len(sys.argv) > 1 else "synthetic"
dev = "cuda" if torch.cuda.is_available() else "cpu"
ds = load_dataset(data)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])

m = build_model(config_for(preset("hstu-ml1m"), ds)).to(dev)
opt = torch.optim.AdamW(m.parameters())
seqs = [(u.items[-201:], u.timestamps[-201:]) for u in ds.users[:128]]
t = time.perf_counter()
b = retrieval_batch(seqs, True).to(dev)
print("retrieval batch build", time.perf_counter() - t)


def ret_step():
    loss = m.sampled_softmax_loss(b, 128)
    opt.zero_grad()
    loss.backward()
    opt.step()


for _ in range(3):
    ret_step()
with profile(activities=acts) as p:
    for _ in range(3):
        ret_step()
    if dev == "cuda":
        torch.cuda.synchronize()
key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
print(p.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40))

cfg = config_for(preset("mtgr-small"), ds)
r = build_model(cfg).to(dev)
opt = torch.optim.AdamW(r.parameters())
fz = Featurizer(ds.catalog, cfg.num_time_buckets)
reqs = training_requests(ds, cfg.tasks, ContextLimits())[:128]
t = time.perf_counter()
for _ in range(3):
    batch = fz.rank_batch(reqs)
print("rank batch build (128 requests)", (time.perf_counter() - t) / 3)
batch = batch.to(dev)


def rank_step():
    loss = torch.nn.functional.binary_cross_entropy_with_logits(r(batch), batch.labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


for _ in range(3):
    rank_step()
if dev == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(5):
    rank_step()
if dev == "cuda":
    torch.cuda.synchronize()
print("rank step", (time.perf_counter() - t) / 5)
t = time.perf_counter()
for _ in range(5):
    ret_step()
if dev == "cuda":
    torch.cuda.synchronize()
print("retrieval step", (time.perf_counter() - t) / 5)
