"""`grinfer export onnx` of a small MTGR and HSTU: standard, checked ONNX that ONNX Runtime runs as eager does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from export_util import ONNX_MAX_BATCH, ONNX_MAX_CANDIDATES, run_cli
from onnx import numpy_helper

from grinfer import load
from grinfer.export.artifacts import RANK_CHECKS, RANK_EXAMPLE, RETRIEVAL_CHECKS, RETRIEVAL_EXAMPLE
from grinfer.export.golden import golden_path
from grinfer.export.onnx_runtime import PROVIDER_ORDER, OnnxModel, choose_providers
from grinfer.export.samples import random_catalog, ranking_batch, retrieval_sample

# ragged batches at sizes neither the export's example nor its own checks used
RANK_UNSEEN = [[(11, 3, 7), (0, 0, 1), (2, 6, 13), (5, 0, 2), (0, 4, 5), (8, 8, 8)], [(15, 1, 3), (3, 2, 2)]]
RETRIEVAL_UNSEEN = [[13, 2, 30, 8, 1, 4], [22, 11]]
DATA_DEPENDENT_OPS = {"If", "Loop", "Scan", "NonZero", "Unique", "SequenceConstruct"}


def test_unseen_sizes_are_unseen():
    seen = [RANK_EXAMPLE, *RANK_CHECKS]
    assert all(sizes not in seen for sizes in RANK_UNSEEN)
    assert all(lengths not in [RETRIEVAL_EXAMPLE, *RETRIEVAL_CHECKS] for lengths in RETRIEVAL_UNSEEN)


@pytest.mark.parametrize("part", ["ranking", "retrieval"])
def test_graphs_are_standard_onnx_with_named_dynamic_axes(onnx_exports, part):
    path = onnx_exports[part]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}
    assert min(op.version for op in proto.opset_import) >= 17
    assert {n.domain for n in proto.graph.node} == {""} and not proto.functions
    assert not DATA_DEPENDENT_OPS & {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    axes, inputs = json.loads(meta["grinfer.axes"]), json.loads(meta["grinfer.inputs"])
    assert meta["grinfer.part"] == part and "batch" in axes
    assert all(1 <= r["min"] <= r["opt"] <= r["max"] for r in axes.values())
    assert axes["batch"]["max"] == ONNX_MAX_BATCH
    assert part == "retrieval" or axes["candidates"]["max"] == ONNX_MAX_CANDIDATES
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert [a for a in inputs[value.name] if a] == [d for d in dims if isinstance(d, str)], value.name
        assert {d for d in dims if isinstance(d, str)} <= set(axes)


def test_onnx_runtime_ranking_equals_eager_on_unseen_ragged_batches(model_dir, onnx_exports):
    model = load(model_dir / "ranking")
    session = OnnxModel(onnx_exports["ranking"])
    assert session.provider == choose_providers()[0] == "CPUExecutionProvider"
    catalog = random_catalog(model.cfg, seed=5)
    for i, sizes in enumerate(RANK_UNSEEN):
        batch = ranking_batch(model.cfg, catalog, sizes, seed=10 + i)
        with torch.no_grad():
            expected = torch.sigmoid(model(batch))
        got = session.rank(batch)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_onnx_runtime_retrieval_equals_eager_on_unseen_ragged_batches(model_dir, onnx_exports):
    model = load(model_dir / "retrieval")
    session = OnnxModel(onnx_exports["retrieval"])
    for i, lengths in enumerate(RETRIEVAL_UNSEEN):
        batch = retrieval_sample(model.cfg, lengths, seed=20 + i)
        with torch.no_grad():
            user = model.user_embedding(batch)
            scores = user @ model.item_table().T
        got_user, got_scores = session.retrieve(batch)
        torch.testing.assert_close(got_user, user, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_scores, scores, atol=1e-5, rtol=0)


def test_providers_are_taken_tensorrt_then_cuda_then_cpu():
    offered = ["CPUExecutionProvider", "AzureExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(offered) == list(PROVIDER_ORDER)
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def _copy(path, tmp_path):
    """The export and its golden file copied into tmp_path (the session's files stay intact)."""
    dest = tmp_path / path.name
    shutil.copy(path, dest)
    shutil.copy(golden_path(path), golden_path(dest))
    return dest


def test_verify_passes_on_the_export(onnx_exports):
    for path in onnx_exports.values():
        code, output = run_cli("export", "verify", str(path))
        assert code == 0, output
        assert "ok" in output


def test_verify_fails_in_one_line_on_a_tampered_golden_file(onnx_exports, tmp_path):
    path = _copy(onnx_exports["ranking"], tmp_path)
    with np.load(golden_path(path)) as data:
        arrays = dict(data)
    arrays["output.probabilities"][0, 0, 0] += 1e-3
    np.savez(golden_path(path), **arrays)
    code, output = run_cli("export", "verify", str(path))
    assert code == 1
    assert output.strip().count("\n") == 0 and "probabilities" in output and "differs" in output


def test_verify_fails_on_a_tampered_graph(onnx_exports, tmp_path):
    path = _copy(onnx_exports["ranking"], tmp_path)
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and
                  "head" in t.name.lower())
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.05, weight.name))
    onnx.save(proto, str(path))
    code, output = run_cli("export", "verify", str(path))
    assert code == 1 and "differs" in output, output


def test_verify_without_a_golden_file_is_a_usage_error(onnx_exports, tmp_path):
    path = tmp_path / "lonely.onnx"
    shutil.copy(onnx_exports["retrieval"], path)
    code, output = run_cli("export", "verify", str(path))
    assert code == 2 and "golden" in output
    code, output = run_cli("export", "verify", str(tmp_path / "missing.onnx"))
    assert code == 2 and "no such file" in output
