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


def kserve_router(state) -> APIRouter:
    """The /v2 routes over the app's AppState (its service, metrics, draining flag)."""
    api = KServe(state.service, state.metrics)
    router = APIRouter(prefix="/v2", tags=["KServe v2"])

    @router.get("")
    async def server_metadata() -> dict:
        """Server name, version and protocol extensions."""
        return api.server_metadata()

    @router.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready")
    async def ready():
        problem = "server is shutting down" if state.draining else await asyncio.to_thread(api.unready)
        return {"ready": True} if problem is None else _false(problem)

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "") -> dict:
        """A model's versions, platform and tensors (404 for an unknown model)."""
        return api.model(name, version).metadata()

    @router.get("/models/{name}/ready")
    @router.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = ""):
        if api.model_ready(name, version):
            return {"name": name, "ready": True}
        return _false(f"model {name!r} is not ready")

    @router.post("/models/{name}/infer")
    @router.post("/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "") -> Response:
        """Run the model on JSON (or binary) tensors, through the same service path as /v1/rank."""
        phases = phases_of(request.scope)
        api.model(name, version)  # an unknown model is a 404 before the body is looked at
        decoded, binary = decode(await request.body(), request.headers.get(HEADER_LENGTH))
        phases.mark("parse")
        answer = await api.infer(name, version, decoded, phases, state.draining, request.headers.get("x-user-id"))
        response = encode(answer, binary)
        phases.mark("encode")
        return response

    @router.post("/repository/index")
    async def repository_index(request: Request) -> list[dict]:
        """Triton's repository extension: the models and their state (body {"ready": true}: ready ones only)."""
        body = await request.body()
        try:
            ready_only = bool(json.loads(body).get("ready", False)) if body.strip() else False
        except (ValueError, AttributeError):
            raise FieldError("body", "expected a JSON object such as {\"ready\": true}", status=400) from None
        return api.index(ready_only)

    return router
