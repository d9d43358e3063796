"""Unit tests of the KV cache's lower tiers (engine/tiers/): the host tier's budget and hand-down, the disk
tier's files, restart, budget, versions and interrupted writes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from grinfer.engine.kv_pool import KVData
from grinfer.engine.signature import ContextSignature
from grinfer.engine.tiers import DiskTier, HostTier

SHAPE = (2, 5, 2, 4)  # layers, tokens, heads, head_dim


def sig(user: str, version: int = 0, realtime=((3, 100, 4),)) -> ContextSignature:
    return ContextSignature(user, version, 4, np.asarray(realtime, np.int64).reshape(-1, 3), (1, 2))


def kv(seed: int, dtype=torch.float32, tokens: int = 5) -> KVData:
    g = torch.Generator().manual_seed(seed)
    shape = (SHAPE[0], tokens, *SHAPE[2:])
    return KVData(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


def nbytes(k: torch.Tensor) -> int:
    return 2 * k.numel() * k.element_size()


def test_host_tier_keeps_entries_until_taken():
    data = kv(0)
    k, v = data.k, data.v
    tier = HostTier(capacity_bytes=10 * nbytes(k))
    tier.offload_launch("u", sig("u"), 5, data)
    assert tier.snapshot()["host_users"] == 1 and tier.used == nbytes(k)
    held = tier.take("u", 0)
    assert held is not None and held.tokens == 5 and held.source == "host"
    got = held.wait()
    hk, hv = got.k, got.v
    assert torch.equal(hk, k) and torch.equal(hv, v)
    assert tier.take("u", 0) is None and tier.used == 0


def test_host_tier_drops_an_older_version():
    data = kv(1)
    k = data.k
    tier = HostTier(capacity_bytes=10 * nbytes(k))
    tier.offload_launch("u", sig("u", version=0), 5, data)
    assert tier.take("u", 1) is None  # a roll happened: the old copy is useless
    assert tier.snapshot()["host_users"] == 0


def test_host_tier_hands_its_oldest_entries_to_the_disk_tier(tmp_path):
    k = kv(2).k
    disk = DiskTier(tmp_path, capacity_bytes=100 * nbytes(k))
    host = HostTier(capacity_bytes=2 * nbytes(k), lower=disk)
    for i in range(4):
        host.offload_launch(f"u{i}", sig(f"u{i}"), 5, kv(10 + i))
    host.flush()
    assert list(host.entries) == ["u2", "u3"] and set(disk.files) == {"u0", "u1"}
    assert host.evictions == 2
    held = host.take("u0", 0)  # not in host: the disk tier answers
    assert held.source == "disk"
    assert torch.equal(held.wait().k, kv(10).k)
    assert "u0" not in disk.files


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_tier_survives_a_restart(tmp_path, dtype):
    data = kv(3, dtype)
    k, v = data.k, data.v
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    first.offload_launch("alice", sig("alice", 7), 5, data)
    first.offload_launch("bob", sig("bob"), 3, kv(4, dtype, tokens=3))
    first.close()
    second = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert set(second.files) == {"alice", "bob"} and second.used == first.used
    held = second.take("alice", 7)
    assert held is not None and held.tokens == 5 and held.source == "disk"
    assert held.signature.version == 7 and np.array_equal(held.signature.realtime, sig("alice").realtime)
    got = held.wait()
    hk, hv = got.k, got.v
    assert hk.dtype == dtype and torch.equal(hk, k) and torch.equal(hv, v)
    assert not list(tmp_path.glob(f"{second._stem('alice').name}.*"))  # taken: its files are gone
    second.close()


def test_disk_tier_budget_evicts_oldest_first(tmp_path):
    k = kv(5).k
    tier = DiskTier(tmp_path, capacity_bytes=2 * nbytes(k))
    for i in range(3):
        tier.offload_launch(f"u{i}", sig(f"u{i}"), 5, kv(20 + i))
    tier.flush()
    assert list(tier.files) == ["u1", "u2"] and tier.evictions == 1 and tier.used == 2 * nbytes(k)
    assert len(list(tmp_path.glob("*.kv"))) == 2
    tier.offload_launch("huge", sig("huge"), 50, kv(6, tokens=50))  # larger than the whole budget: not kept
    assert "huge" not in tier.files
    tier.close()
    assert list(DiskTier(tmp_path, capacity_bytes=nbytes(k)).files) == ["u2"]  # a smaller budget on restart


def test_disk_tier_discards_other_versions_and_unreadable_files(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    tier.offload_launch("u", sig("u", 1), 5, kv(7))
    tier.offload_launch("w", sig("w", 1), 5, kv(8))
    tier.close()
    assert DiskTier(tmp_path, 1 << 20).take("u", 2) is None  # rolled meanwhile
    stem = tier._stem("w")
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta["shape"][1] = 6  # index and data disagree: a torn entry
    stem.with_suffix(".json").write_text(json.dumps(meta))
    (tmp_path / "deadbeef.kv.tmp").write_bytes(b"partial")  # an interrupted write
    (tmp_path / "orphan.kv").write_bytes(b"no index")
    again = DiskTier(tmp_path, 1 << 20)
    assert not again.files and not list(tmp_path.iterdir())


def test_a_take_waits_for_the_write_in_flight(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    data = kv(9)
    k = data.k
    gate = threading.Event()
    tier.offload_launch("u", sig("u"), 5, data, done=gate.wait)  # the device copy is not finished yet
    assert not tier.files["u"].written.done()
    threading.Timer(0.05, gate.set).start()
    held = tier.take("u", 0)  # blocks until the file is whole
    assert torch.equal(held.wait().k, k)
    tier.close()
