"""How the closed-loop load (`grinfer bench --server URL --protocol P`) reaches the server, one request at a time.

    rest         POST /v1/rank or /v1/recommend (JSON)                    on --server
    grpc         grinfer.v1.Recommender Rank / Recommend                   on --grpc-target HOST:PORT
    kserve-http  KServe v2 POST /v2/models/grinfer_<endpoint>/infer (JSON tensors)   on --server
    kserve-grpc  KServe v2 inference.GRPCInferenceService/ModelInfer (raw tensors)   on --grpc-target
    triton       KServe v2 HTTP to any v2 server (e.g. tritonserver with `grinfer export triton-repo`'s
                 repository) at --triton-url, model --triton-model, its request tensors
                 (USER_ID, PROFILE, EVENT_*, CANDIDATE_ITEMS, NUM_STATIC, HISTORY_VERSION): rank only,
                 the user's context read beforehand from --server's GET /v1/users/{id}?recent=N

A sender turns one of the workload's bodies ({"user", "candidates"} or {"user", "k"}) into its protocol's
request (naming the user in X-User-Id / x-user-id, the key user-affine balancers hash) and returns the
outcome as the load counts it: "200" for an answer, "429" for back-pressure (RESOURCE_EXHAUSTED over
gRPC), else the HTTP status, the gRPC code name or the transport error's name; with, for an answer, the
replica that gave it and its context's cache status (X-Grinfer-Replica / X-Grinfer-Cache; "?" unknown).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx
import numpy as np

PROTOCOLS = ("rest", "grpc", "kserve-http", "kserve-grpc", "triton")
GRPC_PROTOCOLS = ("grpc", "kserve-grpc")
Answered = tuple[str, str] | None  # (replica, cache status) of an answer
Send = Callable[[dict], Awaitable[tuple[str, Answered]]]


def grpc_target(target: str | None, protocol: str, check: Callable[[str], str]) -> str:
    """The gRPC HOST:PORT a gRPC protocol needs, checked to be loopback by `check` (load.loopback_url)."""
    if not target:
        raise ValueError(f"--protocol {protocol} needs --grpc-target HOST:PORT (the server's --grpc-port)")
    parts = urlsplit(check(f"http://{target.strip()}"))
    if parts.port is None or parts.path:
        raise ValueError(f"--grpc-target must be HOST:PORT such as 127.0.0.1:50051, got {target!r}")
    return parts.netloc


def _http_sender(client: httpx.AsyncClient, path: str, payload: Callable[[dict], dict]) -> Send:
    async def send(body: dict) -> tuple[str, Answered]:
        try:
            r = await client.post(path, json=payload(body), headers={"X-User-Id": body["user"]})
        except httpx.HTTPError as exc:
            return type(exc).__name__, None
        return str(r.status_code), (r.headers.get("x-grinfer-replica", "?"), r.headers.get("x-grinfer-cache", "?"))
    return send


def rest_sender(client: httpx.AsyncClient, endpoint: str) -> Send:
    return _http_sender(client, f"/v1/{endpoint}", lambda body: body)


def kserve_inputs(body: dict) -> list[dict]:
    """KServe v2 JSON input tensors of a workload body (grinfer_rank / grinfer_recommend, docs/protocols.md)."""
    inputs = [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [body["user"]]}]
    if "candidates" in body:
        items = [c["item"] for c in body["candidates"]]
        return [*inputs, {"name": "candidates", "datatype": "INT64", "shape": [len(items)], "data": items}]
    return [*inputs, {"name": "k", "datatype": "INT64", "shape": [1], "data": [body["k"]]}]


def kserve_http_sender(client: httpx.AsyncClient, endpoint: str, model: str | None = None,
                       tensors: Callable[[dict], list[dict]] = kserve_inputs) -> Send:
    return _http_sender(client, f"/v2/models/{model or f'grinfer_{endpoint}'}/infer",
                        lambda body: {"inputs": tensors(body)})


async def _grpc_outcome(call, cache_of: Callable) -> tuple[str, Answered]:
    """Await a grpc.aio call: ("200", (replica, cache)) or its failure's outcome."""
    import grpc

    try:
        response = await call
    except grpc.RpcError as exc:
        return ("429" if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else exc.code().name), None
    replica = dict(await call.trailing_metadata() or ()).get("x-grinfer-replica", "?")
    return "200", (replica, cache_of(response))


def grpc_sender(channel, endpoint: str, timeout_s: float) -> Send:
    """grinfer.v1.Recommender over a grpc.aio channel."""
    from grinfer.serving.proto import grinfer_pb2 as pb
    from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc

    stub = pb_grpc.RecommenderStub(channel)

    async def send(body: dict) -> tuple[str, Answered]:
        metadata = (("x-user-id", body["user"]),)
        if "candidates" in body:
            call = stub.Rank(pb.RankRequest(user=body["user"], candidates=[pb.Candidate(item=c["item"])
                                                                            for c in body["candidates"]]),
                             timeout=timeout_s, metadata=metadata)
        else:
            call = stub.Recommend(pb.RecommendRequest(user=body["user"], k=body["k"]), timeout=timeout_s,
                                  metadata=metadata)
        return await _grpc_outcome(call, lambda response: response.cache)
    return send


def kserve_grpc_sender(channel, endpoint: str, timeout_s: float) -> Send:
    """KServe v2 ModelInfer over a grpc.aio channel, tensors as raw_input_contents (as tritonclient sends them)."""
    from grinfer.serving.proto import inference_pb2 as pb
    from grinfer.serving.proto import inference_pb2_grpc as pb_grpc

    stub, model = pb_grpc.GRPCInferenceServiceStub(channel), f"grinfer_{endpoint}"
    Input = pb.ModelInferRequest.InferInputTensor

    async def send(body: dict) -> tuple[str, Answered]:
        user = body["user"].encode()
        values = [c["item"] for c in body["candidates"]] if "candidates" in body else [body["k"]]
        name = "candidates" if "candidates" in body else "k"
        request = pb.ModelInferRequest(
            model_name=model, inputs=[Input(name="user_id", datatype="BYTES", shape=[1]),
                                      Input(name=name, datatype="INT64", shape=[len(values)])],
            raw_input_contents=[len(user).to_bytes(4, "little") + user, np.asarray(values, "<i8").tobytes()])
        call = stub.ModelInfer(request, timeout=timeout_s, metadata=(("x-user-id", body["user"]),))
        return await _grpc_outcome(call, lambda response: response.parameters["cache"].string_param)
    return send


MAX_RECENT = 10_000  # GET /v1/users/{id}?recent=: more than a context holds (max_static + max_realtime)


async def triton_contexts(client: httpx.AsyncClient, users: list[str]) -> dict[str, dict]:
    """Each user's context as the exported repository's request tensors take it, from GET /v1/users/{id}."""
    contexts = {}
    for user in users:
        r = await client.get(f"/v1/users/{user}", params={"recent": MAX_RECENT})
        r.raise_for_status()
        u = r.json()
        events = u["recent"][::-1]  # oldest first
        dropped = u["static_events"] + u["realtime_events"] - len(events)  # the oldest, all static
        contexts[user] = {"profile": list(u["profile"].values()), "items": [e["item"] for e in events],
                          "ts": [e["ts"] for e in events], "actions": [e["action"] for e in events],
                          "num_static": max(0, u["static_events"] - dropped), "history_version": u["history_version"]}
    return contexts


def triton_inputs(contexts: dict[str, dict]) -> Callable[[dict], list[dict]]:
    """A rank body as the exported ensemble's request tensors (the user's whole context travels along)."""
    def tensors(body: dict) -> list[dict]:
        c = contexts[body["user"]]
        vec = lambda name, values: {"name": name, "datatype": "INT64", "shape": [len(values)], "data": values}
        return [{"name": "USER_ID", "datatype": "BYTES", "shape": [1], "data": [body["user"]]},
                vec("PROFILE", c["profile"]), vec("EVENT_ITEMS", c["items"]), vec("EVENT_TIMESTAMPS", c["ts"]),
                vec("EVENT_ACTIONS", c["actions"]), vec("NUM_STATIC", [c["num_static"]]),
                vec("HISTORY_VERSION", [c["history_version"]]),
                vec("CANDIDATE_ITEMS", [x["item"] for x in body["candidates"]])]
    return tensors
