"""Uncached recommendation pipeline: retrieval top-N over the catalogue, then MTGR ranking, top-k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grinfer.data.types import ItemCatalog
from grinfer.features.featurizer import FeatureRequest, Featurizer, UserContext, retrieval_batch
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR


@dataclass
class Recommendation:
    """One recommended item with its per-task probabilities and fused score."""

    item: int
    score: float
    probabilities: dict[str, float]


def fused_score(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of per-task probabilities [N, T] -> [N]."""
    return probs @ (weights / weights.sum())


class Recommender:
    """Ranks candidates with MTGR; with a retrieval model, candidates come from its top-N."""

    def __init__(self, ranker: MTGR, catalog: ItemCatalog, retriever: HSTURetrieval | None = None,
                 task_weights: dict[str, float] | None = None, device: str = "cpu"):
        self.ranker, self.retriever, self.catalog, self.device = ranker.eval(), retriever, catalog, device
        self.featurizer = Featurizer(catalog, ranker.cfg.num_time_buckets)
        weights = task_weights or {}
        self.weights = torch.tensor([weights.get(t, 1.0) for t in ranker.cfg.tasks], device=device)

    @torch.no_grad()
    def rank(self, context: UserContext, candidates: np.ndarray, request_ts: int) -> list[Recommendation]:
        """Score `candidates` for the user, best first."""
        batch = self.featurizer.rank_batch([FeatureRequest(context, np.asarray(candidates), request_ts)])
        probs = torch.sigmoid(self.ranker(batch.to(self.device)))
        fused = fused_score(probs, self.weights)
        order = torch.argsort(fused, descending=True).cpu().numpy()
        tasks = self.ranker.cfg.tasks
        return [Recommendation(int(candidates[i]), float(fused[i]),
                               {t: float(probs[i, j]) for j, t in enumerate(tasks)}) for i in order]

    def retrieve(self, context: UserContext, n: int) -> np.ndarray:
        """Top-n unseen items (see `retrieve_candidates`)."""
        return retrieve_candidates(self.retriever, context, n, self.catalog.num_items, self.device)

    def recommend(self, context: UserContext, k: int, request_ts: int, num_retrieve: int = 200) -> list[Recommendation]:
        """Retrieve, rank, and return the top k."""
        return self.rank(context, self.retrieve(context, num_retrieve), request_ts)[:k]


@torch.no_grad()
def retrieve_candidates(retriever: HSTURetrieval | None, context: UserContext, n: int, num_items: int,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """Top-n unseen items by the retrieval model; without one (or without history), every unseen item."""
    seen = np.unique(context.items)
    if retriever is None or len(context.items) == 0:
        return np.setdiff1d(np.arange(1, num_items + 1), seen)
    window = retriever.cfg.max_seq_len
    batch = retrieval_batch([(context.items[-window:], context.timestamps[-window:])], False)
    scores = retriever.user_embedding(batch.to(device))[0] @ retriever.item_table().T
    scores[0] = -torch.inf
    scores[torch.as_tensor(seen, device=scores.device)] = -torch.inf
    return torch.topk(scores, min(n, num_items - len(seen))).indices.cpu().numpy()
