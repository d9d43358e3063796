"""gRPC end to end over a real channel on 127.0.0.1, on the real stack (tiny MTGR, engine, SQLite store,
memory cache): rank, recommend, events then rank, roll history, bad input, auth, overload, health,
reflection, concurrency, metrics, and that the committed stubs match grinfer.proto."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import CancelledError, ThreadPoolExecutor
from functools import partial

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.engine.request import ContextTooLarge, DeadlineExceeded, EngineError, Overloaded
from grinfer.model import build_model
from grinfer.schema import RankIn
from grinfer.serving import grpc_server
from grinfer.serving.grpc_server import FIELD_METADATA, SERVICE_NAME, start_grpc_server
from grinfer.serving.metrics import Metrics
from grinfer.serving.proto import generate
from grinfer.serving.proto import grinfer_pb2 as pb
from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc
from grinfer.serving.service import FieldError, RecommenderService, Unavailable
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset

NUM_ITEMS = 60
API_KEY = "s3cret"
AUTH = (("x-api-key", API_KEY),)
TIMEOUT = 60


class Stack:
    """A real gRPC server over the real service stack, and a client stub on a real channel."""

    def __init__(self, db_path, engine_cfg: EngineConfig = EngineConfig(), start_engine: bool = True):
        torch.manual_seed(0)
        self.ds = generate_synthetic(num_users=20, num_items=NUM_ITEMS, mean_events=15, seed=0)
        cat = self.ds.catalog
        self.cfg = preset("mtgr-tiny").with_vocab(num_items=NUM_ITEMS, num_genres=cat.num_genres,
                                                  num_year_buckets=max(19, cat.num_year_buckets))
        self.model = build_model(self.cfg).eval()
        self.store, self.cache = open_store("sqlite:///" + str(db_path)), open_cache("memory://")
        import_dataset(self.ds, self.store, progress=False)
        self.engine = Engine(self.model, cat, engine_cfg)
        if start_engine:
            self.engine.start()
        self.service = RecommenderService(self.engine, cat, self.store, self.cache)
        self.metrics = Metrics(self.engine, "eager")
        self.engine.on_step = self.metrics.on_step
        self.server = start_grpc_server(self.service, self.metrics, "127.0.0.1", 0, api_key=API_KEY)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def items(self, *dense: int) -> list[int]:
        """Catalogue (raw) ids of dense item ids."""
        return [int(self.ds.catalog.raw_ids[d]) for d in dense]

    def rank(self, user: str, items: list[int], **kw) -> pb.RankResponse:
        request = pb.RankRequest(user=user, candidates=[pb.Candidate(item=i) for i in items], **kw)
        return self.stub.Rank(request, timeout=TIMEOUT)

    def last_ts(self, user: str) -> int:
        record = self.store.get_user(user)
        return max(e.ts for e in record.static + record.realtime)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=5).wait(10)
        self.engine.shutdown()
        self.cache.close()
        self.store.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("grpc") / "db.sqlite")
    yield s
    s.close()


def _scores(response: pb.RankResponse) -> dict[int, float]:
    return {i.item: i.score for i in response.items}


def _fails(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value


def _field(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(FIELD_METADATA)


# ---- the stubs -------------------------------------------------------------------------------------
def test_committed_stubs_match_the_proto():
    assert generate.check() == [], "run `python -m grinfer.serving.proto.generate`"


def test_stale_stubs_are_detected(tmp_path):
    pb2, pb2_grpc, _ = generate.generate(tmp_path)
    text, grpc_text = pb2.read_text(), pb2_grpc.read_text()
    restamped = re.sub(r"Version: [\d.]+", "Version: 99.0.1", text)
    restamped = re.sub(r"(Domain.PUBLIC,\s*)\d+", r"\g<1>99", restamped)
    assert restamped != text and generate.normalized(restamped) == generate.normalized(text)
    restamped = re.sub(r"GRPC_GENERATED_VERSION = '[\d.]+'", "GRPC_GENERATED_VERSION = '9.9.9'", grpc_text)
    assert restamped != grpc_text and generate.normalized(restamped) == generate.normalized(grpc_text)
    assert generate.normalized(text) != generate.normalized(text.replace("Candidate", "Candidat"))


# ---- the operations --------------------------------------------------------------------------------
def test_rank_returns_sorted_scores_for_catalogue_ids(stack):
    items = stack.items(*range(1, 21))
    out = stack.rank("3", items)
    assert out.user == "3" and not out.cold_start and out.history_version == 1
    assert out.cache in ("miss", "hit", "partial") and out.latency_ms > 0
    assert sorted(i.item for i in out.items) == sorted(items)
    scores = [i.score for i in out.items]
    assert scores == sorted(scores, reverse=True)
    for item in out.items:
        assert set(item.probabilities) == set(stack.cfg.tasks)
        assert all(0.0 < p < 1.0 for p in item.probabilities.values())
        assert item.title == stack.ds.catalog.titles[item.item]  # synthetic raw ids are the dense ids


def test_recommend_returns_k_items(stack):
    out = stack.stub.Recommend(pb.RecommendRequest(user="4", k=5), timeout=TIMEOUT)
    assert len(out.items) == 5
    assert {i.item for i in out.items} <= set(stack.items(*range(1, NUM_ITEMS + 1)))
    scores = [i.score for i in out.items]
    assert scores == sorted(scores, reverse=True)
    default = stack.stub.Recommend(pb.RecommendRequest(user="4"), timeout=TIMEOUT)
    assert len(default.items) == 10  # the schema's default k


def test_unknown_user_is_a_cold_start(stack):
    out = stack.rank("newcomer", stack.items(1, 2, 3))
    assert out.cold_start and out.history_version == 0 and len(out.items) == 3


def test_events_then_rank_uses_the_kv_cache_and_changes_scores(stack):
    user, items = "5", stack.items(*range(1, 11))
    before = stack.rank(user, items)
    ts = stack.last_ts(user)
    events = [pb.Event(item=stack.items(7)[0], ts=ts + 100, action=5), pb.Event(item=stack.items(9)[0], ts=ts + 200)]
    ack = stack.stub.AppendEvents(pb.AppendEventsRequest(user=user, events=events), metadata=AUTH, timeout=TIMEOUT)
    assert ack.user == user and ack.appended == 2 and ack.realtime_events == 2
    record = stack.store.get_user(user)
    assert [(e.ts, e.action) for e in record.realtime] == [(ts + 100, 5), (ts + 200, 4)]  # default action 4
    after = stack.rank(user, items)
    assert after.cache == "partial"  # U + S (+ old R) came from the KV cache; only the new events were computed
    assert after.history_version == before.history_version
    assert _scores(after) != pytest.approx(_scores(before), abs=1e-6)


def test_roll_history_bumps_the_version_and_matches_a_cold_engine(stack):
    user, items = "6", stack.items(*range(1, 16))
    ts = stack.last_ts(user)
    stack.stub.AppendEvents(pb.AppendEventsRequest(user=user, events=[pb.Event(item=stack.items(3)[0], ts=ts + 50)]),
                            metadata=AUTH, timeout=TIMEOUT)
    before = stack.rank(user, items)
    rolled = stack.stub.RollHistory(pb.RollHistoryRequest(user=user), metadata=AUTH, timeout=TIMEOUT)
    assert rolled.user == user and rolled.history_version == before.history_version + 1
    after = stack.rank(user, items)
    assert after.cache == "miss" and after.history_version == rolled.history_version

    # the same request on a fresh engine (nothing cached) over the same store
    fresh = Engine(stack.model, stack.ds.catalog, EngineConfig()).start()
    try:
        service = RecommenderService(fresh, stack.ds.catalog, stack.store, open_cache("memory://"))
        cold = asyncio.run(service.rank(RankIn(user=user, candidates=[{"item": i} for i in items])))
    finally:
        fresh.shutdown()
    assert cold.cache == "miss" and cold.history_version == after.history_version
    assert _scores(after) == pytest.approx({i.item: i.score for i in cold.items}, rel=1e-5, abs=1e-6)
    for got, want in zip(after.items, sorted(cold.items, key=lambda i: -i.score)):
        assert dict(got.probabilities) == pytest.approx(want.probabilities, rel=1e-5, abs=1e-6)


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "request_fields", "field"), [
    ("Rank", {"user": "1", "candidates": [{"item": 10**6}]}, "candidates.0.item"),
    ("Rank", {"user": "1", "candidates": [{"item": -1}]}, "candidates.0.item"),
    ("Rank", {"user": "1", "candidates": []}, "candidates"),
    ("Rank", {"user": "bad user!", "candidates": [{"item": 1}]}, "user"),
    ("Rank", {"user": "", "candidates": [{"item": 1}]}, "user"),
    ("Rank", {"user": "1", "candidates": [{"item": 1}], "deadline_ms": 0}, "deadline_ms"),
    ("Rank", {"user": "1", "candidates": [{"item": 1}], "events": [{"item": 1, "action": 9}]}, "events.0.action"),
    ("Rank", {"user": "1", "candidates": [{"item": 1}], "events": [{"item": 10**6}]}, "events.0.item"),
    ("Recommend", {"user": "1", "k": 0}, "k"),
    ("Recommend", {"user": "1", "k": 501}, "k"),
    ("Recommend", {"user": "a" * 129}, "user"),
    ("AppendEvents", {"user": "1", "events": []}, "events"),
    ("AppendEvents", {"user": "1", "events": [{"item": 1, "ts": -5}]}, "events.0.ts"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stack, method, request_fields, field):
    request_type = {"Rank": pb.RankRequest, "Recommend": pb.RecommendRequest,
                    "AppendEvents": pb.AppendEventsRequest}[method]
    request = request_type(**{k: [pb.Candidate(**c) if k == "candidates" else pb.Event(**c) for c in v]
                              if isinstance(v, list) else v for k, v in request_fields.items()})
    error = _fails(lambda: getattr(stack.stub, method)(request, metadata=AUTH, timeout=TIMEOUT),
                   grpc.StatusCode.INVALID_ARGUMENT)
    assert error.details().startswith(f"{field}: "), error.details()
    assert _field(error) == field
    assert "Traceback" not in error.details()


def test_unknown_user_roll_is_not_found(stack):
    error = _fails(lambda: stack.stub.RollHistory(pb.RollHistoryRequest(user="nobody"), metadata=AUTH,
                                                  timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND)
    assert _field(error) == "user" and "nobody" in error.details()


def test_api_key_is_required_for_writes_only(stack):
    append = pb.AppendEventsRequest(user="7", events=[pb.Event(item=stack.items(1)[0], ts=stack.last_ts("7") + 10)])
    roll = pb.RollHistoryRequest(user="7")
    for call, request in ((stack.stub.AppendEvents, append), (stack.stub.RollHistory, roll)):
        for metadata in ((), (("x-api-key", "wrong"),), (("authorization", "Bearer wrong"),)):
            error = _fails(partial(call, request, metadata=metadata, timeout=TIMEOUT),
                           grpc.StatusCode.UNAUTHENTICATED)
            assert _field(error) == "x-api-key"
    assert stack.store.get_user("7").realtime == []  # nothing was written
    assert stack.stub.AppendEvents(append, metadata=(("authorization", f"Bearer {API_KEY}"),),
                                   timeout=TIMEOUT).appended == 1
    assert stack.stub.RollHistory(roll, metadata=AUTH, timeout=TIMEOUT).history_version == 2
    assert stack.rank("7", stack.items(1, 2)).history_version == 2  # reads need no key


@pytest.mark.parametrize(("exc", "code", "kind"), [
    (Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    (DeadlineExceeded("too late"), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    (ContextTooLarge("huge"), grpc.StatusCode.INVALID_ARGUMENT, "context_too_large"),
    (Unavailable("no retriever"), grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (EngineError("stopped"), grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (FieldError("user", "unknown user", status=404), grpc.StatusCode.NOT_FOUND, "field"),
    (FieldError("x-api-key", "wrong key", status=401), grpc.StatusCode.UNAUTHENTICATED, "field"),
    (FieldError("candidates[0].item", "not in the catalogue"), grpc.StatusCode.INVALID_ARGUMENT, "field"),
    (CancelledError(), grpc.StatusCode.CANCELLED, "cancelled"),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL, "internal"),
])
def test_errors_map_to_status_codes(exc, code, kind):
    abort = grpc_server._classify(exc)
    assert (abort.code, abort.kind) == (code, kind)
    assert "bug" not in abort.details  # internal errors do not leak their message


def test_a_stopped_engine_is_unavailable(tmp_path):
    stack = Stack(tmp_path / "db.sqlite", start_engine=False)
    try:
        error = _fails(lambda: stack.rank("1", stack.items(1, 2)), grpc.StatusCode.UNAVAILABLE)
        assert "not running" in error.details()
    finally:
        stack.close()


def test_overload_is_resource_exhausted_never_internal(tmp_path):
    stack = Stack(tmp_path / "db.sqlite", EngineConfig(max_queue=1, max_batch_requests=1))
    try:
        items = stack.items(*range(1, NUM_ITEMS + 1))
        calls = [stack.stub.Rank.future(pb.RankRequest(user=str(u.user_id), candidates=[pb.Candidate(item=i)
                                                                                         for i in items]),
                                        timeout=TIMEOUT) for u in stack.ds.users for _ in range(3)]
        codes = [call.code() for call in calls]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert all(len(c.result().items) == NUM_ITEMS for c in calls if c.code() == grpc.StatusCode.OK)
        assert 'kind="overloaded"' in stack.metrics.render().decode()
    finally:
        stack.close()


# ---- health, reflection, concurrency, metrics ------------------------------------------------------
def test_health_is_serving(stack):
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    _fails(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT),
           grpc.StatusCode.NOT_FOUND)


def test_reflection_lists_and_describes_the_service(stack):
    database = ProtoReflectionDescriptorDatabase(stack.channel)
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(database.get_services())
    from google.protobuf.descriptor_pool import DescriptorPool

    service = DescriptorPool(database).FindServiceByName(SERVICE_NAME)
    assert [m.name for m in service.methods] == ["Rank", "Recommend", "AppendEvents", "RollHistory", "GetUser",
                                                 "ListUsers"]
    assert service.methods_by_name["Recommend"].output_type.full_name == "grinfer.v1.RankResponse"


def test_concurrent_ranks_all_succeed_and_agree(stack):
    users = [str(u.user_id) for u in stack.ds.users[10:20]]
    items = stack.items(*range(1, 31))
    expected = {user: _scores(stack.rank(user, items)) for user in users}
    with ThreadPoolExecutor(max_workers=32) as pool:
        jobs = [(user, pool.submit(stack.rank, user, items)) for user in users for _ in range(6)]
        results = [(user, job.result()) for user, job in jobs]
    assert len(results) == 60
    for user, out in results:
        assert out.cache == "hit"
        assert _scores(out) == pytest.approx(expected[user], rel=1e-5, abs=1e-6)


def test_metrics_record_grpc_calls_and_errors(stack):
    stack.rank("8", stack.items(1, 2))
    _fails(lambda: stack.rank("8", []), grpc.StatusCode.INVALID_ARGUMENT)
    text = stack.metrics.render().decode()
    assert 'grinfer_request_seconds_count{backend="eager",endpoint="grpc:Rank"}' in text
    assert 'grinfer_errors_total{endpoint="grpc:Rank",kind="validation"}' in text
    assert "grinfer_rank_context_cache_total" in text


def test_the_call_deadline_becomes_the_engine_deadline(stack):
    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    req = RankIn(user="1", candidates=[{"item": 1}])
    assert grpc_server._with_call_deadline(req, Context(None)).deadline_ms is None
    assert grpc_server._with_call_deadline(req, Context(2.5)).deadline_ms == 2500
    assert grpc_server._with_call_deadline(req, Context(1e6)).deadline_ms == 600_000
    assert grpc_server._with_call_deadline(req.model_copy(update={"deadline_ms": 7}), Context(2.5)).deadline_ms == 7
    assert stack.rank("1", stack.items(1), deadline_ms=60_000).items  # an explicit, generous deadline works
