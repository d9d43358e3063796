"""Default training recipes per preset: what `grinfer train` runs when no optimisation flag is given.

Each recipe is an epoch budget with early stopping on the validation metric (HR@10 for retrieval, mean GAUC
over tasks for ranking; the best epoch's weights are saved), chosen so that the flagless run reaches the
preset's published level (BENCHMARKS.md, "default recipe" rows)."""

from __future__ import annotations

from dataclasses import fields

from grinfer.train.loop import TrainSettings

RETRIEVAL_RECIPE = {"epochs": 300, "patience": 40, "lr": 1e-3, "batch_size": 128, "num_negatives": 128}
RANKING_RECIPE = {"epochs": 12, "patience": 2, "lr": 3e-4, "batch_size": 128, "warmup_steps": 200,
                  "decay": "cosine"}
# the test/demo-sized preset keeps the earlier flag defaults (lr 1e-3, 10 epochs), now with early stopping
TINY_RECIPE = {"epochs": 10, "patience": 3, "lr": 1e-3, "batch_size": 128}
RECIPES: dict[str, dict] = {"hstu-ml1m": RETRIEVAL_RECIPE, "mtgr-tiny": TINY_RECIPE}


def recipe(preset_name: str, kind: str) -> dict:
    """The recipe of a preset (by name; a preset without its own gets its kind's: hstu or mtgr)."""
    return dict(RECIPES.get(preset_name, RETRIEVAL_RECIPE if kind == "hstu" else RANKING_RECIPE))


def settings_for(preset_name: str, kind: str, **given) -> TrainSettings:
    """TrainSettings from the preset's recipe, with every explicitly given (not None) value winning."""
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a training setting; known: {', '.join(sorted(known))}")
    return TrainSettings(**{**recipe(preset_name, kind), **{k: v for k, v in given.items() if v is not None}})
