"""gr_model: grinfer's Engine inside the model instance, with its paged per-user KV cache and batching.

Triton's dynamic batcher hands the one instance every queued request; they all go to the Engine at once,
which schedules them together (chunked by layers, under its token budget) and reuses each user's cached
context K/V. Each response says whether the context came from the cache (CACHE: hit / partial / miss,
CACHED_TOKENS), and the counter grinfer_triton_kv_cache_requests_total{cache} on Triton's /metrics counts it.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports]  (inside Triton only)

from grinfer.config import EngineConfig
from grinfer.engine import Engine
from grinfer.engine.request import ContextTooLarge, EngineError, Overloaded, RankRequest
from grinfer.features.featurizer import UserContext
from grinfer.model.checkpoint import load_checkpoint
from grinfer.model.mtgr import MTGR
from grinfer.triton_repo.backend import ModelArgs, failure, read, tensor
from grinfer.triton_repo.catalog_file import load_catalog
from grinfer.triton_repo.requests import BadInput, vector

INPUTS = ("USER", "HISTORY_VERSION", "PROFILE_IDS", "CONTEXT_IDS", "CONTEXT_TIMESTAMPS", "CONTEXT_ACTIONS",
          "NUM_STATIC", "CANDIDATE_IDS", "REQUEST_TS")


class TritonPythonModel:
    """One Engine per instance (one instance per device, so a returning user finds its cached K/V)."""

    def initialize(self, args: dict) -> None:
        config = ModelArgs(args)
        device = f"cuda:{config.device_id}" if config.instance_kind == "GPU" else "cpu"
        model = load_checkpoint(config.path("checkpoint"), map_location="cpu")
        if not isinstance(model, MTGR):
            raise ValueError(f"parameter 'checkpoint': {config.path('checkpoint')} is not an mtgr ranking model")
        engine_cfg = EngineConfig.model_validate({  # validated: a bad parameter is a load error naming it
            "backend": config.param("backend", "eager"), "device": device,
            "dtype": "bfloat16" if device.startswith("cuda") else "float32",
            "kv_cache_bytes": int(config.param("kv_cache_mb")) << 20, "max_queue": int(config.param("max_queue")),
            "max_batch_tokens": int(config.param("max_batch_tokens")),
            "max_realtime": int(config.param("max_realtime"))})
        self.timeout_s = float(config.param("timeout_s", "60"))
        self.engine = Engine(model, load_catalog(config.path("catalog")), engine_cfg).start()
        # the family is kept beside its metrics: a Metric of a collected MetricFamily cannot be incremented
        self.cache_family = family = pb_utils.MetricFamily(
            name="grinfer_triton_kv_cache_requests_total",
            description="gr_model requests by where their context K/V came from", kind=pb_utils.MetricFamily.COUNTER)
        self.cache_counters = {c: family.Metric(labels={"cache": c}) for c in ("hit", "partial", "miss")}

    def execute(self, requests) -> list:
        futures: list[concurrent.futures.Future | Exception] = []
        for request in requests:  # all submitted before any is awaited: the engine batches them
            try:
                futures.append(self.engine.submit(self._rank_request(request)))
            except (BadInput, ValueError, EngineError) as exc:
                futures.append(exc)
        return [self._response(f) for f in futures]

    def _rank_request(self, request) -> RankRequest:
        got = read(request, INPUTS)
        one = lambda name: int(vector(name, got[name])[0])
        context = UserContext(vector("PROFILE_IDS", got["PROFILE_IDS"]), vector("CONTEXT_IDS", got["CONTEXT_IDS"]),
                              vector("CONTEXT_TIMESTAMPS", got["CONTEXT_TIMESTAMPS"]),
                              vector("CONTEXT_ACTIONS", got["CONTEXT_ACTIONS"]), num_static=one("NUM_STATIC"))
        user = vector("USER", got["USER"], dtype=None)[0]
        return RankRequest(user.decode() if isinstance(user, bytes) else str(user), one("HISTORY_VERSION"), context,
                           vector("CANDIDATE_IDS", got["CANDIDATE_IDS"]), one("REQUEST_TS"))

    def _response(self, future: concurrent.futures.Future | Exception):
        if isinstance(future, Exception):
            return self._failure(future)
        try:
            result = future.result(self.timeout_s)
        except (EngineError, concurrent.futures.TimeoutError) as exc:
            return self._failure(exc)
        self.cache_counters[result.cache].increment(1)
        probs = result.probabilities.to(torch.float32).numpy()
        return pb_utils.InferenceResponse(output_tensors=[
            tensor("PROBABILITIES", probs, batched=True),
            tensor("CACHE", np.array([[result.cache.encode()]], np.object_)),
            tensor("CACHED_TOKENS", np.array([[result.cached_tokens]], np.int64)),
            tensor("COMPUTED_TOKENS", np.array([[result.computed_tokens]], np.int64))])

    @staticmethod
    def _failure(exc: Exception):
        """Bad input or a context the cache can never hold: INVALID_ARG; a full queue: UNAVAILABLE (retry)."""
        if isinstance(exc, ValueError | ContextTooLarge):
            return failure(BadInput(str(exc)))
        return failure(exc, "UNAVAILABLE" if isinstance(exc, Overloaded) else None)

    def finalize(self) -> None:
        self.engine.shutdown(drain=False)
