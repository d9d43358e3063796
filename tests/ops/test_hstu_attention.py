"""Jagged HSTU attention (`hstu_attention`) against a plain per-sequence dense loop, plus the
properties the KV cache relies on: query subsets, context invariance, candidate independence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U, relative_index, time_bucket
from grinfer.ops.jagged import (
    jagged_to_padded,
    lengths_of,
    max_length,
    offsets_of,
    padded_to_jagged,
    positions_in_seq,
    seq_ids,
)
from grinfer.ops.reference.hstu_attention import hstu_attention

ATOL = 1e-5
HYPOTHESIS = settings(max_examples=20, deadline=None, derandomize=True, database=None)

# A layout is (num_U, num_S, num_R, num_C) of one sequence, in that order.
Layout = tuple[int, int, int, int]
layouts_strategy = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 3), st.integers(0, 3)),
    min_size=1, max_size=4)


@dataclass
class Seqs:
    """A jagged batch of token sequences with random q/k/v and per-token metadata."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    offsets: torch.Tensor
    group: torch.Tensor
    pos: torch.Tensor
    ts: torch.Tensor

    def seq(self, b: int) -> slice:
        return slice(int(self.offsets[b]), int(self.offsets[b + 1]))

    def only(self, b: int) -> Seqs:
        """Sequence b alone, as a batch of one."""
        sl = self.seq(b)
        return Seqs(self.q[sl], self.k[sl], self.v[sl], torch.tensor([0, sl.stop - sl.start]), self.group[sl],
                    self.pos[sl], self.ts[sl])


def groups_of(layout: Layout) -> list[int]:
    nu, ns, nr, nc = layout
    return [GROUP_U] * nu + [GROUP_S] * ns + [GROUP_R] * nr + [GROUP_C] * nc


def make_seqs(layouts: list[Layout], heads: int = 2, d_qk: int = 4, d_v: int = 3, seed: int = 0) -> Seqs:
    gen = torch.Generator().manual_seed(seed)
    groups, pos, ts = [], [], []
    for layout in layouts:
        g = groups_of(layout)
        groups += g
        pos += list(range(len(g)))
        gaps = torch.tensor([0, 1, 3, 50, 1000, 100_000])[torch.randint(0, 6, (len(g),), generator=gen)]
        stamps = (1_000_000 + gaps.cumsum(0)).tolist()
        # U tokens carry no time (0, as the model sets them); candidates share the request time.
        request_ts = (stamps[-1] if stamps else 0) + 7
        ts += [0 if x == GROUP_U else request_ts if x == GROUP_C else s for x, s in zip(g, stamps)]
    total = len(groups)
    lengths = torch.tensor([sum(layout) for layout in layouts], dtype=torch.int64)
    return Seqs(
        q=torch.randn(total, heads, d_qk, generator=gen),
        k=torch.randn(total, heads, d_qk, generator=gen),
        v=torch.randn(total, heads, d_v, generator=gen),
        offsets=offsets_of(lengths),
        group=torch.tensor(groups, dtype=torch.int64),
        pos=torch.tensor(pos, dtype=torch.int64),
        ts=torch.tensor(ts, dtype=torch.int64),
    )


def random_tables(reach: int = 3, buckets: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pos_table": torch.randn(2 * reach + 1, generator=gen),
            "time_table": torch.randn(buckets, generator=gen)}


# ---- the independent definition ----------------------------------------------------------------

def ref_mask(groups: list[int], mode: str) -> torch.Tensor:
    n = len(groups)
    m = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            if mode == "causal":
                ok = j <= i
            elif groups[j] in (GROUP_U, GROUP_S):
                ok = True
            elif groups[j] == GROUP_R:
                ok = groups[i] == GROUP_C or (groups[i] == GROUP_R and j <= i)
            else:
                ok = i == j
            m[i, j] = float(ok)
    return m


def ref_bias(groups: list[int], ts: torch.Tensor, pos_table: torch.Tensor,
             time_table: torch.Tensor) -> torch.Tensor:
    """Candidates take the context length as their position; |dt| is log-bucketed (base 0.301)."""
    n = len(groups)
    ctx = sum(g != GROUP_C for g in groups)
    bpos = [ctx if g == GROUP_C else i for i, g in enumerate(groups)]
    reach = (len(pos_table) - 1) // 2
    bias = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            rel = min(max(bpos[j] - bpos[i], -reach), reach) + reach
            dt = max(abs(int(ts[i]) - int(ts[j])), 1)
            bucket = int(torch.floor(torch.log(torch.tensor(float(dt))) / 0.301))
            bucket = min(max(bucket, 0), len(time_table) - 1)
            bias[i, j] = pos_table[rel] + time_table[bucket]
    return bias


def reference(s: Seqs, mode: str, normalizer: str, max_seq_len: int = 16, alpha: float | None = None,
              tables: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per sequence, per head: SiLU(alpha * q k^T + bias) * M / N @ v, dense and straightforward."""
    out = torch.zeros(s.q.shape[0], s.q.shape[1], s.v.shape[2])
    alpha = 1.0 / math.sqrt(s.q.shape[2]) if alpha is None else alpha
    for b in range(len(s.offsets) - 1):
        sl = s.seq(b)
        groups = s.group[sl].tolist()
        if not groups:
            continue
        mask = ref_mask(groups, mode)
        bias = 0.0 if tables is None else ref_bias(groups, s.ts[sl], tables["pos_table"], tables["time_table"])
        norm = mask.sum(1, keepdim=True) if normalizer == "visible" else float(max_seq_len)
        for h in range(s.q.shape[1]):
            scores = alpha * s.q[sl, h] @ s.k[sl, h].T + bias
            out[sl, h] = (F.silu(scores) * mask / norm) @ s.v[sl, h]
    return out


def run(s: Seqs, mode: str, normalizer: str, max_seq_len: int = 16, alpha: float | None = None,
        tables: dict[str, torch.Tensor] | None = None, rows: torch.Tensor | None = None,
        q_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """hstu_attention on the whole batch, or with only the tokens `rows` (jagged by q_offsets) as queries."""
    rows = torch.arange(len(s.group)) if rows is None else rows
    q_offsets = s.offsets if q_offsets is None else q_offsets
    extra = {} if tables is None else {**tables, "q_ts": s.ts[rows], "k_ts": s.ts}
    return hstu_attention(s.q[rows], s.k, s.v, q_offsets, s.offsets, s.group[rows], s.pos[rows], s.group, s.pos,
                          mode=mode, normalizer=normalizer, max_seq_len=max_seq_len, alpha=alpha, **extra)


def run_each(s: Seqs, mode: str, normalizer: str, **kw) -> torch.Tensor:
    """hstu_attention called once per sequence (so nothing can leak between sequences or via padding)."""
    outs = [run(s.only(b), mode, normalizer, **kw) for b in range(len(s.offsets) - 1)]
    return torch.cat(outs)


MODES = ["dynamic", "causal"]
NORMALIZERS = ["visible", "max_len"]


# ---- (a) jagged vs dense loop ----------------------------------------------------------------------

FIXED_LAYOUTS = [(2, 3, 2, 3), (0, 0, 0, 0), (1, 0, 3, 1), (1, 4, 0, 2), (2, 1, 1, 0), (0, 0, 0, 2)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "rel_bias"])
def test_matches_dense_loop_fixed_batch(mode, normalizer, bias):
    s = make_seqs(FIXED_LAYOUTS, heads=3, d_qk=4, d_v=5)
    tables = random_tables() if bias else None
    got = run(s, mode, normalizer, max_seq_len=13, tables=tables)
    want = reference(s, mode, normalizer, max_seq_len=13, tables=tables)
    assert got.shape == (len(s.group), 3, 5)
    assert want.abs().max() > 1e-2  # not a vacuous comparison
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@HYPOTHESIS
@given(layouts=layouts_strategy, mode=st.sampled_from(MODES), normalizer=st.sampled_from(NORMALIZERS),
       bias=st.booleans(), heads=st.integers(1, 3), seed=st.integers(0, 1000))
def test_matches_dense_loop_generated(layouts, mode, normalizer, bias, heads, seed):
    s = make_seqs(layouts, heads=heads, d_qk=4, d_v=2, seed=seed)
    tables = random_tables(reach=2, buckets=5, seed=seed + 1) if bias else None
    got = run(s, mode, normalizer, max_seq_len=10, tables=tables)
    torch.testing.assert_close(got, reference(s, mode, normalizer, max_seq_len=10, tables=tables),
                               atol=ATOL, rtol=1e-5)


def test_explicit_alpha_is_used():
    s = make_seqs([(1, 2, 2, 2)])
    got = run(s, "dynamic", "visible", alpha=0.37)
    torch.testing.assert_close(got, reference(s, "dynamic", "visible", alpha=0.37), atol=ATOL, rtol=1e-5)
    assert not torch.allclose(got, run(s, "dynamic", "visible"), atol=1e-4)


def test_low_precision_input_computes_in_float32_and_returns_input_dtype():
    s = make_seqs([(1, 3, 2, 2), (0, 2, 0, 1)])
    s16 = Seqs(s.q.bfloat16(), s.k.bfloat16(), s.v.bfloat16(), s.offsets, s.group, s.pos, s.ts)
    got = run(s16, "dynamic", "visible")
    assert got.dtype == torch.bfloat16
    s32 = Seqs(s16.q.float(), s16.k.float(), s16.v.float(), s.offsets, s.group, s.pos, s.ts)
    torch.testing.assert_close(got.float(), reference(s32, "dynamic", "visible").bfloat16().float())


def test_all_empty_sequences():
    s = make_seqs([(0, 0, 0, 0), (0, 0, 0, 0)])
    out = run(s, "dynamic", "visible")
    assert out.shape == (0, 2, 3)


def test_bad_normalizer_raises_naming_it():
    s = make_seqs([(1, 1, 1, 1)])
    with pytest.raises(ValueError, match="'total'"):
        run(s, "dynamic", "total")


def test_bad_mode_raises_naming_it():
    s = make_seqs([(1, 1, 1, 1)])
    with pytest.raises(ValueError, match="'bidirectional'"):
        run(s, "bidirectional", "visible")


# ---- (b) query subsets: what the KV cache relies on ----------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "rel_bias"])
def test_realtime_and_candidate_queries_equal_rows_of_full(mode, normalizer, bias):
    """Only the R + C tokens as queries, over every key: the full computation's R + C rows."""
    s = make_seqs(FIXED_LAYOUTS, seed=3)
    tables = random_tables() if bias else None
    full = run(s, mode, normalizer, tables=tables)
    rows = torch.nonzero(s.group >= GROUP_R).flatten()
    q_offsets = offsets_of(torch.tensor([int((s.group[s.seq(b)] >= GROUP_R).sum())
                                         for b in range(len(FIXED_LAYOUTS))]))
    sub = run(s, mode, normalizer, tables=tables, rows=rows, q_offsets=q_offsets)
    assert len(rows) > 0 and sub.shape[0] == len(rows)
    torch.testing.assert_close(sub, full[rows], atol=ATOL, rtol=1e-5)


@HYPOTHESIS
@given(layouts=layouts_strategy, mode=st.sampled_from(MODES), normalizer=st.sampled_from(NORMALIZERS),
       bias=st.booleans(), cut=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), seed=st.integers(0, 1000))
def test_any_suffix_of_queries_equals_rows_of_full(layouts, mode, normalizer, bias, cut, seed):
    s = make_seqs(layouts, seed=seed)
    tables = random_tables(seed=seed) if bias else None
    full = run(s, mode, normalizer, tables=tables)
    rows, lengths = [], []
    for b, layout in enumerate(layouts):
        n = sum(layout)
        start = int(s.offsets[b]) + round(cut[b] * n)
        rows += range(start, int(s.offsets[b + 1]))
        lengths.append(int(s.offsets[b + 1]) - start)
    rows = torch.tensor(rows, dtype=torch.int64)
    sub = run(s, mode, normalizer, tables=tables, rows=rows, q_offsets=offsets_of(torch.tensor(lengths)))
    torch.testing.assert_close(sub, full[rows], atol=ATOL, rtol=1e-5)


# ---- (c) invariance: context tokens never see what comes after them --------------------------------

def stacked(base: Layout, variants: list[Layout], seed: int) -> Seqs:
    """Sequences [base, *variants] where every variant repeats base's tokens as its prefix.

    The variants extend the base with extra R events and/or candidates; each token's q/k/v and
    timestamp is copied from the longest variant so shared tokens are identical everywhere.
    """
    longest = max([base, *variants], key=sum)
    src = make_seqs([longest], seed=seed)
    nu, ns, nr_max, _ = longest
    r0 = nu + ns
    c0 = r0 + nr_max
    parts = []
    for nu_, ns_, nr, nc in [base, *variants]:
        assert (nu_, ns_) == (nu, ns)
        parts.append(torch.cat([torch.arange(r0 + nr), torch.arange(c0, c0 + nc)]))
    idx = torch.cat(parts)
    lengths = torch.tensor([len(p) for p in parts])
    offsets = offsets_of(lengths)
    return Seqs(src.q[idx], src.k[idx], src.v[idx], offsets, src.group[idx],
                positions_in_seq(offsets), src.ts[idx])


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "rel_bias"])
def test_context_outputs_unchanged_by_later_events_and_candidates(normalizer, bias):
    # base: U U S S S | R R ; variants add R events and/or candidates
    s = stacked((2, 3, 2, 0), [(2, 3, 2, 3), (2, 3, 4, 0), (2, 3, 4, 3)], seed=5)
    tables = random_tables() if bias else None
    for out in (run(s, "dynamic", normalizer, tables=tables), run_each(s, "dynamic", normalizer, tables=tables)):
        base = out[s.seq(0)]
        for b in range(1, 4):
            torch.testing.assert_close(out[s.seq(b)][:7], base, atol=1e-6, rtol=1e-6)
        # the candidates of variants 1 and 3 differ (variant 3 has more R events before them)
        assert not torch.allclose(out[s.seq(1)][-3:], out[s.seq(3)][-3:], atol=1e-4)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "rel_bias"])
def test_context_outputs_unchanged_without_realtime(normalizer, bias):
    s = stacked((1, 4, 0, 0), [(1, 4, 0, 1), (1, 4, 3, 2)], seed=6)
    tables = random_tables() if bias else None
    for out in (run(s, "dynamic", normalizer, tables=tables), run_each(s, "dynamic", normalizer, tables=tables)):
        for b in (1, 2):
            torch.testing.assert_close(out[s.seq(b)][:5], out[s.seq(0)], atol=1e-6, rtol=1e-6)


def candidates_alone_vs_together(mode: str, normalizer: str, tables,
                                 separate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate outputs of one sequence with candidates {a, b, c} vs three sequences with one each
    (in one batch, or with `separate` in four calls)."""
    src = make_seqs([(2, 3, 2, 3)], seed=7)
    ctx = torch.arange(7)
    together = torch.arange(10)
    alone = [torch.cat([ctx, torch.tensor([7 + c])]) for c in range(3)]
    idx = torch.cat([together, *alone])
    offsets = offsets_of(torch.tensor([10, 8, 8, 8]))
    s = Seqs(src.q[idx], src.k[idx], src.v[idx], offsets, src.group[idx], positions_in_seq(offsets), src.ts[idx])
    out = (run_each if separate else run)(s, mode, normalizer, tables=tables)
    return out[7:10], out[torch.tensor([17, 25, 33])]


@pytest.mark.parametrize("separate", [False, True], ids=["one_batch", "separate_calls"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "rel_bias"])
def test_candidates_do_not_affect_each_other(normalizer, bias, separate):
    tables = random_tables() if bias else None
    together, alone = candidates_alone_vs_together("dynamic", normalizer, tables, separate)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "rel_bias"])
def test_candidate_order_does_not_matter(bias):
    src = make_seqs([(1, 2, 2, 4)], seed=8)
    perm = torch.tensor([0, 1, 2, 3, 4, 8, 6, 5, 7])
    idx = torch.cat([torch.arange(9), perm])
    offsets = offsets_of(torch.tensor([9, 9]))
    s = Seqs(src.q[idx], src.k[idx], src.v[idx], offsets, src.group[idx], positions_in_seq(offsets), src.ts[idx])
    out = run(s, "dynamic", "visible", tables=random_tables() if bias else None)
    torch.testing.assert_close(out[9:][torch.argsort(perm)], out[:9], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_causal_mask_lets_candidates_see_earlier_candidates(normalizer):
    """Negative control: the same comparison detects cross-candidate influence under the causal mask."""
    together, alone = candidates_alone_vs_together("causal", normalizer, None)
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=1e-6)  # first one sees no other
    assert (together[1:] - alone[1:]).abs().max() > 1e-3


# ---- (d) time buckets and the relative bias ----------------------------------------------------------

def test_time_bucket_hand_values():
    dt = torch.tensor([0, 1, 2, 3, 10, 1000, -1, -10, -1000, 10**9])
    # floor(ln(max(|dt|, 1)) / 0.301): ln2/.301=2.30, ln3/.301=3.65, ln10/.301=7.65, ln1000/.301=22.95,
    # ln(1e9)/.301=68.8 -> clamped to 63
    want = torch.tensor([0, 0, 2, 3, 7, 22, 0, 7, 22, 63])
    got = time_bucket(dt, 64)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


def test_time_bucket_clamps_to_last_bucket():
    dt = torch.tensor([0, 2, 3, 10, 1000, -1000])
    assert torch.equal(time_bucket(dt, 4), torch.tensor([0, 2, 3, 3, 3, 3]))
    assert torch.equal(time_bucket(dt, 2), torch.tensor([0, 1, 1, 1, 1, 1]))


def test_relative_bias_hand_values():
    pos_table = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])  # reach 2: distances -2..2
    time_table = torch.tensor([0.1, 0.2, 0.3, 0.4])
    k_pos = torch.tensor([0, 3, 4, 5, 6, 9])
    k_ts = torch.tensor([100, 100, 98, 90, 100, 0])  # dt = q_ts - k_ts = 0, 0, 2, 10, 0, 100
    got = pos_table[relative_index(torch.tensor(5), k_pos, 2)] + time_table[time_bucket(100 - k_ts, 4)]
    # distances -5,-2,-1,0,1,4 -> clamped -2,-2,-1,0,1,2; buckets 0,0,2,3(7 clamped),0,3(15 clamped)
    want = torch.tensor([10.1, 10.1, 20.3, 30.4, 40.1, 50.4])
    torch.testing.assert_close(got, want)


# ---- (e) jagged helpers ------------------------------------------------------------------------------

def test_jagged_helpers_hand_values():
    offsets = torch.tensor([0, 2, 2, 5])
    assert lengths_of(offsets).tolist() == [2, 0, 3]
    assert offsets_of(torch.tensor([2, 0, 3])).tolist() == [0, 2, 2, 5]
    assert seq_ids(offsets).tolist() == [0, 0, 2, 2, 2]
    assert positions_in_seq(offsets).tolist() == [0, 1, 0, 1, 2]
    assert max_length(offsets) == 3
    assert max_length(torch.tensor([0])) == 0
    assert max_length(torch.tensor([0, 0, 0])) == 0


def test_jagged_padded_round_trip_with_empty_sequence():
    offsets = torch.tensor([0, 2, 2, 5])
    values = torch.arange(1, 16, dtype=torch.float32).reshape(5, 3)
    padded, valid = jagged_to_padded(values, offsets, 4, pad=-7.0)
    assert padded.shape == (3, 4, 3)
    assert valid.tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]
    assert torch.equal(padded[0, :2], values[:2])
    assert torch.equal(padded[2, :3], values[2:])
    assert (padded[~valid] == -7.0).all()
    assert torch.equal(padded_to_jagged(padded, offsets), values)


@HYPOTHESIS
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=6), extra=st.integers(0, 2))
def test_jagged_padded_round_trip_generated(lengths, extra):
    offsets = offsets_of(torch.tensor(lengths, dtype=torch.int64))
    total = int(offsets[-1])
    values = torch.randn(total, 2, generator=torch.Generator().manual_seed(total)) + 3.0
    padded, valid = jagged_to_padded(values, offsets, max(lengths) + extra)
    assert valid.sum(1).tolist() == lengths
    assert (padded[~valid] == 0).all()
    assert torch.equal(padded_to_jagged(padded, offsets), values)
    assert max_length(offsets) == max(lengths)
    ints = torch.arange(total, dtype=torch.int64)
    ip, _ = jagged_to_padded(ints, offsets, max(lengths), pad=-1)
    assert torch.equal(padded_to_jagged(ip, offsets), ints)
