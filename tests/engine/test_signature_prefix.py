"""ContextSignature.shared_prefix (a one-memcmp fast path, then an elementwise one) against a row-by-row Python
reference on random R events: equal, one a prefix of the other, diverging at a random row, other dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from grinfer.engine.signature import ContextSignature


def reference(a: ContextSignature, b: ContextSignature) -> int:
    if (a.user, a.version, a.static_tokens, a.profile) != (b.user, b.version, b.static_tokens, b.profile):
        return 0
    n = 0
    for x, y in zip(a.realtime.tolist(), b.realtime.tolist()):
        if x != y:
            break
        n += 1
    return a.static_tokens + n


@pytest.mark.parametrize("seed", range(40))
def test_shared_prefix_matches_a_row_by_row_reference(seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 3, (int(rng.integers(0, 12)), 3))  # small values: rows often repeat
    other = rows[:int(rng.integers(0, len(rows) + 1))].copy()
    if len(other) and rng.random() < 0.5:  # diverge at a random row, in one column
        other[rng.integers(len(other)), rng.integers(3)] += 1
    if rng.random() < 0.3:
        other = np.concatenate([other, rng.integers(0, 3, (int(rng.integers(1, 4)), 3))])
    static = int(rng.integers(0, 5))
    a = ContextSignature("u", 1, static, rows.astype(np.int64), (1, 2))
    b = ContextSignature("u", 1, static, other.astype(rng.choice([np.int64, np.int32])), (1, 2))
    for x, y in ((a, b), (b, a), (a, a)):
        assert x.shared_prefix(y) == reference(x, y)
    c = ContextSignature("u", 1, static, other.astype(np.int64), (1, 3))  # another profile shares nothing
    assert a.shared_prefix(c) == 0
