"""Exports kept across starts: the cached step's AOTInductor package of a model, made on first use.

A package lives at ROOT/<model fingerprint>-<settings hash>/step.pt2, the settings being the page size,
the axis limits and the torch version (a package is compiled C++ for one torch build). It is written
under a temporary name and renamed into place once exported and checked against eager, so a start that
dies mid-export leaves nothing a later start would load.

Exporting takes about a minute of compiling on 2 idle CPU cores (several on a loaded machine), so
`--backend auto` does not wait for it: `step_package_in_background` starts the export on a low-priority
thread and the package serves from the next start on.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from grinfer.export.artifacts import Limits
from grinfer.model.mtgr import MTGR

log = logging.getLogger("grinfer.export")
_exports: dict[Path, threading.Thread] = {}  # background exports of this process, by package path


def package_path(model: MTGR, block_size: int, root: Path, limits: Limits = Limits()) -> Path:
    """Where `model`'s cached-step package for pages of `block_size` tokens lives under `root`."""
    from grinfer.engine.core import model_fingerprint

    settings = f"{block_size}|{sorted(asdict(limits).items())}|{torch.__version__}"
    return root / f"{model_fingerprint(model, torch.float32)}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}" \
        / "step.pt2"


def step_package(model: MTGR, block_size: int, root: Path, limits: Limits = Limits()) -> Path:
    """The path of `model`'s cached-step package under `root`, exported (and checked against eager) only when
    no earlier start left it there."""
    model = _float32(model)
    path = package_path(model, block_size, root, limits)
    if not path.is_file():
        _export(model, block_size, path, limits)
    return path


def step_package_in_background(model: MTGR, block_size: int, root: Path, limits: Limits = Limits()) -> Path | None:
    """The package's path if it exists; otherwise None, with its export started (once per process) on a
    daemon thread at the lowest CPU priority, for the next start."""
    model = _float32(model)
    path = package_path(model, block_size, root, limits)
    if path.is_file():
        return path
    if path not in _exports or not _exports[path].is_alive():
        snapshot = copy.deepcopy(model)  # the engine may move or convert the served model meanwhile
        thread = threading.Thread(target=_export_niced, args=(snapshot, block_size, path, limits), daemon=True,
                                  name="grinfer-aoti-export")
        _exports[path] = thread
        thread.start()
    return None


def _float32(model: MTGR) -> MTGR:
    """The model as float32 (a copy if it is not): packages are float32 graphs."""
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def _export_niced(model: MTGR, block_size: int, path: Path, limits: Limits) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread (and the compiler)
    except (AttributeError, OSError):
        pass
    try:
        _export(model, block_size, path, limits)
    except Exception:  # the server keeps serving without it; the next start tries again
        log.exception("background export of the cached step failed (%s)", path)


def _export(model: MTGR, block_size: int, path: Path, limits: Limits) -> None:
    from grinfer.export.export import export_models

    root = path.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.parent.name}-", dir=root))
    try:
        log.info("exporting the cached step to AOTInductor (%s); later starts reuse it", path)
        export_models([model], staging / path.name, "aoti", limits, block_size, progress=False, parts=("step",))
        try:
            os.replace(staging, path.parent)
        except OSError:  # another process got there first: keep its package
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
