"""The models grinfer serves over KServe v2, and how their tensors become service calls.

    grinfer_rank       inputs  user_id BYTES [1], candidates INT64 [N],
                               optional event_items / event_ts / event_actions INT64 [E] (this request only)
                       outputs probabilities FP32 [N, T] and score FP32 [N] in candidate order,
                               ranked INT64 [N] (the candidates, best first)
    grinfer_recommend  inputs  user_id BYTES [1], optional k INT64 [1], retrieve INT64 [1]
                       outputs items INT64 [k] (best first), score FP32 [k], probabilities FP32 [k, T]

Both go through RecommenderService.rank / .recommend, as /v1/rank and /v1/recommend do (admission, the
feature cache, the engine's KV cache, metrics). Request parameter `deadline_ms` is the schema's. Every
answer carries parameters `cache`, `history_version`, `cold_start` and `tasks` (the columns of T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import numpy as np
from pydantic import BaseModel, ValidationError

from grinfer.schema import RankIn, RankOut, RecommendIn, field_path
from grinfer.serving.kserve.tensors import INTEGER, Tensor
from grinfer.serving.phases import Phases
from grinfer.serving.service import MAX_CATALOGUE_RANK, FieldError, RecommenderService

VERSION = "1"  # one version per model until a model registry serves several


@dataclass(frozen=True)
class Spec:
    """A tensor a model takes or gives: its name, datatypes (the first is the advertised one), shape."""

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int, ...]
    optional: bool = False

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


USER = Spec("user_id", ("BYTES", *INTEGER), (1,))


class Model:
    """A KServe v2 model over the service: its tensors, readiness and inference."""

    name: str
    inputs: tuple[Spec, ...]
    outputs: tuple[Spec, ...]
    schema: type[BaseModel]
    fields: ClassVar[dict[str, str]]  # schema field -> the tensor (or parameter) it comes from

    def ready(self, service: RecommenderService) -> bool:
        return True

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [VERSION], "platform": "grinfer",
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs]}

    def check(self, inputs: list[Tensor]) -> dict[str, Tensor]:
        """The inputs by name, each a known one of an accepted datatype, none required missing."""
        specs = {s.name: s for s in self.inputs}
        named: dict[str, Tensor] = {}
        for tensor in inputs:
            spec = specs.get(tensor.name)
            if spec is None:
                raise FieldError(f"inputs.{tensor.name}", f"not an input of {self.name} (inputs: "
                                 f"{', '.join(specs)})", status=400)
            if tensor.datatype not in spec.datatypes:
                raise FieldError(f"inputs.{tensor.name}", f"datatype {tensor.datatype}, expected "
                                 f"{' or '.join(spec.datatypes)}", status=400)
            if tensor.name in named:
                raise FieldError(f"inputs.{tensor.name}", "given twice", status=400)
            named[tensor.name] = tensor
        for spec in self.inputs:
            if not spec.optional and spec.name not in named:
                raise FieldError(f"inputs.{spec.name}", f"missing: {self.name} needs it", status=400)
        return named

    def request(self, inputs: dict[str, Tensor], parameters: dict) -> RankIn | RecommendIn:
        """The schema request the tensors describe (validated by the schema's rules)."""
        body = self.body(inputs)
        if "deadline_ms" in parameters:
            body["deadline_ms"] = parameters["deadline_ms"]
        try:
            return cast(RankIn | RecommendIn, self.schema.model_validate(body))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise FieldError(self.tensor_field(field_path(first["loc"])), first["msg"], status=400) from None

    def tensor_field(self, path: str) -> str:
        """A schema field path ("candidates.3.item") as the tensor element it came from ("inputs.candidates.3")."""
        head, _, rest = path.partition(".")
        index, _, sub = rest.partition(".")
        source = self.fields.get(f"{head}.{sub}" if sub else head, head)
        return ".".join(p for p in (source, index) if p)

    def body(self, inputs: dict[str, Tensor]) -> dict:
        raise NotImplementedError

    def answer(self, out: RankOut, inputs: dict[str, Tensor], tasks: list[str]) -> list[Tensor]:
        raise NotImplementedError

    async def call(self, service: RecommenderService, request: RankIn | RecommendIn,
                   phases: Phases | None) -> RankOut:
        raise NotImplementedError


def user_of(tensor: Tensor) -> str:
    if tensor.data.size != 1:
        raise FieldError("inputs.user_id", f"one user id expected, got {tensor.data.size}", status=400)
    value = tensor.data.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise FieldError("inputs.user_id", "not UTF-8 text", status=400) from None
    return str(int(value))


def ints(inputs: dict[str, Tensor], name: str) -> list[int]:
    return [int(v) for v in inputs[name].data.reshape(-1)] if name in inputs else []


def scalar(inputs: dict[str, Tensor], name: str) -> dict:
    """{name: value} of a one-element tensor that was given (nothing when it was not)."""
    if name not in inputs:
        return {}
    values = ints(inputs, name)
    if len(values) != 1:
        raise FieldError(f"inputs.{name}", f"one value expected, got {len(values)}", status=400)
    return {name: values[0]}


def _fp32(name: str, values) -> Tensor:
    return Tensor(name, "FP32", np.asarray(values, np.float32))


class RankModel(Model):
    name = "grinfer_rank"
    inputs = (USER, Spec("candidates", INTEGER, (-1,)), Spec("event_items", INTEGER, (-1,), True),
              Spec("event_ts", INTEGER, (-1,), True), Spec("event_actions", INTEGER, (-1,), True))
    outputs = (Spec("probabilities", ("FP32",), (-1, -1)), Spec("score", ("FP32",), (-1,)),
               Spec("ranked", ("INT64",), (-1,)))
    schema = RankIn
    fields: ClassVar = {"user": "inputs.user_id", "candidates": "inputs.candidates", "events": "inputs.event_items",
                        "candidates.item": "inputs.candidates", "events.item": "inputs.event_items",
                        "events.ts": "inputs.event_ts", "events.action": "inputs.event_actions",
                        "deadline_ms": "parameters.deadline_ms"}

    def body(self, inputs: dict[str, Tensor]) -> dict:
        items = ints(inputs, "event_items")
        events = [{"item": item} for item in items]
        for name, key in (("event_ts", "ts"), ("event_actions", "action")):
            if name in inputs:
                values = ints(inputs, name)
                if len(values) != len(items):
                    raise FieldError(f"inputs.{name}", f"{len(values)} values for {len(items)} event_items",
                                     status=400)
                for event, value in zip(events, values):
                    event[key] = value
        return {"user": user_of(inputs["user_id"]), "candidates": [{"item": c} for c in ints(inputs, "candidates")],
                "events": events}

    async def call(self, service: RecommenderService, request: RankIn | RecommendIn,
                   phases: Phases | None) -> RankOut:
        return await service.rank(cast(RankIn, request), phases)

    def answer(self, out: RankOut, inputs: dict[str, Tensor], tasks: list[str]) -> list[Tensor]:
        by_item = {i.item: i for i in out.items}
        given = [by_item[c] for c in ints(inputs, "candidates")]
        probabilities = np.asarray([[i.probabilities[t] for t in tasks] for i in given], np.float32)
        return [Tensor("probabilities", "FP32", probabilities.reshape(len(given), len(tasks))),
                _fp32("score", [i.score for i in given]),
                Tensor("ranked", "INT64", np.asarray([i.item for i in out.items], np.int64))]


class RecommendModel(Model):
    name = "grinfer_recommend"
    inputs = (USER, Spec("k", INTEGER, (1,), True), Spec("retrieve", INTEGER, (1,), True))
    outputs = (Spec("items", ("INT64",), (-1,)), Spec("score", ("FP32",), (-1,)),
               Spec("probabilities", ("FP32",), (-1, -1)))
    schema = RecommendIn
    fields: ClassVar = {"user": "inputs.user_id", "k": "inputs.k", "retrieve": "inputs.retrieve",
                        "deadline_ms": "parameters.deadline_ms"}

    def ready(self, service: RecommenderService) -> bool:
        """Ready with a retrieval model, or without one while the catalogue is small enough to rank whole."""
        return service.engine.has_retriever or service.catalog.num_items <= MAX_CATALOGUE_RANK

    def body(self, inputs: dict[str, Tensor]) -> dict:
        return {"user": user_of(inputs["user_id"]), **scalar(inputs, "k"), **scalar(inputs, "retrieve")}

    async def call(self, service: RecommenderService, request: RankIn | RecommendIn,
                   phases: Phases | None) -> RankOut:
        return await service.recommend(cast(RecommendIn, request), phases)

    def answer(self, out: RankOut, inputs: dict[str, Tensor], tasks: list[str]) -> list[Tensor]:
        probabilities = np.asarray([[i.probabilities[t] for t in tasks] for i in out.items], np.float32)
        return [Tensor("items", "INT64", np.asarray([i.item for i in out.items], np.int64)),
                _fp32("score", [i.score for i in out.items]),
                Tensor("probabilities", "FP32", probabilities.reshape(len(out.items), len(tasks)))]


MODELS: dict[str, Model] = {m.name: m for m in (RankModel(), RecommendModel())}
