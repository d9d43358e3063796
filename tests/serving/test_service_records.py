"""RecommenderService over a RevisionCheckedStore (what a front-end worker runs): a write through another
store connection is in the next load_user, a held record is answered inline, and the service's own TTL cache
still never keeps a record that a reader read before a write it raced."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.model import build_model
from grinfer.schema import EventIn, EventsIn
from grinfer.serving.service import RecommenderService, ServiceSettings
from grinfer.storage import open_cache, open_store
from grinfer.storage.base import Event, UserRecord
from grinfer.storage.checked import RevisionCheckedStore
from grinfer.storage.sqlite import SQLiteStore

DS = generate_synthetic(num_users=2, num_items=20, mean_events=5, seed=0)


class PausingStore(SQLiteStore):
    """A SQLite store whose next whole-record read, once armed, waits after reading (to line up a race)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.armed, self.read_done, self.resume = False, threading.Event(), threading.Event()

    def get_user_at(self, user: str) -> tuple[UserRecord, int] | None:
        found = super().get_user_at(user)
        if self.armed:
            self.armed = False
            self.read_done.set()
            self.resume.wait(30)
        return found


class CountingExecutor(ThreadPoolExecutor):
    """The event loop's default executor, counting the calls handed to its threads."""

    submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


def load(service: RecommenderService, user: str) -> tuple[UserRecord, bool, int]:
    """`service.load_user` on a fresh event loop: the record, cold start, and how many calls went to a thread."""
    executor = CountingExecutor(1)
    with asyncio.Runner() as runner:
        runner.get_loop().set_default_executor(executor)
        record, cold = runner.run(service.load_user(user))
    return record, cold, executor.submitted


@pytest.fixture(scope="module")
def engine():
    model = build_model(preset("mtgr-tiny").with_vocab(num_items=20, num_year_buckets=19)).eval()
    return Engine(model, DS.catalog, EngineConfig())  # never started: these tests only read users


def test_a_write_through_another_connection_is_in_the_next_load_user(engine, tmp_path):
    path = tmp_path / "s.db"
    store, other, cache = RevisionCheckedStore(open_store(path)), open_store(path), open_cache("memory://")
    try:  # a worker's settings: no TTL cache with the in-process cache
        service = RecommenderService(engine, DS.catalog, store, cache, ServiceSettings(user_ttl_s=0.0))
        assert load(service, "u")[1:] == (True, 1)  # unknown: cold start, looked up in a thread
        other.append_events("u", [Event(1, 10, 4)])
        assert load(service, "u") == (UserRecord("u", [], realtime=[Event(1, 10, 4)]), False, 1)
        # held, its revision confirmed by one lookup on the event loop: no thread, no whole read
        assert load(service, "u") == (UserRecord("u", [], realtime=[Event(1, 10, 4)]), False, 0)
        other.append_events("u", [Event(2, 20, 5)])
        record, cold, threads = load(service, "u")
        assert (record.realtime, cold, threads) == ([Event(1, 10, 4), Event(2, 20, 5)], False, 1)
        assert store.stats() == {"hits": 1, "reads": 2, "held": 1}
    finally:
        store.close()
        other.close()
        cache.close()


def test_a_reader_that_raced_a_write_does_not_keep_its_stale_record(engine, tmp_path):
    paused = PausingStore(tmp_path / "s.db")
    store, cache = RevisionCheckedStore(paused), open_cache("memory://")
    try:  # one process without workers: the TTL cache is on, above the checked store
        service = RecommenderService(engine, DS.catalog, store, cache, ServiceSettings(user_ttl_s=60.0))
        paused.append_events("u", [Event(1, 10, 4)])
        paused.armed = True
        reader = threading.Thread(target=lambda: results.append(service.user_record("u")))
        results: list[tuple[UserRecord, bool]] = []
        reader.start()
        assert paused.read_done.wait(30)  # the reader has read the record; the write comes before it caches
        raw = int(DS.catalog.raw_ids[2])
        service.append_events(EventsIn(user="u", events=[EventIn(item=raw, ts=20, action=5)]))
        paused.resume.set()
        reader.join(30)
        assert len(results[0][0].realtime) == 1  # it raced: what it read is older than the write ...
        assert len(service.user_record("u")[0].realtime) == 2  # ... and it was not kept for the next request
    finally:
        store.close()
        cache.close()
