"""The padded, exportable modules against the jagged eager model (no export: every model setting, fast)."""

from __future__ import annotations

import pytest
import torch
from model_util import seeded_model

from grinfer.config import preset
from grinfer.export.forward import RANKING_INPUTS, RETRIEVAL_INPUTS, RankingForward, RetrievalForward
from grinfer.export.inputs import jagged_probabilities, ranking_inputs, retrieval_inputs
from grinfer.export.samples import random_catalog, ranking_batch, retrieval_sample
from grinfer.export.step import STEP_INPUTS, STEP_OUTPUTS, CachedStep
from grinfer.export.step_sample import step_sample
from grinfer.model import build_model

SIZES = [(7, 0, 4), (0, 3, 1), (4, 1, 6), (1, 5, 2), (0, 0, 3)]  # (S, R, candidates): no S, no R, no events
SETTINGS = [{"mask": m, "normalizer": n, "rel_bias": b, "group_ln": g}
            for m in ("dynamic", "causal") for n in ("visible", "max_len") for b in (False, True)
            for g in (True, False)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_padded_ranking_and_cached_step_equal_the_eager_model(settings):
    cfg = preset("mtgr-tiny").replace(num_items=50, **settings)
    model = seeded_model(cfg)
    batch = ranking_batch(cfg, random_catalog(cfg), SIZES, seed=3)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch))
        inputs = ranking_inputs(batch)
        got = jagged_probabilities(RankingForward(model)(*(inputs[k] for k in RANKING_INPUTS)), inputs["c_len"])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # contexts of 11, 7, 9, 10 and 4 tokens: partly cached, fully cached (only candidates), cold
        step_in, step_out = step_sample(model, batch, [6, 7, 0, 3, 4], block_size=4)
        for name, value in zip(STEP_OUTPUTS, CachedStep(model, 4)(*(step_in[k] for k in STEP_INPUTS))):
            torch.testing.assert_close(value, step_out[name], atol=1e-5, rtol=0, msg=name)


def test_padded_retrieval_equals_the_eager_model():
    torch.manual_seed(0)
    cfg = preset("hstu-ml1m").replace(num_items=50, max_seq_len=16)
    model = build_model(cfg).eval()
    batch = retrieval_sample(cfg, [5, 1, 16, 9])
    with torch.no_grad():
        inputs = retrieval_inputs(batch)
        user, scores = RetrievalForward(model)(*(inputs[k] for k in RETRIEVAL_INPUTS))
        expected = model.user_embedding(batch)
        torch.testing.assert_close(user, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(scores, expected @ model.item_table().T, atol=1e-6, rtol=0)


def test_step_sample_rejects_a_cached_prefix_longer_than_the_context():
    cfg = preset("mtgr-tiny").replace(num_items=50)
    model = seeded_model(cfg)
    batch = ranking_batch(cfg, random_catalog(cfg), [(1, 1, 2)])
    with pytest.raises(ValueError, match="cached"):
        step_sample(model, batch, [7], block_size=4)
