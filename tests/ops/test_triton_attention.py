"""The Triton HSTU attention kernel against the reference, in Triton's interpreter on the CPU.

The kernel module is imported under the interpreter (tests/triton_util.py) and TRITON_INTERPRET=1 is
set during each test here. Shapes are small: the interpreter runs every program in numpy. Without
Triton these tests fail, unless GRINFER_SKIP_TRITON=1 asks to skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_util import interpreted_module

from grinfer.ops import hstu_attention as attention
from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.jagged import offsets_of
from grinfer.ops.reference.hstu_attention import hstu_attention as reference_attention

tk = interpreted_module("grinfer.ops.triton.hstu_attention")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while a kernel runs; set it per test, restored after."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


ATOL = 1e-4
RTOL = 1e-4
HYPOTHESIS = settings(max_examples=10, deadline=None, derandomize=True, database=None)
SMALL = tk.KernelConfig(16, 16)

Layout = tuple[int, int, int, int]  # (num_U, num_S, num_R, num_C) of one sequence
# U/S/R/C mixes: full, empty S, empty R, no candidates, only candidates, empty, longer than two tiles
MIXED: list[Layout] = [(2, 5, 4, 6), (1, 0, 3, 2), (1, 4, 0, 3), (2, 3, 3, 0), (0, 0, 0, 3), (0, 0, 0, 0),
                       (3, 14, 9, 11)]


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    offsets: torch.Tensor
    group: torch.Tensor
    pos: torch.Tensor


def make_batch(layouts: list[Layout], heads: int = 2, d_qk: int = 24, d_v: int = 20, seed: int = 0) -> Batch:
    """Random q/k/v (never zeros) for sequences [U | S | R | C] with pos = index in the sequence."""
    gen = torch.Generator().manual_seed(seed)
    group, pos = [], []
    for nu, ns, nr, nc in layouts:
        g = [GROUP_U] * nu + [GROUP_S] * ns + [GROUP_R] * nr + [GROUP_C] * nc
        group += g
        pos += range(len(g))
    total = len(group)
    offsets = offsets_of(torch.tensor([sum(layout) for layout in layouts], dtype=torch.int64))
    return Batch(torch.randn(total, heads, d_qk, generator=gen), torch.randn(total, heads, d_qk, generator=gen),
                 torch.randn(total, heads, d_v, generator=gen), offsets, torch.tensor(group, dtype=torch.int64),
                 torch.tensor(pos, dtype=torch.int64))


def suffix_rows(b: Batch, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each sequence from its `starts[i]`-th token on, and their offsets (queries as the KV cache asks)."""
    rows, lengths = [], []
    for i, start in enumerate(starts):
        lo, hi = int(b.offsets[i]), int(b.offsets[i + 1])
        rows += range(min(lo + start, hi), hi)
        lengths.append(max(hi - lo - start, 0))
    return torch.tensor(rows, dtype=torch.int64), offsets_of(torch.tensor(lengths, dtype=torch.int64))


def run_both(b: Batch, mode: str, normalizer: str, rows: torch.Tensor | None = None,
             q_offsets: torch.Tensor | None = None, config: tk.KernelConfig = SMALL, dtype: torch.dtype = torch.float32,
             max_seq_len: int = 40, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, reference) outputs: queries `rows` (default: every token) over every key."""
    rows = torch.arange(len(b.group)) if rows is None else rows
    q_offsets = b.offsets if q_offsets is None else q_offsets
    q, k, v = b.q[rows].to(dtype), b.k.to(dtype), b.v.to(dtype)
    args = (q_offsets, b.offsets, b.group[rows], b.pos[rows], b.group, b.pos)
    got = tk.triton_hstu_attention(q, k, v, *args, mode=mode, normalizer=normalizer, max_seq_len=max_seq_len,
                                   config=config, **kw)
    want = reference_attention(q, k, v, *args, mode=mode, normalizer=normalizer, max_seq_len=max_seq_len, **kw)
    return got, want


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert want.abs().max() > 1e-2  # not a vacuous comparison
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# ---- every mask case, both normalisers --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic", "causal"])
@pytest.mark.parametrize("normalizer", ["visible", "max_len"])
def test_full_sequences_match_reference(mode, normalizer):
    assert_matches(*run_both(make_batch(MIXED), mode, normalizer))


@pytest.mark.parametrize("mode", ["dynamic", "causal"])
def test_suffix_queries_over_all_keys_match_reference(mode):
    """Queries = each sequence's tail (new R events + candidates, or a cut inside S), keys = everything."""
    b = make_batch(MIXED, seed=1)
    starts = [11, 1, 0, 5, 0, 0, 20]  # R+C, S..C, all, R only, all candidates, empty, inside R
    rows, q_offsets = suffix_rows(b, starts)
    got, want = run_both(b, mode, "visible", rows, q_offsets)
    assert_matches(got, want)


def test_candidates_only_over_cached_context():
    """The warm-request shape: only candidate queries, over the cached context plus the candidates."""
    b = make_batch([(2, 9, 5, 12), (1, 3, 0, 17)], seed=2)
    rows, q_offsets = suffix_rows(b, [16, 4])
    assert_matches(*run_both(b, "dynamic", "max_len", rows, q_offsets))


@pytest.mark.parametrize("mode", ["dynamic", "causal"])
def test_any_key_order_matches_reference(mode):
    """Keys shuffled within each sequence: the layout the kernel's loop bounds expect is gone, the result is not."""
    b = make_batch([*MIXED[:4], MIXED[6]], seed=3)
    gen = torch.Generator().manual_seed(0)
    perm = torch.cat([int(b.offsets[i]) + torch.randperm(int(b.offsets[i + 1] - b.offsets[i]), generator=gen)
                      for i in range(len(b.offsets) - 1)])
    got = tk.triton_hstu_attention(b.q, b.k[perm], b.v[perm], b.offsets, b.offsets, b.group, b.pos, b.group[perm],
                                   b.pos[perm], mode=mode, config=SMALL)
    want = reference_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos, mode=mode)
    assert_matches(got, want)


@pytest.mark.parametrize("mode", ["dynamic", "causal"])
def test_reversed_keys_with_single_queries_match_reference(mode):
    """Keys in reverse order and one query per sequence (its first token, last S, last R event or first
    candidate): the keys it sees land past the main loop's bound, at the edges of the remainder's tile test."""
    base = [(1, 3, 2, 20), (2, 9, 6, 4), (0, 1, 0, 19)]
    b = make_batch([layout for layout in base for _ in range(4)], heads=1, seed=9)
    rows, perm = [], []
    for i in range(len(b.offsets) - 1):
        lo, hi = int(b.offsets[i]), int(b.offsets[i + 1])
        group = b.group[lo:hi].tolist()
        last = lambda g, group=group: len(group) - 1 - group[::-1].index(g) if g in group else 0
        rows.append(lo + [0, last(GROUP_S), last(GROUP_R), group.index(GROUP_C)][i % 4])
        perm += range(hi - 1, lo - 1, -1)
    rows, perm = torch.tensor(rows), torch.tensor(perm)
    q_offsets = torch.arange(len(rows) + 1)
    got = tk.triton_hstu_attention(b.q[rows], b.k[perm], b.v[perm], q_offsets, b.offsets, b.group[rows],
                                   b.pos[rows], b.group[perm], b.pos[perm], mode=mode, config=SMALL)
    want = reference_attention(b.q[rows], b.k, b.v, q_offsets, b.offsets, b.group[rows], b.pos[rows], b.group,
                               b.pos, mode=mode)
    assert_matches(got, want)


def test_permuted_keys_put_single_visible_keys_in_tiles_of_one_group():
    """Layout (2, 14, 16, 32), tiles of 16 keys: keys ordered [U/S | C | R] or [U/S | R | reversed C], so whole
    tiles of R or C keys lie past the main loop's bound; the query (first R event or a middle candidate, one
    per sequence) sees one key of such a tile, or all of them."""
    layout, us, r, c = (2, 14, 16, 32), range(0, 16), range(16, 32), range(32, 64)
    cases = [([*us, *c, *r], 16), ([*us, *c, *r], 40), ([*us, *r, *reversed(c)], 40)]  # (key order, query pos)
    b = make_batch([layout] * len(cases), heads=1, seed=10)
    perm = torch.tensor([64 * i + j for i, (order, _) in enumerate(cases) for j in order])
    rows = torch.tensor([64 * i + pos for i, (_, pos) in enumerate(cases)])
    q_offsets = torch.arange(len(cases) + 1)
    got = tk.triton_hstu_attention(b.q[rows], b.k[perm], b.v[perm], q_offsets, b.offsets, b.group[rows],
                                   b.pos[rows], b.group[perm], b.pos[perm], config=SMALL)
    want = reference_attention(b.q[rows], b.k, b.v, q_offsets, b.offsets, b.group[rows], b.pos[rows], b.group,
                               b.pos)
    assert_matches(got, want)


@pytest.mark.parametrize("config", [tk.KernelConfig(16, 32), tk.KernelConfig(32, 16), tk.KernelConfig(32, 32)],
                         ids=["m16n32", "m32n16", "m32n32"])
def test_tile_sizes_that_do_and_do_not_divide_the_lengths(config):
    b = make_batch([(2, 14, 0, 16), (3, 14, 9, 11), (0, 16, 0, 0)], heads=1, seed=4)  # lengths 32, 37, 16
    assert_matches(*run_both(b, "dynamic", "visible", config=config))


def test_head_dims_are_padded_and_masked():
    b = make_batch([(1, 3, 2, 3), (2, 1, 0, 2)], heads=1, d_qk=5, d_v=33, seed=5)
    assert_matches(*run_both(b, "dynamic", "visible", alpha=0.3))


def test_key_counts_per_sequence():
    b = make_batch(MIXED)
    counts = tk.key_counts(b.group, b.offsets)
    want = [[nu + ns, nu + ns + nr] for nu, ns, nr, _ in MIXED]
    assert counts.dtype == torch.int32 and counts.tolist() == want


# ---- keys read from a paged pool -------------------------------------------------------------------

def paged_case(layouts: list[Layout], page: int, seed: int):
    """The batch's keys moved into a pool of shuffled pages (spare pages hold garbage) and their block table."""
    b = make_batch(layouts, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-sum(layout) // page) for layout in layouts]
    ids = torch.randperm(sum(blocks) + 3, generator=gen)
    table = torch.zeros(len(layouts), max([*blocks, 1]), dtype=torch.int64)
    k_pool = torch.randn(len(ids) * page, 2, 24, generator=gen)
    v_pool = torch.randn(len(ids) * page, 2, 20, generator=gen)
    for i, n in enumerate(blocks):
        table[i, :n] = ids[sum(blocks[:i]):sum(blocks[:i + 1])]
        j = torch.arange(int(b.offsets[i + 1] - b.offsets[i]))
        slots = table[i, j // page] * page + j % page
        k_pool[slots], v_pool[slots] = b.k[int(b.offsets[i]) + j], b.v[int(b.offsets[i]) + j]
    return b, k_pool, v_pool, table


@pytest.mark.parametrize("page", [4, 16, 64])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_paged_keys_match_reference(page, table_dtype):
    """The engine's shape: every key in the paged pool, queries the new context tokens and candidates."""
    layouts = [(2, 5, 4, 6), (1, 0, 3, 2), (2, 3, 3, 0), (0, 0, 0, 3), (0, 0, 0, 0), (3, 14, 9, 11)]
    b, k_pool, v_pool, table = paged_case(layouts, page, seed=11)
    rows, q_offsets = suffix_rows(b, [11, 1, 5, 0, 0, 20])  # R+C, S..C, none, only candidates, empty, inside R
    args = (q_offsets, b.offsets, b.group[rows], b.pos[rows], b.group, b.pos)
    got = tk.triton_hstu_attention(b.q[rows], k_pool, v_pool, *args, config=SMALL, block_table=table.to(table_dtype),
                                   page_size=page)
    assert_matches(got, reference_attention(b.q[rows], b.k, b.v, *args))


@pytest.mark.parametrize("paged", [False, True])
def test_visible_counts_from_the_layout_match_counting(paged):
    """layout_counts: the engine's key layout gives each query's visible-key count without counting tiles."""
    layouts = [(2, 5, 4, 6), (1, 0, 3, 2), (2, 3, 3, 0), (0, 0, 0, 3), (0, 0, 0, 0), (3, 14, 9, 11)]
    b, k_pool, v_pool, table = paged_case(layouts, 16, seed=14)
    rows, q_offsets = suffix_rows(b, [0, 1, 6, 0, 0, 20])
    args = (q_offsets, b.offsets, b.group[rows], b.pos[rows], b.group, b.pos)
    keys = {"block_table": table, "page_size": 16} if paged else {}
    got = tk.triton_hstu_attention(b.q[rows], k_pool if paged else b.k, v_pool if paged else b.v, *args,
                                   config=SMALL, layout_counts=True, **keys)
    assert_matches(got, reference_attention(b.q[rows], b.k, b.v, *args))
    with pytest.raises(ValueError, match="layout_counts"):
        tk.triton_hstu_attention(b.q[rows], b.k, b.v, *args, mode="causal", layout_counts=True)


def test_paged_arguments_are_checked():
    b, k_pool, v_pool, table = paged_case([(1, 2, 1, 2)], 4, seed=13)
    args = (b.offsets, b.offsets, b.group, b.pos, b.group, b.pos)
    with pytest.raises(ValueError, match="page_size"):
        tk.triton_hstu_attention(b.q, k_pool, v_pool, *args, block_table=table, page_size=6)
    with pytest.raises(ValueError, match="block_table"):
        tk.triton_hstu_attention(b.q, k_pool, v_pool, *args, block_table=table.float(), page_size=4)


# ---- precision -------------------------------------------------------------------------------------------

def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["dynamic", "causal"])
def test_low_precision_error_at_most_twice_the_reference_ops(dtype, mode):
    """Error vs an fp32 reference on the fp32 inputs: at most 2x that of the reference op run in low precision."""
    b = make_batch(MIXED, d_qk=32, d_v=32, seed=6)
    exact = reference_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos, mode=mode)
    got, low_ref = run_both(b, mode, "visible", dtype=dtype)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert rel_err(got, exact) <= 2 * rel_err(low_ref, exact), (rel_err(got, exact), rel_err(low_ref, exact))


# ---- edge cases ---------------------------------------------------------------------------------------

def test_every_output_element_is_written():
    b = make_batch(MIXED, seed=7)
    out = torch.full((len(b.group), 2, 20), float("nan"))
    tk.triton_hstu_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos, out=out,
                             config=SMALL)
    assert torch.isfinite(out).all()
    assert_matches(out, reference_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos))


def test_empty_sequences_and_empty_batch():
    b = make_batch([(0, 0, 0, 0), (0, 0, 0, 0)])
    got = attention.hstu_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos,
                                   kernel="triton")
    assert got.shape == (0, 2, 20)
    no_seq = torch.zeros(1, dtype=torch.int64)
    got = tk.triton_hstu_attention(b.q, b.k, b.v, no_seq, no_seq, b.group, b.pos, b.group, b.pos)
    assert got.shape == (0, 2, 20)


def test_offsets_that_do_not_span_the_tokens_raise():
    b = make_batch([(1, 2, 1, 2)])
    short = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="q_offsets"):
        tk.triton_hstu_attention(b.q, b.k, b.v, short, b.offsets, b.group, b.pos, b.group, b.pos)


@HYPOTHESIS
@given(layouts=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12), st.integers(0, 8), st.integers(0, 12)),
                        min_size=1, max_size=3),
       mode=st.sampled_from(["dynamic", "causal"]), normalizer=st.sampled_from(["visible", "max_len"]),
       block=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_generated_batches_and_suffixes_match_reference(layouts, mode, normalizer, block, cuts, seed):
    b = make_batch(layouts, heads=1, d_qk=16, d_v=16, seed=seed)
    lengths = [sum(layout) for layout in layouts]
    rows, q_offsets = suffix_rows(b, [round(c * n) for c, n in zip(cuts, lengths)])
    got, want = run_both(b, mode, normalizer, rows, q_offsets, config=tk.KernelConfig(*block))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# ---- the dispatcher ----------------------------------------------------------------------------------

def call(b: Batch, **kw) -> torch.Tensor:
    return attention.hstu_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos, **kw)


def test_dispatcher_triton_matches_reference():
    b = make_batch(MIXED[:3], seed=8)
    assert_matches(call(b, kernel="triton"), call(b, kernel="reference"))


def test_auto_picks_reference_on_cpu_and_with_bias(monkeypatch):
    b = make_batch([(1, 2, 1, 2)])
    q = b.q
    assert attention.choose_kernel("auto", q, b.k, b.v, has_bias=False) == "reference"  # CPU tensors
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert attention.choose_kernel("auto", q, b.k, b.v, has_bias=False) == "triton"
    assert attention.choose_kernel("auto", q, b.k, b.v, has_bias=True) == "reference"
    assert attention.choose_kernel("auto", q.requires_grad_(), b.k, b.v, has_bias=False) == "reference"


def test_dispatcher_bias_falls_back_or_raises():
    b = make_batch([(1, 2, 1, 2)])
    tables = {"pos_table": torch.randn(7), "time_table": torch.randn(4), "q_ts": b.pos, "k_ts": b.pos}
    want = reference_attention(b.q, b.k, b.v, b.offsets, b.offsets, b.group, b.pos, b.group, b.pos, **tables)
    torch.testing.assert_close(call(b, kernel="auto", **tables), want)
    with pytest.raises(ValueError, match="relative bias"):
        call(b, kernel="triton", **tables)


@pytest.mark.parametrize(("change", "match"), [
    ({"kernel": "cuda"}, "kernel"),
    ({"mode": "bidirectional"}, "'bidirectional'"),
    ({"normalizer": "total"}, "'total'"),
    ({"k": torch.randn(6, 3, 24)}, "k:"),
    ({"v": torch.randn(5, 2, 20)}, "v:"),
    ({"q_pos": torch.arange(5)}, "q_pos"),
    ({"k_offsets": torch.tensor([0, 3, 6])}, "k_offsets"),
    ({"pos_table": torch.randn(7)}, "time_table"),
])
def test_dispatcher_rejects_bad_arguments_naming_them(change, match):
    b = make_batch([(1, 2, 1, 2)])
    kw = {"q": b.q, "k": b.k, "v": b.v, "q_offsets": b.offsets, "k_offsets": b.offsets, "q_group": b.group,
          "q_pos": b.pos, "k_group": b.group, "k_pos": b.pos, **change}
    with pytest.raises(ValueError, match=match):
        attention.hstu_attention(**kw)
