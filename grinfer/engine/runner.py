"""Executes a step: one jagged batch of new tokens through the backend over the paged KV pool.

New requests are featurized and embedded once; the step's indices (engine/step.py) are built from the
pages each work item carries; the backend runs the layers over the step's new tokens (`Backend.run_layers`:
new context K/V written into the pool, each query attending over its user's cached context plus the
step's candidates). Candidates' final states go through the heads.

The runner owns every per-request tensor (embeddings, a layer-chunked context's hidden states, the logits
so far) in a table keyed by request. `launch(plan)` prepares on the host and queues the device work
without waiting for it: on CUDA the kernels are queued on the stream and the logits come back through a
non-blocking copy into pinned memory with an event; on the CPU (pipelined) a worker thread runs the device
part in order, so the host prepares step N+1 while step N computes. `StepOutput.wait()` joins the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from grinfer.engine.backends import Backend
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.scheduler import RequestState, StepPlan
from grinfer.engine.step import build_step_index
from grinfer.features.device import DeviceFeaturizer
from grinfer.features.featurizer import RankRequest as FeatureRequest


@dataclass
class _Embedded:
    x: torch.Tensor  # [L, d] the request's full sequence [U | S | R | C]
    group: torch.Tensor
    pos: torch.Tensor
    ts: torch.Tensor


@dataclass
class _RequestTensors:
    """The runner's state of one request."""

    embedded: _Embedded | None = None
    layer_state: torch.Tensor | None = None  # hidden states of a layer-chunked context's pending tokens
    logits: list[torch.Tensor] = field(default_factory=list)  # [n, tasks] float32 host, per step


@dataclass
class StepOutput:
    """A launched step: `wait()` blocks until it is done and raises what its device part raised."""

    counts: list[int]  # candidates scored per work item, in plan order
    logits: torch.Tensor | None = None  # [sum(counts), tasks] float32 on the host once done
    done: Callable[[], object] | None = None

    def wait(self) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            result = done()
            if isinstance(result, torch.Tensor):
                self.logits = result


class ModelRunner:
    """Runs StepPlans with a backend over the KV pool; keeps each request's tensors until it finishes."""

    def __init__(self, backend: Backend, pool: KVPool, featurizer: DeviceFeaturizer, device: torch.device,
                 pipelined: bool = False):
        self.backend, self.pool, self.featurizer, self.device = backend, pool, featurizer, device
        self.dtype = next(backend.model.parameters()).dtype
        self.table: dict[int, _RequestTensors] = {}
        self.host_seconds = {"featurize": 0.0, "indices": 0.0, "launch": 0.0}  # host time per part, summed
        # CPU kernels run on the calling thread: a worker thread plays the role of the CUDA stream
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grinfer-device") \
            if pipelined and device.type == "cpu" else None

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run the plan to completion (the synchronous form of `launch`)."""
        output = self.launch(plan)
        output.wait()
        return output

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> StepOutput:
        """Prepare the plan on the host (embed new requests, build indices) and queue its device work."""
        items = [it for it in plan.items if it.tokens]
        counts = [it.cand_end - it.cand_start for it in plan.items]
        if not items:
            return StepOutput(counts)
        t0 = time.perf_counter()
        with record_function("grinfer.embed"):
            self._embed([it.state for it in items if self._tensors(it.state).embedded is None])
        embedded = [self.table[it.state.key].embedded for it in items]
        t1 = time.perf_counter()
        with record_function("grinfer.index"):
            idx = build_step_index(items, embedded, self.pool, self.device)
        t2 = time.perf_counter()
        self.host_seconds["featurize"] += t1 - t0
        self.host_seconds["indices"] += t2 - t1
        first, last = plan.layers
        chunked = self.table[items[0].state.key]

        @torch.inference_mode()
        def run() -> torch.Tensor | None:
            x = torch.cat([e.x for e in embedded])[idx.q_rows] if first == 0 else chunked.layer_state
            x = self.backend.run_layers(x, idx, self.pool, first, last)
            if last < len(self.backend.model.layers):
                chunked.layer_state = x
                return None
            chunked.layer_state = None
            return self._to_host(self.backend.head(x[idx.cand_src]).float())

        if self._worker is not None:
            output = StepOutput(counts, done=self._worker.submit(run).result)
        else:
            logits = run()
            output = StepOutput(counts, logits)
            if logits is not None and self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                output.done = event.synchronize
        self.host_seconds["launch"] += time.perf_counter() - t2
        return output

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
        return torch.cat(tensors.logits)

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
        x = x.to(self.dtype)
        lengths = [len(r.context.profile) + len(r.context.items) + len(r.candidates) for r in reqs]
        lo = 0
        for state, n in zip(states, lengths):
            hi = lo + n  # the sequence lengths are known on the host: no device sync
            self._tensors(state).embedded = _Embedded(x[lo:hi], meta.group[lo:hi], meta.pos[lo:hi], meta.ts[lo:hi])
            lo = hi
