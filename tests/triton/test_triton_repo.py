"""The repository writer and the request rules of its Python models, without a server (the .venv alone)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.serving.service import RecommenderService, ServiceSettings
from grinfer.storage.base import Event, UserRecord
from grinfer.triton_repo.catalog_file import load_catalog, save_catalog
from grinfer.triton_repo.requests import BadInput, IdLookup, preprocess
from grinfer.triton_repo.writer import GR_MODEL, MODULES, RepoSettings, configs, write_repository

CARDINALITIES = [3, 8, 22, 101]


def raw_tensors(items, stamps, actions, num_static, candidates=(5, 6), profile=(1, 2)) -> dict:
    return {"USER_ID": np.array([b"u-1"], np.object_), "PROFILE": np.array(profile),
            "EVENT_ITEMS": np.array(items), "EVENT_TIMESTAMPS": np.array(stamps), "EVENT_ACTIONS": np.array(actions),
            "CANDIDATE_ITEMS": np.array(candidates),
            "NUM_STATIC": None if num_static is None else np.array([num_static])}


def test_preprocess_windows_the_context_as_the_service_does():
    rng = np.random.default_rng(0)
    static = [Event(int(i), 1000 + t, int(a)) for t, (i, a) in enumerate(zip(rng.integers(1, 40, 9),
                                                                              rng.integers(1, 6, 9)))]
    realtime = [Event(int(i), 2000 + t, 3) for t, i in enumerate(rng.integers(1, 40, 7))]
    record = UserRecord("u-1", [1, 2], history_version=3, static=static, realtime=realtime)
    settings = ServiceSettings(max_static=5, max_realtime=4)
    # the service's own windowing (it needs nothing of the service but these two attributes)
    want = RecommenderService.context(SimpleNamespace(settings=settings, num_profile=len(CARDINALITIES)), record)
    events = static + realtime
    got = preprocess(raw_tensors([e.item for e in events], [e.ts for e in events], [e.action for e in events],
                                 len(static)), CARDINALITIES, settings.max_static, settings.max_realtime, now=5000)
    assert got.num_static == want.num_static == 5
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.timestamps, want.timestamps)
    np.testing.assert_array_equal(got.actions, want.ratings)
    np.testing.assert_array_equal(got.profile, want.profile)
    assert (got.user, got.history_version, got.request_ts, got.top_k) == ("u-1", 0, 5000, 2)


def test_preprocess_defaults_and_errors():
    ctx = preprocess(raw_tensors([1, 2, 3], [10, 20, 30], [4, 5, 1], None), CARDINALITIES, 1000, 100, now=99)
    assert ctx.num_static == 3 and ctx.request_ts == 99 and len(ctx.profile) == 4
    cases = [
        ({"num_static": 4}, "NUM_STATIC: 4 is outside [0, 3]"),
        ({"actions": [4, 0, 1]}, "EVENT_ACTIONS[1]: 0 is outside [1, 5]"),
        ({"stamps": [10, 20]}, "EVENT_TIMESTAMPS, EVENT_ACTIONS: 2 and 3 values for 3 EVENT_ITEMS"),
        ({"profile": (1, 2, 3, 4, 5)}, "PROFILE: 5 values; the model has 4 profile fields"),
        ({"profile": (3,)}, "PROFILE[0]: 3 is outside [0, 2]"),
        ({"candidates": ()}, "CANDIDATE_ITEMS: 0 candidates"),
    ]
    base = {"items": [1, 2, 3], "stamps": [10, 20, 30], "actions": [4, 5, 1], "num_static": None}
    for change, message in cases:
        with pytest.raises(BadInput, match=re.escape(message)):
            preprocess(raw_tensors(**{**base, **change}), CARDINALITIES, 1000, 100, now=0)
    tensors = raw_tensors(**base)
    tensors["USER_ID"] = np.array([b"no spaces please"], np.object_)
    with pytest.raises(BadInput, match="USER_ID: user id must be"):
        preprocess(tensors, CARDINALITIES, 1000, 100, now=0)
    del tensors["USER_ID"]
    with pytest.raises(BadInput, match="USER_ID: missing"):
        preprocess(tensors, CARDINALITIES, 1000, 100, now=0)


def test_id_lookup_maps_catalogue_ids_to_rows(catalog):
    lookup = IdLookup(catalog)
    rows = np.array([3, 1, 40, 17])
    np.testing.assert_array_equal(lookup.rows("CANDIDATE_ITEMS", catalog.raw_ids[rows], unique=True), rows)
    with pytest.raises(BadInput, match=r"EVENT_ITEMS\[1\]: item 5 is not in the catalogue"):
        lookup.rows("EVENT_ITEMS", np.array([7, 5]))
    with pytest.raises(BadInput, match=r"CANDIDATE_ITEMS\[2\]: item 14 is already candidate 0"):
        lookup.rows("CANDIDATE_ITEMS", np.array([14, 7, 14]), unique=True)


def test_catalogue_file_round_trip(catalog, tmp_path):
    save_catalog(catalog, tmp_path / "catalog.npz")
    back = load_catalog(tmp_path / "catalog.npz")
    for name in ("genres", "year_bucket", "raw_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(catalog, name))
    assert back.titles == catalog.titles and back.genre_names == catalog.genre_names


def test_repository_layout(served_checkpoint, tmp_path):
    from model_util import SERVED_SPEC

    from grinfer.data import load_dataset

    out = tmp_path / "repo"
    names = write_repository(served_checkpoint, load_dataset(SERVED_SPEC).catalog, out)
    assert sorted(names) == sorted(p.name for p in out.iterdir())
    for name in names:
        text = (out / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in text and (out / name / "1").is_dir()
        assert str(tmp_path) not in text  # paths are parameters relative to the version folder
        assert (out / name / "1" / "model.py").is_file() == (name in MODULES)
    gr = (out / "gr_model" / "config.pbtxt").read_text()
    assert 'key: "checkpoint" value: { string_value: "checkpoint" }' in gr
    assert "instance_group [ { kind: KIND_CPU count: 1 } ]" in gr and "dynamic_batching" in gr
    assert (out / "gr_model" / "1" / "checkpoint" / "config.json").is_file()
    assert (out / "embedding_service" / "1" / "catalog.npz").is_file()
    assert 'platform: "ensemble"' in (out / "ensemble_model" / "config.pbtxt").read_text()
    with pytest.raises(FileExistsError, match="is not empty"):
        write_repository(served_checkpoint, load_dataset(SERVED_SPEC).catalog, out)


def test_gpu_repository_pins_gr_model_to_one_gpu(mtgr_cfg):
    text = configs(mtgr_cfg, RepoSettings(gpu=1, backend="fused"))[GR_MODEL]
    assert "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 1 ] } ]" in text
    assert 'key: "backend" value: { string_value: "fused" }' in text


@pytest.mark.parametrize("flags, message", [
    (["--task-weights", "[1, 2]"], "--task-weights: expected a JSON object of task -> number"),
    (["--task-weights", '{"ctr": "high"}'], "--task-weights: expected a JSON object of task -> number"),
    (["--task-weights", '{"clicks": 1}'], "--task-weights: unknown task(s) ['clicks']"),
    (["--device", "gpu"], "--device: expected cpu or cuda:N"),
    (["--backend", "tensorrt"], "--backend: expected eager, compiled or fused"),
])
def test_export_command_errors_are_one_line(served_checkpoint, tmp_path, flags, message):
    result = CliRunner().invoke(app, ["export", "triton-repo", "--model", str(served_checkpoint), "--out",
                                      str(tmp_path / "r"), *flags])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert not (tmp_path / "r").exists()


def test_onnx_model_config_is_the_graphs_and_it_ranks_as_grinfer(served_checkpoint, tmp_path):
    """--onnx: gr_model_onnx's config names the graph's tensors; on a request featurized from the raw tensors
    the graph gives the uncached model's probabilities (no server here has the ONNX Runtime backend)."""
    import onnxruntime as ort
    import torch
    from model_util import SERVED_SPEC

    from grinfer.data import load_dataset
    from grinfer.export.inputs import ranking_inputs
    from grinfer.features.featurizer import FeatureRequest, Featurizer, UserContext
    from grinfer.model.checkpoint import load_checkpoint

    ds = load_dataset(SERVED_SPEC)
    out = tmp_path / "repo"
    assert "gr_model_onnx" in write_repository(served_checkpoint, ds.catalog, out, RepoSettings(onnx=True))
    config = (out / "gr_model_onnx" / "config.pbtxt").read_text()
    session = ort.InferenceSession(str(out / "gr_model_onnx" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for value in [*session.get_inputs(), *session.get_outputs()]:
        assert f'name: "{value.name}"' in config
    assert 'platform: "onnxruntime_onnx"' in config

    user, raw = ds.users[0], ds.catalog.raw_ids
    ctx = preprocess(raw_tensors(raw[user.items], user.timestamps, user.ratings, len(user.items) - 3,
                                 candidates=raw[[5, 9, 2, 30]], profile=user.profile), list(ds.profile_cardinalities),
                     1000, 100, now=int(user.timestamps[-1]) + 60)
    lookup = IdLookup(ds.catalog)
    context = UserContext(ctx.profile, lookup.rows("EVENT_ITEMS", ctx.items), ctx.timestamps, ctx.actions,
                          ctx.num_static)
    model = load_checkpoint(served_checkpoint)
    batch = Featurizer(ds.catalog, model.cfg.num_time_buckets).rank_batch(
        [FeatureRequest(context, lookup.rows("CANDIDATE_ITEMS", ctx.candidates), ctx.request_ts)])
    feed = {k: v.numpy() for k, v in ranking_inputs(batch).items()}
    (probs,) = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    with torch.no_grad():
        want = torch.sigmoid(model(batch)).numpy()
    np.testing.assert_allclose(probs[0], want, rtol=0, atol=1e-5)
