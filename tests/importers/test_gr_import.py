"""Importing Meta generative-recommenders HSTU checkpoints: each convention on tiny hand-computed inputs, the
whole converted forward against a dense re-statement of theirs, the round trip, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gr_util import LAYER, gr_item_table, gr_state_dict, gr_user_embedding

from grinfer.config import preset
from grinfer.features.featurizer import retrieval_batch
from grinfer.importers import CheckpointImportError
from grinfer.importers import generative_recommenders as gr
from grinfer.importers.run import convert_generative_recommenders, import_checkpoint
from grinfer.model.checkpoint import load_checkpoint
from grinfer.model.hstu import HSTURetrieval, next_timestamps
from grinfer.model.layers import GroupLayerNorm, HSTULayer, TokenMeta

SETTINGS = {"num_heads": 2, "qk_dim": 3, "v_dim": 2}


def _cfg(**changes):
    base = preset("hstu-ml1m").replace(d_model=8, num_heads=1, max_seq_len=8, num_layers=1, num_items=5, dropout=0.0,
                                       item_emb_dim=8)
    return base.replace(**changes)


def _meta(ts, pos=None):
    ts = torch.tensor(ts)
    pos = torch.arange(len(ts)) if pos is None else torch.tensor(pos)
    return TokenMeta(torch.tensor([0, len(ts)]), torch.ones(len(ts), dtype=torch.long), pos, ts)


# ---- one convention at a time, on numbers worked out by hand -------------------------------------------------
def test_time_bias_buckets_next_event_timestamp_with_nb_plus_one_entries_and_truncation():
    ts = [0, 10, 1000]
    batch = retrieval_batch([(np.array([1, 2, 3]), np.array(ts))], False)
    assert next_timestamps(batch).tolist() == [10, 1000, 1000]  # the last event's next time defaults to its own
    nxt = next_timestamps(batch, torch.tensor([5000]))
    assert nxt.tolist() == [10, 1000, 5000]
    layer = HSTULayer(_cfg(num_time_buckets=129, time_bias_from="next"))
    plan = layer.plan(_meta(nxt.tolist()), _meta(ts))
    # floor(ln|dt| / 0.301): dt 10 -> 7.65; 1000 -> 22.95; 990 -> 22.92; 5000 -> 28.30; 4990 -> 28.29; 4000 -> 27.55
    lower = [[7], [22, 22], [28, 28, 27]]
    assert [plan.bucket[0, i, : i + 1].tolist() for i in range(3)] == lower
    huge = layer.plan(_meta([10**18]), _meta([0]))
    assert huge.bucket.item() == 128  # ln(1e18) / 0.301 = 137.7, truncated to the last of nb + 1 = 129 entries


def test_position_table_has_2n_minus_1_entries_indexed_by_key_minus_query():
    cfg = _cfg(rel_pos_reach=7)  # N = 8
    layer = HSTULayer(cfg)
    assert layer.rel_bias.pos_table.shape == (15,)
    plan = layer.plan(_meta([0] * 8), _meta([0] * 8))
    for i in range(8):
        for j in range(i + 1):
            assert plan.rel[0, i, j] == j - i + 7  # their w[j - i + N - 1]
    assert HSTULayer(_cfg()).rel_bias.pos_table.shape == (17,)  # grinfer's own: 2 * max_seq_len + 1


def test_layer_norm_without_affine_and_its_epsilon():
    norm = GroupLayerNorm(1, 2, eps=1e-6, affine=False)
    assert list(norm.parameters()) == []
    y = norm(torch.tensor([[3.0, 1.0]]), torch.zeros(1, dtype=torch.long))
    assert torch.allclose(y, torch.tensor([[1.0, -1.0]]) / math.sqrt(1 + 1e-6), atol=0, rtol=1e-7)
    layer = HSTULayer(_cfg(ln_affine=False))
    assert not any("norm" in name for name, _ in layer.named_parameters())


def test_attention_scale_alpha_one_versus_one_over_sqrt_d():
    q = k = torch.ones(1, 1, 2)
    v = torch.tensor([[[2.0, 0.0]]])
    for alpha, expected in ((1.0, 2.0), (None, math.sqrt(2.0))):  # q.k = 2; alpha None = 1/sqrt(2)
        layer = HSTULayer(_cfg(qk_dim=2, v_dim=2, num_heads=1, rel_bias=False,
                               attn_alpha=alpha))
        plan = layer.plan(_meta([0]), _meta([0]))
        out = layer.attend(q, k, v, plan)
        silu = expected / (1 + math.exp(-expected))
        assert torch.allclose(out, torch.tensor([[2.0 * silu / 8, 0.0]]))  # / N (max_seq_len 8)


def test_uvqk_without_bias_and_its_split_widths():
    layer = HSTULayer(_cfg(uvqk_bias=False, num_heads=2, qk_dim=3, v_dim=1))
    assert layer.uvqk.bias is None and layer.uvqk.weight.shape == (2 * 2 * (1 + 3), 8)
    u, v, q, k = layer.project(torch.randn(5, 8), torch.zeros(5, dtype=torch.long))
    assert u.shape == (5, 2) and v.shape == (5, 2, 1) and q.shape == k.shape == (5, 2, 3)
    assert layer.norm_attn.weight.shape == (1, 2) and layer.out.weight.shape == (8, 2)


@pytest.mark.parametrize("placement", ["before_out", "around_out"])
def test_dropout_placement(placement):
    layer = HSTULayer(_cfg(dropout=0.5, layer_dropout=placement)).train()
    with torch.no_grad():
        layer.out.weight.zero_()
        layer.out.bias.fill_(1.0)
    out = layer.finish(torch.zeros(256, 8), torch.ones(256, 8), torch.ones(256, 8), torch.zeros(256, dtype=torch.long))
    if placement == "before_out":
        assert torch.equal(out, torch.ones(256, 8))  # only W_o's input is dropped: its bias always comes through
    else:
        assert set(out.unique().tolist()) == {0.0, 2.0}  # W_o's output is dropped too (and rescaled)


def test_input_scaling_and_output_normalisations():
    cfg = _cfg(num_layers=1, rel_bias=False, output_norm="l2", norm_eps=1e-6)
    model = HSTURetrieval(cfg).eval()
    for p in model.layers.parameters():
        torch.nn.init.zeros_(p)  # each layer adds W_o's zero output: the encoder is the identity
    with torch.no_grad():
        model.item_emb.weight[1] = torch.eye(8)[0]
        model.pos_emb.weight.zero_()
        model.pos_emb.weight[0] = 2 * torch.eye(8)[1]
    batch = retrieval_batch([(np.array([1]), np.array([0]))], False)
    x = torch.tensor([math.sqrt(8), 2.0, 0, 0, 0, 0, 0, 0])  # item * sqrt(d) + position 0
    assert torch.allclose(model.encode(batch)[0], x / x.norm())
    model.cfg = cfg.replace(output_norm="layer_norm")
    assert torch.allclose(model.encode(batch)[0], (x - x.mean()) / (x.var(unbiased=False) + 1e-6).sqrt())
    with torch.no_grad():
        model.item_emb.weight[2] = 0.0
    assert torch.equal(model.item_table()[2], torch.zeros(8))  # eps keeps a zero row finite


# ---- the whole converted model -------------------------------------------------------------------------------
def _histories():
    rng = np.random.default_rng(1)
    out = []
    for length in (1, 4, 7):
        items = rng.integers(1, 10, size=length)
        ts = np.cumsum(rng.choice([0, 1, 30, 4000, 90_000, 3_000_000], size=length)) + 978_300_000
        out.append((items, ts, int(ts[-1] + rng.integers(1, 10**6))))
    return out


def test_converted_model_matches_their_forward():
    sd = gr_state_dict()
    model = convert_generative_recommenders(gr.read_state_dict_from(sd), SETTINGS, "gr")
    cfg = model.cfg
    assert (cfg.max_seq_len, cfg.num_time_buckets, cfg.rel_pos_reach, cfg.attn_alpha) == (8, 129, 7, 1.0)
    hist = _histories()
    batch = retrieval_batch([(items, ts) for items, ts, _ in hist], False)
    with torch.no_grad():
        ours = model.user_embedding(batch, torch.tensor([t for *_, t in hist])).double()
        table = model.item_table().double()
    for row, (items, ts, nxt) in enumerate(hist):
        theirs = gr_user_embedding(sd, 2, 3, 2, items.tolist(), ts.tolist(), nxt)
        assert torch.allclose(ours[row], theirs, atol=2e-6), (row, ours[row], theirs)
    assert torch.allclose(table, gr_item_table(sd), atol=1e-7)


def test_converted_model_without_relative_bias():
    sd = gr_state_dict(bias=False, ddp=False)
    model = convert_generative_recommenders(sd, SETTINGS, "gr")
    assert not model.cfg.rel_bias
    items, ts, nxt = _histories()[2]
    with torch.no_grad():
        ours = model.user_embedding(retrieval_batch([(items, ts)], False)).double()[0]
    assert torch.allclose(ours, gr_user_embedding(sd, 2, 3, 2, items.tolist(), ts.tolist(), nxt), atol=2e-6)


def test_round_trip_through_a_grinfer_checkpoint(tmp_path):
    sd = gr_state_dict()
    src = tmp_path / "ckpt_ep100"
    torch.save({"epoch": 100, "model_state_dict": sd, "optimizer_state_dict": {}}, src)
    out = import_checkpoint("generative-recommenders", src, tmp_path / "imported", overrides=SETTINGS)
    model = load_checkpoint(out)
    assert isinstance(model, HSTURetrieval) and model.cfg.name == "ckpt_ep100"
    back = gr.from_grinfer_state(model.state_dict(), model.cfg)
    theirs = gr.read_state_dict_from(sd)
    assert sorted(back) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(back[name], tensor), name
    again = convert_generative_recommenders(back, SETTINGS, "again")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_settings_come_from_their_gin_file(tmp_path):
    gin = tmp_path / "hstu.gin"
    gin.write_text('# comment\ntrain_fn.user_embedding_norm = "layer_norm"\ntrain_fn.temperature = 0.05\n'
                   "hstu_encoder.num_heads = 2\nhstu_encoder.dqk = 3\nhstu_encoder.dv = 2\n"
                   "hstu_encoder.linear_dropout_rate = 0.2\ntrain_fn.item_l2_norm = True\n")
    src = tmp_path / "ckpt"
    torch.save({"model_state_dict": gr_state_dict()}, src)
    cfg = load_checkpoint(import_checkpoint("generative-recommenders", src, tmp_path / "out", gin=gin)).cfg
    assert (cfg.num_heads, cfg.qk_dim, cfg.v_dim, cfg.output_norm, cfg.dropout) == (2, 3, 2, "layer_norm", 0.2)


def test_items_follow_a_catalogues_raw_ids(tmp_path):
    from grinfer.data import load_dataset

    spec = "synthetic:users=5,items=7,events=4,seed=0"
    raw = load_dataset(spec).catalog.raw_ids
    sd = gr_state_dict(num_items=int(raw.max()) + 2)
    src = tmp_path / "ckpt"
    torch.save(sd, src)
    out = import_checkpoint("generative-recommenders", src, tmp_path / "out", overrides=SETTINGS, data=spec)
    model = load_checkpoint(out)
    table = sd["module._embedding_module._item_emb.weight"]
    assert model.cfg.num_items == 7 and torch.equal(model.item_emb.weight[1:], table[raw[1:]])
    from grinfer.model.checkpoint import read_checkpoint_meta

    assert read_checkpoint_meta(out)["training"]["data"] == spec


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    (lambda sd: sd.update({"module._hstu._attention_layers.0._extra": torch.zeros(1)}),
     "unknown parameter '_hstu._attention_layers.0._extra'"),
    (lambda sd: sd.update({"module._output_postproc._layer_norm.weight": torch.zeros(8)}),
     "unknown parameter '_output_postproc._layer_norm.weight'"),
    (lambda sd: sd.pop("module." + LAYER.format(1) + "_o.bias"),
     "missing parameter '_hstu._attention_layers.1._o.bias'"),
    (lambda sd: sd.pop("module._input_features_preproc._pos_emb.weight"),
     "missing parameter '_input_features_preproc._pos_emb.weight'"),
    (lambda sd: sd.update({"module._attn_mask": torch.zeros(8, 8, dtype=torch.bool)}),
     "'_attn_mask' is not the causal"),
    (lambda sd: sd.update({"module." + LAYER.format(0) + "_uvqk": torch.zeros(8, 7)}),
     "parameter for 'layers.0.uvqk.weight' has shape [7, 8]"),
])
def test_bad_parameters_are_named(change, message):
    sd = gr_state_dict()
    change(sd)
    with pytest.raises(CheckpointImportError, match=message.replace("[", r"\[")):
        convert_generative_recommenders(gr.read_state_dict_from(sd), SETTINGS, "gr")


def test_missing_and_unsupported_settings_are_named(tmp_path):
    sd = gr.read_state_dict_from(gr_state_dict())
    with pytest.raises(CheckpointImportError, match=r"num_heads: not recorded .*hstu_encoder.num_heads.*--set"):
        convert_generative_recommenders(sd, {"qk_dim": 3, "v_dim": 2}, "gr")
    with pytest.raises(CheckpointImportError, match=r"hstu_encoder\.concat_ua = True is not supported"):
        gr.settings_from_gin({"hstu_encoder.concat_ua": True})
    with pytest.raises(CheckpointImportError, match=r"train_fn\.item_l2_norm = False is not supported"):
        gr.settings_from_gin({"train_fn.item_l2_norm": False})
    with pytest.raises(CheckpointImportError, match="setting num_heads"):
        convert_generative_recommenders(sd, {**SETTINGS, "num_heads": 0}, "gr")
    with pytest.raises(CheckpointImportError, match="SRC: no file"):
        import_checkpoint("generative-recommenders", tmp_path / "nope", tmp_path / "out", overrides=SETTINGS)
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointImportError, match="not a readable checkpoint"):
        import_checkpoint("generative-recommenders", tmp_path / "junk", tmp_path / "out", overrides=SETTINGS)
    with pytest.raises(CheckpointImportError, match="--format: unknown format 'onnx'"):
        import_checkpoint("onnx", tmp_path / "junk", tmp_path / "out")
