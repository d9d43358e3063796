"""The `aoti` backend (the packaged cached step) on what the backend grid does not reach: layer-chunked
contexts, candidate micro-batches and steps past the package's axis ranges run on the eager layers and
still match uncached scoring; packages that do not fit the engine are refused with the setting named."""

from __future__ import annotations

import pytest
from aoti_util import AOTI_BLOCK_SIZE, AOTI_LIMITS, aoti_package
from engine_util import assert_scores, assert_unpinned, engine_request, fixed_model, make_core, record_plans, run


def test_chunked_and_oversized_steps_run_eager_and_still_match(model, catalog, featurizer, make_request, request):
    core = make_core(model, catalog, backend="aoti", aoti_path=aoti_package(model, request),
                     block_size=AOTI_BLOCK_SIZE, max_batch_tokens=16)
    plans = record_plans(core)
    # 39 tokens against a 16-token budget (layer-chunked); 40 candidates (micro-batches); 5 tokens
    reqs = [engine_request("long", make_request(30, 5, 3, seed=120)),
            engine_request("many", make_request(6, 2, 40, seed=121)),
            engine_request("short", make_request(1, 0, 2, seed=122))]
    results = run(core, reqs)
    for q in reqs:
        assert_scores(model, featurizer, q, results[q.request_id])
    assert any(p.layers != (0, len(model.layers)) for p in plans)
    stats = core.runner.backend.stats()
    assert stats["eager_steps"] >= 1 and stats["package_steps"] >= 1 and sum(stats.values()) == core.steps
    assert_unpinned(core)

    # more users in one step than the package's batch axis takes: that step runs eager
    crowd = [engine_request(f"c{i}", make_request(2, 1, 2, seed=130 + i)) for i in range(AOTI_LIMITS.batch + 2)]
    big = make_core(model, catalog, backend="aoti", aoti_path=aoti_package(model, request),
                    block_size=AOTI_BLOCK_SIZE)
    results = run(big, crowd)
    for q in crowd:
        assert_scores(model, featurizer, q, results[q.request_id])
    assert big.runner.backend.stats() == {"package_steps": 0, "eager_steps": 1}
    core.close()
    big.close()


def test_packages_that_do_not_fit_the_engine_are_refused(model, catalog, request):
    path = aoti_package(model, request)
    with pytest.raises(ValueError, match=r"block_size: the aoti package .* blocks of 4 tokens, the engine in 8"):
        make_core(model, catalog, backend="aoti", aoti_path=path, block_size=8)
    with pytest.raises(ValueError, match="needs aoti_path"):
        make_core(model, catalog, backend="aoti", block_size=AOTI_BLOCK_SIZE)
    other = model.cfg.model_copy(update={"temperature": 2.0})
    with pytest.raises(ValueError, match="another model configuration"):
        make_core(fixed_model(other), catalog, backend="aoti", aoti_path=path, block_size=AOTI_BLOCK_SIZE)
