"""A model with seeded weights, shared by the model and engine tests; the served dataset's spec."""

from __future__ import annotations

import torch

from grinfer.config import ModelConfig
from grinfer.model import build_model
from grinfer.model.mtgr import MTGR

SERVED_SPEC = "synthetic:users=20,items=60,events=15,seed=0"  # what the tests that start servers serve


def seeded_model(cfg: ModelConfig, seed: int = 0, randomize_bias: bool = True) -> MTGR:
    """An MTGR in eval mode with seeded weights; with `randomize_bias`, the relative-bias tables (zero at
    init) are randomised so that they matter."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    assert isinstance(model, MTGR)
    if randomize_bias:
        with torch.no_grad():
            for layer in model.layers:
                if layer.rel_bias is not None:
                    layer.rel_bias.pos_table.normal_(0.0, 0.5)
                    layer.rel_bias.time_table.normal_(0.0, 0.5)
    return model.eval()
