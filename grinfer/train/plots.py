"""Training curves as PNG."""

from __future__ import annotations

from pathlib import Path


def plot_history(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """One panel per run: the training loss and every other per-epoch metric on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items()):
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["loss"] for r in history], "o-", color="tab:blue", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        ax.set_title(name)
        extra = sorted({k for r in history for k in r} - {"epoch", "loss", "steps"})
        if extra:
            twin = ax.twinx()
            for key in extra:
                twin.plot(epochs, [r.get(key) for r in history], "s--", label=key)
            twin.set_ylabel("validation metric")
            twin.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
