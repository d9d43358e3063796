"""The engine link's messages: plain pickles with tensors as numpy arrays, so a worker never has to fetch
a tensor's shared memory from the engine process's resource-sharer thread."""

from __future__ import annotations

import numpy as np
import torch

from grinfer.engine.request import EngineError, RankResult
from grinfer.serving.engine_link import dumps, loads


def test_a_rank_result_round_trips_with_its_tensor_as_bytes():
    probs = torch.rand(100, 2)
    result = RankResult(request_id=3, probabilities=probs, cache="hit", cached_tokens=40, computed_tokens=100,
                        queue_seconds=0.0, total_seconds=0.01, steps=1)
    data = dumps((7, True, result))
    assert b"rebuild_storage_fd" not in data and b"torch.multiprocessing" not in data  # no fd handed over
    request_id, ok, back = loads(data)
    assert (request_id, ok, back.cache) == (7, True, "hit")
    assert isinstance(back.probabilities, torch.Tensor) and torch.equal(back.probabilities, probs)


def test_requests_with_numpy_arrays_and_errors_round_trip():
    candidates = np.arange(50, dtype=np.int64)
    _, op, (cands, err) = loads(dumps((1, "rank", (candidates, EngineError("full")))))
    assert op == "rank" and np.array_equal(cands, candidates) and str(err) == "full"


def test_a_non_contiguous_or_bf16_tensor_comes_back_equal():
    for t in (torch.rand(8, 6)[:, ::2], torch.rand(5, 3).to(torch.bfloat16)):
        back = loads(dumps(t))
        assert back.dtype == t.dtype and torch.equal(back, t)
