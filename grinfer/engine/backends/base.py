"""The backend interface: what the runner asks of a backend that runs MTGR's layer stack over the paged KV pool.

`eager` (eager.py) implements it in PyTorch and is the reference every other backend is checked against;
`compiled` and `fused` build on it. The uncached scorers (baseline.py, onnx.py) are not backends of this
kind: they say `uncached = True` and score whole work items with `logits(items)`.
"""

from __future__ import annotations

import torch

from grinfer.config import EngineConfig
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.step import StepIndex
from grinfer.features.device import DeviceFeaturizer, RawBatch
from grinfer.model.layers import TokenMeta
from grinfer.model.mtgr import MTGR


class Backend:
    """Runs a step's layers over the paged KV pool; the runner owns batching, the pool and the indices."""

    name = ""
    keys_in_pool = False  # whether attention reads the candidates' K/V from the cache (scratch pages) too

    def __init__(self, model: MTGR, config: EngineConfig | None = None):
        self.model = model  # `config` (the engine's) is for backends with settings of their own

    def featurize_embed(self, featurizer: DeviceFeaturizer, raw: RawBatch) -> tuple[torch.Tensor, TokenMeta]:
        """Token embeddings and metadata of whole request sequences, from their raw events on the device."""
        raise NotImplementedError

    def run_layers(self, x: torch.Tensor, idx: StepIndex, pool: KVPool, first: int, last: int) -> torch.Tensor:
        """Layers [first, last) over the step's new tokens x: each writes its new context K/V into the pool,
        then the queries attend over their context K/V plus the step's candidates; the new tokens' states."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Per-task logits of final candidate states."""
        raise NotImplementedError

    def capture_pending(self, min_steps: int = 1) -> bool:
        """Do one piece of deferred device work (a CUDA-graph capture of a bucket at least `min_steps` steps
        needed) off the request path; whether there was any. The engine calls it when idle, between steps
        under load, and during warm-up."""
        return False

    def stats(self) -> dict:
        """Backend counters for metrics (e.g. CUDA graphs held, pending, failed)."""
        return {}
