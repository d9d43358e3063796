"""MTGR end to end on featurized requests: shapes, the dynamic mask's guarantees, batching, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_util import seeded_model

from grinfer.features import FeatureRequest, Featurizer, UserContext
from grinfer.model.mtgr import MTGR
from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U

ATOL = 1e-5


def with_candidates(req: FeatureRequest, candidates) -> FeatureRequest:
    return FeatureRequest(context=req.context, candidates=np.asarray(candidates, np.int64),
                       request_ts=req.request_ts)


def score(model: MTGR, featurizer: Featurizer, requests: list[FeatureRequest]) -> torch.Tensor:
    with torch.no_grad():
        return model(featurizer.rank_batch(requests))


def test_forward_shape_and_finite(mtgr_cfg, featurizer, make_request):
    model = seeded_model(mtgr_cfg)
    reqs = [make_request(5, 3, 4, seed=1), make_request(2, 0, 6, seed=2)]
    out = score(model, featurizer, reqs)
    assert out.shape == (10, len(mtgr_cfg.tasks)) == (10, 2)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0


def test_embed_layout_and_metadata(mtgr_cfg, featurizer, make_request):
    model = seeded_model(mtgr_cfg)
    req = make_request(3, 2, 2, seed=3)
    batch = featurizer.rank_batch([req, make_request(1, 1, 1, seed=4)])
    x, meta = model.embed(batch)
    nu = len(mtgr_cfg.profile_cardinalities)
    U, S, R, C = GROUP_U, GROUP_S, GROUP_R, GROUP_C
    assert meta.offsets.tolist() == [0, nu + 7, 2 * nu + 10]
    assert meta.group.tolist() == [U] * nu + [S] * 3 + [R] * 2 + [C] * 2 + [U] * nu + [S, R, C]
    assert meta.pos.tolist() == list(range(nu + 7)) + list(range(nu + 3))
    assert x.shape == (2 * nu + 10, mtgr_cfg.d_model)
    ts = meta.ts[: nu + 7].tolist()
    assert ts[:nu] == [0] * nu
    assert ts[nu : nu + 5] == req.context.timestamps.tolist()
    assert ts[nu + 5 :] == [req.request_ts] * 2


def test_single_request_without_candidates(mtgr_cfg, featurizer, make_request):
    model = seeded_model(mtgr_cfg)
    out = score(model, featurizer, [with_candidates(make_request(3, 2, 1), [])])
    assert out.shape == (0, 2)


def test_cold_user_without_events(mtgr_cfg, featurizer, make_request):
    model = seeded_model(mtgr_cfg)
    req = make_request(0, 0, 3, seed=5)
    out = score(model, featurizer, [req])
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    alone = torch.cat([score(model, featurizer, [with_candidates(req, [c])]) for c in req.candidates])
    torch.testing.assert_close(out, alone, atol=ATOL, rtol=1e-5)


def per_candidate(model, featurizer, req) -> torch.Tensor:
    return torch.cat([score(model, featurizer, [with_candidates(req, [c])]) for c in req.candidates])


@pytest.mark.parametrize("normalizer", ["visible", "max_len"])
@pytest.mark.parametrize("rel_bias", [False, True], ids=["no_bias", "rel_bias"])
@pytest.mark.parametrize("group_ln", [True, False], ids=["group_ln", "one_ln"])
def test_candidates_scored_together_equal_each_alone(mtgr_cfg, featurizer, make_request, normalizer, rel_bias,
                                                     group_ln):
    cfg = mtgr_cfg.model_copy(update={"normalizer": normalizer, "rel_bias": rel_bias, "group_ln": group_ln})
    model = seeded_model(cfg, seed=1)
    req = make_request(6, 3, 5, seed=6)
    together = score(model, featurizer, [req])
    torch.testing.assert_close(together, per_candidate(model, featurizer, req), atol=ATOL, rtol=1e-5)
    # reversing the candidate list reverses the scores
    rev = score(model, featurizer, [with_candidates(req, req.candidates[::-1])])
    torch.testing.assert_close(rev, together.flip(0), atol=ATOL, rtol=1e-5)
    assert together[:, 0].std() > 1e-4  # different candidates do get different scores


def test_causal_ablation_lets_candidates_influence_each_other(mtgr_cfg, featurizer, make_request):
    """Negative control: under the plain causal mask the per-candidate comparison fails."""
    model = seeded_model(mtgr_cfg.model_copy(update={"mask": "causal"}), seed=1)
    req = make_request(6, 3, 5, seed=6)
    together = score(model, featurizer, [req])
    alone = per_candidate(model, featurizer, req)
    torch.testing.assert_close(together[0], alone[0], atol=ATOL, rtol=1e-5)  # the first sees no other
    assert (together[1:] - alone[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("rel_bias", [False, True], ids=["no_bias", "rel_bias"])
def test_batch_of_users_equals_each_alone(mtgr_cfg, featurizer, make_request, rel_bias):
    model = seeded_model(mtgr_cfg.model_copy(update={"rel_bias": rel_bias}), seed=2)
    reqs = [make_request(7, 3, 4, seed=10), make_request(0, 2, 1, seed=11), make_request(3, 0, 6, seed=12),
            make_request(0, 0, 2, seed=13), make_request(12, 5, 3, seed=14),
            with_candidates(make_request(2, 1, 1, seed=15), [])]
    batched = score(model, featurizer, reqs)
    alone = torch.cat([score(model, featurizer, [r]) for r in reqs])
    assert batched.shape == (16, 2)
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=1e-5)


def test_context_changes_scores(mtgr_cfg, featurizer, make_request):
    """The model does read the context: other events (or more R events) change the candidates' scores."""
    model = seeded_model(mtgr_cfg, seed=3)
    req = make_request(6, 3, 3, seed=20)
    other = make_request(6, 3, 3, seed=21)
    base = score(model, featurizer, [req])
    assert (score(model, featurizer, [with_candidates(other, req.candidates)]) - base).abs().max() > 1e-4
    shorter = FeatureRequest(
        context=UserContext(req.context.profile, req.context.items[:-1], req.context.timestamps[:-1],
                                  req.context.ratings[:-1], req.context.num_static),
        candidates=req.candidates, request_ts=req.request_ts)
    assert (score(model, featurizer, [shorter]) - base).abs().max() > 1e-4


def test_context_states_unchanged_by_candidates_and_later_events(mtgr_cfg, featurizer, make_request):
    """At every layer, U/S states do not depend on R or C, and earlier R states not on later R or C."""
    model = seeded_model(mtgr_cfg.model_copy(update={"rel_bias": True}), seed=4)
    req = make_request(5, 3, 4, seed=22)
    ctx = req.context
    fewer_events = FeatureRequest(
        context=UserContext(ctx.profile, ctx.items[:-1], ctx.timestamps[:-1], ctx.ratings[:-1], ctx.num_static),
        candidates=np.zeros(0, np.int64), request_ts=req.request_ts)

    def states(r):
        with torch.no_grad():
            x, meta = model.embed(featurizer.rank_batch([r]))
            out = [x]
            for layer in model.layers:
                x = layer(x, meta)
                out.append(x)
        return out

    nu = len(mtgr_cfg.profile_cardinalities)
    n_keep = nu + 5 + 2  # U, S and the first two R events
    for full, part in zip(states(req), states(fewer_events)):
        torch.testing.assert_close(full[:n_keep], part[:n_keep], atol=ATOL, rtol=1e-5)


def test_group_ln_false_builds_and_runs(mtgr_cfg, featurizer, make_request):
    cfg = mtgr_cfg.model_copy(update={"group_ln": False})
    model = seeded_model(cfg)
    assert model.layers[0].norm_in.weight.shape == (1, cfg.d_model)
    assert seeded_model(mtgr_cfg).layers[0].norm_in.weight.shape == (4, cfg.d_model)
    out = score(model, featurizer, [make_request(4, 2, 3, seed=30), make_request(1, 0, 2, seed=31)])
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def test_group_ln_uses_one_norm_per_group(mtgr_cfg, featurizer, make_request):
    """Scaling the candidate group's input LayerNorm changes candidate states only."""
    model = seeded_model(mtgr_cfg, seed=5)
    batch = featurizer.rank_batch([make_request(4, 2, 3, seed=32)])
    with torch.no_grad():
        x0, meta = model.embed(batch)
        before = model.layers[0](x0, meta)
        model.layers[0].norm_in.weight[GROUP_C].mul_(1.7)
        after = model.layers[0](x0, meta)
    ctx = meta.group != GROUP_C
    torch.testing.assert_close(after[ctx], before[ctx])
    assert (after[~ctx] - before[~ctx]).abs().max() > 1e-4


def test_tasks_follow_config(mtgr_cfg, featurizer, make_request):
    cfg = mtgr_cfg.model_copy(update={"tasks": ("ctr", "ctcvr", "like")})
    out = score(seeded_model(cfg), featurizer, [make_request(3, 1, 2)])
    assert out.shape == (2, 3)


def test_wrong_kind_rejected(mtgr_cfg):
    hstu_cfg = mtgr_cfg.model_copy(update={"kind": "hstu", "mask": "causal"})
    with pytest.raises(ValueError, match="kind"):
        MTGR(hstu_cfg)


@pytest.mark.parametrize("rel_bias", [False, True], ids=["no_bias", "rel_bias"])
def test_gradients_reach_every_parameter(mtgr_cfg, featurizer, make_request, rel_bias):
    model = seeded_model(mtgr_cfg.model_copy(update={"rel_bias": rel_bias}), seed=6, randomize_bias=False)
    model.train()
    batch = featurizer.rank_batch([make_request(5, 3, 4, seed=40), make_request(2, 2, 3, seed=41)])
    assert batch.labels is not None and batch.labels.shape == (7, 2)
    loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    for name in ("item_emb.weight", "layers.0.uvqk.weight", "layers.1.out.weight", "heads.ctr.2.weight",
                 "heads.ctcvr.2.weight", "candidate_mlp.0.weight", "realtime_mlp.0.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    if rel_bias:  # tables start at zero but still get a gradient
        assert model.layers[0].rel_bias.pos_table.grad.abs().sum() > 0
    # rows of item_emb for items that appear nowhere in the batch get no gradient
    used = torch.cat([batch.history.items, batch.realtime.items, batch.candidates.items]).unique()
    unused = torch.ones(mtgr_cfg.num_items + 1, dtype=torch.bool)
    unused[used] = False
    grad = model.item_emb.weight.grad
    assert grad[unused].abs().sum() == 0 and grad[used].abs().sum(1).min() > 0


def test_few_adam_steps_reduce_bce(mtgr_cfg, featurizer, make_request):
    model = seeded_model(mtgr_cfg, seed=7)
    model.train()
    batch = featurizer.rank_batch([make_request(5, 2, 6, seed=50 + i) for i in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
