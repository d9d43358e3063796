"""Overload against a live server (REST, gRPC and KServe v2 over one real service): past saturation only
200 and 429 are answered, a 429 is faster than a served request, and every ranking path (REST, KServe
REST, gRPC, KServe gRPC) is refused by the same admission before any work. Qualitative only: the
figures (goodput against the peak, 429 p99) come from `python -m grinfer.bench.overload`."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import grpc
import httpx
import pytest
from live_stack import LiveStack

from grinfer.bench.load import prepare, run_level
from grinfer.serving.admission import Admission
from grinfer.serving.proto import grinfer_pb2 as pb
from grinfer.serving.proto import inference_pb2 as kpb
from grinfer.serving.proto import inference_pb2_grpc as kpb_grpc


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("overload") / "store.db")
    yield stack
    stack.close()


def _lookups(live: LiveStack) -> float:
    stats = live.engine.stats()["kv_cache"]
    return sum(stats[k] for k in ("hits", "partial_hits", "misses"))


def test_past_saturation_only_200_and_429_and_a_429_is_faster_than_an_answer(live):
    # a 20 ms target: a tiny model on a shared CPU saturates at a few requests in flight
    live.service.admission = Admission(target_s=0.02, floor=1, window_s=0.25, initial=1)

    async def level():
        async with httpx.AsyncClient(base_url=live.url, timeout=60, trust_env=False) as client:
            workload = await prepare(client, "rank", candidates=20, k=10, seed=0)
            return await run_level(client, workload, clients=24, requests=600, duration_s=4.0)

    result = asyncio.run(level())
    assert result.errors == {}  # nothing but 200 and 429
    assert result.ok > 0 and result.rejected_429 > 0
    assert result.rejected_p50_ms is not None and result.p50_ms is not None
    assert result.rejected_p50_ms < result.p50_ms


def _kserve_request(user: str, item: int) -> kpb.ModelInferRequest:
    Input = kpb.ModelInferRequest.InferInputTensor
    return kpb.ModelInferRequest(model_name="grinfer_rank", inputs=[
        Input(name="user_id", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(
            bytes_contents=[user.encode()])),
        Input(name="candidates", datatype="INT64", shape=[1], contents=kpb.InferTensorContents(
            int64_contents=[item]))])


def test_a_saturated_server_refuses_every_ranking_path_before_any_work(live):
    gate = live.service.admission = Admission(target_s=0.5, window_s=3600, initial=1)  # bound 1 for an hour
    user, item = live.user(), live.raw_item(3)
    kserve = kpb_grpc.GRPCInferenceServiceStub(live.channel)
    with ExitStack() as held:
        held.enter_context(gate.admit())  # the one place: the server is saturated
        before = _lookups(live)
        # at the door: the body is not even parsed (invalid JSON is answered 429, not 422)
        assert live.http.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"}
                              ).status_code == 429
        refused = [live.http.post("/v1/recommend", json={"user": user, "k": 3}),
                   live.http.post("/v2/models/grinfer_rank/infer", json={"inputs": []})]
        for response in refused:
            assert response.status_code == 429 and response.headers["retry-after"]
            assert "saturated" in response.json()["error"]
        for call in (lambda: live.stub.Rank(pb.RankRequest(user=user, candidates=[pb.Candidate(item=item)]),
                                            timeout=30),
                     lambda: live.stub.Recommend(pb.RecommendRequest(user=user, k=3), timeout=30),
                     lambda: kserve.ModelInfer(_kserve_request(user, item), timeout=30)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert live.http.get("/v1/users", params={"limit": 2}).status_code == 200  # reads are not admitted
        assert _lookups(live) == before  # nothing reached the engine
        assert gate.refused == 6
        page = live.http.get("/metrics").text
        assert "grinfer_admission_in_flight 1.0" in page and "grinfer_admission_bound 1.0" in page
    assert live.http.post("/v1/recommend", json={"user": user, "k": 3}).status_code == 200
