"""Hashing raw 64-bit ids: splitmix64 against a Python-integer twin, rows in range, collision rate as predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grinfer.embedding.hashing import HashedIds, IdentityIds, collision_rate, expected_collision_rate, mix64

MASK = (1 << 64) - 1


def splitmix64(value: int, seed: int = 0) -> int:
    """The textbook finaliser on Python integers (unsigned 64-bit), as a signed int64."""
    z = (value + seed * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


@pytest.mark.parametrize("seed", [0, 7])
def test_mix64_equals_the_python_twin_on_random_64_bit_ids(seed):
    rng = np.random.default_rng(seed)
    ids = [0, 1, -1, 2**63 - 1, -(2**63), *rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64).tolist()]
    got = mix64(torch.tensor(ids, dtype=torch.int64), seed).tolist()
    assert got == [splitmix64(v, seed) for v in ids]


def test_hashed_rows_are_in_range_and_keep_the_ids_shape():
    ids = torch.randint(-(2**62), 2**62, (5, 7), generator=torch.Generator().manual_seed(0))
    rows = HashedIds(1000, seed=3).rows(ids)
    assert rows.shape == ids.shape and int(rows.min()) >= 0 and int(rows.max()) < 1000
    assert torch.equal(rows, HashedIds(1000, seed=3).rows(ids))  # deterministic
    assert not torch.equal(rows, HashedIds(1000, seed=4).rows(ids))


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_measured_collision_rate_matches_the_expected_rate(kind):
    n, m = 20_000, 200_000
    ids = (torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(1)) if kind == "random"
           else torch.arange(10**9, 10**9 + n))
    expected = expected_collision_rate(n, m)  # ~ n / m
    assert abs(expected - n / m) < 0.01
    assert abs(collision_rate(ids, m) - expected) < 0.01


def test_collisions_vanish_with_many_rows_and_saturate_with_few():
    ids = torch.arange(5000)
    assert collision_rate(ids, 10**12) == 0.0
    assert collision_rate(ids, 10) == 1.0


def test_identity_rejects_ids_outside_the_table():
    assert torch.equal(IdentityIds(10).rows(torch.tensor([0, 9])), torch.tensor([0, 9]))
    with pytest.raises(IndexError, match="ids: an id outside the table's 10 rows"):
        IdentityIds(10).rows(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="num_rows"):
        HashedIds(0)
