"""The Triton layer-epilogue kernels (group_layer_norm, silu_scatter_kv, group_norm_mul) against their
references in `grinfer.ops.reference.layer_norm`, in Triton's interpreter on the CPU, plus the reference
against the model's GroupLayerNorm.

The kernel module is imported under the interpreter (tests/triton_util.py) and TRITON_INTERPRET=1 is
set during each test here. Without Triton these tests fail, unless GRINFER_SKIP_TRITON=1 asks to skip them.
"""

from __future__ import annotations

import pytest
import torch
from triton_util import interpreted_module

from grinfer.model.layers import GroupLayerNorm
from grinfer.ops.reference import layer_norm as ref

tk = interpreted_module("grinfer.ops.triton.layer_norm")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while a kernel runs; set it per test, restored after."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


ATOL = 1e-5
ROWS = [0, 1, 7, 33]
DIMS = [24, 48, 64, 96]
LOW = [torch.bfloat16, torch.float16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def affine(groups: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [G, d] weight (away from zero) and bias."""
    sign = torch.where(torch.rand(groups, d, generator=g) < 0.5, -1.0, 1.0)
    return sign * (0.5 + torch.rand(groups, d, generator=g)), torch.randn(groups, d, generator=g)


def inputs(rows: int, d: int, groups: int, seed: int, cols: int | None = None):
    """x [T, cols] (shifted and scaled rows, never constant), group ids in 0..3, weight, bias [G, d]."""
    g = gen(seed)
    cols = d if cols is None else cols
    x = torch.randn(rows, cols, generator=g) * 2.0 + torch.randn(rows, 1, generator=g) * 3.0
    group = torch.randint(0, 4, (rows,), generator=g)
    weight, bias = affine(groups, d, g)
    return x, group, weight, bias


def rel_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.float() - exact).norm() / exact.norm())


def assert_low_precision(got: torch.Tensor, low_ref: torch.Tensor, exact: torch.Tensor) -> None:
    """Error vs the fp32 ground truth at most 1.1x the reference's run in the same dtype, and (both round the
    same fp32 value once) nearly every element identical to it."""
    assert got.dtype == low_ref.dtype and got.shape == exact.shape
    assert torch.isfinite(got).all()
    assert rel_err(got, exact) <= 1.1 * rel_err(low_ref, exact) + 1e-7, (rel_err(got, exact), rel_err(low_ref, exact))
    assert (got == low_ref).float().mean() >= 0.99


# ---- the reference against the model's module ----------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
def test_reference_group_layer_norm_matches_the_model_module_in_fp32(groups):
    x, group, weight, bias = inputs(33, 48, groups, seed=0)
    module = GroupLayerNorm(groups, 48)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        torch.testing.assert_close(ref.group_layer_norm(x, group, weight, bias), module(x, group), atol=ATOL, rtol=0)


# ---- group_layer_norm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_group_layer_norm_matches_reference(rows, d, groups):
    x, group, weight, bias = inputs(rows, d, groups, seed=rows * d + groups)
    torch.testing.assert_close(tk.group_layer_norm(x, group, weight, bias),
                               ref.group_layer_norm(x, group, weight, bias), atol=ATOL, rtol=0)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("rows", [1, 33])
def test_group_layer_norm_adds_in_place_on_a_column_slice(rows, groups):
    """x' = x + add is written back into x, a column slice of a [T, 4d] tensor; nothing else moves."""
    d = 48
    big, group, weight, bias = inputs(rows, d, groups, seed=rows + groups, cols=4 * d)
    add = torch.randn(d, generator=gen(1)) * 3
    mine, theirs = big.clone(), big.clone()
    out = torch.full((rows, d), float("nan"))
    got = tk.group_layer_norm(mine[:, d:2 * d], group, weight, bias, 1e-3, add=add, out=out)
    want = ref.group_layer_norm(theirs[:, d:2 * d], group, weight, bias, 1e-3, add=add)
    assert got is out
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine[:, d:2 * d], big[:, d:2 * d] + add, atol=0, rtol=0)
    torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_group_layer_norm_single_group_ignores_group_ids():
    x, group, weight, bias = inputs(7, 24, 1, seed=3)
    want = ref.group_layer_norm(x, None, weight, bias)
    torch.testing.assert_close(tk.group_layer_norm(x, None, weight, bias), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(tk.group_layer_norm(x, group.int(), weight, bias), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("d", [64, 96])
def test_group_layer_norm_low_precision(dtype, d):
    x, group, weight, bias = inputs(33, d, 4, seed=d)
    add = torch.randn(d, generator=gen(2))
    exact = ref.group_layer_norm(x.clone(), group, weight, bias, add=add)
    x_low, x_ref = x.to(dtype), x.to(dtype)
    got = tk.group_layer_norm(x_low, group, weight, bias, add=add)
    low_ref = ref.group_layer_norm(x_ref, group, weight, bias, add=add)
    torch.testing.assert_close(x_low, x_ref, atol=0, rtol=0)  # the residual: x + add rounded once
    assert_low_precision(got, low_ref, exact)


# ---- silu_scatter_kv --------------------------------------------------------------------------------------

def scatter_case(rows: int, d: int, heads: int, seed: int, h_dtype, cache_dtype, slot_dtype=torch.int64,
                 extra_slots: int = 5):
    """h [T, 4d]; slots: a shuffled subset of [0, S) with about a third -1; caches [S, H, Dh] of NaN."""
    g = gen(seed)
    h = (torch.randn(rows, 4 * d, generator=g) * 3).to(h_dtype)
    slots = torch.randperm(rows + extra_slots, generator=g)[:rows]
    slots[torch.rand(rows, generator=g) < 0.35] = -1
    shape = (rows + extra_slots, heads, d // heads)
    caches = torch.full(shape, float("nan"), dtype=cache_dtype), torch.full(shape, float("nan"), dtype=cache_dtype)
    return h, slots.to(slot_dtype), caches


def run_scatter(impl, h, d, slots, caches):
    h, k_cache, v_cache = h.clone(), caches[0].clone(), caches[1].clone()
    assert impl.silu_scatter_kv(h, d, slots, k_cache, v_cache) is None
    return h, k_cache, v_cache


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_scatter_kv_matches_reference(rows, d):
    h, slots, caches = scatter_case(rows, d, heads=2 if d % 2 == 0 else 1, seed=rows + d, h_dtype=torch.float32,
                                    cache_dtype=torch.float32, slot_dtype=torch.int64 if d % 3 else torch.int32)
    got, want = run_scatter(tk, h, d, slots, caches), run_scatter(ref, h, d, slots, caches)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, equal_nan=True)  # unwritten slots stay NaN
    kept = slots[slots >= 0]
    assert torch.isnan(got[1]).flatten(1).all(1).sum() == len(caches[0]) - len(kept)
    if len(kept):
        torch.testing.assert_close(got[1][kept].flatten(1), got[0][slots >= 0, 3 * d:], atol=0, rtol=0)
        torch.testing.assert_close(got[2][kept].flatten(1), got[0][slots >= 0, d:2 * d], atol=0, rtol=0)


@pytest.mark.parametrize(("h_dtype", "cache_dtype"), [(torch.float32, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16),
                                                      (torch.float16, torch.bfloat16)])
def test_silu_scatter_kv_casts_into_caches_of_another_dtype(h_dtype, cache_dtype):
    d = 96
    h, slots, caches = scatter_case(33, d, heads=3, seed=5, h_dtype=h_dtype, cache_dtype=cache_dtype,
                                    slot_dtype=torch.int32)
    got, want = run_scatter(tk, h, d, slots, caches), run_scatter(ref, h, d, slots, caches)
    exact = run_scatter(ref, h.float(), d, slots, tuple(c.float() for c in caches))
    written = slots[slots >= 0]
    for g, w, e in zip(got[1:], want[1:], exact[1:]):
        assert g.dtype == cache_dtype and torch.isnan(g).equal(torch.isnan(w))
        assert_low_precision(g[written], w[written], e[written])
    if h_dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    else:
        assert_low_precision(got[0], want[0], exact[0])


# ---- group_norm_mul ---------------------------------------------------------------------------------------

def norm_mul_case(rows: int, d: int, groups: int, seed: int, dtype=torch.float32):
    """a [T, H, Dh]; u the first column block of h [T, 4d] (a strided view)."""
    a, group, weight, bias = inputs(rows, d, groups, seed)
    heads = 3 if d % 3 == 0 else 2
    h = torch.randn(rows, 4 * d, generator=gen(seed + 1)).to(dtype)
    return a.to(dtype).reshape(rows, heads, d // heads), h[:, :d], group, weight, bias


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_group_norm_mul_matches_reference(rows, d, groups):
    a, u, group, weight, bias = norm_mul_case(rows, d, groups, seed=rows * d + groups)
    assert u.stride(0) == 4 * d
    got = tk.group_norm_mul(a, u, group, weight, bias)
    assert got.shape == (rows, d)
    torch.testing.assert_close(got, ref.group_norm_mul(a, u, group, weight, bias), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("groups", [1, 4])
def test_group_norm_mul_low_precision(dtype, groups):
    a, u, group, weight, bias = norm_mul_case(33, 96, groups, seed=7)
    exact = ref.group_norm_mul(a, u, group, weight, bias)
    a, u = a.to(dtype), u.to(dtype)
    assert_low_precision(tk.group_norm_mul(a, u, group, weight, bias), ref.group_norm_mul(a, u, group, weight, bias),
                         exact)


def test_group_norm_mul_writes_every_element_of_a_strided_out():
    a, u, group, weight, bias = norm_mul_case(33, 48, 4, seed=8)
    big = torch.full((33, 96), float("nan"))
    got = tk.group_norm_mul(a.reshape(33, 48), u, group.int(), weight, bias, out=big[:, 48:])
    torch.testing.assert_close(got, ref.group_norm_mul(a, u, group, weight, bias), atol=ATOL, rtol=0)
    assert torch.isfinite(big[:, 48:]).all() and torch.isnan(big[:, :48]).all()


# ---- arguments ---------------------------------------------------------------------------------------------

def test_bad_arguments_raise_naming_them():
    x, group, weight, bias = inputs(4, 24, 4, seed=9)
    with pytest.raises(ValueError, match="group"):
        tk.group_layer_norm(x, None, weight, bias)
    with pytest.raises(ValueError, match="add"):
        tk.group_layer_norm(x, group, weight, bias, add=torch.zeros(23))
    with pytest.raises(ValueError, match="weight"):
        tk.group_norm_mul(x, x, group, weight[:, :20], bias[:, :20])
    h, slots, (k_cache, v_cache) = scatter_case(4, 24, 2, seed=0, h_dtype=torch.float32, cache_dtype=torch.float32)
    with pytest.raises(ValueError, match="slots"):
        tk.silu_scatter_kv(h, 24, slots.float(), k_cache, v_cache)
    with pytest.raises(ValueError, match="k_cache"):
        tk.silu_scatter_kv(h, 24, slots, k_cache.transpose(1, 2), v_cache)
