"""KServe v2 over HTTP: the /v2 routes (JSON tensors and the binary tensor data extension).

Binary extension: a request whose header `Inference-Header-Content-Length: N` is set has N bytes of JSON
first, then the raw data of every input whose parameters give `binary_data_size`, in input order. Outputs
asked for with parameter `binary_data: true` (or all, with request parameter `binary_data_output: true`)
are answered the same way. Errors are {"error": "field: message"} with 400 (bad request) or 404 (unknown
model); the app's handlers (app.py) map the service's other errors (429, 503, 504) as for /v1.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import to_json

from grinfer.schema import ErrorOut, field_path
from grinfer.serving.kserve.core import InferRequest, InferResponse, KServe
from grinfer.serving.kserve.tensors import from_list, from_raw, to_list, to_raw
from grinfer.serving.phases import phases_of
from grinfer.serving.service import FieldError

HEADER_LENGTH = "inference-header-content-length"


class InputJSON(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class OutputJSON(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferJSON(BaseModel):
    id: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputJSON] = Field(min_length=1, max_length=64)
    outputs: list[OutputJSON] | None = None


def decode(body: bytes, header_length: str | None) -> tuple[InferRequest, set[str] | bool]:
    """The request, and which outputs to answer in binary (a set of names, or True for all)."""
    if header_length is None:
        head, raw = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise FieldError(HEADER_LENGTH, f"{header_length!r} is not a length within the body's {len(body)} "
                             "bytes", status=400)
        head, raw = body[:int(header_length)], body[int(header_length):]
    try:
        parsed = InferJSON.model_validate_json(head)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FieldError(field_path(first["loc"]) or "body", first["msg"], status=400) from None
    inputs, offset = [], 0
    for spec in parsed.inputs:
        size = spec.parameters.get("binary_data_size")
        if size is None:
            if spec.data is None:
                raise FieldError(f"inputs.{spec.name}", "no data and no binary_data_size", status=400)
            inputs.append(from_list(spec.name, spec.datatype, spec.shape, spec.data))
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(raw):
            raise FieldError(f"inputs.{spec.name}", f"binary_data_size {size!r} runs past the body's binary "
                             f"data ({len(raw)} bytes)", status=400)
        inputs.append(from_raw(spec.name, spec.datatype, spec.shape, raw[offset:offset + size]))
        offset += size
    everything = parsed.parameters.get("binary_data_output") is True
    outputs = None if parsed.outputs is None else [o.name for o in parsed.outputs]
    binary = {o.name for o in parsed.outputs or () if o.parameters.get("binary_data", everything)}
    request = InferRequest(inputs, outputs, {k: v for k, v in parsed.parameters.items()
                                             if k != "binary_data_output"}, parsed.id)
    return request, (everything if parsed.outputs is None else binary)


def encode(response: InferResponse, binary: set[str] | bool) -> Response:
    """The JSON answer, or JSON then the binary outputs (Inference-Header-Content-Length names the split)."""
    outputs, raws = [], []
    for tensor in response.outputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary is True or (binary and tensor.name in binary):
            raws.append(to_raw(tensor))
            entry["parameters"] = {"binary_data_size": len(raws[-1])}
        else:
            entry["data"] = to_list(tensor)
        outputs.append(entry)
    head = to_json({"model_name": response.model_name, "model_version": response.model_version,  # Rust, ~10x json
                    "id": response.id, "parameters": response.parameters, "outputs": outputs})
    cache = {"X-Grinfer-Cache": str(response.parameters.get("cache", ""))}  # as /v1/rank's, for balancer logs
    if not raws:
        return Response(head, media_type="application/json", headers=cache)
    return Response(head + b"".join(raws), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head)), **cache})


def _false(message: str) -> JSONResponse:
    """The protocol's "false" for a readiness probe: a 4xx with the reason."""
    return JSONResponse(ErrorOut(error=message).model_dump(), status_code=400)


ERRORS = {400: "Bad request: the field names the tensor, parameter or header (readiness probes: not ready)",
          404: "Unknown model or version", 413: "Body over the size limit, or the user's context too long",
          429: "Server saturated: retry after Retry-After seconds",
          503: "Shutting down, engine or store unavailable: retry after Retry-After seconds",
          504: "deadline_ms passed before the scores were ready"}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}
_TENSOR = {"name": {"type": "string", "minLength": 1, "maxLength": 256}, "parameters": {"type": "object"}}
INFER_SCHEMA = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": {"type": "object"},
    "inputs": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
        "type": "object", "required": ["name", "datatype", "shape"], "properties": {
            **_TENSOR, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"description": "the elements, flat or nested row-major (BYTES: strings)"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": _TENSOR}}}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": INFER_SCHEMA},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "binary tensor extension: Inference-Header-Content-Length bytes of "
                                                "JSON, then the inputs' raw data"}}}}
INFER_OK = {200: {"description": "The output tensors (binary extension: JSON, then raw data)",
                  "content": {"application/json": {}, "application/octet-stream": {}}}}


def _errors(*statuses: int) -> dict:
    """OpenAPI responses for the error statuses a route can answer, each an ErrorOut body."""
    return {status: {"model": ErrorOut, "description": ERRORS[status],
                     **({"headers": RETRY_AFTER} if status in (429, 503) else {})} for status in statuses}


def kserve_router(state) -> APIRouter:
    """The /v2 routes over the app's AppState (its service, metrics, draining flag)."""
    api = KServe(state.service, state.metrics)
    router = APIRouter(prefix="/v2", tags=["KServe v2"])
    _health_routes(router, api, state)
    _model_routes(router, api)
    _infer_routes(router, api, state)
    return router


def _health_routes(router: APIRouter, api: KServe, state) -> None:
    @router.get("")
    async def server_metadata() -> dict:
        """Server name, version and protocol extensions."""
        return api.server_metadata()

    @router.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready", responses=_errors(400))
    async def ready():
        problem = "server is shutting down" if state.draining else await asyncio.to_thread(api.unready)
        return {"ready": True} if problem is None else _false(problem)



def _model_routes(router: APIRouter, api: KServe) -> None:
    model_errors = _errors(400, 404)

    def ready_answer(name: str, version: str):
        return {"name": name, "ready": True} if api.model_ready(name, version) else \
            _false(f"model {name!r} is not ready")

    @router.get("/models/{name}", responses=_errors(404))
    async def model_metadata(name: str) -> dict:
        """A model's versions, platform and tensors (404 for an unknown model)."""
        return api.model(name).metadata()

    @router.get("/models/{name}/versions/{version}", responses=_errors(404))
    async def model_version_metadata(name: str, version: str) -> dict:
        return api.model(name, version).metadata()

    @router.get("/models/{name}/ready", responses=model_errors)
    async def model_ready(name: str):
        return ready_answer(name, "")

    @router.get("/models/{name}/versions/{version}/ready", responses=model_errors)
    async def model_version_ready(name: str, version: str):
        return ready_answer(name, version)

    @router.post("/repository/index", responses=_errors(400), openapi_extra={"requestBody": {
        "required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"ready": {"type": "boolean"}}}}}}})
    async def repository_index(request: Request) -> list[dict]:
        """Triton's repository extension: the models and their state (body {"ready": true}: ready ones only)."""
        body = await request.body()
        try:
            query = json.loads(body) if body.strip() else {}
            if not isinstance(query, dict) or not isinstance(query.get("ready", False), bool):
                raise ValueError
        except ValueError:
            raise FieldError("body", "expected a JSON object such as {\"ready\": true}", status=400) from None
        return api.index(query.get("ready", False))


def _infer_routes(router: APIRouter, api: KServe, state) -> None:
    infer_errors = {**INFER_OK, **_errors(400, 404, 413, 429, 503, 504)}

    async def run(name: str, version: str, request: Request) -> Response:
        phases = phases_of(request.scope)
        api.model(name, version)  # an unknown model is a 404 before the body is looked at
        decoded, binary = decode(await request.body(), request.headers.get(HEADER_LENGTH))
        phases.mark("parse")
        answer = await api.infer(name, version, decoded, phases, state.draining, request.headers.get("x-user-id"))
        response = encode(answer, binary)
        phases.mark("encode")
        return response

    @router.post("/models/{name}/infer", responses=infer_errors, openapi_extra=INFER_BODY)
    async def infer(name: str, request: Request) -> Response:
        """Run the model on JSON (or binary) tensors, through the same service path as /v1/rank."""
        return await run(name, "", request)

    @router.post("/models/{name}/versions/{version}/infer", responses=infer_errors, openapi_extra=INFER_BODY)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await run(name, version, request)
