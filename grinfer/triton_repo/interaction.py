"""interaction_python: the heads' per-task probabilities -> fused score (task weights) -> top-k, best first."""

from __future__ import annotations

import json

import numpy as np
import torch

from grinfer.recommend import fused_score
from grinfer.triton_repo.backend import ModelArgs, read, respond, tensor
from grinfer.triton_repo.requests import vector


def top_k(probs: np.ndarray, weights: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order of the k best candidates, their fused scores, their probabilities) as grinfer's /v1/rank sorts."""
    probs_t = torch.from_numpy(np.ascontiguousarray(probs, np.float32))
    fused = fused_score(probs_t, weights)
    order = torch.argsort(fused, descending=True)[:k]
    return order.numpy(), fused[order].numpy(), probs_t[order].numpy()


class TritonPythonModel:
    """Task weights come from the `task_weights` parameter (JSON, task -> weight; missing tasks weigh 1)."""

    def initialize(self, args: dict) -> None:
        config = ModelArgs(args)
        tasks = json.loads(config.param("tasks"))
        weights = json.loads(config.param("task_weights", "{}"))
        self.weights = torch.tensor([float(weights.get(t, 1.0)) for t in tasks])

    def execute(self, requests) -> list:
        return respond(requests, self._one)

    def _one(self, request) -> list:
        got = read(request, ("PROBABILITIES", "CANDIDATES", "TOP_K"))
        probs = np.asarray(got["PROBABILITIES"])
        probs = probs.reshape(probs.shape[-2:])
        candidates = vector("CANDIDATES", got["CANDIDATES"])
        order, scores, rows = top_k(probs, self.weights, int(vector("TOP_K", got["TOP_K"])[0]))
        return [tensor("ITEMS", candidates[order]), tensor("SCORES", scores), tensor("TASK_PROBABILITIES", rows)]
