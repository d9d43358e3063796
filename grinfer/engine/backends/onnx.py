"""`onnx`: the uncached ranking forward exported to ONNX (`grinfer export onnx`), in ONNX Runtime.

Like `baseline` it scores each work item's candidates over the whole request, with no KV cache: it is
what a TensorRT engine built from the same file would serve (ONNX Runtime's TensorRT provider is taken
first where it is installed; the chosen provider is reported as `provider`).
"""

from __future__ import annotations

import torch

from grinfer.engine.backends.baseline import BaselineScorer
from grinfer.features.featurizer import Featurizer
from grinfer.model.mtgr import MTGR


class OnnxScorer(BaselineScorer):
    name = "onnx"

    def __init__(self, model: MTGR, featurizer: Featurizer, device: torch.device, path: str):
        super().__init__(model, featurizer, device)
        from grinfer.export.onnx_runtime import OnnxModel  # onnxruntime is needed from here on only

        self.session = OnnxModel(path)
        self.provider = self.session.provider

    def _logits(self, batch) -> torch.Tensor:
        probabilities = self.session.rank(batch).float().cpu()
        return torch.logit(probabilities.clamp(1e-7, 1 - 1e-7))  # the engine applies the sigmoid

    def stats(self) -> dict:
        return {"provider": self.provider}
