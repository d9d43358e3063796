"""Retrieval (causal HSTU): next-item sampled-softmax training and full-catalogue evaluation."""

from __future__ import annotations

import numpy as np
import torch

from grinfer.data.splits import retrieval_eval_point, retrieval_train_items
from grinfer.data.types import Dataset
from grinfer.features.featurizer import retrieval_batch
from grinfer.model.hstu import HSTURetrieval
from grinfer.train.loop import FitResult, TrainSettings, fit
from grinfer.train.metrics import hit_rate, ndcg

RETRIEVAL_KS = (10, 50, 200)
MONITOR = "valid_hr@10"  # early stopping and the saved epoch follow the validation HR@10


def train_retrieval(model: HSTURetrieval, ds: Dataset, settings: TrainSettings,
                    validate: bool = True) -> FitResult:
    """Train on each user's events before the validation target (the last max_seq_len + 1 of them); with
    `validate`, early stopping on the validation HR@10 and the best epoch's weights kept."""
    window = model.cfg.max_seq_len + 1
    seqs = []
    for u in ds.users:
        n = retrieval_train_items(u)
        if n >= 2:
            seqs.append((u.items[max(0, n - window):n], u.timestamps[max(0, n - window):n]))
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed)

    def batches(epoch: int):
        order = rng.permutation(len(seqs))
        for i in range(0, len(order), settings.batch_size):
            yield retrieval_batch([seqs[j] for j in order[i:i + settings.batch_size]], True).to(settings.device)

    def loss_fn(m, batch):
        return m.sampled_softmax_loss(batch, settings.num_negatives, generator=gen)

    def on_epoch(epoch, loss):
        if not validate:
            return {}
        metrics = evaluate_retrieval(model, ds, "valid", settings.device, ks=(10,))
        return {MONITOR: metrics["hr@10"], "valid_ndcg@10": metrics["ndcg@10"]}

    steps = -(-len(seqs) // settings.batch_size)
    return fit(model, batches, loss_fn, settings, "train retrieval", steps, on_epoch, MONITOR if validate else None)


@torch.no_grad()
def target_ranks(model: HSTURetrieval, ds: Dataset, split: str, device: str,
                 batch_size: int = 256) -> np.ndarray:
    """0-based rank of each user's target among all items, history items excluded (a model whose time bias
    uses the next event's timestamp is given the target's, as generative-recommenders evaluates)."""
    model.eval()
    table = model.item_table().to(device)
    users = [u for u in ds.users if retrieval_eval_point(u, split) >= 1]
    ranks = []
    for i in range(0, len(users), batch_size):
        chunk = users[i:i + batch_size]
        points = [retrieval_eval_point(u, split) for u in chunk]
        seqs = [(u.items[max(0, t - model.cfg.max_seq_len):t], u.timestamps[max(0, t - model.cfg.max_seq_len):t])
                for u, t in zip(chunk, points)]
        next_ts = torch.as_tensor(np.array([u.timestamps[t] for u, t in zip(chunk, points)]), device=device)
        emb = model.user_embedding(retrieval_batch(seqs, False).to(device), next_ts)
        scores = emb @ table.T  # [b, num_items + 1]
        targets = torch.as_tensor(np.array([u.items[t] for u, t in zip(chunk, points)]), device=device)
        target_scores = scores.gather(1, targets[:, None])
        rows = np.repeat(np.arange(len(chunk)), points)
        history = np.concatenate([u.items[:t] for u, t in zip(chunk, points)])
        scores[torch.as_tensor(rows, device=device), torch.as_tensor(history, device=device)] = -torch.inf
        scores[:, 0] = -torch.inf
        ranks.append((scores > target_scores).sum(1).cpu().numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def evaluate_retrieval(model: HSTURetrieval, ds: Dataset, split: str = "test", device: str = "cpu",
                       ks: tuple[int, ...] = RETRIEVAL_KS) -> dict:
    """HR@k and NDCG@k under full ranking over the catalogue (DESIGN §5)."""
    ranks = target_ranks(model, ds, split, device)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    out["users"] = len(ranks)
    return out
