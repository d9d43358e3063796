"""Artifact -> standard ONNX (opset 18, default domain only) with its dynamic axes named and their ranges in
the model's metadata; checked by onnx.checker (full) and strict shape inference."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from grinfer.export.artifacts import Artifact
from grinfer.export.dims import dynamic_shapes
from grinfer.export.support import ExportError

OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")
PROTOBUF_LIMIT = 1 << 31  # bytes: larger models keep their weights in external data beside the file


def export_onnx(artifact: Artifact, ranges: dict, metadata: dict[str, str], path: Path) -> None:
    """Trace the artifact with torch.onnx (dynamo), add the metadata, check and save it at `path`."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" lines: nothing here uses it
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torch.onnx's axis-renaming chatter
        program = torch.onnx.export(
            artifact.module, artifact.args(artifact.example), dynamo=True, opset_version=OPSET, optimize=True,
            dynamic_shapes=dynamic_shapes(artifact, ranges), input_names=list(artifact.inputs),
            output_names=list(artifact.outputs), verbose=False)
    registry_log.setLevel(level)
    if program is None:
        raise ExportError(f"{artifact.part}: torch.onnx.export returned no program")
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    check_standard(proto)
    size = sum(t.numel() * t.element_size() for t in artifact.module.state_dict().values())
    onnx.save_model(proto, str(path), save_as_external_data=size >= PROTOBUF_LIMIT,
                    location=f"{path.name}.data")
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred.onnx")), check_type=True,
                                           strict_mode=True)
    path.with_suffix(".inferred.onnx").unlink()
    check_axes(onnx.load(str(path), load_external_data=False), artifact)


def check_standard(proto: onnx.ModelProto) -> None:
    """ExportError unless every node and opset import is in the default ONNX domain at opset >= 17."""
    domains = {n.domain for n in proto.graph.node} | {f.domain for f in proto.functions}
    custom = sorted(domains - set(STANDARD_DOMAINS))
    if custom:
        raise ExportError(f"the ONNX graph uses custom domains {custom}; TensorRT's parser takes standard ops only")
    for op in proto.opset_import:
        if op.domain in STANDARD_DOMAINS and op.version < 17:
            raise ExportError(f"the ONNX graph imports opset {op.version}; at least 17 is needed")


def check_axes(proto: onnx.ModelProto, artifact: Artifact) -> None:
    """ExportError unless every input and output dimension is the named axis or the fixed size intended."""
    for values, axes in ((proto.graph.input, artifact.inputs), (proto.graph.output, artifact.outputs)):
        for value in values:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            want = axes[value.name]
            if len(dims) != len(want) or any(a is not None and d != a for d, a in zip(dims, want)):
                raise ExportError(f"ONNX {value.name}: dimensions {dims}, expected {list(want)} (None: fixed)")
            if any(a is None and not isinstance(d, int) for d, a in zip(dims, want)):
                raise ExportError(f"ONNX {value.name}: dimensions {dims} has an unexpected dynamic axis")
