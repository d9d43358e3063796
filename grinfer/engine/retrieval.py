"""Retrieval inside the engine: the causal HSTU's top-N unseen items, one batched forward per engine turn.

Every `/recommend` first needs its candidates; running that forward on the engine's thread (instead of a
worker thread beside it) keeps one owner for the device (no kernel launches racing a CUDA-graph capture)
and batches the retrievals of concurrent requests into one forward and one top-k. With a history cache
(retrieval_cache.py, EngineConfig.retrieval_cache_bytes) a returning user's cached history K/V are reused
and only their new events and the query are computed; without one, every window is computed whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grinfer.engine.retrieval_cache import History, HistoryCache
from grinfer.features.featurizer import UserContext, retrieval_batch
from grinfer.model.hstu import HSTURetrieval
from grinfer.recommend import retrieve_candidates


@dataclass(frozen=True)
class RetrievalQuery:
    """The top-n unseen items for a context; with a user, their history K/V are cached per version."""

    context: UserContext
    n: int
    user: str | None = None
    version: int = 0


class BatchRetriever:
    """Top-n unseen items for many users at once (`recommend.retrieve_candidates`, batched)."""

    def __init__(self, model: HSTURetrieval | None, num_items: int, device: torch.device, cache_bytes: int = 0,
                 block_size: int = 32):
        self.model = model.to(device).eval() if model is not None else None
        self.num_items, self.device = num_items, device
        self.history: HistoryCache | None = None
        if self.model is not None and cache_bytes:
            self.history = HistoryCache(self.model, cache_bytes, block_size, device)

    @torch.inference_mode()
    def top_n(self, queries: list[RetrievalQuery]) -> list[np.ndarray]:
        """For each query: the model's top-n items the user has not seen, best first; users without history
        (or without a model) get every unseen item, as `retrieve_candidates` gives them."""
        out: list[np.ndarray | None] = [None] * len(queries)
        batched = []
        for i, q in enumerate(queries):
            if self.model is None or len(q.context.items) == 0:
                out[i] = retrieve_candidates(None, q.context, q.n, self.num_items)
            else:
                batched.append(i)
        if batched:
            seen = [np.unique(queries[i].context.items) for i in batched]
            scores = self._user_embeddings([queries[i] for i in batched]) @ self._model().item_table().T
            rows = np.repeat(np.arange(len(batched)), [len(s) for s in seen])
            scores[:, 0] = -torch.inf
            scores[torch.as_tensor(rows, device=scores.device),
                   torch.as_tensor(np.concatenate(seen), device=scores.device)] = -torch.inf
            counts = [min(queries[i].n, self.num_items - len(s)) for i, s in zip(batched, seen)]
            top = torch.topk(scores, max(counts)).indices.cpu().numpy()
            for row, (i, count) in enumerate(zip(batched, counts)):
                out[i] = top[row, :count]
        return [o for o in out if o is not None]

    def forget(self, user: str, before_version: int) -> None:
        """Free the user's cached history K/V of versions before `before_version` (a history roll elsewhere)."""
        if self.history is not None:
            self.history.cache.drop_stale(user, before_version)

    def stats(self) -> dict:
        """The history cache's plain stats (empty without one)."""
        return self.history.cache.snapshot() if self.history is not None else {}

    def _model(self) -> HSTURetrieval:
        assert self.model is not None  # only queries with a model are batched
        return self.model

    def _user_embeddings(self, queries: list[RetrievalQuery]) -> torch.Tensor:
        """[B, d] the queries' user embeddings over their last max_seq_len events: through the history cache,
        or the whole windows through the model."""
        window = self._model().cfg.max_seq_len
        if self.history is not None:
            return self.history.user_embeddings([History(q.context.items[-window:], q.context.timestamps[-window:],
                                                         q.user, q.version) for q in queries])
        batch = retrieval_batch([(q.context.items[-window:], q.context.timestamps[-window:]) for q in queries],
                                False)
        return self._model().user_embedding(batch.to(self.device))

