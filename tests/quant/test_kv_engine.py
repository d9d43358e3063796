"""The engine with 8-bit K/V (EngineConfig.kv_dtype): cached == uncached within the 8-bit engine, close to
the full-precision model, the same after a trip through the host and disk tiers, and the fused backend
(Triton's interpreter) agreeing with eager."""

from __future__ import annotations

import pytest
import torch
from quant_util import core, extended, requests, scores, uncached
from triton_util import interpreted_module

from grinfer.config import EngineConfig
from grinfer.engine.kv_pool import KVPool

# the fused backend's kernels in Triton's interpreter, imported so before any test runs (tests/triton_util.py)
interpreted_module("grinfer.ops.triton.hstu_attention")
interpreted_module("grinfer.ops.triton.layer_norm")

ATOL = 1e-5  # float32: one 8-bit engine against another (or against itself, cached vs uncached)
# The documented tolerance of 8-bit K/V against the full-precision model, on probabilities: int8's half-step
# error (max|x| / 254 per token and head) and e4m3's 2**-4 relative error moved through two layers
KV_TOL = {"int8": 5e-3, "fp8": 5e-2}
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_cached_equals_uncached_within_the_8_bit_engine(model, catalog, featurizer, make_request, kv_dtype):
    """Cold, then new events over the cached context, then repeats: each result equals a fresh 8-bit engine's
    cold result for the same request, and is within KV_TOL of the full-precision model."""
    engine = core(model, catalog, kv_dtype=kv_dtype)
    assert engine.pool.k.dtype.itemsize == 1 and engine.pool.k_scale is not None
    first = requests(make_request)
    rounds = [first, [extended(r, seed=i) for i, r in enumerate(first)]]
    rounds.append(rounds[1])
    worst = 0.0
    for n, reqs in enumerate(rounds):
        got = scores(engine, reqs)
        cold = scores(core(model, catalog, kv_dtype=kv_dtype), reqs)
        for r in reqs:
            status, probs = got[r.user]
            assert (status == "miss") == (n == 0)
            torch.testing.assert_close(probs, cold[r.user][1], atol=ATOL, rtol=0)
            worst = max(worst, float((probs - uncached(model, featurizer, r)).abs().max()))
    assert 0 < worst < KV_TOL[kv_dtype]  # quantised (not the model's K/V), and within the documented tolerance


@pytest.mark.parametrize("tiers", ["host", "disk", "host+disk"])
def test_8_bit_entries_through_the_tiers_give_the_same_scores(model, catalog, make_request, tmp_path, tiers):
    """A device pool of one user: every other user's int8 K/V (and scales) go down and come back."""
    reqs = requests(make_request)
    tier_cfg = {"host_cache_bytes": (1 << 20) if "host" in tiers else 0,
                "disk_cache_bytes": (1 << 20) if "disk" in tiers else 0, "disk_cache_dir": str(tmp_path)}
    if tiers == "host+disk":
        tier_cfg["host_cache_bytes"] = 1  # too small for anyone: straight through to disk
    cfg = {"kv_dtype": "int8", "block_size": 4, "max_batch_requests": 1}
    cfg_m = model.cfg
    per_token = KVPool.bytes_per_token(cfg_m.num_layers, cfg_m.num_heads, cfg_m.head_dim, torch.float32, "int8")
    small = core(model, catalog, kv_cache_bytes=28 * per_token, **cfg, **tier_cfg)  # 7 pages: the longest context
    roomy = core(model, catalog, **cfg)
    scores(small, reqs)
    scores(roomy, reqs)
    again = [extended(r, seed=10 + i) for i, r in enumerate(reqs)]
    got, want = scores(small, again), scores(roomy, again)
    stats = small.cache.snapshot()
    assert stats["host_hits"] + stats["disk_hits"] >= len(reqs) - 1
    for r in again:
        assert got[r.user][0] != "miss"
        torch.testing.assert_close(got[r.user][1], want[r.user][1], atol=ATOL, rtol=0)
    if "disk" in tiers:  # a restart reads the files back: same scores for another round
        small.close()
        restarted = core(model, catalog, kv_cache_bytes=1 << 20, **cfg, **tier_cfg)
        final = [extended(r, seed=20 + i) for i, r in enumerate(again)]
        got, want = scores(restarted, final), scores(roomy, final)
        assert restarted.cache.snapshot()["disk_hits"] == len(final)
        for r in final:
            torch.testing.assert_close(got[r.user][1], want[r.user][1], atol=ATOL, rtol=0)


def test_fused_backend_over_an_8_bit_pool_matches_eager(model, catalog, make_request, monkeypatch):
    """Triton's interpreter on the CPU: the candidates' K/V quantised into scratch pages, every key read from
    the 8-bit pool by the kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cores = {name: core(model, catalog, backend=name, kv_dtype="int8", block_size=4, fallback=False)
             for name in ("eager", "fused")}  # no fallback: a failing fused step fails the test
    first = requests(make_request)
    for reqs in (first, [extended(r, seed=i) for i, r in enumerate(first)]):
        results = {name: scores(c, reqs) for name, c in cores.items()}
        for r in reqs:
            assert results["fused"][r.user][0] == results["eager"][r.user][0]
            torch.testing.assert_close(results["fused"][r.user][1], results["eager"][r.user][1], atol=1e-4, rtol=0)
    assert cores["fused"].runner.backend.name == "fused"


def test_kv_dtype_is_validated_and_aoti_refuses_8_bit(model, catalog):
    with pytest.raises(ValueError, match="kv_dtype"):
        EngineConfig(kv_dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_dtype"):
        core(model, catalog, backend="aoti", kv_dtype="int8")
