"""Named axes -> torch.export dynamic shapes (one Dim per name, shared by every tensor that has it)."""

from __future__ import annotations

from torch.export import Dim

from grinfer.export.artifacts import Artifact


def used_axes(artifact: Artifact) -> list[str]:
    """The artifact's axis names, in order of first use."""
    names = [a for axes in (*artifact.inputs.values(), *artifact.outputs.values()) for a in axes if a]
    return list(dict.fromkeys(names))


def dynamic_shapes(artifact: Artifact, ranges: dict[str, dict[str, int]]) -> tuple[dict, ...]:
    """Per input (in order), {dim: Dim} for its named axes."""
    dims = {name: Dim(name, min=ranges[name]["min"], max=ranges[name]["max"]) for name in used_axes(artifact)}
    return tuple({i: dims[a] for i, a in enumerate(axes) if a} for axes in artifact.inputs.values())
