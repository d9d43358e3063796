"""The attention dispatcher's paged entry (`paged_hstu_attention`) and planned path (`plan_attention`, `attend`).

The paged reference twin gathers each sequence's K/V through its block table: on random ragged batches whose
pages are shuffled over a pool of garbage, it must give exactly the jagged reference over the same keys. Bad
arguments raise ValueError naming the field. (The Triton kernel against this twin: test_triton_paged_attention.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grinfer.ops import hstu_attention as attention
from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.jagged import offsets_of
from grinfer.ops.reference import hstu_attention as reference
from grinfer.ops.reference.kv_quant import quantize_kv

HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
LAYOUT = st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(0, 5), st.integers(0, 6))
REACH, BUCKETS = 8, 6  # relative-bias table sizes


@dataclass
class PagedBatch:
    """Queries (each sequence's suffix) over keys held twice: jagged (k, v) and in a paged pool (k_pool, v_pool)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    pool_k_scale: torch.Tensor | None
    pool_v_scale: torch.Tensor | None
    block_table: torch.Tensor
    page: int
    q_offsets: torch.Tensor
    k_offsets: torch.Tensor
    q_group: torch.Tensor
    q_pos: torch.Tensor
    k_group: torch.Tensor
    k_pos: torch.Tensor
    q_ts: torch.Tensor
    k_ts: torch.Tensor

    def meta(self) -> tuple[torch.Tensor, ...]:
        """(q_offsets, k_offsets, q_group, q_pos, k_group, k_pos): the layout arguments of either entry."""
        return self.q_offsets, self.k_offsets, self.q_group, self.q_pos, self.k_group, self.k_pos

    def jagged(self, **kw) -> torch.Tensor:
        """The jagged reference over the keys k, v."""
        return reference.hstu_attention(self.q, self.k, self.v, *self.meta(), k_scale=self.k_scale,
                                        v_scale=self.v_scale, **kw)

    def poison_unowned(self) -> int:
        """NaN in every pool slot no key owns (a kernel that reads one would leak it into its output); returns
        how many slots that is."""
        owned = torch.zeros(len(self.k_pool), dtype=torch.bool)
        owned[reference.paged_slots(self.block_table, self.page, self.k_offsets, len(self.k_group))] = True
        self.k_pool[~owned], self.v_pool[~owned] = float("nan"), float("nan")
        return int((~owned).sum())

    def paged(self, kernel: str = "reference", **kw) -> torch.Tensor:
        """The dispatcher's paged entry over the pool."""
        return attention.paged_hstu_attention(self.q, self.k_pool, self.v_pool, self.block_table, self.page,
                                              *self.meta(), k_scale=self.pool_k_scale, v_scale=self.pool_v_scale,
                                              kernel=kernel, **kw)


def paged_batch(layouts: list[tuple[int, int, int, int]], page: int, cuts: list[float], *, kv_dtype: str = "model",
                dtype: torch.dtype = torch.float32, heads: int = 2, d_qk: int = 12, d_v: int = 10,
                seed: int = 0) -> PagedBatch:
    """Sequences [U | S | R | C] (pos = index), queries from round(cut * length) of each on; the keys' pages
    shuffled over a pool with spare pages, every slot no key owns (and every unused table entry) garbage."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [sum(layout) for layout in layouts]
    group = torch.tensor([g for nu, ns, nr, nc in layouts
                          for g in [GROUP_U] * nu + [GROUP_S] * ns + [GROUP_R] * nr + [GROUP_C] * nc],
                         dtype=torch.int64)
    pos = torch.tensor([p for n in lengths for p in range(n)], dtype=torch.int64)
    ts = torch.cumsum(torch.randint(0, 5000, (len(group),), generator=gen), 0)
    k_offsets = offsets_of(torch.tensor(lengths, dtype=torch.int64))
    t = len(group)
    k, v = torch.randn(t, heads, d_qk, generator=gen), torch.randn(t, heads, d_v, generator=gen)
    blocks = [-(-n // page) for n in lengths]
    num_pages = sum(blocks) + 2
    ids = torch.randperm(num_pages, generator=gen)
    table = torch.randint(0, num_pages, (len(layouts), max(blocks, default=0) + 1), generator=gen)
    k_pool = torch.randn(num_pages * page, heads, d_qk, generator=gen) * 5
    v_pool = torch.randn(num_pages * page, heads, d_v, generator=gen) * 5
    rows = []
    for b, n in enumerate(blocks):
        table[b, :n] = ids[sum(blocks[:b]):sum(blocks[:b + 1])]
        j = torch.arange(lengths[b])
        rows.append(table[b, j // page] * page + j % page)
    slots = torch.cat(rows)
    k_pool[slots], v_pool[slots] = k, v
    scales: list[torch.Tensor | None] = [None] * 4
    if kv_dtype != "model":
        (k, k_scale), (v, v_scale) = quantize_kv(k, kv_dtype), quantize_kv(v, kv_dtype)
        (k_pool, pool_k_scale), (v_pool, pool_v_scale) = quantize_kv(k_pool, kv_dtype), quantize_kv(v_pool, kv_dtype)
        scales = [k_scale, v_scale, pool_k_scale, pool_v_scale]
    else:
        k, v, k_pool, v_pool = (x.to(dtype) for x in (k, v, k_pool, v_pool))
    q_rows, q_lengths = [], []
    for b, (n, cut) in enumerate(zip(lengths, cuts)):
        start = round(cut * n)
        q_rows += range(int(k_offsets[b]) + start, int(k_offsets[b]) + n)
        q_lengths.append(n - start)
    q_rows = torch.tensor(q_rows, dtype=torch.int64)
    q = torch.randn(t, heads, d_qk, generator=gen)[q_rows].to(dtype)
    return PagedBatch(q, k, v, *scales[:2], k_pool, v_pool, *scales[2:], table, page,
                      offsets_of(torch.tensor(q_lengths, dtype=torch.int64)), k_offsets, group[q_rows], pos[q_rows],
                      group, pos, ts[q_rows], ts)


def bias_tables(b: PagedBatch) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"q_ts": b.q_ts, "k_ts": b.k_ts, "pos_table": torch.randn(2 * REACH + 1, generator=gen),
            "time_table": torch.randn(BUCKETS, generator=gen)}


# ---- the paged reference twin ------------------------------------------------------------------------------

def test_slots_follow_the_block_table():
    table = torch.tensor([[2, 0, 5], [1, 3, 4]], dtype=torch.int32)
    slots = reference.paged_slots(table, 2, torch.tensor([0, 3, 4]), 4)
    assert slots.tolist() == [4, 5, 0, 2]  # sequence 0: page 2 then page 0; sequence 1: page 1


def test_a_sequence_longer_than_its_block_table_raises():
    b = paged_batch([(1, 4, 2, 3)], page=4, cuts=[0.5])
    short = b.block_table[:, :2]  # 8 slots for 10 keys
    with pytest.raises(ValueError, match="block_table: a sequence has 10 keys"):
        attention.paged_hstu_attention(b.q, b.k_pool, b.v_pool, short, b.page, *b.meta())


@HYPOTHESIS
@given(layouts=st.lists(LAYOUT, min_size=1, max_size=4), page=st.sampled_from([1, 2, 4, 8]),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), mode=st.sampled_from(["dynamic", "causal"]),
       normalizer=st.sampled_from(["visible", "max_len"]), kv_dtype=st.sampled_from(["model", "int8", "fp8"]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_paged_reference_is_the_jagged_reference_over_the_gathered_keys(layouts, page, cuts, mode, normalizer,
                                                                         kv_dtype, bias, seed):
    b = paged_batch(layouts, page, cuts, kv_dtype=kv_dtype, seed=seed)
    kw = {"mode": mode, "normalizer": normalizer, "max_seq_len": 40, **(bias_tables(b) if bias else {})}
    want = b.jagged(**kw)
    got = b.paged(**kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)


def test_paged_reference_reads_only_the_sequences_pages():
    """Changing every slot no key owns (spare pages, the unused table column's pages) changes nothing."""
    b = paged_batch([(2, 5, 4, 6), (1, 0, 3, 2), (0, 0, 0, 0), (3, 6, 2, 5)], page=4, cuts=[0.3, 0.0, 0.0, 0.6])
    want = b.paged()
    assert want.abs().max() > 1e-2
    assert b.poison_unowned() > 0
    assert torch.equal(b.paged(), want)


def test_auto_picks_the_reference_on_the_cpu():
    b = paged_batch([(1, 3, 2, 3), (2, 0, 1, 2)], page=2, cuts=[0.0, 0.5], kv_dtype="int8")
    assert torch.equal(b.paged(kernel="auto"), b.jagged())


# ---- bad arguments name the field ---------------------------------------------------------------------------

def _paged_kw(b: PagedBatch) -> dict:
    return {"q": b.q, "k_pool": b.k_pool, "v_pool": b.v_pool, "block_table": b.block_table, "page_size": b.page,
            "q_offsets": b.q_offsets, "k_offsets": b.k_offsets, "q_group": b.q_group, "q_pos": b.q_pos,
            "k_group": b.k_group, "k_pos": b.k_pos}


drop_first = lambda name: lambda kw: kw[name][1:]


@pytest.mark.parametrize(("name", "change", "match"), [
    ("kernel", lambda kw: "cuda", "kernel"),
    ("mode", lambda kw: "bidirectional", "mask mode"),
    ("normalizer", lambda kw: "total", "normalizer"),
    ("q", lambda kw: kw["q"].to(torch.int8), "q: expected a floating-point"),
    ("k_pool", lambda kw: kw["k_pool"].flatten(1), r"k_pool: expected \[tokens, heads, head_dim\]"),
    ("k_pool", lambda kw: kw["k_pool"][:, :1], r"k_pool: expected \[Tk, 2, 12\]"),
    ("v_pool", drop_first("v_pool"), "v_pool: expected"),
    ("k_pool", lambda kw: kw["k_pool"].to(torch.int8), r"k_pool: expected a floating-point tensor \(8-bit only with"),
    ("k_scale", lambda kw: torch.ones(kw["k_pool"].shape[:2]), "k_scale: expected 8-bit k_pool"),
    ("block_table", lambda kw: kw["block_table"].float(), "block_table: expected integer"),
    ("block_table", drop_first("block_table"), r"block_table: expected integer \[2, max_blocks\]"),
    ("block_table", lambda kw: kw["block_table"].to("meta"), "block_table: expected the device of q"),
    ("page_size", lambda kw: 3, "page_size"),
    ("page_size", lambda kw: 0, "page_size"),
    ("k_pos", drop_first("k_pos"), "k_pos"),
    ("q_group", drop_first("q_group"), "q_group"),
    ("k_offsets", drop_first("k_offsets"), "q_offsets, k_offsets"),
    ("pos_table", lambda kw: torch.zeros(2 * REACH + 1), "pos_table, time_table"),
])
def test_paged_entry_rejects_bad_arguments_naming_them(name, change, match):
    b = paged_batch([(1, 2, 1, 2), (0, 3, 1, 1)], page=2, cuts=[0.5, 0.0])
    kw = {"q": b.q, "k_pool": b.k_pool, "v_pool": b.v_pool, "block_table": b.block_table, "page_size": b.page,
          "q_offsets": b.q_offsets, "k_offsets": b.k_offsets, "q_group": b.q_group, "q_pos": b.q_pos,
          "k_group": b.k_group, "k_pos": b.k_pos}
    kw[name] = change(kw)
    with pytest.raises(ValueError, match=match):
        attention.paged_hstu_attention(**kw)


def test_triton_refuses_the_relative_bias():
    b = paged_batch([(1, 2, 1, 2)], page=2, cuts=[0.0])
    with pytest.raises(ValueError, match="relative bias"):
        b.paged(kernel="triton", **bias_tables(b))


# ---- the planned path the model takes -----------------------------------------------------------------------

def test_planned_path_is_the_reference():
    b = paged_batch([(2, 5, 4, 6), (1, 0, 3, 2)], page=4, cuts=[0.4, 0.0], kv_dtype="fp8")
    tables = bias_tables(b)
    plan = attention.plan_attention(*b.meta(), q_ts=b.q_ts, k_ts=b.k_ts, bias_reach=REACH,
                                    num_time_buckets=BUCKETS)
    got = attention.attend(b.q, b.k, b.v, plan, None, tables["pos_table"], tables["time_table"], b.k_scale,
                           b.v_scale)
    assert torch.equal(got, b.jagged(**tables))


def test_planned_path_rejects_bad_arguments_naming_them():
    b = paged_batch([(1, 2, 1, 2), (0, 3, 1, 1)], page=2, cuts=[0.5, 0.0])
    with pytest.raises(ValueError, match="q_pos"):
        attention.plan_attention(b.q_offsets, b.k_offsets, b.q_group, b.q_pos[1:], b.k_group, b.k_pos)
    with pytest.raises(ValueError, match="mask mode"):
        attention.plan_attention(*b.meta(), mode="bidirectional")
    plan = attention.plan_attention(*b.meta())
    with pytest.raises(ValueError, match="q: expected the plan's"):
        attention.attend(b.q[1:], b.k, b.v, plan)
    with pytest.raises(ValueError, match="k: expected the plan's"):
        attention.attend(b.q, b.k[1:], b.v[1:], plan)
    with pytest.raises(ValueError, match="v: expected"):
        attention.attend(b.q, b.k, b.v[:, :1], plan)
    with pytest.raises(ValueError, match="pos_table: the plan has no relative-bias"):
        attention.attend(b.q, b.k, b.v, plan, None, torch.zeros(3), torch.zeros(2))
