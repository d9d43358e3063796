"""Ranking (MTGR): multi-task BCE training on time windows and AUC/GAUC evaluation (DESIGN §5).

With validation, each user's last 10 % of the events before the test window are held out as the validation
window (early stopping on its mean GAUC); training windows stop before it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from grinfer.data.splits import ranking_cut, task_labels
from grinfer.data.types import Dataset, UserTimeline
from grinfer.features.featurizer import FeatureRequest, Featurizer, UserContext
from grinfer.model.mtgr import MTGR
from grinfer.train.loop import FitResult, TrainSettings, fit
from grinfer.train.metrics import auc, gauc

MONITOR = "valid_gauc"  # mean over tasks of the validation GAUC
SPLITS = ("valid", "test")


@dataclass(frozen=True)
class ContextLimits:
    """How much behaviour goes into a request: at most `max_static` S events and `num_realtime` R events."""

    max_static: int = 200
    num_realtime: int = 20
    window: int = 32  # candidates per training request


def window_request(user: UserTimeline, start: int, end: int, tasks: tuple[str, ...],
                   limits: ContextLimits) -> FeatureRequest:
    """Events [start:end) as labelled candidates, scored against the context of the events before them."""
    ctx = UserContext.from_timeline(user, start, max_static=limits.max_static,
                                    num_realtime=limits.num_realtime)
    return FeatureRequest(ctx, user.items[start:end], int(user.timestamps[start]),
                       task_labels(user.ratings[start:end], tasks))


def validation_cut(user: UserTimeline) -> int:
    """Index of the first validation event: the last 10 % (at least one) of the events before the test cut."""
    cut = ranking_cut(user)
    return cut - max(1, math.ceil(0.1 * cut)) if cut >= 2 else cut


def window(user: UserTimeline, split: str) -> tuple[int, int]:
    """[start, end) of a user's 'valid' or 'test' candidates."""
    if split not in SPLITS:
        raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
    return (validation_cut(user), ranking_cut(user)) if split == "valid" else (ranking_cut(user), len(user))


def training_requests(ds: Dataset, tasks: tuple[str, ...], limits: ContextLimits,
                      hold_out: bool = False) -> list[FeatureRequest]:
    """Every training event once as a candidate: consecutive windows before each user's test cut (or, with
    `hold_out`, before the validation window)."""
    out = []
    for user in ds.users:
        cut = validation_cut(user) if hold_out else ranking_cut(user)
        out.extend(window_request(user, s, min(s + limits.window, cut), tasks, limits)
                   for s in range(1, cut, limits.window))
    return out


def evaluation_requests(ds: Dataset, tasks: tuple[str, ...], limits: ContextLimits,
                        split: str = "test") -> list[FeatureRequest]:
    """One request per user: the split's window as candidates after the context before them."""
    spans = [(u, *window(u, split)) for u in ds.users]
    return [window_request(u, start, end, tasks, limits) for u, start, end in spans if start >= 1 and end > start]


def train_ranking(model: MTGR, ds: Dataset, featurizer: Featurizer, settings: TrainSettings,
                  limits: ContextLimits = ContextLimits(), validate: bool = True) -> FitResult:
    """Multi-task BCE on the training windows; with `validate`, the validation window is held out, its GAUC
    reported per epoch, training stops early on its mean and the best epoch's weights are kept."""
    requests = training_requests(ds, model.cfg.tasks, limits, hold_out=validate)
    rng = np.random.default_rng(settings.seed)

    def batches(epoch: int):
        order = rng.permutation(len(requests))
        for i in range(0, len(order), settings.batch_size):
            chunk = [requests[j] for j in order[i:i + settings.batch_size]]
            yield featurizer.rank_batch(chunk).to(settings.device)

    def loss_fn(m, batch):
        return F.binary_cross_entropy_with_logits(m(batch), batch.labels)

    def on_epoch(epoch, loss):
        if not validate:
            return {}
        metrics = evaluate_ranking(model, ds, featurizer, settings.device, limits, split="valid")
        per_task = {f"valid_{t}_gauc": metrics[t]["gauc"] for t in model.cfg.tasks}
        return {MONITOR: float(np.mean(list(per_task.values()))), **per_task}

    steps = -(-len(requests) // settings.batch_size)
    return fit(model, batches, loss_fn, settings, "train ranking", steps, on_epoch, MONITOR if validate else None)


@torch.no_grad()
def evaluate_ranking(model: MTGR, ds: Dataset, featurizer: Featurizer, device: str = "cpu",
                     limits: ContextLimits = ContextLimits(), batch_size: int = 64, split: str = "test") -> dict:
    """Per-task AUC and GAUC (grouped by user) on each user's last 10 % of events (split 'test') or on the
    validation window before them ('valid')."""
    model.eval()
    requests = evaluation_requests(ds, model.cfg.tasks, limits, split)
    scores, labels, groups = [], [], []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        batch = featurizer.rank_batch(chunk)
        scores.append(torch.sigmoid(model(batch.to(device))).float().cpu().numpy())
        assert batch.labels is not None  # evaluation requests carry their labels
        labels.append(batch.labels.numpy())
        groups.append(np.repeat(np.arange(i, i + len(chunk)), [len(r.candidates) for r in chunk]))
    s, y, g = np.concatenate(scores), np.concatenate(labels), np.concatenate(groups)
    out: dict[str, object] = {t: {"auc": auc(y[:, j], s[:, j]), "gauc": gauc(y[:, j], s[:, j], g)}
                              for j, t in enumerate(model.cfg.tasks)}
    out["candidates"] = len(s)
    return out
