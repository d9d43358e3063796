"""The API says what it did, the same way over REST and gRPC: strict request types, k within retrieve,
415 for bodies that are not JSON, deadline_ms enforced, the same field paths and messages for catalogue
errors, users readable over both, and a roll with nothing to fold changing nothing.

One real stack (tiny MTGR, engine, SQLite store, memory cache) serves REST and gRPC from one service.
"""

from __future__ import annotations

import grpc
import pytest
from test_rest import API_KEY, NUM_ITEMS, Stack

from grinfer.serving.grpc_server import FIELD_METADATA, start_grpc_server
from grinfer.serving.proto import grinfer_pb2 as pb
from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc

AUTH = (("x-api-key", API_KEY),)
TIMEOUT = 60


class Both:
    """The REST stack plus a gRPC server and stub over the same service."""

    def __init__(self, stack: Stack):
        self.stack, self.http = stack, stack.http
        self.grpc = start_grpc_server(stack.service, stack.metrics, "127.0.0.1", 0, api_key=API_KEY)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def user(self, i: int) -> str:
        return str(self.stack.ds.users[i].user_id)

    def close(self) -> None:
        self.channel.close()
        self.grpc.stop(grace=5).wait(10)
        self.stack.close()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    b = Both(Stack(f"sqlite:///{tmp_path_factory.mktemp('api') / 'grinfer.db'}", "memory://"))
    yield b
    b.close()


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def grpc_field(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(FIELD_METADATA)


def rank_request(body: dict) -> pb.RankRequest:
    return pb.RankRequest(user=body["user"], candidates=[pb.Candidate(**c) for c in body["candidates"]],
                          events=[pb.Event(**e) for e in body.get("events", ())])


# ---- strict types and 415 (REST: JSON carries the types; proto fields are typed already) ------------------
@pytest.mark.parametrize(("path", "extra", "field"), [
    ("/v1/recommend", {"k": "10"}, "k"),
    ("/v1/recommend", {"k": True}, "k"),
    ("/v1/recommend", {"k": 10.0}, "k"),
    ("/v1/recommend", {"retrieve": "50"}, "retrieve"),
    ("/v1/recommend", {"deadline_ms": "100"}, "deadline_ms"),
    ("/v1/rank", {"candidates": [{"item": "7"}]}, "candidates.0.item"),
    ("/v1/rank", {"candidates": [{"item": 7}], "events": [{"item": 7, "action": True}]}, "events.0.action"),
    ("/v1/rank", {"candidates": [{"item": 7}], "events": [{"item": 7, "ts": "1000"}]}, "events.0.ts"),
    ("/v1/rank", {"user": 1, "candidates": [{"item": 7}]}, "user"),
])
def test_request_types_are_strict(both, path, extra, field):
    r = both.http.post(path, json={"user": both.user(0), **extra})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(f"{field}: "), r.json()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", ["/v1/rank", "/v1/recommend", "/v1/events", "/v1/admin/roll-history"])
def test_a_body_that_is_not_declared_json_is_415(both, path, content_type):
    headers = {"x-api-key": API_KEY} | ({"content-type": content_type} if content_type else {})
    r = both.http.post(path, content=b'{"user": "1", "k": 5}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["field"] == "content-type"
    assert (content_type or "none") in r.json()["error"]


def test_json_with_parameters_or_a_json_suffix_is_accepted(both):
    for content_type in ("application/json; charset=utf-8", "application/vnd.grinfer+json"):
        r = both.http.post("/v1/recommend", content=b'{"user": "1", "k": 3}', headers={"content-type": content_type})
        assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text


# ---- k and retrieve ----------------------------------------------------------------------------------------
def test_k_above_an_explicit_retrieve_is_rejected_naming_k(both):
    r = both.http.post("/v1/recommend", json={"user": both.user(1), "k": 30, "retrieve": 20})
    assert r.status_code == 422 and r.json()["field"] == "k", r.text
    assert "retrieve=20" in r.json()["error"]
    error = grpc_error(lambda: both.stub.Recommend(pb.RecommendRequest(user=both.user(1), k=30, retrieve=20),
                                                   timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and grpc_field(error) == "k"
    assert error.details() == r.json()["error"]


def test_retrieve_defaults_to_at_least_k(both):
    """k above the default retrieve (200) is served whole; the catalogue here has fewer unseen items."""
    unseen = NUM_ITEMS - len(set(both.stack.ds.users[2].items.tolist()))
    r = both.http.post("/v1/recommend", json={"user": both.user(2), "k": 300})
    assert r.status_code == 200 and len(r.json()["items"]) == unseen, r.text
    out = both.stub.Recommend(pb.RecommendRequest(user=both.user(2), k=300), timeout=TIMEOUT)
    assert len(out.items) == unseen


# ---- deadline_ms ---------------------------------------------------------------------------------------------
def test_a_deadline_that_passes_while_computing_is_504_and_leaves_the_cache_usable(both):
    user = both.user(3)
    items = [both.stack.raw(i) for i in range(1, NUM_ITEMS + 1)]
    body = {"user": user, "candidates": [{"item": i} for i in items]}
    r = both.http.post("/v1/rank", json={**body, "deadline_ms": 1})
    assert r.status_code == 504, r.text
    assert r.json()["field"] == "deadline_ms" and r.json()["error"].startswith("deadline_ms: ")
    error = grpc_error(lambda: both.stub.Rank(pb.RankRequest(deadline_ms=1, **{
        "user": user, "candidates": [pb.Candidate(item=i) for i in items]}), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and grpc_field(error) == "deadline_ms"
    assert error.details().startswith("deadline_ms: ")
    ok = both.http.post("/v1/rank", json={**body, "deadline_ms": 60_000})
    assert ok.status_code == 200
    expected = both.stack.uncached(user, items)
    for x in ok.json()["items"]:
        assert x["probabilities"]["ctr"] == pytest.approx(expected[x["item"]], abs=1e-5)


# ---- catalogue errors: one field path and one message on both APIs -------------------------------------------
@pytest.mark.parametrize("case", ["unknown candidate", "unknown event item", "repeated candidate", "append unknown"])
def test_catalogue_errors_are_the_same_on_rest_and_grpc(both, case):
    user, known = both.user(4), both.stack.raw(3)
    if case == "append unknown":
        body = {"user": user, "events": [{"item": known}, {"item": 999_999}]}
        r = both.http.post("/v1/events", json=body, headers={"x-api-key": API_KEY})
        request = pb.AppendEventsRequest(user=user, events=[pb.Event(**e) for e in body["events"]])
        error = grpc_error(lambda: both.stub.AppendEvents(request, metadata=AUTH, timeout=TIMEOUT))
    else:
        candidates = {"unknown candidate": [known, 999_999], "repeated candidate": [known, known]}.get(case, [known])
        body = {"user": user, "candidates": [{"item": i} for i in candidates]}
        if case == "unknown event item":
            body["events"] = [{"item": known}, {"item": 999_999}]
        r = both.http.post("/v1/rank", json=body)
        error = grpc_error(lambda: both.stub.Rank(rank_request(body), timeout=TIMEOUT))
    assert r.status_code == 422 and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert r.json()["field"] == grpc_field(error) and r.json()["field"].endswith("1.item")
    assert r.json()["error"] == error.details()


# ---- reading users ---------------------------------------------------------------------------------------------
def user_dict(msg: pb.UserResponse) -> dict:
    return {"user": msg.user, "profile": dict(msg.profile), "history_version": msg.history_version,
            "static_events": msg.static_events, "realtime_events": msg.realtime_events,
            "recent": [{"item": e.item, "ts": e.ts, "action": e.action, "title": e.title} for e in msg.recent]}


def test_get_user_and_list_users_mirror_rest(both):
    user = both.user(5)
    rest = both.http.get(f"/v1/users/{user}").json()
    got = both.stub.GetUser(pb.GetUserRequest(user=user), timeout=TIMEOUT)
    assert user_dict(got) == rest
    events = len(both.stack.ds.users[5].items)
    assert rest["static_events"] == events and len(rest["recent"]) == min(20, events) > 0
    page = both.http.get("/v1/users", params={"limit": 3, "offset": 2}).json()
    listed = both.stub.ListUsers(pb.ListUsersRequest(limit=3, offset=2), timeout=TIMEOUT)
    assert {"users": list(listed.users), "total": listed.total} == page
    assert page["total"] == both.stack.store.count_users() and len(page["users"]) == 3
    default = both.stub.ListUsers(pb.ListUsersRequest(), timeout=TIMEOUT)
    assert list(default.users) == both.http.get("/v1/users").json()["users"]


@pytest.mark.parametrize(("rest_path", "rpc", "message", "status", "code", "field"), [
    ("/v1/users/nobody", "GetUser", pb.GetUserRequest(user="nobody"), 404, grpc.StatusCode.NOT_FOUND, "user"),
    ("/v1/users/bad%20id", "GetUser", pb.GetUserRequest(user="bad id"), 422, grpc.StatusCode.INVALID_ARGUMENT,
     "user"),
    ("/v1/users?limit=0", "ListUsers", pb.ListUsersRequest(limit=0), 422, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    ("/v1/users?limit=1001", "ListUsers", pb.ListUsersRequest(limit=1001), 422, grpc.StatusCode.INVALID_ARGUMENT,
     "limit"),
    ("/v1/users?offset=-1", "ListUsers", pb.ListUsersRequest(offset=-1), 422, grpc.StatusCode.INVALID_ARGUMENT,
     "offset"),
])
def test_user_read_errors_match(both, rest_path, rpc, message, status, code, field):
    r = both.http.get(rest_path)
    assert r.status_code == status and r.json()["field"] == field, r.text
    error = grpc_error(lambda: getattr(both.stub, rpc)(message, timeout=TIMEOUT))
    assert error.code() == code and grpc_field(error) == field
    assert error.details() == r.json()["error"]


# ---- history rolls ---------------------------------------------------------------------------------------------
def test_a_roll_with_nothing_to_fold_changes_nothing(both):
    user, items = both.user(6), [both.stack.raw(i) for i in (1, 2, 3)]
    payload = {"user": user, "candidates": [{"item": i} for i in items]}
    first = both.http.post("/v1/rank", json=payload).json()
    assert both.stack.cache.get_user(user) is not None  # the ranked user's record is cached
    r = both.http.post("/v1/admin/roll-history", json={"user": user}, headers={"x-api-key": API_KEY})
    assert r.status_code == 200 and r.json() == {"user": user, "history_version": first["history_version"],
                                                 "folded": 0}
    assert both.stack.cache.get_user(user) is not None  # not invalidated
    rolled = both.stub.RollHistory(pb.RollHistoryRequest(user=user), metadata=AUTH, timeout=TIMEOUT)
    assert (rolled.history_version, rolled.folded) == (first["history_version"], 0)
    again = both.http.post("/v1/rank", json=payload).json()
    assert again["cache"] == "hit" and again["history_version"] == first["history_version"]
    assert [x["score"] for x in again["items"]] == pytest.approx([x["score"] for x in first["items"]], abs=1e-3)

    last = int(both.stack.ds.users[6].timestamps[-1])
    both.http.post("/v1/events", json={"user": user, "events": [{"item": items[0], "ts": last + 60}]},
                   headers={"x-api-key": API_KEY})
    rolled = both.stub.RollHistory(pb.RollHistoryRequest(user=user), metadata=AUTH, timeout=TIMEOUT)
    assert (rolled.history_version, rolled.folded) == (first["history_version"] + 1, 1)
    assert both.http.post("/v1/rank", json=payload).json()["cache"] == "miss"
