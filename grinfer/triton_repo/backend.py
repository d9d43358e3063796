"""What every Python-backend model of the repository shares: parameters, request tensors, error responses.

Imported only inside tritonserver's Python backend (triton_python_backend_utils exists only there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports]  (inside Triton only)

from grinfer.triton_repo.requests import BadInput


class ModelArgs:
    """The `args` Triton hands to initialize(): the model's config parameters and its version folder."""

    def __init__(self, args: dict):
        self.config = json.loads(args["model_config"])
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.instance_kind = args.get("model_instance_kind", "CPU")
        self.device_id = int(args.get("model_instance_device_id", 0) or 0)

    def param(self, key: str, default: str | None = None) -> str:
        """A `parameters` entry; a missing one without a default is a load error naming it."""
        entry = self.config.get("parameters", {}).get(key)
        if entry is None:
            if default is None:
                raise ValueError(f"config.pbtxt: parameter {key!r} is missing")
            return default
        return entry["string_value"]

    def path(self, key: str) -> Path:
        """A path parameter, relative to the model's version folder."""
        return (self.version_dir / self.param(key)).resolve()


def read(request, names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The request's tensors by name (None for an optional one it does not carry)."""
    out = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else tensor.as_numpy()
    return out


def tensor(name: str, value: np.ndarray, batched: bool = False):
    """An output tensor; `batched` adds the batch dimension of 1 that a batching model's outputs carry."""
    value = np.asarray(value)
    return pb_utils.Tensor(name, value[None] if batched else value)


def failure(exc: Exception, code: str | None = None):
    """The error response of one request with Triton's error code `code` (a TritonError attribute name);
    by default bad input is INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT), anything else INTERNAL."""
    code = code or ("INVALID_ARG" if isinstance(exc, BadInput) else "INTERNAL")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), getattr(pb_utils.TritonError, code)))


def respond(requests, handle) -> list:
    """One response per request: `handle(request)` returns its output tensors, or raises for an error response."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except (BadInput, ValueError, KeyError) as exc:
            responses.append(failure(exc if isinstance(exc, BadInput) else BadInput(str(exc))))
    return responses
