"""Jagged featurized batches <-> the padded tensors the exported graphs take (host side, eager torch).

Each jagged group is padded to its longest sequence, and at least to 1: exported graphs have no
zero-sized dimension (TensorRT rejects them), a group nobody has is one padded slot of length 0.
"""

from __future__ import annotations

import torch

from grinfer.export.forward import CANDIDATE_FIELDS, EVENT_FIELDS
from grinfer.features.batch import EventTokens, MTGRBatch, RetrievalBatch
from grinfer.ops.jagged import jagged_to_padded, lengths_of, max_length, padded_index, padded_to_jagged


def _pad(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return jagged_to_padded(values, offsets, max(max_length(offsets), 1))[0]


def _events(prefix: str, ev: EventTokens, fields: tuple[str, ...], extra: dict | None = None) -> dict:
    source = {"items": ev.items, "genres": ev.genres, "years": ev.years, "actions": ev.actions,
              "ts": ev.timestamps, "gaps": ev.gaps, **(extra or {})}
    out = {f"{prefix}_{f}": _pad(source[f], ev.offsets) for f in fields}
    out[f"{prefix}_len"] = lengths_of(ev.offsets)
    return out


def ranking_inputs(batch: MTGRBatch) -> dict[str, torch.Tensor]:
    """RANKING_INPUTS of a jagged ranking batch (on its device), padded."""
    return {"profile": batch.profile, **_events("s", batch.history, EVENT_FIELDS),
            **_events("r", batch.realtime, EVENT_FIELDS),
            **_events("c", batch.candidates, CANDIDATE_FIELDS, {"cross": batch.cross})}


def retrieval_inputs(batch: RetrievalBatch) -> dict[str, torch.Tensor]:
    """RETRIEVAL_INPUTS of a jagged retrieval batch (every sequence non-empty), padded."""
    return {"items": _pad(batch.items, batch.offsets), "ts": _pad(batch.timestamps, batch.offsets),
            "lengths": lengths_of(batch.offsets)}


def jagged_probabilities(probabilities: torch.Tensor, c_len: torch.Tensor) -> torch.Tensor:
    """[B, Lc, T] padded probabilities -> [N_c, T] in the batch's candidate order (as the eager model's)."""
    offsets = torch.nn.functional.pad(torch.cumsum(c_len, 0), (1, 0))
    return padded_to_jagged(probabilities, offsets, padded_index(offsets, int(offsets[-1])))
