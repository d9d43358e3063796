"""The Triton attention kernel's opt-in variants (KernelConfig: prefetch, overlap, scan, persistent, tl.range hints)
against the reference, in Triton's interpreter: jagged and paged keys (a block id per key and per tile), dynamic and
causal masks, both normalisers, fp32 and bf16, int8 and fp8 K/V, shuffled keys (the remainder loop), generated
ragged batches. The default config stays version 4's (KERNELS.md, versions 5+).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_attention_dispatch import paged_batch
from test_triton_attention import HYPOTHESIS, MIXED, assert_matches, make_batch, run_both, suffix_rows
from test_triton_paged_attention import CUTS, LAYOUTS
from triton_util import interpreted_module

from grinfer.ops.reference.hstu_attention import hstu_attention as reference_attention

tk = interpreted_module("grinfer.ops.triton.hstu_attention")
BASE = tk.KernelConfig(16, 16)
VARIANTS = {
    "prefetch": tk.KernelConfig(16, 16, prefetch=True),
    "overlap": tk.KernelConfig(16, 16, overlap=True),
    "prefetch+overlap": tk.KernelConfig(16, 16, prefetch=True, overlap=True),
    "scan": tk.KernelConfig(16, 16, scan=32),
    "prefetch+scan-one-tile": tk.KernelConfig(16, 16, prefetch=True, scan=16),
    "persistent": tk.KernelConfig(16, 16, persistent=1),
    "persistent+overlap": tk.KernelConfig(32, 16, persistent=2, overlap=True),
    "range-hints": tk.KernelConfig(16, 16, num_stages=3, loop_stages=3, unroll=2, warp_specialize=True),
    "tma": tk.KernelConfig(16, 16, tma=True),
    "tma+prefetch": tk.KernelConfig(16, 16, tma=True, prefetch=True),
    "tma+ws+persistent": tk.KernelConfig(16, 16, tma=True, warp_specialize=True, persistent=1, scan=32),
}
CONFIGS = list(VARIANTS.values())
IDS = list(VARIANTS)


def dims(config) -> dict[str, int]:
    """Head dims for make_batch: padded ones (24, 20), or powers of two where TMA needs them."""
    return {"d_qk": 16, "d_v": 16} if config.tma else {"d_qk": 24, "d_v": 20}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while a kernel runs; set it per test, restored after."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mode, normalizer", [("dynamic", "visible"), ("causal", "max_len")])
def test_variants_on_jagged_keys_match_reference(config, mode, normalizer):
    """Full sequences and suffix queries (the warm shape), empty sequences and only-candidate ones included."""
    b = make_batch(MIXED, seed=21, **dims(config))
    assert_matches(*run_both(b, mode, normalizer, config=config))
    rows, q_offsets = suffix_rows(b, [11, 1, 0, 5, 0, 0, 20])
    assert_matches(*run_both(b, mode, normalizer, rows, q_offsets, config=config))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kv_dtype, dtype, page", [("model", torch.float32, 16), ("model", torch.bfloat16, 32),
                                                   ("int8", torch.bfloat16, 4), ("fp8", torch.float32, 16)])
def test_variants_on_paged_keys_match_the_paged_reference(config, kv_dtype, dtype, page):
    """Shuffled pages over a garbage pool; pages of 16 and 32 (one block id per tile, the prefetched one) and of 4
    (one per key); 8-bit K/V; the fused backend's hints (layout counts) and without them."""
    if config.tma and kv_dtype != "model":
        pytest.skip("TMA tiles are model-dtype K/V only (8-bit K/V raise: test_tma_needs)")
    b = paged_batch(LAYOUTS, page=page, cuts=CUTS, kv_dtype=kv_dtype, dtype=dtype, heads=2, d_qk=16, d_v=16, seed=22)
    want = b.paged(kernel="reference")
    hints = {"max_len_q": int((b.q_offsets[1:] - b.q_offsets[:-1]).max()),
             "k_counts": tk.key_counts(b.k_group, b.k_offsets), "layout_counts": True}
    atol = 1e-4 if dtype == torch.float32 and kv_dtype == "model" else 2e-2 * max(float(want.float().abs().max()), 1)
    for kw in ({}, hints):
        got = b.paged(kernel="triton", config=config, **kw)
        assert got.dtype == want.dtype and want.abs().max() > 1e-2
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
        # the variant changes the schedule, not the sums: within float rounding of version 4's output
        torch.testing.assert_close(got.float(), b.paged(kernel="triton", config=BASE, **kw).float(),
                                   atol=atol / 4, rtol=0)
    causal = b.paged(kernel="triton", config=config, mode="causal")
    torch.testing.assert_close(causal.float(), b.paged(kernel="reference", mode="causal").float(), atol=atol, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mode", ["dynamic", "causal"])
def test_variants_with_shuffled_keys_match_reference(config, mode):
    """Keys shuffled within each sequence, or ordered [U/S | C | R] with one query per sequence: visible keys past
    the main loop, found only by the remainder (tile by tile, or chunk by chunk with scan)."""
    b = make_batch([*MIXED[:4], MIXED[6]], seed=23, **dims(config))
    gen = torch.Generator().manual_seed(1)
    perm = torch.cat([int(b.offsets[i]) + torch.randperm(int(b.offsets[i + 1] - b.offsets[i]), generator=gen)
                      for i in range(len(b.offsets) - 1)])
    got = tk.triton_hstu_attention(b.q, b.k[perm], b.v[perm], b.offsets, b.offsets, b.group, b.pos, b.group[perm],
                                   b.pos[perm], mode=mode, config=config)
    assert_matches(got, reference_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos,
                                            mode=mode))
    us, r, c = range(0, 16), range(16, 32), range(32, 64)
    cases = [([*us, *c, *r], 16), ([*us, *c, *r], 40), ([*us, *r, *reversed(c)], 40)]  # (key order, query pos)
    b = make_batch([(2, 14, 16, 32)] * len(cases), heads=1, seed=24, **dims(config))
    perm = torch.tensor([64 * i + j for i, (order, _) in enumerate(cases) for j in order])
    rows = torch.tensor([64 * i + pos for i, (_, pos) in enumerate(cases)])
    meta = (torch.arange(len(cases) + 1), b.offsets, b.group[rows], b.pos[rows])
    got = tk.triton_hstu_attention(b.q[rows], b.k[perm], b.v[perm], *meta, b.group[perm], b.pos[perm], mode=mode,
                                   config=config)
    assert_matches(got, reference_attention(b.q[rows], b.k, b.v, *meta, b.group, b.pos, mode=mode))


@HYPOTHESIS
@given(layouts=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12), st.integers(0, 8), st.integers(0, 12)),
                        min_size=1, max_size=3),
       mode=st.sampled_from(["dynamic", "causal"]), name=st.sampled_from(IDS),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_generated_batches_match_reference(layouts, mode, name, cuts, seed):
    b = make_batch(layouts, heads=1, d_qk=16, d_v=16, seed=seed)
    rows, q_offsets = suffix_rows(b, [round(c * sum(layout)) for c, layout in zip(cuts, layouts)])
    got, want = run_both(b, mode, "visible", rows, q_offsets, config=VARIANTS[name])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_default_configs():
    """The fused backend's call at head dim 256 in 16-bit (layout counts) takes versions 5 + scan, the shape
    that won on the H200 (KERNELS.md); every other default launch shape keeps the variants off."""
    for d in (32, 64, 128, 256):
        for dtype in (torch.float32, torch.bfloat16):
            for layout_counts in (False, True):
                cfg = tk.default_config(d, d, dtype, layout_counts)
                if d == 256 and dtype == torch.bfloat16 and layout_counts:
                    assert str(cfg) == "m128 n32 w8 s3 prefetch scan256"
                else:
                    assert cfg == tk.KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert str(tk.KernelConfig(64, 32, 4, 3, prefetch=True, scan=256, persistent=1)) == \
        "m64 n32 w4 s3 prefetch scan256 p1"


@pytest.mark.parametrize("change, match", [({"scan": 8}, "scan"), ({"scan": 48}, "scan"), ({"persistent": -1},
                                           "persistent"), ({"loop_stages": -2}, "loop_stages")])
def test_bad_variant_fields_raise_naming_them(change, match):
    with pytest.raises(ValueError, match=match):
        tk.KernelConfig(16, 16, **change)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_variants_read_only_the_sequences_pages(config):
    """Every slot no key owns holds NaN (prefetched block ids past the end, TMA's whole tiles): nothing changes."""
    b = paged_batch(LAYOUTS, page=16, cuts=CUTS, heads=1, d_qk=16, d_v=16, seed=26)
    want = b.paged(kernel="triton", config=config)
    b.poison_unowned()
    got = b.paged(kernel="triton", config=config)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_tma_needs_its_shapes_and_says_so():
    b = paged_batch(LAYOUTS, page=4, cuts=CUTS, heads=2, d_qk=16, d_v=16, seed=25)
    with pytest.raises(ValueError, match=r"config\.tma"):  # pages smaller than a tile
        b.paged(kernel="triton", config=VARIANTS["tma"])
    b = paged_batch(LAYOUTS, page=16, cuts=CUTS, kv_dtype="int8", heads=2, d_qk=16, d_v=16, seed=25)
    with pytest.raises(ValueError, match=r"config\.tma"):
        b.paged(kernel="triton", config=VARIANTS["tma"])
    with pytest.raises(ValueError, match=r"config\.tma"):  # a padded head dim
        run_both(make_batch(MIXED), "dynamic", "visible", config=VARIANTS["tma"])
    with pytest.raises(ValueError, match="tma"):
        tk.KernelConfig(16, 16, tma=True, overlap=True)
