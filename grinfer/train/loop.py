"""One training loop for every model: AdamW with warm-up/decay, early stopping on a validation metric (the
best epoch's weights kept), a progress bar and an up-front time estimate."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

ESTIMATE_STEPS = 5  # training steps timed (after the first) for the estimate printed at the start


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by ranking and retrieval training (per-preset defaults: train.recipe)."""

    epochs: int = 10  # the budget; early stopping (patience) may end training sooner
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_negatives: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    patience: int = 0  # stop after this many epochs without a better validation metric; 0 = every epoch runs
    warmup_steps: int = 0  # linear learning-rate warm-up over the first steps
    decay: Literal["none", "cosine"] = "none"  # cosine decay over the epoch budget (to MIN_LR_RATIO of lr)
    group_lr_scale: float = 1.0  # learning-rate multiple of the per-group (GroupLN) LayerNorm parameters


MIN_LR_RATIO = 0.05


@dataclass
class FitResult:
    """Per-epoch records and which epoch's weights the model holds at the end."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based; None without a validation metric (the last epoch's weights)
    best_value: float | None = None
    stopped_early: bool = False


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; others are returned as given once checked
    (ValueError naming --device for an unknown name or a GPU that is not there)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if name == "cpu":
        return name
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device: unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= visible:
        raise ValueError(f"--device {name}: {'no CUDA device is visible' if not visible else f'{visible} visible'}"
                         f"; use cpu or auto")
    return name


def param_groups(model: torch.nn.Module, settings: TrainSettings) -> list[dict]:
    """AdamW groups: per-group LayerNorm tables (more than one row) at lr * group_lr_scale, the rest at lr."""
    grouped, rest = [], []
    for name, p in model.named_parameters():
        is_group_ln = ("norm_in." in name or "norm_attn." in name) and p.dim() == 2 and p.shape[0] > 1
        (grouped if is_group_ln else rest).append(p)
    groups = [{"params": rest, "lr": settings.lr}]
    if grouped:
        groups.append({"params": grouped, "lr": settings.lr * settings.group_lr_scale})
    return groups


def lr_factor(step: int, settings: TrainSettings, total_steps: int) -> float:
    """Learning-rate multiple at a step: linear warm-up (at most a fifth of the budget, so that a small dataset
    is not trained at a fraction of the rate), then constant or cosine down to MIN_LR_RATIO."""
    warmup = min(settings.warmup_steps, max(total_steps // 5, 1))
    warm = min(1.0, (step + 1) / warmup) if settings.warmup_steps else 1.0
    if settings.decay == "none":
        return warm
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return warm * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def _say(settings: TrainSettings, message: str) -> None:
    if settings.progress:
        tqdm.write(message, file=sys.stderr)


def fit(model: torch.nn.Module, batches: Callable[[int], Iterator], loss_fn: Callable,
        settings: TrainSettings, desc: str, steps_per_epoch: int,
        on_epoch: Callable[[int, float], dict] | None = None, monitor: str | None = None) -> FitResult:
    """Train `model` for up to settings.epochs; `batches(epoch)` yields device-ready batches.

    Each epoch's record is {"epoch", "loss", "steps", "lr", **on_epoch(epoch, loss)}. With `monitor` (a key of
    on_epoch's result, higher is better) the best epoch's weights are restored at the end and training stops
    after `patience` epochs without improvement."""
    opt = torch.optim.AdamW(param_groups(model, settings), weight_decay=settings.weight_decay)
    total = settings.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings, total))
    result, best_state, bad = FitResult(), None, 0
    bar = tqdm(total=settings.epochs, desc=desc, disable=not settings.progress, unit="epoch")
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        loss_sum, steps, t_first = 0.0, 0, 0.0
        for batch in batches(epoch):
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            steps += 1
            if epoch == 0 and steps == 1:
                t_first = time.perf_counter()
            elif epoch == 0 and steps == 1 + ESTIMATE_STEPS:
                per_epoch = (time.perf_counter() - t_first) / ESTIMATE_STEPS * steps_per_epoch
                _say(settings, f"{desc}: about {per_epoch:.1f} s per epoch of training, so at most "
                               f"{_duration(per_epoch * settings.epochs)} for {settings.epochs} epochs (+ validation)"
                               + (f"; early stopping (patience {settings.patience}) usually ends it sooner"
                                  if settings.patience and monitor else ""))
        record = {"epoch": epoch + 1, "loss": loss_sum / max(steps, 1), "steps": steps,
                  "lr": opt.param_groups[0]["lr"]}
        if on_epoch is not None:
            model.eval()
            with torch.no_grad():
                record.update(on_epoch(epoch, record["loss"]))
        if epoch == 0:
            spent = time.perf_counter() - start
            _say(settings, f"{desc}: epoch 1 took {spent:.1f} s with validation: at most "
                           f"{_duration(spent * settings.epochs)} for the {settings.epochs}-epoch budget")
        result.history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "lr"})
        bar.update(1)
        if monitor is not None and monitor in record:
            if result.best_value is None or record[monitor] > result.best_value:
                result.best_epoch, result.best_value, bad = epoch + 1, float(record[monitor]), 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if settings.patience and bad >= settings.patience:
                    result.stopped_early = True
                    break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
