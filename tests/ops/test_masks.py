"""The MTGR dynamic mask and the causal mask (`visible`) on hand-made [U | S | R | C] sequences.

Every expected matrix below is written out by hand: row = query token, column = key token,
1 = the query may attend to the key.
"""

from __future__ import annotations

import re

import pytest
import torch

from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U, visible

G = {"U": GROUP_U, "S": GROUP_S, "R": GROUP_R, "C": GROUP_C}


def mask_of(layout: str, mode: str) -> torch.Tensor:
    """The full query x key 0/1 matrix of `visible` for a sequence like "UUSSSRRCCC" (pos = index)."""
    group = torch.tensor([G[c] for c in layout])
    pos = torch.arange(len(layout))
    return visible(group[:, None], pos[:, None], group[None, :], pos[None, :], mode).to(torch.int64)


def as_tensor(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_constants_are_distinct_and_ordered():
    assert [GROUP_U, GROUP_S, GROUP_R, GROUP_C] == sorted({GROUP_U, GROUP_S, GROUP_R, GROUP_C})


def test_dynamic_full_layout():
    expected = as_tensor([
        # U  U  S  S  S  R  R  C  C  C
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # U0
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # U1
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # S2
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # S3
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # S4
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # R5
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # R6
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # C7
        [1, 1, 1, 1, 1, 1, 1, 0, 1, 0],  # C8
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 1],  # C9
    ])
    assert torch.equal(mask_of("UUSSSRRCCC", "dynamic"), expected)


def test_causal_full_layout_is_lower_triangle():
    expected = as_tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(mask_of("UUSSSRRCCC", "causal"), expected)
    assert torch.equal(expected, torch.ones(10, 10, dtype=torch.int64).tril())


def test_dynamic_empty_realtime():
    expected = as_tensor([
        # U  S  S  C  C
        [1, 1, 1, 0, 0],  # U0
        [1, 1, 1, 0, 0],  # S1
        [1, 1, 1, 0, 0],  # S2
        [1, 1, 1, 1, 0],  # C3
        [1, 1, 1, 0, 1],  # C4
    ])
    assert torch.equal(mask_of("USSCC", "dynamic"), expected)


def test_dynamic_empty_static():
    expected = as_tensor([
        # U  U  R  R  R  C
        [1, 1, 0, 0, 0, 0],  # U0
        [1, 1, 0, 0, 0, 0],  # U1
        [1, 1, 1, 0, 0, 0],  # R2
        [1, 1, 1, 1, 0, 0],  # R3
        [1, 1, 1, 1, 1, 0],  # R4
        [1, 1, 1, 1, 1, 1],  # C5
    ])
    assert torch.equal(mask_of("UURRRC", "dynamic"), expected)


def test_dynamic_no_candidates():
    expected = as_tensor([
        # U  S  S  R  R
        [1, 1, 1, 0, 0],  # U0
        [1, 1, 1, 0, 0],  # S1
        [1, 1, 1, 0, 0],  # S2
        [1, 1, 1, 1, 0],  # R3
        [1, 1, 1, 1, 1],  # R4
    ])
    assert torch.equal(mask_of("USSRR", "dynamic"), expected)


def test_dynamic_only_candidates_see_only_themselves():
    assert torch.equal(mask_of("CCC", "dynamic"), torch.eye(3, dtype=torch.int64))


def test_dynamic_only_context_is_bidirectional():
    assert torch.equal(mask_of("UUSS", "dynamic"), torch.ones(4, 4, dtype=torch.int64))


def test_dynamic_realtime_without_context():
    expected = as_tensor([
        # R  R  C  C
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 1],
    ])
    assert torch.equal(mask_of("RRCC", "dynamic"), expected)


def test_query_subset_rows_match_full_matrix():
    """Queries = the R and C tokens only (as on a warm cache hit) over all keys: same rows."""
    layout = "UUSSSRRCCC"
    group = torch.tensor([G[c] for c in layout])
    pos = torch.arange(len(layout))
    sub = torch.arange(5, 10)
    rows = visible(group[sub][:, None], pos[sub][:, None], group[None, :], pos[None, :], "dynamic")
    assert torch.equal(rows.to(torch.int64), mask_of(layout, "dynamic")[5:])


def test_elementwise_broadcasting_and_dtype():
    q_group = torch.tensor([GROUP_R, GROUP_C, GROUP_S])
    q_pos = torch.tensor([5, 8, 2])
    k_group = torch.tensor([GROUP_R, GROUP_C, GROUP_R])
    k_pos = torch.tensor([6, 8, 5])
    out = visible(q_group, q_pos, k_group, k_pos, "dynamic")
    assert out.dtype == torch.bool
    # R5 -> R6: later event, hidden; C8 -> C8: itself; S2 -> R5: context never sees R
    assert out.tolist() == [False, True, False]


@pytest.mark.parametrize("mode", ["bidirectional", "Dynamic", "", "full"])
def test_bad_mode_raises_naming_the_mode(mode):
    group = torch.tensor([GROUP_U, GROUP_C])
    pos = torch.arange(2)
    with pytest.raises(ValueError, match=re.escape(f"got {mode!r}")):
        visible(group[:, None], pos[:, None], group[None, :], pos[None, :], mode)
