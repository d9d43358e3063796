"""gr_model_onnx: the uncached ranking graph (`grinfer export onnx`) as an `onnxruntime_onnx` platform model,
for servers that have Triton's ONNX Runtime backend (the nvidia-pytriton wheel has none).

Its tensors are the exported graph's: the padded featurized batch (grinfer.export.inputs.ranking_inputs)
in, per-task probabilities [B, Lc, T] out; config.pbtxt is written from the graph's own inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from grinfer.export.artifacts import Limits
from grinfer.export.export import export_checkpoint
from grinfer.triton_repo.pbtxt import Tensor, model_config

ONNX_MODEL = "gr_model_onnx"
ONNX_TYPES = {onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.FLOAT: "FP32",
              onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.FLOAT16: "FP16"}


def graph_tensors(values) -> list[Tensor]:
    """Triton tensors of an ONNX graph's inputs or outputs (a named, dynamic axis is -1)."""
    out = []
    for value in values:
        kind = value.type.tensor_type
        dims = tuple(-1 if d.dim_param or not d.dim_value else d.dim_value for d in kind.shape.dim)
        out.append(Tensor(value.name, ONNX_TYPES[kind.elem_type], dims))
    return out


def write_onnx_model(ranking_dir: Path, out: Path, limits: Limits, progress: bool) -> str:
    """Export the ranking checkpoint to out/gr_model_onnx/1/model.onnx (checked against eager, a golden
    file beside it) and write its config.pbtxt; returns the model's name."""
    version = out / ONNX_MODEL / "1"
    version.mkdir(parents=True)
    path = version / "model.onnx"
    export_checkpoint(ranking_dir, path, "onnx", limits, progress=progress)
    graph = onnx.load(str(path), load_external_data=False).graph
    (out / ONNX_MODEL / "config.pbtxt").write_text(model_config(
        ONNX_MODEL, graph_tensors(graph.input), graph_tensors(graph.output), platform="onnxruntime_onnx",
        instances=1))
    return ONNX_MODEL
