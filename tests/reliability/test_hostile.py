"""Hostile requests against a live server (REST and gRPC over one real service and SQLite store):
unbounded input adds no metric series, numbers past the schema's bounds are 4xx naming the field,
the API key is checked (Bearer scheme, before the body) and undecodable gRPC bytes are
INVALID_ARGUMENT with a rate-limited log."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from live_stack import API_KEY, LiveStack

from grinfer.serving.grpc_server import FIELD_METADATA, SERVICE_NAME
from grinfer.serving.proto import grinfer_pb2 as pb

DISTINCT_IDS = 10_000
KEY = {"X-API-Key": API_KEY}
COLD_ITEM = 7  # a catalogue id
COLD_EVERY = 40


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("hostile") / "store.db")
    yield stack
    stack.close()


def _rest_probe(http: httpx.Client, i: int) -> int:
    """One request carrying a never-seen user id: ranked cold (200, one in COLD_EVERY: the engine runs),
    unknown (404) or malformed (422)."""
    if i % COLD_EVERY == 0:
        return http.post("/v1/rank", json={"user": f"cold-{i}", "candidates": [{"item": COLD_ITEM}]}).status_code
    kind = i % 3
    if kind == 0:
        return http.get(f"/v1/users/nobody-{i}").status_code
    if kind == 1:
        return http.get(f"/v1/users/bad id {i}!").status_code
    return http.post("/v1/rank", json={"user": f"bad/{i}", "candidates": [{"item": 1}]}).status_code


def _rest_probes(url: str, ids: range) -> list[int]:
    with httpx.Client(base_url=url, timeout=30) as http:
        return [_rest_probe(http, i) for i in ids]


def _grpc_probe(stub, i: int) -> grpc.StatusCode:
    kind = i % 3
    try:
        if kind == 0:
            stub.GetUser(pb.GetUserRequest(user=f"nobody-{i}"), timeout=30)
        elif kind == 1:
            stub.GetUser(pb.GetUserRequest(user=f"bad id {i}!"), timeout=30)
        else:
            stub.Rank(pb.RankRequest(user=f"bad/{i}", candidates=[pb.Candidate(item=1)]), timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_ten_thousand_unknown_user_ids_add_no_metric_series_over_rest(live):
    _rest_probes(live.url, range(COLD_EVERY + 3))  # every route and error kind has its series before the count
    live.series()
    before = live.series()
    with ThreadPoolExecutor(4) as pool:
        first = COLD_EVERY + 3
        chunks = list(pool.map(lambda j: _rest_probes(live.url, range(first + j, first + DISTINCT_IDS, 4)), range(4)))
    statuses = [status for chunk in chunks for status in chunk]
    assert len(statuses) == DISTINCT_IDS and set(statuses) == {200, 404, 422}, set(statuses)
    after = live.series()
    assert after == before, sorted(after - before)[:10]


def test_ten_thousand_unknown_user_ids_add_no_metric_series_over_grpc(live):
    for i in range(3):
        _grpc_probe(live.stub, i)
    live.series()
    before = live.series()
    with ThreadPoolExecutor(4) as pool:
        codes = set(pool.map(lambda i: _grpc_probe(live.stub, i), range(3, DISTINCT_IDS + 3)))
    assert codes == {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, codes
    after = live.series()
    assert after == before, sorted(after - before)[:10]


@pytest.mark.parametrize("query, field", [
    ("offset=9223372036854775808", "offset"), ("offset=2147483649", "offset"), ("offset=-1", "offset"),
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=99999999999999999999", "limit"),
])
def test_list_query_numbers_past_their_bounds_are_422_naming_the_field(live, query, field):
    r = live.http.get(f"/v1/users?{query}")
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_the_largest_accepted_offset_is_answered(live):
    r = live.http.get(f"/v1/users?offset={2**31}&limit=1000")
    assert r.status_code == 200 and r.json()["users"] == [], r.text


@pytest.mark.parametrize("path, body, field", [
    ("/v1/events", {"user": "u1", "events": [{"item": 2**63}]}, "events.0.item"),
    ("/v1/events", {"user": "u1", "events": [{"item": 1, "ts": 2**63}]}, "events.0.ts"),
    ("/v1/events", {"user": "u1", "events": [{"item": 1, "ts": -(2**63) - 1}]}, "events.0.ts"),
    ("/v1/rank", {"user": "u1", "candidates": [{"item": 2**64}]}, "candidates.0.item"),
    ("/v1/rank", {"user": "u1", "candidates": [{"item": 1}], "deadline_ms": 2**40}, "deadline_ms"),
    ("/v1/recommend", {"user": "u1", "k": 2**63}, "k"),
    ("/v1/recommend", {"user": "u1", "retrieve": 10**30}, "retrieve"),
])
def test_body_numbers_past_their_bounds_are_422_naming_the_field(live, path, body, field):
    r = live.http.post(path, json=body, headers=KEY)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


@pytest.mark.parametrize("headers", [
    {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"X-API-Key": "caf\u00e9".encode("latin-1")},
    {"X-API-Key": ""}, {"X-API-Key": "", "Authorization": ""}, {},
])
@pytest.mark.parametrize("path", ["/v1/events", "/v1/admin/roll-history"])
def test_writes_without_a_bearer_or_x_api_key_key_are_401_before_the_body_is_looked_at(live, headers, path):
    for content, media in ((b"{not json", "application/json"), (b'{"user": 1}', "application/json"),
                           (b"x" * 200_000, "application/json"), (b"{}", "text/plain")):
        r = live.http.post(path, content=content, headers={**headers, "content-type": media})
        assert r.status_code == 401 and r.json()["field"] == "x-api-key", (headers, media, r.text)


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"bearer  {API_KEY}"},
                                     {"X-API-Key": API_KEY}])
def test_a_key_as_x_api_key_or_bearer_token_is_accepted(live, headers):
    r = live.http.post("/v1/events", json={"user": "keyed", "events": [{"item": 3}]}, headers=headers)
    assert r.status_code == 200, r.text


def test_the_key_is_checked_when_served_under_a_root_path(live):
    async def post(headers: dict) -> int:
        transport = httpx.ASGITransport(app=live.app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://grinfer") as http:
            response = await http.post("/api/v1/admin/roll-history", json={"user": live.user()}, headers=headers)
            return response.status_code
    assert asyncio.run(post({})) == 401
    assert asyncio.run(post(KEY)) == 200


def test_grpc_writes_need_the_bearer_scheme(live):
    request = pb.RollHistoryRequest(user=live.user())
    with pytest.raises(grpc.RpcError) as bare:
        live.stub.RollHistory(request, metadata=(("authorization", API_KEY),), timeout=30)
    assert bare.value.code() == grpc.StatusCode.UNAUTHENTICATED
    live.stub.RollHistory(request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=30)


def test_undecodable_grpc_bytes_are_invalid_argument_logged_once_per_burst(live, caplog):
    call = live.channel.unary_unary(f"/{SERVICE_NAME}/Rank")  # no serializers: the bytes go as they are
    with caplog.at_level(logging.WARNING, logger="grinfer.grpc"):
        for i in range(50):
            with pytest.raises(grpc.RpcError) as error:
                call(b"\xff\xff\xff" + bytes([i]), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
            assert "grinfer.v1.RankRequest" in error.value.details()
            assert dict(error.value.trailing_metadata())[FIELD_METADATA] == "request"
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) <= 1
