"""Executes a step: one jagged batch of new tokens through the backend over the paged KV pool.

New requests are featurized and embedded once; the step's indices (engine/step.py) are built from the
pages each work item carries; the backend runs the layers over the step's new tokens (`Backend.run_layers`:
new context K/V written into the pool, each query attending over its user's cached context plus the
step's candidates). Candidates' final states go through the heads.

The runner owns every per-request tensor (embeddings, a layer-chunked context's hidden states, the logits
so far) in a table keyed by request. `launch(plan)` prepares on the host and queues the device work
without waiting for it: on CUDA the kernels are queued on the stream and the logits come back through a
non-blocking copy into pinned memory with an event; on the CPU the device part runs inline, or, with
EngineConfig.cpu_device_thread, on a worker thread in order while the host prepares step N+1.
`StepOutput.wait()` joins the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import cast

import torch
from torch.profiler import record_function

from grinfer.engine.kv_pool import KVPool
from grinfer.engine.scheduler import RequestState, StepPlan
from grinfer.engine.step import SequenceRows, TokenBatch, batch_rows, build_step_index, split_batch
from grinfer.engine.strategy import NonFiniteOutput, StepTimeout
from grinfer.features.device import DeviceFeaturizer
from grinfer.features.featurizer import FeatureRequest


@dataclass
class _RequestTensors:
    """The runner's state of one request."""

    embedded: SequenceRows | None = None  # its full sequence [U | S | R | C] in an embedded batch
    # a layer-chunked context's hidden states by the layer they enter (kept so a failed chunk can re-run)
    layer_states: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: list[torch.Tensor] = field(default_factory=list)  # [n, tasks] float32 host, per step


@dataclass
class StepOutput:
    """A launched step on chain backend `level`: `wait()` blocks until it is done and raises what its device
    part raised (NonFiniteOutput for NaN or infinity, StepTimeout past the timeout)."""

    counts: list[int]  # candidates scored per work item, in plan order
    level: int = 0
    logits: torch.Tensor | None = None  # [sum(counts), tasks] float32 on the host once done
    done: Callable[..., object] | None = None
    finite: torch.Tensor | None = None  # a device/host bool: whether the step's outputs are all finite
    timeout_s: float | None = None

    def wait(self) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            try:
                result = done(self.timeout_s) if self.timeout_s else done()
            except FutureTimeout:
                raise StepTimeout(f"step did not finish within {self.timeout_s:g} s") from None
            if isinstance(result, tuple):
                self.logits, self.finite = result
        if self.finite is not None and not bool(self.finite):
            raise NonFiniteOutput("the step's outputs hold NaN or infinity")


class ModelRunner:
    """Runs StepPlans over the KV pool with the chain's backends (`backends[i]` for chain level i, the last
    being the uncached baseline); keeps each request's tensors until it finishes."""

    def __init__(self, backends: list, pool: KVPool, featurizer: DeviceFeaturizer, device: torch.device,
                 pipelined: bool = False, step_timeout_s: float = 0.0):
        self.backends, self.pool, self.featurizer, self.device = backends, pool, featurizer, device
        self.backend = backends[0]  # the primary (warm-up and stats address it)
        self.baseline = backends[-1]
        self.dtype = next(self.backend.model.parameters()).dtype
        self.step_timeout_s = step_timeout_s
        self.table: dict[int, _RequestTensors] = {}
        self.host_seconds = {"featurize": 0.0, "indices": 0.0, "launch": 0.0}  # host time per part, summed
        # CPU kernels run on the calling thread: a worker thread may play the role of the CUDA stream
        self.pipelined = pipelined and device.type == "cpu"
        self._worker = self._new_worker()

    def _new_worker(self) -> ThreadPoolExecutor | None:
        return ThreadPoolExecutor(1, thread_name_prefix="grinfer-device") if self.pipelined else None

    @torch.inference_mode()
    def launch(self, plan: StepPlan, level: int = 0, inline: bool = False) -> StepOutput:
        """Prepare the plan on the host (embed new requests, build indices) and queue its device work on
        chain backend `level` (requests already served by the baseline stay on it); `inline` runs the
        device part on the calling thread even when pipelined (a re-run after a failure)."""
        counts = [it.cand_end - it.cand_start for it in plan.items]
        if getattr(self.backends[level], "uncached", False):
            return self._launch_uncached(plan, counts, level)
        items = [it for it in plan.items if it.tokens and not it.state.uncached]
        if not items:
            return self._launch_uncached(plan, counts, len(self.backends) - 1) \
                if any(it.state.uncached for it in plan.items) else StepOutput(counts, level)
        t0 = time.perf_counter()
        with record_function("grinfer.embed"):
            self._embed([it.state for it in items if self._tensors(it.state).embedded is None])
        embedded = cast(list[SequenceRows], [self.table[it.state.key].embedded for it in items])  # all embedded now
        t1 = time.perf_counter()
        with record_function("grinfer.index"):
            idx = build_step_index(items, embedded, self.pool, self.device,
                                   dense_keys=not self.backends[level].keys_in_pool)
        t2 = time.perf_counter()
        self.host_seconds["featurize"] += t1 - t0
        self.host_seconds["indices"] += t2 - t1
        run = self._device_part(plan, items, idx, self.backends[level])
        output = StepOutput(counts, level, timeout_s=self.step_timeout_s or None)
        if self._worker is not None and not inline:
            output.done = self._worker.submit(run).result
        else:
            output.logits, output.finite = run()
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                output.done = lambda *_: event.synchronize()
        self.host_seconds["launch"] += time.perf_counter() - t2
        return output

    def _device_part(self, plan: StepPlan, items, idx, backend):
        """The step's device work as a function: (host logits or None, all-finite flag)."""
        first, last = plan.layers
        chunked = self.table[items[0].state.key]
        baseline_items = [it for it in plan.items if it.state.uncached and it.cand_end > it.cand_start]

        @torch.inference_mode()
        def run():
            x = batch_rows(idx.batches, "x").index_select(0, idx.q_rows) if first == 0 else chunked.layer_states[first]
            x = backend.run_layers(x, idx, self.pool, first, last)
            if last < len(backend.model.layers):
                chunked.layer_states[last] = x
                return None, self._to_host(torch.isfinite(x).all())
            logits = backend.head(x[idx.cand_src]).float()
            finite = torch.isfinite(logits).all()
            if baseline_items:  # requests a failed step moved to the baseline, beside this step's
                logits = _merge(plan.items, logits, self.baseline.logits(baseline_items))
            return self._to_host(logits), self._to_host(finite)

        return run

    def _launch_uncached(self, plan: StepPlan, counts: list[int], level: int) -> StepOutput:
        """Every item of the plan scored uncached by backend `level` (its requests keep no cache entry)."""
        for it in plan.items:
            it.state.uncached = True
        logits = self.backends[level].logits(plan.items)
        return StepOutput(counts, level, logits, finite=torch.isfinite(logits).all())

    def abandon_worker(self) -> None:
        """Leave a hung worker thread behind (its step timed out) and start a fresh one."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._worker = self._new_worker()

    def complete(self, plan: StepPlan, output: StepOutput) -> None:
        """File a finished step's logits under their requests."""
        if output.logits is None:
            return
        offset = 0
        for item, n in zip(plan.items, output.counts):
            if n:
                self._tensors(item.state).logits.append(output.logits[offset:offset + n])
                offset += n

    def pop_logits(self, state: RequestState, num_tasks: int) -> torch.Tensor:
        """The request's candidate logits in order, and its tensors forgotten."""
        tensors = self.table.pop(state.key, None)
        if tensors is None or not tensors.logits:
            return torch.zeros(0, num_tasks)
        return tensors.logits[0] if len(tensors.logits) == 1 else torch.cat(tensors.logits)

    def forget(self, state: RequestState) -> None:
        """Drop a failed or expired request's tensors."""
        self.table.pop(state.key, None)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _tensors(self, state: RequestState) -> _RequestTensors:
        return self.table.setdefault(state.key, _RequestTensors())

    def _to_host(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.device.type != "cuda":
            return logits
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        return host.copy_(logits, non_blocking=True)

    def _embed(self, states: list[RequestState]) -> None:
        """Embed the full sequences of newly started requests, in one batch."""
        if not states:
            return
        reqs = [FeatureRequest(s.request.context, s.request.candidates, s.request.request_ts) for s in states]
        raw = self.featurizer.prepare(reqs)  # features are built on the device, with the embedding
        x, meta = self.backend.featurize_embed(self.featurizer, raw)
        batch = TokenBatch(meta.group, meta.pos, meta.ts, x.to(self.dtype))
        # the sequence lengths are known on the host: no device sync
        lengths = [len(r.context.profile) + len(r.context.items) + len(r.candidates) for r in reqs]
        for state, rows in zip(states, split_batch(batch, lengths)):
            self._tensors(state).embedded = rows


def _merge(items, cached: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """One logits tensor in plan order from the cached items' rows and the baseline-served items' rows."""
    rows, offsets = [], [0, 0]
    for it in items:
        n = it.cand_end - it.cand_start
        if n:
            k = int(it.state.uncached)
            rows.append((baseline if k else cached)[offsets[k]:offsets[k] + n].to(cached.device, cached.dtype))
            offsets[k] += n
    return torch.cat(rows)
