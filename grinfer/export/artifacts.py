"""What gets exported from a checkpoint: each graph's module, named inputs and outputs, dynamic axes with
their ranges, the example it is traced on, and check batches at other sizes with eager's outputs.

Axes are named; `Limits` gives each its range. Example sizes are all >= 2 (torch.export specialises
sizes 0 and 1) and differ from every check batch's, so a graph that baked in a traced size fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from grinfer.export.forward import (
    CANDIDATE_FIELDS,
    EVENT_FIELDS,
    RANKING_INPUTS,
    RETRIEVAL_INPUTS,
    RankingForward,
    RetrievalForward,
)
from grinfer.export.inputs import ranking_inputs, retrieval_inputs
from grinfer.export.samples import random_catalog, ranking_batch, retrieval_sample
from grinfer.export.step import STEP_INPUTS, STEP_OUTPUTS, CachedStep
from grinfer.export.step_sample import step_sample
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.ops.jagged import jagged_to_padded

Axes = tuple[str | None, ...]  # per tensor dimension: an axis name, or None for a fixed size

# per-user (S events, R events, candidates): the traced example, then the check batches (ragged, other sizes)
RANK_EXAMPLE = [(3, 2, 3), (2, 1, 2)]
RANK_CHECKS = [[(6, 0, 5)], [(7, 0, 4), (0, 3, 1), (4, 1, 6), (1, 5, 2), (9, 4, 9)],
               [(0, 0, 2), (12, 7, 1), (2, 2, 11)]]
RETRIEVAL_EXAMPLE, RETRIEVAL_CHECKS = [4, 3], [[1], [9, 2, 5, 7, 3], [17, 6, 1]]
STEP_EXAMPLE_CACHED = [5, 4]  # context tokens in the pool per user of RANK_EXAMPLE (contexts of 9 and 7 tokens)
STEP_CHECKS_CACHED = [[0], [10, 7, 0, 10, 13], [4, 20, 3]]  # cold, warm (only candidates), partial


@dataclass(frozen=True)
class Limits:
    """The range of each dynamic axis (min is 1 for all); opt is the size TensorRT profiles tune for."""

    batch: int = 64
    static: int = 1024
    realtime: int = 128
    candidates: int = 512
    sequence: int = 256
    pool_slots: int = 1 << 24

    def ranges(self, block_size: int, num_profile: int) -> dict[str, dict[str, int]]:
        context = num_profile + self.static + self.realtime
        top = {"batch": self.batch, "static": self.static, "realtime": self.realtime, "candidates": self.candidates,
               "sequence": self.sequence, "new_tokens": context, "context": context,
               "pages": -(-context // block_size), "slots": self.pool_slots}
        return {name: {"min": 1, "opt": max(1, min(hi, 8 if name == "batch" else 64)), "max": hi}
                for name, hi in top.items()}


@dataclass
class Artifact:
    """One exportable graph of a checkpoint."""

    part: str  # "ranking", "retrieval" or "step"
    module: nn.Module
    inputs: dict[str, Axes]  # in the module's argument order
    outputs: dict[str, Axes]
    example: dict[str, torch.Tensor]
    checks: Callable[[], list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]]
    block_size: int | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def args(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(values[name] for name in self.inputs)


def _ranking_axes() -> dict[str, Axes]:
    axes: dict[str, Axes] = {"profile": ("batch", None)}
    for prefix, axis, fields in (("s", "static", EVENT_FIELDS), ("r", "realtime", EVENT_FIELDS),
                                 ("c", "candidates", CANDIDATE_FIELDS)):
        for f in fields:
            axes[f"{prefix}_{f}"] = ("batch", axis, None) if f in ("genres", "cross") else ("batch", axis)
        axes[f"{prefix}_len"] = ("batch",)
    assert tuple(axes) == RANKING_INPUTS
    return axes


STEP_AXES: dict[str, Axes] = {
    "x_new": ("batch", "new_tokens", None), "x_cand": ("batch", "candidates", None), "ctx_start": ("batch",),
    "ctx_end": ("batch",), "static_tokens": ("batch",), "ctx_ts": ("batch", "context"), "cand_len": ("batch",),
    "request_ts": ("batch",), "block_table": ("batch", "pages"), "k_pool": (None, "slots", None, None),
    "v_pool": (None, "slots", None, None)}
assert tuple(STEP_AXES) == STEP_INPUTS


@torch.no_grad()
def _ranking_expected(model: MTGR, batch) -> dict[str, torch.Tensor]:
    """Eager probabilities [N_c, T] padded as the graph's [B, Lc, T] (0 at padded candidates)."""
    probs = torch.sigmoid(model(batch).float())
    offsets = batch.candidates.offsets
    return {"probabilities": jagged_to_padded(probs, offsets, max(int(batch.candidates.lengths.max()), 1))[0]}


@torch.no_grad()
def _retrieval_expected(model: HSTURetrieval, batch) -> dict[str, torch.Tensor]:
    user = model.user_embedding(batch)
    return {"user_embedding": user, "scores": user @ model.item_table().T}


def artifacts(model: MTGR | HSTURetrieval, with_step: bool, block_size: int, seed: int = 0) -> list[Artifact]:
    """The graphs to export from a model: its uncached forward, and for MTGR with `with_step` the cached step."""
    cfg = model.cfg
    if isinstance(model, HSTURetrieval):
        ax: dict[str, Axes] = {"items": ("batch", "sequence"), "ts": ("batch", "sequence"), "lengths": ("batch",)}
        assert tuple(ax) == RETRIEVAL_INPUTS
        return [Artifact(
            "retrieval", RetrievalForward(model), ax, {"user_embedding": ("batch", None), "scores": ("batch", None)},
            retrieval_inputs(retrieval_sample(cfg, RETRIEVAL_EXAMPLE, seed)),
            lambda: [(retrieval_inputs(b), _retrieval_expected(model, b))
                     for b in (retrieval_sample(cfg, n, seed + 1 + i) for i, n in enumerate(RETRIEVAL_CHECKS))])]
    catalog = random_catalog(cfg, seed)
    example = ranking_batch(cfg, catalog, RANK_EXAMPLE, seed)
    check_batches = lambda: [ranking_batch(cfg, catalog, sizes, seed + 1 + i) for i, sizes in enumerate(RANK_CHECKS)]
    out = [Artifact("ranking", RankingForward(model), _ranking_axes(), {"probabilities": ("batch", "candidates", None)},
                    ranking_inputs(example),
                    lambda: [(ranking_inputs(b), _ranking_expected(model, b)) for b in check_batches()])]
    if with_step:
        out.append(Artifact(
            "step", CachedStep(model, block_size), STEP_AXES,
            dict(zip(STEP_OUTPUTS, [("batch", "candidates", None), *[(None, "batch", "new_tokens", None, None)] * 2,
                                    ("batch", "candidates", None)])),
            step_sample(model, example, STEP_EXAMPLE_CACHED, block_size, seed)[0],
            lambda: [step_sample(model, b, cached, block_size, seed + 1 + i)
                     for i, (b, cached) in enumerate(zip(check_batches(), STEP_CHECKS_CACHED))],
            block_size=block_size))
    return out
