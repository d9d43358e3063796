"""The uncached backends behind the engine's interface: `baseline` (the eager model over whole requests)
and `onnx` (the exported ranking graph in ONNX Runtime). Their answers equal the uncached model's, and
they keep no KV cache (every request is a miss, no entry survives it)."""

from __future__ import annotations

import pytest
from engine_util import assert_scores, assert_unpinned, engine_request, make_core, run, with_context

from grinfer.model.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the onnx backend needs onnxruntime (the export extra)")
    from grinfer.export.export import export_checkpoint

    root = tmp_path_factory.mktemp("onnx")
    save_checkpoint(model, root / "model")
    (exported,) = export_checkpoint(root / "model", root / "ranking.onnx", "onnx", progress=False)
    return str(exported.path)


@pytest.mark.parametrize("depth", [1, 2], ids=["sync", "pipelined"])
@pytest.mark.parametrize("backend", ["baseline", "onnx"])
def test_uncached_backends_answer_like_the_model(model, catalog, featurizer, make_request, backend, depth,
                                                 request):
    config = {"onnx_path": request.getfixturevalue("onnx_path")} if backend == "onnx" else {}
    core = make_core(model, catalog, backend=backend, pipeline_depth=depth, cpu_device_thread=depth > 1,
                     max_batch_tokens=32, **config)
    assert core.chain.names == ([backend, "baseline"] if backend == "onnx" else ["baseline"])
    reqs = [engine_request(f"u{i}", make_request(4 + 3 * i, 2, 3 + 5 * i, seed=60 + i)) for i in range(4)]
    for requests in (reqs, [with_context(r, r.context) for r in reqs]):  # the second round finds nothing cached
        results = run(core, requests)
        for q in requests:
            res = results[q.request_id]
            assert res.cache == "miss"
            assert_scores(model, featurizer, q, res)
        assert core.stats()["kv_cache"]["users"] == 0
        assert_unpinned(core)
    if backend == "onnx":
        assert core.runner.backend.provider == "CPUExecutionProvider"


def test_the_onnx_backend_needs_its_file(model, catalog):
    with pytest.raises(ValueError, match="onnx_path"):
        make_core(model, catalog, backend="onnx")
