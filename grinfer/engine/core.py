"""EngineCore: the synchronous engine loop body (schedule -> execute -> update), no threads."""

from __future__ import annotations

import time

import torch

from grinfer.config import EngineConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine.backends import make_backend
from grinfer.engine.kv_cache import KVCache
from grinfer.engine.request import ContextTooLarge, EngineError, RankRequest, RankResult
from grinfer.engine.runner import ModelRunner
from grinfer.engine.scheduler import RequestState, Scheduler, context_signature
from grinfer.features.device import DeviceFeaturizer
from grinfer.model.mtgr import MTGR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_blocks(config: EngineConfig, bytes_per_token: int, device: torch.device) -> int:
    """Number of KV blocks the device tier gets: a byte budget, or a fraction of free CUDA memory."""
    budget = config.kv_cache_bytes
    if device.type == "cuda" and budget == 0:
        budget = int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
    return budget // (bytes_per_token * config.block_size)


class EngineCore:
    """Holds model, KV cache, scheduler and runner; `step()` advances every admitted request."""

    def __init__(self, model: MTGR, catalog: ItemCatalog, config: EngineConfig):
        if model.cfg.mask != "dynamic":
            raise ValueError(f"mask: the engine serves MTGR's dynamic mask (candidates never see each other), "
                             f"got {model.cfg.mask!r}; score such a model uncached")
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the float32 attention of the eager path
        dtype = DTYPES[config.dtype]
        self.model = model.to(self.device, dtype).eval()
        cfg = model.cfg
        backend = make_backend(config.backend, self.model, config)
        per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.head_dim, dtype)
        # candidates of one step: at most max_batch_tokens, each item's starting on a page of their own
        scratch = -(-config.max_batch_tokens // config.block_size) + config.max_batch_requests
        self.cache = KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, config.block_size,
                             cache_blocks(config, per_token, self.device), dtype, self.device,
                             host_bytes=config.host_cache_bytes, scratch_blocks=scratch if backend.keys_in_pool else 0)
        self.scheduler = Scheduler(config, self.cache, cfg.num_layers)
        self.runner = ModelRunner(backend, self.cache,
                                  DeviceFeaturizer(catalog, cfg.num_time_buckets, self.device), self.device)
        self.num_profile_tokens = len(cfg.profile_cardinalities)
        self.steps = 0
        self.last_step: dict = {}

    def prepare(self, request: RankRequest) -> RequestState:
        """Validate a request and build its state, touching nothing shared (raises ContextTooLarge / ValueError)."""
        n_rt = len(request.context.items) - request.context.num_static
        if n_rt > self.config.max_realtime:
            raise ValueError(f"context: {n_rt} real-time events exceed max_realtime={self.config.max_realtime}; "
                             "roll older events into the static history")
        state = RequestState(request, context_signature(request, self.num_profile_tokens))
        if not self.cache.fits(state.context_len):
            raise ContextTooLarge(f"context of {state.context_len} tokens exceeds the KV cache "
                                  f"({self.cache.num_blocks} blocks of {self.cache.block_size})")
        return state

    def add(self, request: RankRequest | RequestState) -> RequestState:
        """Admit a request to the queue (raises Overloaded / ContextTooLarge / ValueError)."""
        state = request if isinstance(request, RequestState) else self.prepare(request)
        self.scheduler.add(state)
        return state

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[RequestState, RankResult | EngineError | Exception]]:
        """One engine step; returns the requests that finished or failed in it."""
        plan = self.scheduler.schedule()
        out: list[tuple[RequestState, RankResult | EngineError | Exception]] = []
        for state, error in plan.failed:
            # an expired request keeps its user's entry: K/V are only written past the committed prefix
            self.scheduler.finish(state, ok=True)
            out.append((state, error))
        if not plan.items:
            return out
        start = time.perf_counter()
        try:
            self.runner.execute(plan)
        except Exception as exc:  # a failing batch fails its requests, never the engine
            for item in plan.items:
                self.scheduler.finish(item.state, ok=False)
                out.append((item.state, exc))
            return out
        self.steps += 1
        self.last_step = {"requests": len(plan.items), "tokens": sum(i.tokens for i in plan.items),
                          "seconds": time.perf_counter() - start, "layers": plan.layers}
        now = time.monotonic()
        for state in self.scheduler.update(plan):
            out.append((state, self.scheduler.expired(state, now) or self._result(state, now)))
        return out

    def _result(self, state: RequestState, now: float) -> RankResult:
        logits = torch.cat(state.logits) if state.logits else torch.zeros(0, len(self.model.cfg.tasks))
        req, lookup = state.request, state.lookup
        return RankResult(req.request_id, torch.sigmoid(logits), lookup.status, lookup.cached_tokens,
                          lookup.compute_tokens, state.started - req.arrival, now - req.arrival, state.steps)

    def run_until_done(self) -> list[tuple[RequestState, RankResult | EngineError | Exception]]:
        """Step until nothing is queued or running (tests and offline scoring)."""
        out = []
        while self.has_work():
            out.extend(self.step())
        return out

    def device_bytes(self) -> int:
        """Bytes held on the device: CUDA's allocator count, or on the CPU the weights and the KV pool."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        tensors = [*self.model.parameters(), *self.model.buffers(), self.cache.k, self.cache.v]
        return sum(t.numel() * t.element_size() for t in tensors)

    def stats(self) -> dict:
        """Plain stats: queue, running, KV cache, last step."""
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "steps": self.steps, "kv_cache": self.cache.snapshot(), "last_step": self.last_step}
