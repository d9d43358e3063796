"""Hostile KServe v2 requests on a live server: random tensors (bad names, datatypes, shapes, contents, raw
bytes, parameters, outputs) over gRPC and HTTP are answered with the protocol's errors, never an internal one."""

from __future__ import annotations

import random

import grpc

from grinfer.serving.kserve.grpc_service import KSERVE_SERVICE
from grinfer.serving.proto import inference_pb2 as pb

CASES = 200
NAMES = ["user_id", "candidates", "event_items", "event_ts", "event_actions", "k", "retrieve", "x", ""]
DATATYPES = ["BYTES", "INT64", "INT32", "UINT64", "FP32", "FP16", "BOOL", "UINT8", "NOPE", ""]
SHAPES = [[1], [2], [0], [3], [-1], [2, 2], [2**40], [], [1, 1, 1], [2**62, 4]]
MODELS = ["grinfer_rank", "grinfer_recommend", "nope"]
CONTENTS = {"bytes_contents": [b"1", b"\xff\xfe", b"", b"x" * 200], "int64_contents": [-1, 0, 1, 7, 2**63 - 1],
            "int_contents": [-1, 0, 300], "uint64_contents": [0, 2**64 - 1], "bool_contents": [True, False],
            "fp32_contents": [0.5, float("nan"), float("inf")]}
JSON_DATA = [[1], ["a"], [[1, 2], [3]], [], [1.5], [True], None, "x", [[[[1]]]], [0, 1, 2], [2**70]]


def _contents(rng: random.Random) -> pb.InferTensorContents:
    contents = pb.InferTensorContents()
    field = rng.choice([*CONTENTS, None])
    if field is not None:
        getattr(contents, field).extend(rng.choice(CONTENTS[field]) for _ in range(rng.choice([0, 1, 2, 3, 2001])))
    return contents


def _grpc_case(rng: random.Random) -> pb.ModelInferRequest:
    inputs = [pb.ModelInferRequest.InferInputTensor(name=rng.choice(NAMES), datatype=rng.choice(DATATYPES),
                                                    shape=rng.choice(SHAPES), contents=_contents(rng))
              for _ in range(rng.choice([0, 1, 2, 3]))]
    request = pb.ModelInferRequest(model_name=rng.choice(MODELS), model_version=rng.choice(["", "1", "2"]),
                                   inputs=inputs)
    if rng.random() < 0.3:
        request.raw_input_contents.extend(rng.randbytes(rng.choice([0, 4, 8, 13, 24]))
                                          for _ in range(len(inputs) if rng.random() < 0.8 else 1))
    if rng.random() < 0.3:
        request.parameters["deadline_ms"].CopyFrom(rng.choice([
            pb.InferParameter(int64_param=rng.choice([0, 1, 10**12])), pb.InferParameter(string_param="x")]))
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=rng.choice(["score", "nope"]))
                           for _ in range(rng.choice([0, 0, 1])))
    return request


def _http_case(rng: random.Random) -> dict:
    body: dict = {"inputs": [{"name": rng.choice(NAMES), "datatype": rng.choice(DATATYPES), "shape": rng.choice(SHAPES),
                              "data": rng.choice(JSON_DATA)} for _ in range(rng.choice([0, 1, 2, 3]))]}
    if rng.random() < 0.3:
        body["parameters"] = rng.choice([{"deadline_ms": 0}, {"deadline_ms": "x"}, {"binary_data_output": True}])
    if rng.random() < 0.3:
        body["outputs"] = [{"name": rng.choice(["score", "x"]), "parameters": rng.choice([{}, {"binary_data": True}])}]
    return body


def test_hostile_grpc_tensors_get_protocol_errors(live):
    infer = live.channel.unary_unary(f"/{KSERVE_SERVICE}/ModelInfer",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=pb.ModelInferResponse.FromString)
    rng, codes = random.Random(0), set()
    for _ in range(CASES):
        request = _grpc_case(rng)
        try:
            infer(request, timeout=30)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (error.details(), request)
            codes.add(error.code())
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= codes


def test_hostile_json_tensors_get_protocol_errors(live):
    rng, statuses = random.Random(1), set()
    for _ in range(CASES):
        body = _http_case(rng)
        r = live.http.post(f"/v2/models/{rng.choice(MODELS)}/infer", json=body)
        assert r.status_code == 200 or (r.status_code < 500 and "error" in r.json()), (r.status_code, r.text, body)
        statuses.add(r.status_code)
    assert {400, 404} <= statuses
