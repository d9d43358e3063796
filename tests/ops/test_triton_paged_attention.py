"""The dispatcher's paged entry with the Triton kernel against its paged reference twin, in Triton's interpreter.

Tiny ragged batches whose pages are shuffled over a pool of garbage (tests/ops/test_attention_dispatch.py builds
them), queries each sequence's suffix: fp32 and bf16, full-precision and 8-bit K/V, dynamic and causal masks, and
the launch hints the fused backend passes. Without Triton these tests fail, unless GRINFER_SKIP_TRITON=1 skips them.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_dispatch import PagedBatch, paged_batch
from triton_util import interpreted_module

tk = interpreted_module("grinfer.ops.triton.hstu_attention")
SMALL = tk.KernelConfig(16, 16)
# U/S/R/C mixes: full, empty S, empty sequence, only candidates, longer than two key tiles
LAYOUTS = [(2, 5, 4, 6), (1, 0, 3, 2), (0, 0, 0, 0), (0, 0, 0, 3), (3, 14, 9, 11)]
CUTS = [0.4, 0.0, 0.0, 0.0, 0.5]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while a kernel runs; set it per test, restored after."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_kernel_matches(b: PagedBatch, **kw) -> torch.Tensor:
    """Triton vs the paged reference on the same inputs; returns the kernel's output."""
    want = b.paged(kernel="reference", **kw)
    got = b.paged(kernel="triton", config=SMALL, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype == b.q.dtype
    assert want.abs().max() > 1e-2  # not a vacuous comparison
    # float32: accumulation order only; bf16: q and the probabilities rounded to bf16, as the kernel's dots take
    atol = 1e-4 if b.q.dtype == torch.float32 else 2e-2 * max(float(want.float().abs().max()), 1.0)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
    return got


@pytest.mark.parametrize("mode", ["dynamic", "causal"])
@pytest.mark.parametrize("kv_dtype", ["model", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_paged_matches_the_paged_reference(mode, kv_dtype, dtype):
    b = paged_batch(LAYOUTS, page=4, cuts=CUTS, kv_dtype=kv_dtype, dtype=dtype, heads=2, d_qk=16, d_v=16, seed=3)
    assert_kernel_matches(b, mode=mode)


@pytest.mark.parametrize("page", [1, 16, 32])
def test_pages_smaller_equal_and_larger_than_a_key_tile(page):
    b = paged_batch(LAYOUTS, page=page, cuts=CUTS, heads=1, d_qk=16, d_v=16, seed=4)
    assert_kernel_matches(b, normalizer="max_len", max_seq_len=64)


def test_launch_hints_of_the_fused_backend_change_nothing():
    """max_len_q, k_counts and layout_counts (the engine's key layout) as the fused backend passes them."""
    b = paged_batch(LAYOUTS, page=4, cuts=CUTS, kv_dtype="int8", heads=2, d_qk=16, d_v=16, seed=5)
    hints = {"max_len_q": int((b.q_offsets[1:] - b.q_offsets[:-1]).max()),
             "k_counts": tk.key_counts(b.k_group, b.k_offsets), "layout_counts": True}
    torch.testing.assert_close(assert_kernel_matches(b, **hints), b.paged(kernel="triton", config=SMALL),
                               atol=1e-5, rtol=0)


def test_triton_reads_only_the_sequences_pages():
    """Every slot no key owns holds NaN: the kernel's output stays finite and unchanged."""
    b = paged_batch(LAYOUTS, page=4, cuts=CUTS, heads=1, d_qk=16, d_v=16, seed=6)
    want = b.paged(kernel="triton", config=SMALL)
    b.poison_unowned()
    got = b.paged(kernel="triton", config=SMALL)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)

