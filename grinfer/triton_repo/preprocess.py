"""preprocess_py: raw request tensors -> the checked, windowed context tensors the model takes."""

from __future__ import annotations

import json
import time

import numpy as np

from grinfer.triton_repo.backend import ModelArgs, read, respond, tensor
from grinfer.triton_repo.requests import preprocess

INPUTS = ("USER_ID", "PROFILE", "EVENT_ITEMS", "EVENT_TIMESTAMPS", "EVENT_ACTIONS", "CANDIDATE_ITEMS",
          "NUM_STATIC", "HISTORY_VERSION", "REQUEST_TS", "TOP_K")


class TritonPythonModel:
    """Checks a request as /v1/rank does and windows its events (last max_static S, last max_realtime R)."""

    def initialize(self, args: dict) -> None:
        config = ModelArgs(args)
        self.cardinalities = json.loads(config.param("profile_cardinalities"))
        self.max_static = int(config.param("max_static"))
        self.max_realtime = int(config.param("max_realtime"))

    def execute(self, requests) -> list:
        return respond(requests, self._one)

    def _one(self, request) -> list:
        ctx = preprocess(read(request, INPUTS), self.cardinalities, self.max_static, self.max_realtime,
                         int(time.time()))
        one = lambda value: np.array([[value]], np.int64)
        return [tensor("USER", np.array([[ctx.user.encode()]], np.object_)),
                tensor("HISTORY_VERSION", one(ctx.history_version)),
                tensor("PROFILE_IDS", ctx.profile, batched=True),
                tensor("CONTEXT_ITEMS", ctx.items, batched=True),
                tensor("CONTEXT_TIMESTAMPS", ctx.timestamps, batched=True),
                tensor("CONTEXT_ACTIONS", ctx.actions, batched=True),
                tensor("NUM_STATIC", one(ctx.num_static)),
                tensor("CANDIDATES", ctx.candidates, batched=True),
                tensor("REQUEST_TS", one(ctx.request_ts)),
                tensor("TOP_K", one(ctx.top_k))]
