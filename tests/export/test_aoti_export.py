"""`grinfer export aoti`: the uncached forward and the cached step, reloaded from their packages, == eager."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from export_util import STEP_BLOCK_SIZE, run_cli

from grinfer import load
from grinfer.export.aoti_runtime import AotiModel, write_new_kv
from grinfer.export.golden import golden_path
from grinfer.export.samples import random_catalog, ranking_batch
from grinfer.export.step_sample import step_sample

UNSEEN = [(9, 4, 6), (0, 2, 3), (3, 0, 10), (6, 6, 1)]  # (S, R, candidates): contexts of 17, 6, 7, 16 tokens


def test_uncached_package_equals_eager_on_unseen_ragged_batches(model_dir, aoti_exports):
    model = load(model_dir / "ranking")
    package = AotiModel(aoti_exports["ranking"])
    assert package.part == "ranking"
    batch = ranking_batch(model.cfg, random_catalog(model.cfg, seed=7), UNSEEN, seed=7)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch))
    torch.testing.assert_close(package.rank(batch), expected, atol=1e-5, rtol=0)


def test_cached_step_package_equals_eager_cold_partial_and_warm(model_dir, aoti_exports):
    model = load(model_dir / "ranking")
    step = AotiModel(aoti_exports["step"])
    assert step.part == "step" and step.metadata["grinfer.block_size"] == str(STEP_BLOCK_SIZE)
    batch = ranking_batch(model.cfg, random_catalog(model.cfg, seed=8), UNSEEN, seed=8)
    inputs, expected = step_sample(model, batch, [0, 6, 3, 15], STEP_BLOCK_SIZE, seed=8)  # cold, warm, partial
    out = step.run(inputs)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, atol=1e-5, rtol=0, msg=name)

    # the step's new K/V written into the pool; a warm step (only candidates) then reads all of it
    write_new_kv(inputs["k_pool"], inputs["v_pool"], out, inputs, STEP_BLOCK_SIZE)
    warm = {**inputs, "ctx_start": inputs["ctx_end"].clone(), "x_new": inputs["x_new"][:, :1] * 0}
    torch.testing.assert_close(step.run(warm)["probabilities"], expected["probabilities"], atol=1e-5, rtol=0)


def test_verify_checks_packages_too(aoti_exports, tmp_path):
    for path in aoti_exports.values():
        code, output = run_cli("export", "verify", str(path))
        assert code == 0, output
    path = tmp_path / aoti_exports["step"].name
    shutil.copy(aoti_exports["step"], path)
    with np.load(golden_path(aoti_exports["step"])) as data:
        arrays = dict(data)
    arrays["output.k_new"] = arrays["output.k_new"] * 1.01
    np.savez(golden_path(path), **arrays)
    code, output = run_cli("export", "verify", str(path))
    assert code == 1 and "k_new" in output, output
