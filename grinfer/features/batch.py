"""Jagged token batches: values + offsets per sequence, never padded."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def _move(obj, device):
    return type(obj)(**{f.name: (None if (v := getattr(obj, f.name)) is None else v.to(device))
                        for f in fields(obj)})


@dataclass
class EventTokens:
    """One jagged group of item tokens (static history S, real-time R, or candidates C)."""

    offsets: torch.Tensor  # [B + 1] int64
    items: torch.Tensor  # [N] int64 dense item ids
    genres: torch.Tensor  # [N, num_genres] float32 multi-hot
    years: torch.Tensor  # [N] int64 year buckets
    actions: torch.Tensor  # [N] int64 rating 1..5 (0 for candidates)
    timestamps: torch.Tensor  # [N] int64 seconds
    gaps: torch.Tensor  # [N] int64 time bucket of the gap to the user's previous event

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device) -> EventTokens:
        return _move(self, device)


@dataclass
class MTGRBatch:
    """A batch of ranking requests: [U | S | R | C] per user, as four jagged groups."""

    profile: torch.Tensor  # [B, num_profile_fields] int64
    history: EventTokens  # S
    realtime: EventTokens  # R
    candidates: EventTokens  # C
    cross: torch.Tensor  # [N_c, num_cross_features] float32 user x item features
    request_ts: torch.Tensor  # [B] int64
    labels: torch.Tensor | None = None  # [N_c, num_tasks] float32 (training / evaluation)

    @property
    def batch_size(self) -> int:
        return self.profile.shape[0]

    def to(self, device) -> MTGRBatch:
        return MTGRBatch(self.profile.to(device), self.history.to(device), self.realtime.to(device),
                         self.candidates.to(device), self.cross.to(device), self.request_ts.to(device),
                         None if self.labels is None else self.labels.to(device))


@dataclass
class RetrievalBatch:
    """A batch of item sequences for the causal (HSTU) retrieval model."""

    offsets: torch.Tensor  # [B + 1]
    items: torch.Tensor  # [N]
    timestamps: torch.Tensor  # [N]
    targets: torch.Tensor | None = None  # [N] next item per position (0 = no target)

    def to(self, device) -> RetrievalBatch:
        return _move(self, device)
