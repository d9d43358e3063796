"""Checkpoints (config.json + model.safetensors) and ModelConfig validation / presets."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import grinfer
from grinfer.config import PRESETS, ModelConfig, preset
from grinfer.features import retrieval_batch
from grinfer.model import build_model
from grinfer.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    read_checkpoint_meta,
    save_checkpoint,
)
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-initialised bias tables and LayerNorm biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def mtgr_model(mtgr_cfg) -> MTGR:
    torch.manual_seed(0)
    return randomized(build_model(mtgr_cfg.model_copy(update={"rel_bias": True}))).eval()


@pytest.fixture
def hstu_model() -> HSTURetrieval:
    torch.manual_seed(0)
    return randomized(build_model(preset("hstu-ml1m").with_vocab(num_items=50))).eval()


def edit_config(path, **changes) -> None:
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["model"].update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


# ---- round trips ------------------------------------------------------------------------------

def test_mtgr_round_trip_gives_identical_scores(tmp_path, mtgr_model, featurizer, make_request):
    path = save_checkpoint(mtgr_model, tmp_path / "ckpt")
    assert (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()
    loaded = grinfer.load(path)
    assert isinstance(loaded, MTGR)
    assert not loaded.training
    assert loaded.cfg == mtgr_model.cfg
    batch = featurizer.rank_batch([make_request(5, 2, 4, seed=1), make_request(0, 3, 2, seed=2)])
    with torch.no_grad():
        want, got = mtgr_model(batch), loaded(batch)
    assert torch.equal(got, want)
    for name, tensor in mtgr_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_hstu_round_trip_gives_identical_embeddings(tmp_path, hstu_model):
    path = save_checkpoint(hstu_model, tmp_path / "hstu")
    loaded = grinfer.load(str(path))  # str paths work too
    assert isinstance(loaded, HSTURetrieval)
    assert not loaded.training
    assert loaded.cfg == hstu_model.cfg
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, 51, size=n).astype(np.int64), np.arange(n, dtype=np.int64) * 100) for n in (6, 1, 9)]
    batch = retrieval_batch(seqs, with_targets=False)
    with torch.no_grad():
        assert torch.equal(loaded.user_embedding(batch), hstu_model.user_embedding(batch))
        assert torch.equal(loaded.item_table(), hstu_model.item_table())


def test_config_json_keeps_extra_metadata_and_round_trips_tuples(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path / "c", extra={"dataset": "synthetic", "epoch": 3})
    meta = read_checkpoint_meta(path)
    assert meta["dataset"] == "synthetic" and meta["epoch"] == 3
    cfg = ModelConfig.model_validate(meta["model"])
    assert cfg == mtgr_model.cfg
    assert isinstance(cfg.profile_cardinalities, tuple) and isinstance(cfg.tasks, tuple)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_file_mode_follows_the_umask_like_config_json(tmp_path, mtgr_model, umask):
    old = os.umask(umask)
    try:
        path = save_checkpoint(mtgr_model, tmp_path / "c")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((path / name).stat().st_mode)
    assert mode(WEIGHTS_FILE) == mode(CONFIG_FILE) == 0o666 & ~umask


def test_saving_twice_overwrites(tmp_path, mtgr_cfg):
    torch.manual_seed(0)
    first = build_model(mtgr_cfg)
    torch.manual_seed(1)
    second = build_model(mtgr_cfg)
    save_checkpoint(first, tmp_path)
    save_checkpoint(second, tmp_path)
    loaded = grinfer.load(tmp_path)
    assert torch.equal(loaded.item_emb.weight, second.item_emb.weight)
    assert not torch.equal(loaded.item_emb.weight, first.item_emb.weight)


def test_train_mode_model_loads_in_eval_mode(tmp_path, hstu_model):
    hstu_model.train()
    assert not grinfer.load(save_checkpoint(hstu_model, tmp_path)).training


# ---- config / weights mismatches ----------------------------------------------------------------

def test_changed_num_items_names_item_embedding(tmp_path, mtgr_model, mtgr_cfg):
    path = save_checkpoint(mtgr_model, tmp_path)
    edit_config(path, num_items=mtgr_cfg.num_items + 5)
    with pytest.raises(CheckpointError) as err:
        grinfer.load(path)
    msg = str(err.value)
    e = mtgr_cfg.item_emb_dim
    assert "'item_emb.weight'" in msg
    assert f"[{mtgr_cfg.num_items + 1}, {e}]" in msg  # shape in the file
    assert f"[{mtgr_cfg.num_items + 6}, {e}]" in msg  # shape the config implies
    assert f"num_items={mtgr_cfg.num_items + 5}" in msg


def test_changed_d_model_names_a_tensor_and_its_shapes(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path)
    edit_config(path, d_model=64)
    with pytest.raises(CheckpointError, match=r"tensor '[\w.]+' has shape \[\d+(, \d+)*\]") as err:
        grinfer.load(path)
    assert "d_model=64" in str(err.value)
    assert re.search(r"implies \[\d+(, \d+)*\]", str(err.value))


def test_hstu_changed_num_items_names_item_embedding(tmp_path, hstu_model):
    path = save_checkpoint(hstu_model, tmp_path)
    edit_config(path, num_items=60)
    with pytest.raises(CheckpointError, match=re.escape("'item_emb.weight' has shape [51, 50]")) as err:
        grinfer.load(path)
    assert "[61, 50]" in str(err.value)


def test_changed_num_layers_names_missing_tensors(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path)
    edit_config(path, num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers\.2\."):
        grinfer.load(path)


def test_fewer_layers_names_unexpected_tensors(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path)
    edit_config(path, num_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers\.1\."):
        grinfer.load(path)


def test_rel_bias_flag_mismatch_names_bias_tables(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path)  # saved with rel_bias=True
    edit_config(path, rel_bias=False)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \[.*rel_bias\.pos_table"):
        grinfer.load(path)


def test_missing_weights_file_is_named(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=re.escape(WEIGHTS_FILE)):
        grinfer.load(path)


def test_missing_config_file_is_named(tmp_path, mtgr_model):
    path = save_checkpoint(mtgr_model, tmp_path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=re.escape(CONFIG_FILE)):
        grinfer.load(path)


def test_nonexistent_directory(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(CONFIG_FILE)):
        grinfer.load(tmp_path / "does-not-exist")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---- ModelConfig validation and presets ---------------------------------------------------------

def test_d_model_must_divide_by_heads():
    with pytest.raises(ValidationError, match=r"d_model \(30\) must be divisible by num_heads \(4\)"):
        ModelConfig(d_model=30, num_heads=4)


def test_hstu_requires_causal_mask():
    with pytest.raises(ValidationError, match="mask"):
        ModelConfig(kind="hstu", mask="dynamic", tasks=())
    assert ModelConfig(kind="hstu", mask="causal", tasks=()).mask == "causal"


def test_mtgr_needs_a_task():
    with pytest.raises(ValidationError, match="tasks"):
        ModelConfig(kind="mtgr", tasks=())


@pytest.mark.parametrize(("field", "value"), [
    ("mask", "bidirectional"), ("normalizer", "total"), ("kind", "dlrm"), ("d_model", 4), ("num_layers", 0),
    ("dropout", 1.0), ("temperature", 0.0), ("num_time_buckets", 1),
])
def test_bad_field_values_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        ModelConfig(**{field: value})


def test_unknown_field_is_rejected_by_name():
    with pytest.raises(ValidationError, match="d_modle"):
        ModelConfig(d_modle=64)


def test_config_is_frozen():
    cfg = preset("mtgr-tiny")
    with pytest.raises(ValidationError):
        cfg.d_model = 64  # type: ignore[misc]


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="'nope'") as err:
        preset("nope")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize(("name", "layers", "d", "heads"), [
    ("mtgr-small", 3, 512, 2), ("mtgr-medium", 5, 768, 3), ("mtgr-large", 15, 768, 3), ("hstu-ml1m", 2, 50, 1),
])
def test_presets_follow_design(name, layers, d, heads):
    cfg = preset(name)
    assert (cfg.name, cfg.num_layers, cfg.d_model, cfg.num_heads) == (name, layers, d, heads)
    assert cfg.head_dim * cfg.num_heads == cfg.d_model


def test_hstu_preset_is_causal_retrieval():
    cfg = preset("hstu-ml1m")
    assert cfg.kind == "hstu" and cfg.mask == "causal"


def test_every_preset_validates_and_tiny_ones_build():
    for name, cfg in PRESETS.items():
        assert ModelConfig.model_validate(cfg.model_dump(mode="json")) == cfg, name
    assert isinstance(build_model(preset("mtgr-tiny")), MTGR)
    assert isinstance(build_model(preset("hstu-ml1m")), HSTURetrieval)


def test_with_vocab_returns_a_copy():
    base = preset("mtgr-tiny")
    cfg = base.with_vocab(num_items=123, profile_cardinalities=(2, 3))
    assert cfg.num_items == 123 and cfg.profile_cardinalities == (2, 3)
    assert base.num_items == 4000


def test_with_vocab_validates():
    with pytest.raises(ValueError):
        preset("mtgr-tiny").with_vocab(num_items=0)


def test_corrupt_or_incomplete_config_is_a_checkpoint_error(tmp_path, mtgr_cfg):
    from grinfer.model import build_model
    from grinfer.model.checkpoint import CheckpointError, save_checkpoint

    path = save_checkpoint(build_model(mtgr_cfg), tmp_path / "c")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        grinfer.load(path)
    (path / "config.json").write_text('{"training": {}}')
    with pytest.raises(CheckpointError, match="'model'"):
        grinfer.load(path)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(build_model(mtgr_cfg), tmp_path / "d", extra={"model": {}})
