"""8-bit K/V storage: the quantiser's error bound, the paged pool's format and the tiers' round trips
(host memory, disk files with their scales and kv_dtype, a restart)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grinfer.engine.kv_pool import KVData, KVPool
from grinfer.engine.signature import ContextSignature
from grinfer.engine.tiers import DiskTier, HostTier
from grinfer.ops.reference.kv_quant import dequantize_kv, quantize_kv, storage_dtype

EIGHT_BIT = ["int8", "fp8"]
# the largest error of one dequantised value relative to its (token, head)'s max |x|: half an int8 step, or
# half an e4m3 ulp at the top binade (3 mantissa bits: 2**-4 of the value)
REL_BOUND = {"int8": 0.5 / 127, "fp8": 2.0**-4}


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(kv_dtype=st.sampled_from(EIGHT_BIT), tokens=st.integers(0, 9), heads=st.integers(1, 3),
       dim=st.integers(1, 17), log_scale=st.floats(-6, 6), seed=st.integers(0, 2**16))
def test_quantise_dequantise_error_is_bounded_per_token_and_head(kv_dtype, tokens, heads, dim, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, dim, generator=g) * 10.0**log_scale
    q, scale = quantize_kv(x, kv_dtype)
    assert q.dtype == storage_dtype(kv_dtype, torch.float32) and scale.shape == (tokens, heads)
    err = (dequantize_kv(q, scale) - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.all(err <= REL_BOUND[kv_dtype] * amax * (1 + 1e-6) + 1e-30)
    if kv_dtype == "int8":
        assert q.numel() == 0 or int(q.abs().max()) <= 127


@pytest.mark.parametrize("kv_dtype", EIGHT_BIT)
def test_a_zero_row_quantises_to_zeros(kv_dtype):
    q, scale = quantize_kv(torch.zeros(2, 3, 4), kv_dtype)
    assert torch.all(dequantize_kv(q, scale) == 0) and torch.all(scale > 0)


def test_8_bit_pool_holds_about_twice_the_tokens_of_bf16_per_byte():
    """MTGR presets' head dim 256: int8 + a float32 scale per head is 260 bytes against bf16's 512."""
    bf16 = KVPool.bytes_per_token(15, 3, 256, torch.bfloat16)
    for kv_dtype in EIGHT_BIT:
        per_token = KVPool.bytes_per_token(15, 3, 256, torch.bfloat16, kv_dtype)
        assert per_token == 2 * 15 * 3 * (256 + 4)
        assert 1.95 < bf16 / per_token <= 2
    assert KVPool.bytes_per_token(2, 2, 16, torch.float32) / KVPool.bytes_per_token(2, 2, 16, torch.float32,
                                                                                      "int8") == 64 / 20


@pytest.mark.parametrize("kv_dtype", EIGHT_BIT)
def test_pool_write_gather_scatter_round_trip(kv_dtype):
    pool = KVPool(2, 2, 8, block_size=4, num_blocks=6, dtype=torch.float32, device="cpu", kv_dtype=kv_dtype)
    assert pool.k.dtype == storage_dtype(kv_dtype, torch.float32) and pool.k_scale is not None
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 7, 2, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g)
    blocks = [4, 1]  # 7 tokens over two pages, out of order
    slots = pool.slots(blocks, 0, 7)
    for layer in range(2):
        pool.write(layer, slots, k[layer], v[layer])
    held = pool.gather(blocks, 7)
    assert held.kv_dtype == kv_dtype and held.k_scale is not None and held.k_scale.shape == (2, 7, 2)
    for x, q, s in ((k, held.k, held.k_scale), (v, held.v, held.v_scale)):
        expected_q, expected_s = quantize_kv(x, kv_dtype)
        assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)) and torch.equal(s, expected_s)
    other = [0, 3]
    pool.scatter(other, held)  # onboarding a copy into other pages gives the same bytes back
    again = pool.gather(other, 7)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(again.tensors(), held.tensors()))
    pool.write(0, torch.tensor([-1, 2]), k[0, :2], v[0, :2])  # slot -1: not written anywhere a page sees
    assert torch.equal(pool.gather(other, 7).k[0, 0].view(torch.uint8), held.k[0, 0].view(torch.uint8))
    with pytest.raises(ValueError, match="kv_dtype"):
        pool.scatter(other, KVData(k, v))


def sig(user: str, version: int = 0) -> ContextSignature:
    return ContextSignature(user, version, 4, np.asarray([(3, 100, 4)], np.int64), (1, 2))


def quantised(seed: int, kv_dtype: str, tokens: int = 5) -> KVData:
    g = torch.Generator().manual_seed(seed)
    shape = (2, tokens, 3, 5)  # 2 * 5 * 3 * 5 one-byte values: the scales start at a byte offset of 150
    k, ks = quantize_kv(torch.randn(shape, generator=g), kv_dtype)
    v, vs = quantize_kv(torch.randn(shape, generator=g), kv_dtype)
    return KVData(k, v, ks, vs)


def assert_same(a: KVData, b: KVData) -> None:
    assert a.kv_dtype == b.kv_dtype and len(a.tensors()) == len(b.tensors()) == 4
    for x, y in zip(a.tensors(), b.tensors()):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


@pytest.mark.parametrize("kv_dtype", EIGHT_BIT)
def test_host_tier_keeps_and_hands_down_scales(tmp_path, kv_dtype):
    data = [quantised(i, kv_dtype) for i in range(3)]
    disk = DiskTier(tmp_path, capacity_bytes=1 << 20)
    host = HostTier(capacity_bytes=2 * data[0].nbytes, lower=disk)
    for i, kv in enumerate(data):
        host.offload_launch(f"u{i}", sig(f"u{i}"), 5, kv)
    host.flush()
    assert host.used == 2 * data[0].nbytes and set(disk.files) == {"u0"}
    assert disk.used == data[0].nbytes  # values and scales counted
    for i, source in ((0, "disk"), (2, "host")):
        held = host.take(f"u{i}", 0)
        assert held is not None and held.source == source
        assert_same(held.wait(), data[i])
    host.close()


@pytest.mark.parametrize("kv_dtype", EIGHT_BIT)
def test_disk_files_record_the_kv_dtype_and_scales_and_survive_a_restart(tmp_path, kv_dtype):
    kv = quantised(7, kv_dtype)
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    first.offload_launch("alice", sig("alice", 3), 5, kv)
    first.close()
    index = json.loads(first._stem("alice").with_suffix(".json").read_text())
    assert index["kv_dtype"] == kv_dtype and index["scale_dtype"] == "torch.float32"
    assert first._stem("alice").with_suffix(".kv").stat().st_size == kv.nbytes
    second = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert second.used == kv.nbytes
    held = second.take("alice", 3)
    assert held is not None and held.tokens == 5
    assert_same(held.wait(), kv)
    second.close()


def test_disk_index_of_a_model_dtype_entry_without_kv_dtype_still_reads(tmp_path):
    """Files written before 8-bit K/V existed name no kv_dtype and no scales: model-dtype entries."""
    g = torch.Generator().manual_seed(1)
    kv = KVData(torch.randn(2, 5, 3, 5, generator=g), torch.randn(2, 5, 3, 5, generator=g))
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    first.offload_launch("bob", sig("bob"), 5, kv)
    first.close()
    meta = first._stem("bob").with_suffix(".json")
    index = json.loads(meta.read_text())
    del index["kv_dtype"]
    meta.write_text(json.dumps(index))
    held = DiskTier(tmp_path, capacity_bytes=1 << 20).take("bob", 0)
    assert held is not None and held.kv.k_scale is None and torch.equal(held.wait().v, kv.v)


def test_disk_index_whose_kv_dtype_disagrees_with_its_bytes_is_dropped(tmp_path):
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    first.offload_launch("eve", sig("eve"), 5, quantised(2, "int8"))
    first.close()
    meta = first._stem("eve").with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "kv_dtype": "fp8"}))
    assert not DiskTier(tmp_path, capacity_bytes=1 << 20).files and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
def test_disk_entries_whose_values_are_wider_than_their_keys_round_trip(tmp_path, kv_dtype):
    """KVPool's v_head_dim (imported models): V's head dim is recorded beside K's shape."""
    pool = KVPool(2, 3, 4, block_size=4, num_blocks=4, dtype=torch.float32, device="cpu", kv_dtype=kv_dtype,
                  v_head_dim=7)
    g = torch.Generator().manual_seed(3)
    slots = pool.slots([2, 0], 0, 6)
    for layer in range(2):
        pool.write(layer, slots, torch.randn(6, 3, 4, generator=g), torch.randn(6, 3, 7, generator=g))
    kv = pool.gather([2, 0], 6)
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    first.offload_launch("w", sig("w"), 6, kv)
    first.close()
    held = DiskTier(tmp_path, capacity_bytes=1 << 20).take("w", 0)
    assert held is not None and held.wait().v.shape == (2, 6, 3, 7)
    for a, b in zip(held.wait().tensors(), kv.tensors()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
