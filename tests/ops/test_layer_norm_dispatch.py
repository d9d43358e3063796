"""The layer-epilogue dispatchers (`grinfer.ops.layer_norm`): which kernel runs, and that both agree."""

from __future__ import annotations

import pytest
import torch
from triton_util import interpreted_module

from grinfer.ops import layer_norm as dispatch
from grinfer.ops.reference import layer_norm as ref

interpreted_module("grinfer.ops.triton.layer_norm")  # the dispatcher's kernel="triton" then runs interpreted


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def case(rows: int = 9, d: int = 32, groups: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    group = torch.randint(0, groups, (rows,), generator=g)
    return x, group, torch.randn(groups, d, generator=g), torch.randn(groups, d, generator=g)


def test_auto_picks_reference_on_cpu_with_grad_and_past_max_dim(monkeypatch):
    x, _, weight, _ = case()
    assert dispatch.choose_kernel("auto", 32, x, weight) == "reference"  # CPU tensors
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert dispatch.choose_kernel("auto", 32, x, weight) == "triton"
    assert dispatch.choose_kernel("auto", 10 ** 6, x, weight) == "reference"  # wider than the kernels' MAX_DIM
    assert dispatch.choose_kernel("auto", 32, x, weight.requires_grad_()) == "reference"
    assert dispatch.choose_kernel("reference", 32, x) == "reference"
    assert dispatch.choose_kernel("triton", 32, x) == "triton"


def test_unknown_kernel_is_rejected_by_name():
    x, group, weight, bias = case()
    with pytest.raises(ValueError, match="kernel"):
        dispatch.group_layer_norm(x, group, weight, bias, kernel="cuda")
    with pytest.raises(ValueError, match="kernel"):
        dispatch.LayerNormKernels("cuda")


@pytest.mark.parametrize("bound", [False, True], ids=["kernel-argument", "LayerNormKernels"])
@pytest.mark.parametrize("kernel", ["auto", "reference", "triton"])
def test_each_kernel_matches_the_reference(kernel, bound):
    x, group, weight, bias = case()
    ops = dispatch.LayerNormKernels(kernel) if bound else None
    kw = {} if bound else {"kernel": kernel}
    add = torch.randn(32)
    want_x = x.clone()
    want = ref.group_layer_norm(want_x, group, weight, bias, add=add)
    got = (ops or dispatch).group_layer_norm(x, group, weight, bias, add=add, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(x, want_x)  # `add` written back in place by both

    a, u = torch.randn(9, 4, 8), torch.randn(9, 32)
    torch.testing.assert_close((ops or dispatch).group_norm_mul(a, u, group, weight, bias, **kw),
                               ref.group_norm_mul(a, u, group, weight, bias), atol=1e-5, rtol=0)

    h = torch.randn(9, 4 * 32)
    slots = torch.tensor([0, -1, 2, 3, -1, 5, 6, 7, 1])
    caches = [torch.zeros(8, 4, 8) for _ in range(4)]
    want_h = h.clone()
    ref.silu_scatter_kv(want_h, 32, slots, caches[0], caches[1])
    (ops or dispatch).silu_scatter_kv(h, 32, slots, caches[2], caches[3], **kw)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[2], caches[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[3], caches[1], atol=1e-5, rtol=0)
