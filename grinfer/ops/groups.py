"""Token groups of an MTGR sequence [U | S | R | C], the mask over them, and the bias indices.

    GROUP_U  profile tokens      GROUP_S  static history
    GROUP_R  real-time events    GROUP_C  candidates

Imported by the model, the featurizers, the engine and every attention kernel: one definition.
"""

from __future__ import annotations

import torch

GROUP_U, GROUP_S, GROUP_R, GROUP_C = 0, 1, 2, 3
NUM_GROUPS = 4
_TIME_BUCKET_BASE = 0.301  # HSTU: bucket = floor(log(|dt|) / 0.301)


def visible(q_group: torch.Tensor, q_pos: torch.Tensor, k_group: torch.Tensor, k_pos: torch.Tensor,
            mode: str) -> torch.Tensor:
    """Whether query (q_group, q_pos) may see key (k_group, k_pos); broadcasts elementwise.

    dynamic: U and S keys are seen by every token; an R key by R queries at or after it and by
    every candidate; a C key only by itself. causal: key position <= query position.
    """
    if mode == "causal":
        return k_pos <= q_pos
    if mode != "dynamic":
        raise ValueError(f"mask mode: expected 'dynamic' or 'causal', got {mode!r}")
    context_key = k_group <= GROUP_S
    realtime_key = (k_group == GROUP_R) & (((q_group == GROUP_R) & (k_pos <= q_pos)) | (q_group == GROUP_C))
    self_candidate = (k_group == GROUP_C) & (k_pos == q_pos)
    return context_key | realtime_key | self_candidate


def time_bucket(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """HSTU's log time bucket of |dt| seconds, clamped to [0, num_buckets - 1]."""
    dt = dt.abs().clamp(min=1).to(torch.float32)
    return (torch.log(dt) / _TIME_BUCKET_BASE).floor().long().clamp(0, num_buckets - 1)


def relative_index(q_pos: torch.Tensor, k_pos: torch.Tensor, reach: int) -> torch.Tensor:
    """Index into a 2 * reach + 1 relative-position table: k_pos - q_pos clamped to [-reach, reach]."""
    return (k_pos - q_pos).clamp(-reach, reach) + reach
