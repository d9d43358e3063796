"""KServe v2 over HTTP on a live server: health, metadata, repository index, inference with JSON tensors and
the binary extension equal to /v1/rank and /v1/recommend (fp32 1e-5), through the same service (KV cache,
metrics), and protocol errors ({"error": ...} with 400 / 404)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kserve_util import items_of, v1_rank


def _rank_body(user: str, items: list[int], **extra) -> dict:
    return {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [user]},
                       {"name": "candidates", "datatype": "INT64", "shape": [len(items)], "data": items}], **extra}


def _outputs(answer: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


def test_health_metadata_and_index(live):
    http = live.http
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    server = http.get("/v2").json()
    assert server["name"] == "grinfer" and "binary_tensor_data" in server["extensions"]
    meta = http.get("/v2/models/grinfer_rank").json()
    assert meta == http.get("/v2/models/grinfer_rank/versions/1").json()
    assert meta["versions"] == ["1"] and meta["platform"] == "grinfer"
    assert [i["name"] for i in meta["inputs"]][:2] == ["user_id", "candidates"]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": [-1, -1], "score": [-1],
                                                                 "ranked": [-1]}
    for path in ("/v2/models/grinfer_rank/ready", "/v2/models/grinfer_recommend/versions/1/ready"):
        assert http.get(path).json()["ready"] is True
    index = http.post("/v2/repository/index").json()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {("grinfer_rank", "1", "READY"),
                                                                       ("grinfer_recommend", "1", "READY")}
    assert http.post("/v2/repository/index", json={"ready": True}).json() == index


def test_json_inference_equals_v1_rank_in_candidate_order(live):
    user, items = live.user(), items_of(live, 5, 1, 9, 3)
    r = live.http.post("/v2/models/grinfer_rank/infer", json=_rank_body(user, items, id="req-1"))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model_name"] == "grinfer_rank" and answer["model_version"] == "1" and answer["id"] == "req-1"
    tasks = answer["parameters"]["tasks"].split(",")
    out, expected = _outputs(answer), v1_rank(live, user, items)
    assert out["probabilities"].shape == (4, len(tasks))
    np.testing.assert_allclose(out["score"], [expected[i]["score"] for i in items], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], [[expected[i]["probabilities"][t] for t in tasks]
                                                      for i in items], rtol=0, atol=1e-5)
    assert out["ranked"].tolist() == list(expected)  # /v1/rank's order: best first


def test_binary_tensors_in_and_out(live):
    user, items = live.user(), items_of(live, 2, 4, 6)
    raws = [len(user).to_bytes(4, "little") + user.encode(), np.asarray(items, "<i8").tobytes()]
    head = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": len(raws[0])}},
                       {"name": "candidates", "datatype": "INT64", "shape": [3],
                        "parameters": {"binary_data_size": len(raws[1])}}],
            "outputs": [{"name": "score", "parameters": {"binary_data": True}}, {"name": "ranked"}]}
    header = json.dumps(head).encode()
    r = live.http.post("/v2/models/grinfer_rank/infer", content=header + b"".join(raws),
                       headers={"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    split = int(r.headers["inference-header-content-length"])
    answer = json.loads(r.content[:split])
    assert [o["name"] for o in answer["outputs"]] == ["score", "ranked"]  # only what was asked for
    score_meta, ranked = answer["outputs"]
    assert score_meta["parameters"]["binary_data_size"] == 12 and "data" not in score_meta
    score = np.frombuffer(r.content[split:], "<f4")
    expected = v1_rank(live, user, items)
    np.testing.assert_allclose(score, [expected[i]["score"] for i in items], rtol=0, atol=1e-5)
    assert ranked["data"] == list(expected)


def test_events_tensors_are_the_v1_events(live):
    user, items = str(live.ds.users[1].user_id), items_of(live, 7, 8)
    events = [{"item": live.raw_item(3), "ts": 2_000_000_000, "action": 5}]
    body = _rank_body(user, items)
    body["inputs"] += [{"name": "event_items", "datatype": "INT64", "shape": [1], "data": [events[0]["item"]]},
                       {"name": "event_ts", "datatype": "INT64", "shape": [1], "data": [events[0]["ts"]]},
                       {"name": "event_actions", "datatype": "INT32", "shape": [1], "data": [5]}]
    out = _outputs(live.http.post("/v2/models/grinfer_rank/infer", json=body).json())
    expected = v1_rank(live, user, items, events)
    np.testing.assert_allclose(out["score"], [expected[i]["score"] for i in items], rtol=0, atol=1e-5)


def test_recommend_equals_v1_recommend(live):
    user = str(live.ds.users[2].user_id)
    body = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [user]},
                       {"name": "k", "datatype": "INT64", "shape": [1], "data": [4]}]}
    out = _outputs(live.http.post("/v2/models/grinfer_recommend/infer", json=body).json())
    expected = live.http.post("/v1/recommend", json={"user": user, "k": 4}).json()["items"]
    assert out["items"].tolist() == [i["item"] for i in expected]
    np.testing.assert_allclose(out["score"], [i["score"] for i in expected], rtol=0, atol=1e-5)


def _hits(live) -> float:
    """grinfer_rank_context_cache_total{status="hit"} on /metrics."""
    for line in live.http.get("/metrics").text.splitlines():
        if line.startswith('grinfer_rank_context_cache_total{status="hit"}'):
            return float(line.split()[-1])
    return 0.0


def test_inference_goes_through_the_service_cache_and_metrics(live):
    user, items = str(live.ds.users[3].user_id), items_of(live, 1, 2)
    live.http.post("/v2/models/grinfer_rank/infer", json=_rank_body(user, items))  # the user's context is cached
    hits = _hits(live)
    again = live.http.post("/v2/models/grinfer_rank/infer", json=_rank_body(user, items))
    assert again.json()["parameters"]["cache"] == "hit" and again.headers["x-grinfer-cache"] == "hit"
    assert _hits(live) == hits + 1  # counted by the service's metrics, as /v1/rank's answers are
    assert 'endpoint="/v2/models/{name}/infer"' in live.http.get("/metrics").text


@pytest.mark.parametrize("path, body, status, field", [
    ("/v2/models/nope/infer", None, 404, "model_name"),
    ("/v2/models/grinfer_rank/versions/2/infer", None, 404, "model_version"),
    ("/v2/models/grinfer_rank/infer", {"inputs": []}, 400, "inputs"),
    ("/v2/models/grinfer_rank/infer", {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1],
                                                   "data": ["u"]}]}, 400, "inputs.candidates"),
    ("/v2/models/grinfer_rank/infer", "unknown-item", 400, "inputs.candidates.1"),
    ("/v2/models/grinfer_rank/infer", "bad-shape", 400, "inputs.candidates"),
    ("/v2/models/grinfer_rank/infer", "extra-input", 400, "inputs.colour"),
    ("/v2/models/grinfer_rank/infer", "bad-output", 400, "outputs.logits"),
    ("/v2/models/grinfer_rank/infer", "bad-deadline", 400, "parameters.deadline_ms"),
    ("/v2/models/grinfer_recommend/infer", "k-above-retrieve", 400, "inputs.k"),
])
def test_bad_requests_get_the_protocols_error(live, path, body, status, field):
    items = items_of(live, 1, 2)
    body = {"unknown-item": _rank_body("u1", [items[0], 99_999]),
            "bad-shape": {"inputs": [*_rank_body("u1", items)["inputs"][:1],
                                     {"name": "candidates", "datatype": "INT64", "shape": [3], "data": items}]},
            "extra-input": {"inputs": [*_rank_body("u1", items)["inputs"],
                                       {"name": "colour", "datatype": "INT64", "shape": [1], "data": [1]}]},
            "bad-output": _rank_body("u1", items, outputs=[{"name": "logits"}]),
            "bad-deadline": _rank_body("u1", items, parameters={"deadline_ms": 0}),
            "k-above-retrieve": {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["u"]},
                                            {"name": "k", "datatype": "INT64", "shape": [1], "data": [9]},
                                            {"name": "retrieve", "datatype": "INT64", "shape": [1], "data": [3]}]},
            }.get(body, body) if isinstance(body, str) else (body or _rank_body("u1", items))
    r = live.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["field"] == field and error["error"].startswith(f"{field}: "), error


def test_unknown_model_metadata_and_bad_binary_header(live):
    assert live.http.get("/v2/models/nope").status_code == 404
    assert live.http.get("/v2/models/nope/ready").status_code == 404
    r = live.http.post("/v2/models/grinfer_rank/infer", content=b"{}",
                       headers={"Inference-Header-Content-Length": "50"})
    assert r.status_code == 400 and r.json()["field"] == "inference-header-content-length"
    r = live.http.post("/v2/models/grinfer_rank/infer", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()


def test_a_user_header_naming_another_user_is_refused(live):
    body = _rank_body(live.user(), items_of(live, 1, 2))
    r = live.http.post("/v2/models/grinfer_rank/infer", json=body, headers={"X-User-Id": "someone-else"})
    assert r.status_code == 400 and r.json()["field"] == "inputs.user_id", r.text
    ok = live.http.post("/v2/models/grinfer_rank/infer", json=body, headers={"X-User-Id": live.user()})
    assert ok.status_code == 200 and ok.headers["x-grinfer-cache"] in ("hit", "partial", "miss")
