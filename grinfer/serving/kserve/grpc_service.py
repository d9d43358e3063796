"""KServe v2 over gRPC: inference.GRPCInferenceService beside grinfer.v1.Recommender on the same port.

Tensors come as typed `contents` or as `raw_input_contents` (as tritonclient sends them); outputs go back
as `raw_output_contents`. Errors use grinfer's gRPC mapping (grpc_server._classify): a bad request is
INVALID_ARGUMENT, an unknown model NOT_FOUND, an unavailable engine or store UNAVAILABLE, overload
RESOURCE_EXHAUSTED; details read "field: message".
"""

from __future__ import annotations

import grpc

from grinfer.serving.grpc_server import (
    REPLICA_METADATA,
    USER_METADATA,
    GuardedServicer,
    _EventLoop,
    _text_metadata,
    lenient_handler,
)
from grinfer.serving.kserve.core import InferRequest, InferResponse, KServe
from grinfer.serving.kserve.tensors import element_count, from_list, from_raw, to_raw
from grinfer.serving.metrics import Metrics
from grinfer.serving.proto import inference_pb2 as pb
from grinfer.serving.proto import inference_pb2_grpc as pb_grpc
from grinfer.serving.service import FieldError, RecommenderService

KSERVE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
            "BYTES": "bytes_contents"}  # FP16 has no typed field: raw only


def parameters_of(params) -> dict:
    """An InferParameter map as plain Python values."""
    out = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def _parameter(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    """The decoded request; FieldError (INVALID_ARGUMENT) naming the tensor that is wrong."""
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise FieldError("raw_input_contents", f"{len(raw)} entries for {len(msg.inputs)} inputs", status=400)
    inputs = []
    for i, tensor in enumerate(msg.inputs):
        shape = list(tensor.shape)
        if raw:
            inputs.append(from_raw(tensor.name, tensor.datatype, shape, raw[i]))
            continue
        element_count(tensor.name, tensor.datatype, shape)
        if tensor.datatype not in CONTENTS:
            raise FieldError(f"inputs.{tensor.name}", f"{tensor.datatype} data must come as raw_input_contents",
                             status=400)
        inputs.append(from_list(tensor.name, tensor.datatype, shape, list(getattr(tensor.contents,
                                                                                  CONTENTS[tensor.datatype]))))
    outputs = [o.name for o in msg.outputs] or None
    return InferRequest(inputs, outputs, parameters_of(msg.parameters), msg.id)


def infer_response(out: InferResponse) -> pb.ModelInferResponse:
    outputs = [pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
               for t in out.outputs]
    return pb.ModelInferResponse(model_name=out.model_name, model_version=out.model_version, id=out.id,
                                 parameters={k: _parameter(v) for k, v in out.parameters.items()},
                                 outputs=outputs, raw_output_contents=[to_raw(t) for t in out.outputs])


def _metadata(meta: dict) -> pb.ModelMetadataResponse:
    tensors = [[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[kind]] for kind in ("inputs", "outputs")]
    return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                    inputs=tensors[0], outputs=tensors[1])


class KServeServicer(GuardedServicer, pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the KServe core; ModelInfer runs on the server's event loop."""

    def __init__(self, service: RecommenderService, metrics: Metrics, loop: _EventLoop):
        super().__init__(metrics)
        self.api, self.loop = KServe(service, metrics), loop

    def ServerLive(self, request, context):
        return self._call("ServerLive", context, lambda: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request, context):
        return self._call("ServerReady", context, lambda: pb.ServerReadyResponse(ready=self.api.unready() is None))

    def ModelReady(self, request, context):
        return self._call("ModelReady", context, lambda: pb.ModelReadyResponse(
            ready=self.api.model_ready(request.name, request.version)))

    def ServerMetadata(self, request, context):
        return self._call("ServerMetadata", context, lambda: pb.ServerMetadataResponse(**self.api.server_metadata()))

    def ModelMetadata(self, request, context):
        return self._call("ModelMetadata", context, lambda: _metadata(
            self.api.model(request.name, request.version).metadata()))

    def ModelInfer(self, request, context):
        def work():
            self.api.model(request.model_name, request.model_version)
            decoded = infer_request(request)
            context.set_trailing_metadata(((REPLICA_METADATA, self.api.service.settings.replica),))
            header = _text_metadata(context).get(USER_METADATA)
            return infer_response(self.loop.run(self.api.infer(request.model_name, request.model_version, decoded,
                                                               user_header=header), context))
        return self._call("ModelInfer", context, work)

    def RepositoryIndex(self, request, context):
        def work():
            if request.repository_name not in ("", "grinfer"):
                raise FieldError("repository_name", f"unknown repository {request.repository_name!r} (grinfer has "
                                 "one: \"grinfer\", or leave it empty)", status=404)
            models = [pb.RepositoryIndexResponse.ModelIndex(**m) for m in self.api.index(request.ready)]
            return pb.RepositoryIndexResponse(models=models)
        return self._call("RepositoryIndex", context, work)


def kserve_handler(service: RecommenderService, metrics: Metrics, loop: _EventLoop) -> grpc.GenericRpcHandler:
    """inference.GRPCInferenceService's methods, to add to grinfer's gRPC server."""
    return lenient_handler(KServeServicer(service, metrics, loop), pb, "GRPCInferenceService")
