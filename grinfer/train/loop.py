"""One training loop for every model: AdamW, a progress bar, per-epoch loss history."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by ranking and retrieval training."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_negatives: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


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


def fit(model: torch.nn.Module, batches: Callable[[int], Iterator], loss_fn: Callable,
        settings: TrainSettings, desc: str,
        on_epoch: Callable[[int, float], dict] | None = None) -> list[dict]:
    """Train `model` for settings.epochs; `batches(epoch)` yields device-ready batches.

    Returns one record per epoch: {"epoch", "loss", "steps", **on_epoch(epoch, loss)} (e.g. a validation metric).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    history: list[dict] = []
    bar = tqdm(total=settings.epochs, desc=desc, disable=not settings.progress, unit="epoch")
    for epoch in range(settings.epochs):
        model.train()
        total, steps = 0.0, 0
        for batch in batches(epoch):
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        record = {"epoch": epoch + 1, "loss": total / max(steps, 1), "steps": steps}
        if on_epoch is not None:
            model.eval()
            with torch.no_grad():
                record.update(on_epoch(epoch, record["loss"]))
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if isinstance(v, float)})
        bar.update(1)
    bar.close()
    model.eval()
    return history
