"""Dense low precision (grinfer.model.quantize_dense, EngineConfig.dense): which projections are quantised,
closeness to full precision, the engine's cached == uncached over the quantised model on every backend that
runs it here (eager, compiled, the uncached baseline, fused in Triton's interpreter), and clear refusals."""

from __future__ import annotations

import pytest
import torch
from quant_util import SHAPES, as_engine, core, extended, requests, scores, uncached
from triton_util import interpreted_module

from grinfer.config import EngineConfig
from grinfer.model.quantize_dense import is_quantized, linear, quantize_dense

# the fused backend's kernels in Triton's interpreter, imported so before any test runs (tests/triton_util.py)
interpreted_module("grinfer.ops.triton.hstu_attention")
interpreted_module("grinfer.ops.triton.layer_norm")

# the engine against the same quantised model, uncached (float32); with int8 activations, float32 noise
# of 1e-7 between the cached and the uncached order of sums can flip one value's rounding (1/254 of its row's
# max), so there the bound is the effect of a few such flips
ATOL = {"int8": 1e-5, "int8-dynamic": 1e-3}
# the documented distance of int8 projections from the full-precision model, on probabilities
DENSE_TOL = 2e-2
CPU_MODES = ["int8", "int8-dynamic"]


@pytest.mark.parametrize("mode", CPU_MODES)
def test_only_the_layer_stacks_projections_are_quantised(model, mode):
    quantize_dense(model, mode)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_quantized(module) == name.startswith("layers."), name
    assert sum(isinstance(m, torch.nn.Linear) and is_quantized(m) for m in model.modules()) == 2 * len(model.layers)
    first = model.layers[0].uvqk.weight
    quantize_dense(model, mode)  # a second engine over the same model: already quantised, left as it is
    assert model.layers[0].uvqk.weight is first


@pytest.mark.parametrize("mode", CPU_MODES)
@pytest.mark.parametrize("backend", ["eager", "baseline"])
def test_engine_over_a_quantised_model_equals_it_uncached(model, catalog, featurizer, make_request, mode, backend):
    full = {i: uncached(model, featurizer, as_engine(f"u{i}", make_request(*s, seed=i))) for i, s in enumerate(SHAPES)}
    engine = core(model, catalog, backend=backend, dense=mode)
    assert engine.model is model and is_quantized(model.layers[0].out)
    first = requests(make_request)
    worst = 0.0
    for reqs in (first, [extended(r, seed=i) for i, r in enumerate(first)]):
        got = scores(engine, reqs)
        for r in reqs:
            torch.testing.assert_close(got[r.user][1], uncached(model, featurizer, r), atol=ATOL[mode], rtol=0)
    for i, r in enumerate(first):
        worst = max(worst, float((uncached(model, featurizer, r) - full[i]).abs().max()))
    assert 0 < worst < DENSE_TOL


def test_compiled_backend_runs_quantised_projections_and_8_bit_kv(model, catalog, make_request):
    """torch.compile takes torchao's tensors and the 8-bit pool's dequantisation: compiled == eager, within the
    effect of a rounding flip (Inductor's fused kernels sum in another order: 1e-7 apart before quantising)."""
    reqs = [as_engine(f"u{i}", make_request(*s, seed=i)) for i, s in enumerate(SHAPES[:2])]
    settings = {"dense": "int8", "kv_dtype": "int8", "fallback": False}  # a failing step fails the test
    eager = scores(core(model, catalog, backend="eager", **settings), reqs)
    compiled = core(model, catalog, backend="compiled", **settings)
    got = scores(compiled, reqs)
    assert compiled.runner.backend.name == "compiled"
    for r in reqs:
        torch.testing.assert_close(got[r.user][1], eager[r.user][1], atol=1e-3, rtol=0)


def test_fused_backend_runs_quantised_projections(model, catalog, make_request, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reqs = requests(make_request)
    results = {b: scores(core(model, catalog, backend=b, dense="int8", block_size=4, fallback=False), reqs)
               for b in ("eager", "fused")}
    for r in reqs:
        torch.testing.assert_close(results["fused"][r.user][1], results["eager"][r.user][1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("quantised", [False, True])
def test_linear_twin_of_addmm(quantised):
    """The fused stack's projection call: x W^T + b, or residual + x W^T, for plain and torchao weights."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 8).eval()
    x, residual = torch.randn(5, 16, generator=g), torch.randn(5, 8, generator=g)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    if quantised:
        holder = torch.nn.Module()
        holder.layers = torch.nn.ModuleList([layer])
        quantize_dense(holder, "int8")
        w = layer.weight.dequantize()
    with torch.no_grad():
        torch.testing.assert_close(linear(x, layer), x @ w.T + b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x, layer, residual), residual + x @ w.T, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_field(model, catalog):
    with pytest.raises(ValueError, match="dense"):
        EngineConfig(dense="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dense: fp8 runs on CUDA"):
        core(model, catalog, dense="fp8")
    with pytest.raises(ValueError, match="dense: backend 'onnx'"):
        core(model, catalog, backend="onnx", onnx_path="unused.onnx", dense="int8")
    assert not any(is_quantized(m) for m in model.modules() if isinstance(m, torch.nn.Linear))  # refused first


def test_quantize_records_the_dense_mode_the_server_applies(tmp_path, model):
    """`grinfer quantize --dense int8` writes a checkpoint whose config.json names the mode (weights unchanged);
    the server's engine config takes it unless --dense is given."""
    from typer.testing import CliRunner

    from grinfer.cli import app
    from grinfer.config import load_server_config
    from grinfer.model.checkpoint import read_checkpoint_meta, save_checkpoint

    src = save_checkpoint(model, tmp_path / "full")
    runner = CliRunner()
    done = runner.invoke(app, ["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--dense", "int8"])
    assert done.exit_code == 0 and "dense int8" in done.output, done.output
    assert read_checkpoint_meta(tmp_path / "q")["dense"] == "int8"
    bad = runner.invoke(app, ["quantize", "--model", str(src), "--out", str(tmp_path / "x"), "--dense", "int3"])
    assert bad.exit_code == 2 and "--dense: expected one of" in bad.output
    assert load_server_config(env={}).engine.dense is None
    assert load_server_config(env={}, dense="none").engine.dense == "none"
    assert load_server_config(env={"GRINFER_KV_DTYPE": "int8"}).engine.kv_dtype == "int8"
