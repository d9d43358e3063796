"""EngineCore: the engine loop body (schedule -> launch -> update), no threads of its own.

With `EngineConfig.pipeline_depth` = 1 each step is launched and waited for before the next is planned
(the synchronous reference). With 2 the next step is planned, prepared and launched while the previous
one still runs on the device, and the previous one is then waited for: progress advances at schedule
time (scheduler.py), so planning never waits for a result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from pathlib import Path

import torch

from grinfer.config import EngineConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine.backends import EagerBackend, make_backend
from grinfer.engine.backends.baseline import BaselineScorer
from grinfer.engine.backends.onnx import OnnxScorer
from grinfer.engine.block_manager import BlockManager
from grinfer.engine.kv_cache import KVCache
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.request import ContextTooLarge, EngineError, RankRequest, RankResult
from grinfer.engine.runner import ModelRunner, StepOutput
from grinfer.engine.scheduler import RequestState, Scheduler, StepPlan
from grinfer.engine.signature import context_signature
from grinfer.engine.strategy import BASELINE, BackendChain, StepTimeout, reason_of
from grinfer.engine.tiers import DiskTier, HostTier, Tier
from grinfer.features.device import DeviceFeaturizer
from grinfer.features.featurizer import Featurizer
from grinfer.model.mtgr import MTGR
from grinfer.model.quantize_dense import quantize_dense

log = logging.getLogger("grinfer.engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Finished = list[tuple[RequestState, RankResult | EngineError | Exception]]


def cache_blocks(config: EngineConfig, bytes_per_token: int, device: torch.device) -> int:
    """Number of KV blocks the device tier gets: a byte budget, or a fraction of free CUDA memory."""
    budget = config.kv_cache_bytes
    if device.type == "cuda" and budget == 0:
        budget = int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
    return budget // (bytes_per_token * config.block_size)


def model_fingerprint(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """A short hash of the model's config, dtype and weights (the first 64 KiB of every tensor): the key
    under which its K/V may be kept across restarts."""
    h = hashlib.sha1(f"{getattr(model, 'cfg', '')}|{dtype}".encode())
    for name, t in model.state_dict().items():
        if type(t) is not torch.Tensor:  # a low-precision weight (grinfer.model.quantize_dense): its values
            t = t.dequantize()
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[:65536 // max(flat.element_size(), 1)].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def make_tiers(config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype) -> list[Tier]:
    """The lower tiers the config asks for, first to last: host memory, then disk (its directory keyed by
    the model's fingerprint, hashed only when there is a disk tier)."""
    disk = None
    if config.disk_cache_bytes and config.disk_cache_dir:
        name = model_fingerprint(model, dtype)
        if (config.dense, config.kv_dtype) != ("none", "model"):  # other weights or K/V bytes: other files
            name += f"-{config.dense}-{config.kv_dtype}"
        directory = Path(config.disk_cache_dir).expanduser() / name
        disk = DiskTier(directory, config.disk_cache_bytes)
    if config.host_cache_bytes:
        return [HostTier(config.host_cache_bytes, lower=disk)]
    return [disk] if disk is not None else []


class EngineCore:
    """Holds model, KV cache, scheduler and runner; `step()` advances every admitted request."""

    def __init__(self, model: MTGR, catalog: ItemCatalog, config: EngineConfig):
        if model.cfg.mask != "dynamic":
            raise ValueError(f"mask: the engine serves MTGR's dynamic mask (candidates never see each other), "
                             f"got {model.cfg.mask!r}; score such a model uncached")
        _check_precision(config)
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the float32 attention of the eager path
        dtype = DTYPES[config.dtype]
        assert config.dense is not None  # EngineConfig refuses an unresolved dense mode
        self.model = quantize_dense(model.to(self.device, dtype).eval(), config.dense)
        cfg = model.cfg
        baseline = BaselineScorer(self.model, Featurizer(catalog, cfg.num_time_buckets), self.device)
        backend = self._primary(config, baseline)
        per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.head_dim, dtype, config.kv_dtype)
        # candidates of one step: at most max_batch_tokens, each item's starting on a page of their own
        scratch = -(-config.max_batch_tokens // config.block_size) + config.max_batch_requests
        manager = BlockManager(cache_blocks(config, per_token, self.device), config.block_size)
        self.pool = KVPool(cfg.num_layers, cfg.num_heads, cfg.head_dim, config.block_size, manager.num_blocks,
                           dtype, self.device, scratch_blocks=scratch if backend.keys_in_pool else 0,
                           kv_dtype=config.kv_dtype)
        self.cache = KVCache(manager, self.pool, make_tiers(config, self.model, dtype))
        self.scheduler = Scheduler(config, self.cache, cfg.num_layers)
        names, backends = [backend.name], [backend]
        if config.fallback and backend.name != "eager" and not getattr(backend, "uncached", False):
            names.append("eager")
            backends.append(EagerBackend(self.model, config))
        if backend is baseline:
            names, backends = [], []
        self.chain = BackendChain([*names, BASELINE])
        featurizer = DeviceFeaturizer(catalog, cfg.num_time_buckets, self.device)
        self.runner = ModelRunner([*backends, baseline], self.pool, featurizer, self.device,
                                  pipelined=config.pipeline_depth > 1 and config.cpu_device_thread,
                                  step_timeout_s=config.step_timeout_s)
        self.num_profile_tokens = len(cfg.profile_cardinalities)
        self.inflight: deque[tuple[StepPlan, StepOutput, float]] = deque()
        self.steps = 0
        self.last_step: dict = {}
        self.host_seconds = {"schedule": 0.0, "wait": 0.0, "result": 0.0}  # host time per phase, summed

    def _primary(self, config: EngineConfig, baseline: BaselineScorer):
        """The backend steps run on first: a layer-stack backend, or an uncached scorer (baseline, onnx)."""
        if config.backend == "baseline":
            return baseline
        if config.backend == "onnx":
            if not config.onnx_path:
                raise ValueError("backend: 'onnx' needs onnx_path, the exported ranking graph (grinfer export onnx)")
            return OnnxScorer(self.model, baseline.featurizer, self.device, config.onnx_path)
        return make_backend(config.backend, self.model, config)

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
        return self.scheduler.has_work() or bool(self.inflight)

    def step(self) -> Finished:
        """Plan and launch one step, then wait for the oldest step in flight once `pipeline_depth` are (or
        when there is nothing new to launch); returns the requests that finished or failed."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        self.host_seconds["schedule"] += time.perf_counter() - t0
        out: Finished = []
        for state, error in plan.failed:  # expired with nothing in flight: their entries stay cached
            self.runner.forget(state)
            out.append((state, error))
        if plan.items:
            start = time.perf_counter()
            self.inflight.append((plan, self._launch(plan, self.chain.first()), start))
        while self.inflight and (len(self.inflight) >= self.config.pipeline_depth or not plan.items):
            out.extend(self._complete(*self.inflight.popleft()))
        return out

    def _launch(self, plan: StepPlan, level: int, inline: bool = False) -> StepOutput:
        try:
            return self.runner.launch(plan, level, inline)
        except Exception as exc:  # a failing batch fails (or falls back), never the engine
            return StepOutput([], level, done=_raiser(exc))

    def _complete(self, plan: StepPlan, output: StepOutput, start: float) -> Finished:
        """Wait for a launched step (re-running it down the backend chain if it failed), commit it and
        resolve the requests it finished."""
        t0 = time.perf_counter()
        error = _wait(output)
        fell_back = False
        while error is not None and self._may_fall_back(output, error):
            if isinstance(error, StepTimeout):
                self.runner.abandon_worker()  # the hung step's thread is left behind
            level = self.chain.failed(output.level, reason_of(error))
            log.warning("step of %d requests failed on %s (%s: %s); re-running it on %s", len(plan.items),
                        self.chain.names[output.level], type(error).__name__, error, self.chain.names[level])
            output = self._launch(plan, level, inline=True)
            error, fell_back = _wait(output), True
        if error is None:
            self.chain.succeeded(output.level)
        if fell_back:  # later steps in flight may have read this one's K/V: run them again, in order
            self._relaunch_inflight()
        t1 = time.perf_counter()
        self.host_seconds["wait"] += t1 - t0
        if error is None:
            self.runner.complete(plan, output)
            self.steps += 1
            self.last_step = {"requests": len(plan.items), "tokens": sum(i.tokens for i in plan.items),
                              "seconds": time.perf_counter() - start, "layers": plan.layers}
        now = time.monotonic()
        out: Finished = []
        for state in self.scheduler.update(plan, error):
            if state.error is not None:
                self.runner.forget(state)
                out.append((state, state.error))
            else:
                out.append((state, self.scheduler.expired(state, now) or self._result(state, now)))
        self.host_seconds["result"] += time.perf_counter() - t1
        return out

    def _may_fall_back(self, output: StepOutput, error: Exception) -> bool:
        return self.config.fallback and not isinstance(error, EngineError) and output.level < len(self.chain.names) - 1

    def _relaunch_inflight(self) -> None:
        relaunched = deque()
        for plan, output, start in self.inflight:
            _wait(output)  # its result is discarded
            relaunched.append((plan, self._launch(plan, self.chain.first(), inline=True), start))
        self.inflight = relaunched

    def _result(self, state: RequestState, now: float) -> RankResult:
        probs = torch.sigmoid(self.runner.pop_logits(state, len(self.model.cfg.tasks)))
        req, lookup = state.request, state.lookup
        assert lookup is not None and state.started is not None  # a finished request was started
        return RankResult(req.request_id, probs, lookup.status, lookup.cached_tokens,
                          lookup.compute_tokens, state.started - req.arrival, now - req.arrival, state.steps)

    def run_until_done(self) -> Finished:
        """Step until nothing is queued, running or in flight (tests and offline scoring)."""
        out = []
        while self.has_work():
            out.extend(self.step())
        return out

    def close(self) -> None:
        """Stop the runner's worker and move the cached K/V down to the tiers (a disk tier keeps them for
        the next start)."""
        self.runner.close()
        self.cache.close()

    def device_bytes(self) -> int:
        """Bytes held on the device: CUDA's allocator count, or on the CPU the weights and the KV pool."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        weights = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in weights) + self.pool.nbytes()

    def stats(self) -> dict:
        """Plain stats: queue, running, KV cache, last step."""
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "steps": self.steps, "kv_cache": self.cache.snapshot(), "last_step": self.last_step,
                "pipeline_depth": self.config.pipeline_depth, "phase_seconds": self.phase_seconds(),
                "strategy": self.chain.stats()}

    def phase_seconds(self) -> dict[str, float]:
        """Host seconds spent per phase of the steps so far: schedule, featurize, indices, launch (queueing the
        device work; all of it where the device is the calling thread), wait (for the device), result."""
        r, c = self.runner.host_seconds, self.host_seconds
        return {"schedule": c["schedule"], "featurize": r["featurize"], "indices": r["indices"],
                "launch": r["launch"], "wait": c["wait"], "result": c["result"]}


def _check_precision(config: EngineConfig) -> None:
    """Low precision runs where the layer stack is PyTorch's or the fused kernels' (eager, compiled, fused, and
    the uncached baseline); the exported graphs (onnx, aoti) hold full-precision weights and K/V."""
    if config.dense != "none" and config.backend in ("onnx", "aoti"):
        raise ValueError(f"dense: backend {config.backend!r} runs a graph exported at full precision; "
                         "low-precision layers run on eager, compiled or fused")
    if config.kv_dtype != "model" and config.backend == "aoti":
        raise ValueError("kv_dtype: backend 'aoti' reads K/V in the model's dtype; 8-bit K/V run on eager, "
                         "compiled or fused")


def _wait(output: StepOutput) -> Exception | None:
    try:
        output.wait()
    except Exception as exc:
        return exc
    return None


def _raiser(exc: Exception):
    def done(*_):
        raise exc
    return done
