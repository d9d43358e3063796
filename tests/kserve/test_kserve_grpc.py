"""KServe v2 over gRPC with grinfer's own stubs (inference_pb2): typed and raw tensor contents, the replica
and user metadata, and the status codes of bad requests (INVALID_ARGUMENT, NOT_FOUND)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from kserve_util import items_of, v1_rank

from grinfer.serving.kserve.grpc_service import KSERVE_SERVICE
from grinfer.serving.proto import inference_pb2 as pb
from grinfer.serving.proto import inference_pb2_grpc as pb_grpc

Input = pb.ModelInferRequest.InferInputTensor
TIMEOUT = 60


@pytest.fixture(scope="module")
def stub(live):
    return pb_grpc.GRPCInferenceServiceStub(live.channel)


def _typed(user: str, items: list[int], model: str = "grinfer_rank") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model, inputs=[
        Input(name="user_id", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[
            user.encode()])),
        Input(name="candidates", datatype="INT64", shape=[len(items)], contents=pb.InferTensorContents(
            int64_contents=items))])


def _code(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_typed_contents_equal_v1_rank_and_name_the_replica(live, stub):
    user, items = live.user(), items_of(live, 3, 6, 9)
    response, call = stub.ModelInfer.with_call(_typed(user, items), timeout=TIMEOUT,
                                               metadata=(("x-user-id", user),))
    outputs = {o.name: (o, raw) for o, raw in zip(response.outputs, response.raw_output_contents)}
    score = np.frombuffer(outputs["score"][1], "<f4")
    expected = v1_rank(live, user, items)
    np.testing.assert_allclose(score, [expected[i]["score"] for i in items], rtol=0, atol=1e-5)
    assert list(outputs["probabilities"][0].shape) == [3, 2]
    assert response.parameters["tasks"].string_param == "ctr,ctcvr"
    assert "x-grinfer-replica" in dict(call.trailing_metadata())


def test_health_metadata_and_index(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="grinfer_recommend", version="1")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="grinfer_recommend"))
    assert [t.name for t in meta.inputs] == ["user_id", "k", "retrieve"] and meta.versions == ["1"]
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "grinfer"
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert sorted(m.name for m in ready.models) == ["grinfer_rank", "grinfer_recommend"]
    assert KSERVE_SERVICE == "inference.GRPCInferenceService"


def test_bad_requests_get_the_protocols_codes(live, stub):
    user, items = live.user(), items_of(live, 1, 2)
    cases = {
        "unknown model": (lambda: stub.ModelInfer(_typed(user, items, "nope"), timeout=TIMEOUT),
                          grpc.StatusCode.NOT_FOUND, "model_name: unknown model 'nope'"),
        "unknown version": (lambda: stub.ModelReady(pb.ModelReadyRequest(name="grinfer_rank", version="7")),
                            grpc.StatusCode.NOT_FOUND, "model_version"),
        "unknown repository": (lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="x")),
                               grpc.StatusCode.NOT_FOUND, "repository_name"),
        "user metadata differs": (lambda: stub.ModelInfer(_typed(user, items), timeout=TIMEOUT,
                                                          metadata=(("x-user-id", "someone-else"),)),
                                  grpc.StatusCode.INVALID_ARGUMENT, "inputs.user_id: "),
        "raw count": (lambda: stub.ModelInfer(pb.ModelInferRequest(
            model_name="grinfer_rank", inputs=_typed(user, items).inputs, raw_input_contents=[b"x"])),
            grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents: 1 entries for 2 inputs"),
        "fp16 typed": (lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="grinfer_rank", inputs=[
            Input(name="candidates", datatype="FP16", shape=[1])])),
            grpc.StatusCode.INVALID_ARGUMENT, "FP16 data must come as raw_input_contents"),
        "wrong datatype": (lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="grinfer_rank", inputs=[
            *_typed(user, items).inputs[:1], Input(name="candidates", datatype="FP32", shape=[1],
                                                   contents=pb.InferTensorContents(fp32_contents=[1.0]))])),
            grpc.StatusCode.INVALID_ARGUMENT, "inputs.candidates: datatype FP32"),
    }
    for name, (call, code, text) in cases.items():
        error = _code(call)
        assert error.code() == code and text in error.details(), (name, error.code(), error.details())


def test_undecodable_bytes_are_invalid_argument(live):
    infer = live.channel.unary_unary(f"/{KSERVE_SERVICE}/ModelInfer", request_serializer=lambda b: b,
                                     response_deserializer=pb.ModelInferResponse.FromString)
    error = _code(lambda: infer(b"\xff\xff\xff", timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in \
        error.details()
