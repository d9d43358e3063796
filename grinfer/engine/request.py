"""Engine-level request and result types and the errors a caller can see."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from grinfer.features.featurizer import UserContext


class EngineError(RuntimeError):
    """Base class of the errors the engine reports to callers."""


class Overloaded(EngineError):
    """The waiting queue is full: retry later."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it finished."""


class ContextTooLarge(EngineError):
    """The request's context can never fit the KV cache."""


_ids = itertools.count()


@dataclass
class RankRequest:
    """Score `candidates` for a user: context = U + S (fixed per history_version) + R events."""

    user: str
    history_version: int
    context: UserContext
    candidates: np.ndarray
    request_ts: int
    deadline: float | None = None  # time.monotonic() seconds
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    arm: str | None = None  # the A/B arm an admin forced (serving/models.py); None: the user's assigned arm


@dataclass
class RankResult:
    """Per-candidate task probabilities (in the request's candidate order) and how they were made."""

    request_id: int
    probabilities: torch.Tensor  # [K, num_tasks] float32, CPU
    cache: str  # "hit", "partial" or "miss" (of the context's K/V)
    cached_tokens: int
    computed_tokens: int
    queue_seconds: float
    total_seconds: float
    steps: int
    arm: str = ""  # the A/B arm and model version that answered (set by serving/models.py's ModelSet)
    model_version: str = ""
