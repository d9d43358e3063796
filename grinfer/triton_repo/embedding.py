"""embedding_service: catalogue ids -> the model's embedding-table rows (unknown ids are errors)."""

from __future__ import annotations

from grinfer.triton_repo.backend import ModelArgs, read, respond, tensor
from grinfer.triton_repo.catalog_file import load_catalog
from grinfer.triton_repo.requests import IdLookup, vector


class TritonPythonModel:
    """The catalogue's id map, shared by the models that take item rows (gr_model, the ONNX graph)."""

    def initialize(self, args: dict) -> None:
        self.lookup = IdLookup(load_catalog(ModelArgs(args).path("catalog")))

    def execute(self, requests) -> list:
        return respond(requests, self._one)

    def _one(self, request) -> list:
        got = read(request, ("CONTEXT_ITEMS", "CANDIDATES"))
        # the names in errors are the ensemble's: EVENT_ITEMS / CANDIDATE_ITEMS as the client sent them
        context = self.lookup.rows("EVENT_ITEMS", vector("CONTEXT_ITEMS", got["CONTEXT_ITEMS"]))
        candidates = self.lookup.rows("CANDIDATE_ITEMS", vector("CANDIDATES", got["CANDIDATES"]), unique=True)
        return [tensor("CONTEXT_IDS", context, batched=True), tensor("CANDIDATE_IDS", candidates, batched=True)]
