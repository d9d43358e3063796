"""Retrieval inside the engine: the causal HSTU's top-N unseen items, one batched forward per engine turn.

Every `/recommend` first needs its candidates; running that forward on the engine's thread (instead of a
worker thread beside it) keeps one owner for the device (no kernel launches racing a CUDA-graph capture)
and batches the retrievals of concurrent requests into one forward and one top-k.
"""

from __future__ import annotations

import numpy as np
import torch

from grinfer.features.featurizer import UserContext, retrieval_batch
from grinfer.model.hstu import HSTURetrieval
from grinfer.recommend import retrieve_candidates


class BatchRetriever:
    """Top-n unseen items for many users at once (`recommend.retrieve_candidates`, batched)."""

    def __init__(self, model: HSTURetrieval | None, num_items: int, device: torch.device):
        self.model = model.to(device).eval() if model is not None else None
        self.num_items, self.device = num_items, device

    @torch.inference_mode()
    def top_n(self, queries: list[tuple[UserContext, int]]) -> list[np.ndarray]:
        """For each (context, n): the model's top-n items the user has not seen, best first; users without
        history (or without a model) get every unseen item, as `retrieve_candidates` gives them."""
        out: list[np.ndarray | None] = [None] * len(queries)
        batched = []
        for i, (ctx, n) in enumerate(queries):
            if self.model is None or len(ctx.items) == 0:
                out[i] = retrieve_candidates(None, ctx, n, self.num_items)
            else:
                batched.append(i)
        if batched and self.model is not None:
            window = self.model.cfg.max_seq_len
            seen = [np.unique(queries[i][0].items) for i in batched]
            batch = retrieval_batch([(queries[i][0].items[-window:], queries[i][0].timestamps[-window:])
                                     for i in batched], False)
            scores = self.model.user_embedding(batch.to(self.device)) @ self.model.item_table().T
            rows = np.repeat(np.arange(len(batched)), [len(s) for s in seen])
            scores[:, 0] = -torch.inf
            scores[torch.as_tensor(rows, device=scores.device),
                   torch.as_tensor(np.concatenate(seen), device=scores.device)] = -torch.inf
            counts = [min(queries[i][1], self.num_items - len(s)) for i, s in zip(batched, seen)]
            top = torch.topk(scores, max(counts)).indices.cpu().numpy()
            for row, (i, count) in enumerate(zip(batched, counts)):
                out[i] = top[row, :count]
        return [o for o in out if o is not None]
