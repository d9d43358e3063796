"""Artifact -> torch.export -> AOTInductor package (.pt2), with the grinfer metadata inside the package."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from grinfer.export.artifacts import Artifact
from grinfer.export.dims import dynamic_shapes


def export_aoti(artifact: Artifact, ranges: dict, metadata: dict[str, str], path: Path) -> None:
    """torch.export the artifact with its dynamic axes and compile it into the package at `path`."""
    program = torch.export.export(artifact.module, artifact.args(artifact.example),
                                  dynamic_shapes=dynamic_shapes(artifact, ranges), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree's LeafSpec deprecation, inside torch
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"aot_inductor.metadata": metadata})
