"""`baseline`: the uncached eager model, no KV cache at all — the last resort of a failing step.

It scores a work item's candidates with the whole model over the request's context and those candidates
(`MTGR.forward` of one featurized request), never reading or writing the paged pool. A request it
served cannot trust its cache entry afterwards (the context's K/V were not written), so the engine
serves the rest of that request with it too and drops the entry when the request finishes.
"""

from __future__ import annotations

import torch

from grinfer.features.featurizer import FeatureRequest, Featurizer
from grinfer.model.mtgr import MTGR


class BaselineScorer:
    name = "baseline"
    uncached = True  # scores whole requests; the runner never hands it the paged pool
    keys_in_pool = False

    def __init__(self, model: MTGR, featurizer: Featurizer, device: torch.device):
        self.model, self.featurizer, self.device = model, featurizer, device

    @torch.inference_mode()
    def logits(self, items) -> torch.Tensor:
        """[sum of the items' candidates, tasks] float32 logits on the host, in item order."""
        requests = [FeatureRequest(it.state.request.context, it.state.request.candidates[it.cand_start:it.cand_end],
                                   it.state.request.request_ts) for it in items if it.cand_end > it.cand_start]
        if not requests:
            return torch.zeros(0, len(self.model.cfg.tasks))
        return self._logits(self.featurizer.rank_batch(requests))

    def _logits(self, batch) -> torch.Tensor:
        return self.model(batch.to(self.device)).float().cpu()

    def capture_pending(self, min_steps: int = 1) -> bool:
        return False

    def stats(self) -> dict:
        return {}
