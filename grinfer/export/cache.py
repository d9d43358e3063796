"""Exports kept across starts: the cached step's AOTInductor package of a model, made on first use.

A package lives at ROOT/<model fingerprint>-<settings hash>/step.pt2, the settings being the page size,
the axis limits and the torch version (a package is compiled C++ for one torch build). It is written
under a temporary name and renamed into place once exported and checked against eager, so a start that
dies mid-export leaves nothing a later start would load.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from grinfer.export.artifacts import Limits
from grinfer.model.mtgr import MTGR

log = logging.getLogger("grinfer.export")


def step_package(model: MTGR, block_size: int, root: Path, limits: Limits = Limits()) -> Path:
    """The path of `model`'s cached-step package for pages of `block_size` tokens under `root`, exported
    (about a minute of compiling on 2 CPU cores) only when no earlier start left it there."""
    from grinfer.engine.core import model_fingerprint

    if next(model.parameters()).dtype != torch.float32:  # the package is a float32 graph
        model = copy.deepcopy(model).float()
    settings = f"{block_size}|{sorted(asdict(limits).items())}|{torch.__version__}"
    key = f"{model_fingerprint(model, torch.float32)}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"
    path = root / key / "step.pt2"
    if path.is_file():
        return path
    from grinfer.export.export import export_models

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        log.info("exporting the cached step to AOTInductor (%s); later starts reuse it", path)
        export_models([model], staging / "step.pt2", "aoti", limits, block_size, progress=False,
                      parts=("step",))
        try:
            os.replace(staging, path.parent)
        except OSError:  # another process got there first: keep its package
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
