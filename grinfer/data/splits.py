"""The evaluation protocol's splits (DESIGN §5).

Retrieval (HSTU's leave-last-out): per user the last event is the test target, the one before it
the validation target; training targets come only from the events before those two.
Ranking: per user the last 10 % of events by time (at least one) are the evaluation candidates,
labelled ctr = rating >= 4 and ctcvr = rating == 5; training uses the events before them.
"""

from __future__ import annotations

import math

import numpy as np

from grinfer.data.types import UserTimeline

RANKING_EVAL_FRACTION = 0.1
TASK_LABELS = {"ctr": lambda r: r >= 4, "ctcvr": lambda r: r == 5}


def ranking_cut(user: UserTimeline, fraction: float = RANKING_EVAL_FRACTION) -> int:
    """Index of the first evaluation event: events [cut:] are the user's last `fraction` by time."""
    return len(user) - max(1, math.ceil(fraction * len(user)))


def task_labels(ratings: np.ndarray, tasks: tuple[str, ...]) -> np.ndarray:
    """[n, num_tasks] float32 labels of the given tasks from ratings."""
    unknown = [t for t in tasks if t not in TASK_LABELS]
    if unknown:
        raise ValueError(f"tasks: no label rule for {unknown}; known tasks are {sorted(TASK_LABELS)}")
    return np.stack([TASK_LABELS[t](ratings) for t in tasks], -1).astype(np.float32)


def retrieval_train_items(user: UserTimeline) -> int:
    """Number of leading events whose items may serve as training inputs and targets."""
    return max(len(user) - 2, 0)


def retrieval_eval_point(user: UserTimeline, split: str) -> int:
    """Index of the target event for 'valid' (second to last) or 'test' (last); inputs are the events before."""
    if split not in ("valid", "test"):
        raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
    return len(user) - (2 if split == "valid" else 1)
