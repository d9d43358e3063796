"""Unit tests of the KV cache's bookkeeping (engine/block_manager.py): pages, pins, LRU order, stats."""

from __future__ import annotations

import numpy as np
import pytest

from grinfer.engine.block_manager import BlockManager
from grinfer.engine.signature import CacheLookup, ContextSignature


def sig(user: str, tokens: int = 0, version: int = 0, realtime=()) -> ContextSignature:
    return ContextSignature(user, version, tokens, np.asarray(realtime, np.int64).reshape(-1, 3))


def test_pages_come_from_the_free_list_and_return_to_it():
    m = BlockManager(num_blocks=5, block_size=4)
    a = m.add(sig("a", 9))
    assert m.shortfall(a, 9) == 0
    m.grow(a, 9)
    assert a.blocks == [0, 1, 2] and len(m.free) == 2  # ceil(9 / 4) pages, lowest ids first
    m.grow(a, 12)  # still 3 pages
    assert len(a.blocks) == 3
    b = m.add(sig("b", 8))
    assert m.shortfall(b, 12) == 1  # 3 pages wanted, 2 free
    m.grow(b, 8)
    assert sorted(a.blocks + b.blocks + m.free) == [0, 1, 2, 3, 4] and not m.free
    assert m.occupancy() == 1.0
    m.drop("a")
    assert sorted(m.free) == [0, 1, 2] and m.get("a") is None and a.blocks == [] and a.tokens == 0


def test_victims_are_least_recently_used_and_never_pinned():
    m = BlockManager(num_blocks=8, block_size=2)
    for user in "abc":
        m.grow(m.add(sig(user)), 2)
    assert m.victim()[0] == "a"
    m.touch("a")
    assert m.victim()[0] == "b"
    m.get("b").pins = 1
    assert m.victim()[0] == "c"
    m.get("c").pins = 2
    m.get("a").pins = 1
    assert m.victim() is None


def test_fits_counts_whole_pages():
    m = BlockManager(num_blocks=3, block_size=4)
    assert m.fits(12) and not m.fits(13) and m.fits(0)


def test_no_block_at_all_is_a_clear_error():
    with pytest.raises(ValueError, match="holds no block"):
        BlockManager(num_blocks=0, block_size=4)


def test_lookups_are_counted_by_status_and_tier():
    m = BlockManager(num_blocks=2, block_size=4)
    for lookup in [CacheLookup(0, 5, "none"), CacheLookup(5, 0, "device"), CacheLookup(3, 2, "host"),
                   CacheLookup(5, 0, "disk"), CacheLookup(5, 0, "disk")]:
        m.count_lookup(lookup.status, lookup.source)
    s = m.stats
    assert (s.misses, s.hits, s.partial_hits) == (1, 3, 1)
    assert s.tier_hits == {"host": 1, "disk": 2}


def test_signature_prefix_and_json_round_trip():
    a = sig("u", 5, 2, [(1, 10, 3), (2, 11, 4), (3, 12, 5)])
    assert a.num_tokens == 8 and a.shared_prefix(a) == 8
    assert a.shared_prefix(sig("u", 5, 2, [(1, 10, 3), (9, 11, 4)])) == 6
    assert a.shared_prefix(sig("u", 5, 3, [(1, 10, 3)])) == 0  # another history version shares nothing
    back = ContextSignature.from_json(a.to_json())
    assert (back.user, back.version, back.static_tokens, back.profile) == (a.user, a.version, 5, a.profile)
    assert np.array_equal(back.realtime, a.realtime) and back.shared_prefix(a) == 8
