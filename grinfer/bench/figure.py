"""One PNG figure of side-by-side panels, for the benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def panels(path: Path, count: int, size: tuple[float, float]) -> Iterator[list]:
    """`with panels(path, 2, (8, 4)) as axes:` draw on the axes; the figure is written to `path` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
