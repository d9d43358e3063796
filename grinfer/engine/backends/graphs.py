"""CUDA graphs of the fused layer stack, one per shape bucket, replayed instead of ~6 launches a layer.

A step's shapes (query rows, sequences, key rows, block-table width, longest query sequence) are
rounded up to a bucket; the graph of that bucket reads padded static copies of the step's inputs:

    x, q_slots      padding rows are zero / -1 (their K/V are never written into the cache)
    offsets         padding sequences are empty (their programs exit at once)
    block tables    padding is never read (a sequence reads only the pages its keys span)

so one graph serves every step whose shapes fall in its bucket. Query rows are rounded to 8 steps per
power of two (at most 12.5% more GEMM rows); the rest, which cost nothing when padded, to powers of two
with floors (sequences 8, key rows 256), so the few query-row buckets a workload visits are nearly all
the graphs it needs and warm-up captures them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

log = logging.getLogger("grinfer.engine")


def bucket(n: int, steps_per_octave: int = 8, minimum: int = 16) -> int:
    """n rounded up to one of `steps_per_octave` sizes per power of two (at least `minimum`)."""
    n = max(n, minimum)
    step = max(1 << max(n.bit_length() - 1 - steps_per_octave.bit_length() + 1, 0), 1)
    return -(-n // step) * step


def pow2(n: int) -> int:
    """The next power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class LayerInputs:
    """What the fused layer stack reads besides x: the jagged query/key metadata and the cache pages."""

    q_offsets: torch.Tensor  # [B + 1]
    q_group: torch.Tensor  # [Tq]
    q_pos: torch.Tensor  # [Tq]
    q_slots: torch.Tensor  # [Tq] cache slot of each query's K/V, -1 = not written
    k_offsets: torch.Tensor  # [B + 1]
    k_group: torch.Tensor  # [Tk]
    k_pos: torch.Tensor  # [Tk]
    block_table: torch.Tensor  # [B, W]
    k_counts: torch.Tensor  # [B, 2]
    max_len_q: int

    def key(self) -> tuple[int, ...]:
        """The bucket of these shapes: (query rows, sequences, key rows, table width, longest query sequence)."""
        return (bucket(len(self.q_group)), pow2(max(len(self.q_offsets) - 1, 8)), pow2(max(len(self.k_group), 256)),
                pow2(self.block_table.shape[1]), pow2(self.max_len_q))

    @classmethod
    def empty(cls, key: tuple[int, ...], device: torch.device) -> LayerInputs:
        """Static inputs of a bucket: every sequence empty, every slot -1."""
        t_q, batch, t_k, width, max_q = key
        z = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)
        return cls(z(batch + 1), z(t_q), z(t_q), torch.full((t_q,), -1, dtype=torch.int64, device=device),
                   z(batch + 1), z(t_k), z(t_k), z(batch, width), z(batch, 2), max_q)

    def load(self, step: LayerInputs) -> None:
        """Copy a step's inputs into these (larger) static ones, resetting what the previous step left."""
        t_q, batch = len(step.q_group), len(step.q_offsets) - 1
        for f in fields(self):
            if f.name in ("q_offsets", "k_offsets", "block_table", "max_len_q"):
                continue
            src, dst = getattr(step, f.name), getattr(self, f.name)
            dst[:len(src)].copy_(src)
        self.q_slots[t_q:].fill_(-1)
        for name in ("q_offsets", "k_offsets"):
            src, dst = getattr(step, name), getattr(self, name)
            dst[:batch + 1].copy_(src)
            dst[batch + 1:].copy_(src[-1].expand(len(dst) - batch - 1))  # padding sequences are empty
        self.block_table[:batch, :step.block_table.shape[1]].copy_(step.block_table)


class _Graph:
    def __init__(self, key: tuple[int, ...], d_model: int, dtype: torch.dtype, device: torch.device):
        self.inputs = LayerInputs.empty(key, device)
        self.x = torch.zeros(key[0], d_model, dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None  # set only once its capture succeeded
        self.out: torch.Tensor | None = None


class GraphCache:
    """Runs `layers(x, inputs)` through a CUDA graph per shape bucket (LRU, at most `max_graphs`).

    A bucket first seen under traffic is run eagerly and queued; its graph is captured later, off the
    request path, by `capture_pending()` (the engine calls it when it has nothing else to do, and before
    the server says ready). A capture that fails is contained: the half-recorded graph and its memory
    pool are dropped, the bucket is served eagerly from then on (logged once, counted in `failures`),
    and later captures use a fresh pool. With capture=False the padded static inputs are run eagerly
    (the tests' check of the padding)."""

    def __init__(self, layers: Callable[[torch.Tensor, LayerInputs], torch.Tensor], d_model: int,
                 dtype: torch.dtype, device: torch.device, max_graphs: int = 64, capture: bool = True):
        self.layers, self.max_graphs, self.capture = layers, max_graphs, capture
        self.d_model, self.dtype, self.device = d_model, dtype, device
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pending: dict[tuple, int] = {}  # buckets waiting for a capture -> steps that needed them
        self.failed: set[tuple] = set()  # buckets whose capture failed: always eager
        self.failures = 0
        self.eager_steps = 0  # steps run without a graph (bucket pending or failed)
        self.pool = self._new_pool() if capture else None
        self.warmup_stream = None  # one, made at the first capture: its cached blocks are reused

    def __call__(self, x: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        key = inputs.key()
        g = self.graphs.get(key)
        if not self.capture:  # the padded static inputs, run eagerly
            g = g or self._add(key, _Graph(key, self.d_model, self.dtype, self.device))
            self.graphs.move_to_end(key)
            g.inputs.load(inputs)
            g.x[:len(x)].copy_(x)
            return self.layers(g.x, g.inputs)[:len(x)]
        if g is None:
            if key not in self.failed and (key in self.pending or len(self.pending) < self.max_graphs):
                self.pending[key] = self.pending.get(key, 0) + 1
            self.eager_steps += 1
            return self.layers(x, inputs)
        self.graphs.move_to_end(key)
        g.inputs.load(inputs)
        g.x[:len(x)].copy_(x)
        assert g.graph is not None and g.out is not None  # held graphs are captured ones
        g.graph.replay()
        return g.out[:len(x)].clone()  # the next replay overwrites the static output

    def capture_pending(self, min_steps: int = 1) -> bool:
        """Capture the pending bucket that the most steps needed (the oldest of a tie), if at least
        `min_steps` did; returns whether one was captured or failed."""
        key = max(self.pending, key=self.pending.__getitem__, default=None)
        if key is None or self.pending[key] < min_steps:
            return False
        steps = self.pending.pop(key)
        g = _Graph(key, self.d_model, self.dtype, self.device)
        start = time.perf_counter()
        try:
            self._record(g)
        except Exception as exc:  # contained: the bucket stays eager, the engine keeps serving
            self._contain(key, exc)
            return True
        self._add(key, g)
        log.info("captured the CUDA graph of bucket %s (needed by %d steps) in %.0f ms", key, steps,
                 1e3 * (time.perf_counter() - start))
        return True

    def _add(self, key: tuple, g: _Graph) -> _Graph:
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g

    def _new_pool(self):
        return torch.cuda.graph_pool_handle()

    def _record(self, g: _Graph) -> None:
        """Warm up on a side stream (compiles kernels; empty static inputs write nothing), then capture.

        Only this thread's CUDA calls are checked during the capture (capture_error_mode="thread_local")."""
        if self.warmup_stream is None:
            self.warmup_stream = torch.cuda.Stream(self.device)
        stream = self.warmup_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.layers(g.x, g.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.layers(g.x, g.inputs)
        g.graph, g.out = graph, out

    def _contain(self, key: tuple, exc: Exception) -> None:
        """Forget a failed capture: the bucket turns eager and later captures get a pool of their own."""
        self.failed.add(key)
        self.failures += 1
        log.warning("CUDA graph capture of bucket %s failed (%s: %s); serving it without graphs",
                    key, type(exc).__name__, exc)
        failed_pool, self.pool = self.pool, self._new_pool()
        self._release(failed_pool)

    def _release(self, pool) -> None:
        """Close the failed capture's pool: a capture whose end failed leaves the allocator recording into it
        (the next capture into it would fail with "already recording to mempool_id")."""
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)
        try:
            if end is not None:
                end(self.device.index if self.device.index is not None else torch.cuda.current_device(), pool)
            torch.cuda.synchronize(self.device)  # an asynchronous error of the capture surfaces here, not later
        except RuntimeError as exc:
            log.warning("after the failed capture: %s", exc)

    def stats(self) -> dict:
        """Graphs held, buckets pending, captures failed, steps run eagerly."""
        return {"graphs": len(self.graphs), "pending": len(self.pending), "capture_failures": self.failures,
                "eager_steps": self.eager_steps}
