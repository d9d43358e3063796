"""The served lookup (distinct rows, device row cache, batched dequantisation) against the plain-PyTorch
reference on random ragged id batches; the cache's LRU, budget and hit ratio."""

from __future__ import annotations

import copy

import pytest
import torch

from grinfer.embedding.cache import RowCache
from grinfer.embedding.formats import ROW_FORMATS
from grinfer.embedding.hashing import HashedIds, IdentityIds
from grinfer.embedding.managed import FALLBACK_ROW, ManagedIds
from grinfer.embedding.reference import reference_lookup
from grinfer.embedding.store import RowStore
from grinfer.embedding.table import HashedEmbedding, ServedTable


def ragged_ids(g: torch.Generator, high: int, steps: int = 6) -> list[torch.Tensor]:
    """Per step, one flat batch of a random number of ids (some repeated, some empty steps)."""
    out = []
    for _ in range(steps):
        n = int(torch.randint(0, 300, (1,), generator=g))
        hot = torch.randint(0, 20, (n // 2,), generator=g)  # a hot set that repeats across steps
        out.append(torch.cat([hot, torch.randint(0, high, (n - n // 2,), generator=g)])[torch.randperm(n, generator=g)])
    return out


@pytest.mark.parametrize("fmt", ROW_FORMATS)
@pytest.mark.parametrize("cache_bytes", [0, 4096, 1 << 20])  # none, tiny (constant evictions), all of it
@pytest.mark.parametrize("kind", ["identity", "hashed"])
def test_served_lookup_equals_the_reference(fmt, cache_bytes, kind):
    g = torch.Generator().manual_seed(hash((fmt, cache_bytes, kind)) % 1000)
    store = RowStore.from_rows(torch.randn(500, 16, generator=g), fmt)
    ids_of = (lambda: IdentityIds(500)) if kind == "identity" else (lambda: HashedIds(500, seed=1))
    table = ServedTable(store, ids_of(), cache_bytes)
    for ids in ragged_ids(g, 500 if kind == "identity" else 2**40):
        shaped = ids.reshape(1, -1)
        got = table(shaped)
        assert got.shape == (1, len(ids), 16)
        assert torch.equal(got[0], reference_lookup(ids, store, ids_of()))
    if cache_bytes:
        stats = table.stats()
        assert 0.0 < stats["hit_ratio"] <= 1.0 and stats["bytes"] <= max(cache_bytes, 8 * (16 * 4 + 16))


def test_fp32_identity_table_equals_nn_embedding_exactly():
    emb = torch.nn.Embedding(100, 8)
    table = ServedTable(RowStore.from_rows(emb.weight, "fp32"), IdentityIds(100), cache_bytes=2048)
    ids = torch.randint(0, 100, (4, 33))
    for _ in range(3):
        assert torch.equal(table(ids), emb(ids))


def test_the_table_follows_the_modules_dtype_and_keeps_its_store_in_place():
    store = RowStore.from_rows(torch.randn(50, 8), "int8")
    table = ServedTable(store, IdentityIds(50), cache_bytes=1024).to(torch.bfloat16)
    out = table(torch.arange(10))
    assert out.dtype == torch.bfloat16 and table.cache is not None and table.cache.dtype == torch.bfloat16
    assert table.store.parts["data"].dtype == torch.uint8  # .to() casts no stored part
    assert torch.allclose(out.float(), store.dense()[:10], atol=1e-2, rtol=1e-2)
    assert torch.equal(table.weight.float(), store.dense().bfloat16().float())


def test_cache_is_lru_within_a_set_and_counts_hits_per_distinct_row():
    values = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 4)
    fetched = []

    def fetch(rows):
        fetched.append(rows.tolist())
        return values[rows]

    cache = RowCache(budget_bytes=2 * (4 * 4 + 16), dim=4, dtype=torch.float32, device=torch.device("cpu"), ways=2)
    assert cache.capacity == 2 and cache.num_sets == 1
    assert torch.equal(cache.lookup(torch.tensor([1, 2]), fetch), values[[1, 2]])
    cache.lookup(torch.tensor([1]), fetch)  # 1 is now the most recent
    assert torch.equal(cache.lookup(torch.tensor([3]), fetch), values[[3]])  # evicts 2, the least recent
    cache.lookup(torch.tensor([1, 3]), fetch)
    assert fetched == [[1, 2], [3]]
    cache.lookup(torch.tensor([2, 4, 5]), fetch)  # three misses, two ways: all served, two kept
    assert fetched[-1] == [2, 4, 5]
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 6


def test_a_lookup_never_evicts_rows_it_uses_itself():
    values = torch.randn(100, 4)
    cache = RowCache(budget_bytes=4 * (4 * 4 + 16), dim=4, dtype=torch.float32, device=torch.device("cpu"), ways=4)
    rows = torch.arange(0, 40, 1)
    for _ in range(3):
        assert torch.equal(cache.lookup(rows, lambda r: values[r]), values[rows])
    assert len(set(cache.tags.tolist()) - {-1}) == cache.capacity


def test_managed_ids_admit_after_k_sightings_and_evict_the_least_recently_used():
    ids = ManagedIds(num_rows=3, admit_after=2)  # rows 1 and 2 to give out
    assert ids.rows(torch.tensor([10])).tolist() == [FALLBACK_ROW]  # first sighting: probation
    first = ids.rows(torch.tensor([10, 10])).tolist()  # second step: admitted (repeats in one call count once)
    assert first[0] == first[1] != FALLBACK_ROW and ids.assigned.tolist() == [first[0]]
    ids.rows(torch.tensor([20]))
    twenty = ids.rows(torch.tensor([20]))
    ids.rows(torch.tensor([10]))  # 10 is now more recent than 20
    ids.rows(torch.tensor([30]))
    thirty = ids.rows(torch.tensor([30]))  # the table is full: 20, the least recently used, loses its row
    assert thirty.tolist() == twenty.tolist() and ids.evicted == 1 and len(ids) == 2
    assert ids.rows(torch.tensor([10])).tolist() == first[:1]
    ids.rows(torch.tensor([40]))
    both = ids.rows(torch.tensor([40, 10, 30]))  # 40 admitted, but 10 and 30 are in use by this call
    assert both[0] == FALLBACK_ROW and ids.evicted == 1


def test_managed_served_table_equals_its_reference_twin():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 8, generator=g)
    served_store, ref_store = RowStore.from_rows(rows, "int8"), RowStore.from_rows(rows, "int8")
    table = ServedTable(served_store, ManagedIds(64, admit_after=2), cache_bytes=16 * (8 * 4 + 16))
    twin = ManagedIds(64, admit_after=2)
    for ids in ragged_ids(g, 200, steps=10):
        assert torch.equal(table(ids), reference_lookup(ids, ref_store, twin))
    assert table.ids.evicted > 0  # type: ignore[attr-defined]


def test_hashed_embedding_hashes_before_its_lookup():
    emb = HashedEmbedding(97, 4)
    ids = torch.tensor([5, 2**40, -3])
    assert torch.equal(emb(ids), emb.weight[HashedIds(97).rows(ids)])
    assert set(emb.state_dict()) == {"weight"}


def test_state_dict_holds_the_stored_parts():
    table = ServedTable(RowStore.from_rows(torch.randn(5, 4), "int4"), IdentityIds(5))
    assert set(table.state_dict()) == {"data", "scale", "bias"}
    copied = copy.deepcopy(table)
    assert torch.equal(copied(torch.arange(5)), table(torch.arange(5)))
