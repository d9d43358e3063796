"""Attention over 8-bit K/V: the reference dequantises exactly as `dequantize_kv`; the Triton kernel (in
Triton's interpreter, tiny shapes) matches the reference on random ragged batches, keys read in place from
a paged pool of shuffled pages as the engine's are."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_util import interpreted_module

from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.jagged import offsets_of
from grinfer.ops.reference.hstu_attention import hstu_attention
from grinfer.ops.reference.kv_quant import dequantize_kv, quantize_kv

tk = interpreted_module("grinfer.ops.triton.hstu_attention")
SMALL = tk.KernelConfig(16, 16)
HEADS, D_QK, D_V = 2, 12, 10


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def ragged(layouts: list[tuple[int, int, int, int]], seed: int):
    """Random q/k/v and metadata of sequences [U | S | R | C] (pos = index in the sequence)."""
    g = torch.Generator().manual_seed(seed)
    group = [x for nu, ns, nr, nc in layouts
             for x in [GROUP_U] * nu + [GROUP_S] * ns + [GROUP_R] * nr + [GROUP_C] * nc]
    pos = [p for layout in layouts for p in range(sum(layout))]
    t = len(group)
    offsets = offsets_of(torch.tensor([sum(layout) for layout in layouts], dtype=torch.int64))
    meta = (offsets, offsets, torch.tensor(group, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64))
    return (torch.randn(t, HEADS, D_QK, generator=g), torch.randn(t, HEADS, D_QK, generator=g) * 3,
            torch.randn(t, HEADS, D_V, generator=g), meta)


def args(meta):
    q_off, k_off, group, pos = meta
    return q_off, k_off, group, pos, group, pos


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_reference_with_scales_is_attention_over_the_dequantised_keys(kv_dtype):
    q, k, v, meta = ragged([(2, 5, 3, 4), (1, 0, 2, 3), (0, 0, 0, 0)], seed=0)
    (kq, ks), (vq, vs) = quantize_kv(k, kv_dtype), quantize_kv(v, kv_dtype)
    got = hstu_attention(q, kq, vq, *args(meta), k_scale=ks, v_scale=vs)
    want = hstu_attention(q, dequantize_kv(kq, ks), dequantize_kv(vq, vs), *args(meta))
    assert torch.equal(got, want)
    full = hstu_attention(q, k, v, *args(meta))
    assert 0 < (got - full).abs().max() < 0.1 * full.abs().max()  # quantised, and close to full precision


def paged(k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, page: int, kv_dtype: str, seed: int):
    """k/v quantised into a pool of shuffled pages (spare pages hold other values) and its block table."""
    g = torch.Generator().manual_seed(seed)
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    blocks = [-(-n // page) for n in lengths]
    ids = torch.randperm(sum(blocks) + 2, generator=g)
    table = torch.zeros(len(lengths), max([*blocks, 1]), dtype=torch.int64)
    pool_k, k_scale = quantize_kv(torch.randn(len(ids) * page, HEADS, D_QK, generator=g), kv_dtype)
    pool_v, v_scale = quantize_kv(torch.randn(len(ids) * page, HEADS, D_V, generator=g), kv_dtype)
    (kq, ks), (vq, vs) = quantize_kv(k, kv_dtype), quantize_kv(v, kv_dtype)
    for i, n in enumerate(blocks):
        table[i, :n] = ids[sum(blocks[:i]):sum(blocks[:i + 1])]
        j = torch.arange(lengths[i])
        slots, rows = table[i, j // page] * page + j % page, int(offsets[i]) + j
        pool_k[slots], pool_v[slots], k_scale[slots], v_scale[slots] = kq[rows], vq[rows], ks[rows], vs[rows]
    return (kq, vq, ks, vs), (pool_k, pool_v, k_scale, v_scale), table


LAYOUT = st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 6), st.integers(0, 7))


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(layouts=st.lists(LAYOUT, min_size=1, max_size=4), kv_dtype=st.sampled_from(["int8", "fp8"]),
       page=st.sampled_from([4, 16]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_kernel_over_an_8_bit_paged_pool_matches_the_reference(layouts, kv_dtype, page, dtype, seed):
    q, k, v, meta = ragged(layouts, seed)
    (kq, vq, ks, vs), (pool_k, pool_v, pk_scale, pv_scale), table = paged(k, v, meta[0], page, kv_dtype, seed)
    want = hstu_attention(q.to(dtype), kq, vq, *args(meta), k_scale=ks, v_scale=vs).float()
    got = tk.triton_hstu_attention(q.to(dtype), pool_k, pool_v, *args(meta), config=SMALL, block_table=table,
                                   page_size=page, k_scale=pk_scale, v_scale=pv_scale)
    assert got.dtype == dtype
    # float32: accumulation order only; bf16: q and the probabilities rounded to bf16, as the kernel's dots take
    atol = 1e-4 if dtype == torch.float32 else 2e-2 * max(float(want.abs().max()), 1.0)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


def test_kernel_with_dense_8_bit_keys_matches_the_reference():
    q, k, v, meta = ragged([(2, 5, 4, 6), (3, 14, 9, 11), (0, 0, 0, 3)], seed=3)
    (kq, ks), (vq, vs) = quantize_kv(k, "int8"), quantize_kv(v, "int8")
    got = tk.triton_hstu_attention(q, kq, vq, *args(meta), normalizer="max_len", config=SMALL, k_scale=ks,
                                   v_scale=vs)
    want = hstu_attention(q, kq, vq, *args(meta), normalizer="max_len", max_seq_len=256, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_kernel_checks_8_bit_arguments():
    q, k, v, meta = ragged([(1, 2, 1, 2)], seed=4)
    (kq, ks), (vq, vs) = quantize_kv(k, "int8"), quantize_kv(v, "int8")
    with pytest.raises(ValueError, match="k, v"):
        tk.triton_hstu_attention(q, kq, vq, *args(meta))  # 8-bit without scales
    with pytest.raises(ValueError, match="k_scale"):
        tk.triton_hstu_attention(q, kq, vq, *args(meta), k_scale=ks[:, :1], v_scale=vs)
    with pytest.raises(ValueError, match="k, v"):
        tk.triton_hstu_attention(q, k, v, *args(meta), k_scale=ks, v_scale=vs)  # scales for float K/V


def test_dispatcher_passes_8_bit_keys_to_either_kernel_and_names_bad_scales():
    from grinfer.ops import hstu_attention as dispatch

    q, k, v, meta = ragged([(2, 5, 4, 6), (0, 3, 0, 2)], seed=5)
    (kq, ks), (vq, vs) = quantize_kv(k, "int8"), quantize_kv(v, "int8")
    got = {kernel: dispatch.hstu_attention(q, kq, vq, *args(meta), k_scale=ks, v_scale=vs, kernel=kernel)
           for kernel in ("reference", "triton")}
    torch.testing.assert_close(got["triton"], got["reference"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="v: expected a floating-point tensor"):
        dispatch.hstu_attention(q, kq, vq, *args(meta), k_scale=ks, kernel="reference")
    with pytest.raises(ValueError, match="k_scale: expected 8-bit k"):
        dispatch.hstu_attention(q, k, v, *args(meta), k_scale=ks, v_scale=vs, kernel="reference")
