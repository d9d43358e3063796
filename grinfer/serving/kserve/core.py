"""The transport-free KServe v2 operations behind the REST routes (rest.py) and the gRPC servicer (grpc.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grinfer
from grinfer.serving.kserve.models import MODELS, VERSION, Model
from grinfer.serving.kserve.tensors import Tensor
from grinfer.serving.metrics import Metrics
from grinfer.serving.phases import Phases
from grinfer.serving.service import FieldError, RecommenderService, Unavailable, check_user_header

EXTENSIONS = ["binary_tensor_data", "parameters", "model_repository"]


@dataclass
class InferRequest:
    """A decoded inference request: its input tensors, the outputs asked for (None: all) and parameters."""

    inputs: list[Tensor]
    outputs: list[str] | None = None
    parameters: dict = field(default_factory=dict)
    id: str = ""


@dataclass
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    parameters: dict
    id: str = ""
    model_version: str = VERSION


class KServe:
    """Server and model metadata, readiness, the repository index and inference over one RecommenderService."""

    def __init__(self, service: RecommenderService, metrics: Metrics):
        self.service, self.metrics = service, metrics

    def server_metadata(self) -> dict:
        return {"name": "grinfer", "version": grinfer.__version__, "extensions": EXTENSIONS}

    def unready(self) -> str | None:
        """Why the server cannot answer inference requests now (None: it can); blocking (reads the store)."""
        return self.service.unready()

    def model(self, name: str, version: str = "") -> Model:
        """The model called `name` (version "" or "1"); FieldError 404 for any other."""
        model = MODELS.get(name)
        if model is None:
            raise FieldError("model_name", f"unknown model {name!r} (models: {', '.join(MODELS)})", status=404)
        if version not in ("", VERSION):
            raise FieldError("model_version", f"model {name!r} has no version {version!r} (versions: {VERSION})",
                             status=404)
        return model

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.model(name, version).ready(self.service)

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every model, its version and state."""
        models = [{"name": m.name, "version": VERSION, "state": "READY" if m.ready(self.service) else "UNAVAILABLE",
                   "reason": "" if m.ready(self.service) else "no retrieval model and the catalogue is too large"}
                  for m in MODELS.values()]
        return [m for m in models if m["state"] == "READY"] if ready_only else models

    async def infer(self, name: str, version: str, request: InferRequest, phases: Phases | None = None,
                    draining: bool = False, user_header: str | None = None) -> InferResponse:
        """Run one request through the service (as /v1/rank or /v1/recommend); outputs as asked for.

        `user_header`: the X-User-Id header (gRPC: x-user-id metadata) a balancer routed by; it must name
        the request's user."""
        model = self.model(name, version)
        if draining:
            raise Unavailable("server is shutting down")
        inputs = model.check(request.inputs)
        wanted = self._wanted(model, request.outputs)
        call = model.request(inputs, request.parameters)
        try:
            check_user_header(user_header, call.user)
            out = await model.call(self.service, call, phases)
        except FieldError as exc:
            if exc.status != 422:
                raise
            raise FieldError(model.tensor_field(exc.field), str(exc), status=400) from None
        self.metrics.cache_status.labels(out.cache).inc()
        tasks = list(self.service.tasks)
        outputs = [t for t in model.answer(out, inputs, tasks) if t.name in wanted]
        parameters = {"cache": out.cache, "history_version": out.history_version, "cold_start": out.cold_start,
                      "tasks": ",".join(tasks)}
        return InferResponse(model.name, outputs, parameters, request.id)

    @staticmethod
    def _wanted(model: Model, names: list[str] | None) -> set[str]:
        known = [s.name for s in model.outputs]
        if names is None:
            return set(known)
        for name in names:
            if name not in known:
                raise FieldError(f"outputs.{name}", f"not an output of {model.name} (outputs: {', '.join(known)})",
                                 status=400)
        return set(names)
