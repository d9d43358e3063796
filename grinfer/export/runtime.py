"""What every loaded export offers: named inputs -> named outputs, and featurized batches -> results."""

from __future__ import annotations

import json

import torch

from grinfer.export.inputs import jagged_probabilities, ranking_inputs, retrieval_inputs
from grinfer.features.batch import MTGRBatch, RetrievalBatch


class ExportedModel:
    """A loaded exported graph. Subclasses implement `run` and set `metadata` (the grinfer.* entries)."""

    metadata: dict[str, str]

    @property
    def part(self) -> str:
        """"ranking", "retrieval" or "step"."""
        return self.metadata["grinfer.part"]

    @property
    def input_names(self) -> list[str]:
        return list(json.loads(self.metadata["grinfer.inputs"]))

    @property
    def output_names(self) -> list[str]:
        return list(json.loads(self.metadata["grinfer.outputs"]))

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph on named inputs (tensors, or arrays) -> named output tensors."""
        raise NotImplementedError

    def rank(self, batch: MTGRBatch) -> torch.Tensor:
        """Per-task probabilities [N_c, T] of a featurized ranking batch, in its candidate order (as
        `torch.sigmoid(model(batch))`)."""
        self._expect("ranking")
        inputs = ranking_inputs(batch)
        return jagged_probabilities(self.run(inputs)["probabilities"], inputs["c_len"].to("cpu"))

    def retrieve(self, batch: RetrievalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(user embeddings [B, d], scores over the item table [B, num_items + 1]) of a retrieval batch."""
        self._expect("retrieval")
        out = self.run(retrieval_inputs(batch))
        return out["user_embedding"], out["scores"]

    def _expect(self, part: str) -> None:
        if self.part != part:
            raise ValueError(f"this export is the {self.part} graph, not the {part} one")
