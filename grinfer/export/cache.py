"""Exports kept across starts: the cached step's AOTInductor package of a model, made on first use.

A package lives at ROOT/<model fingerprint>-<settings hash>/step.pt2, the settings being the page size,
the axis limits and the torch version (a package is compiled C++ for one torch build). It is written
under a temporary name and renamed into place once exported and checked against eager, so a start that
dies mid-export leaves nothing a later start would load.

Exporting takes about a minute of compiling on 2 idle CPU cores (several on a loaded machine), so
`--backend auto` does not wait for it: `step_package_in_background` starts the export in a low-priority
child process and the package serves from the next start on.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from grinfer.export.artifacts import Limits
from grinfer.model.mtgr import MTGR

log = logging.getLogger("grinfer.export")
_exports: dict[Path, subprocess.Popen] = {}  # background exports started by this process, by package path


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


def step_package_in_background(model: MTGR, model_dir: Path, block_size: int, root: Path) -> Path | None:
    """The package's path if it exists; otherwise None, with its export started (once per process) in a
    child process at the lowest CPU priority, from the checkpoint at `model_dir` (the weights `model` was
    loaded from), for the next start. A process of its own: torch.export and torch.compile must not trace
    in two threads of one process at once (Dynamo's tracer state is global)."""
    path = package_path(_float32(model), block_size, root)
    if path.is_file():
        return path
    if path not in _exports or _exports[path].poll() is not None:
        log.info("exporting the cached step to AOTInductor in the background (%s), for the next start", path)
        _exports[path] = subprocess.Popen(
            [sys.executable, "-m", "grinfer.export.cache", str(model_dir), str(block_size), str(root), str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=lambda: os.nice(19))
    return None


def _float32(model: MTGR) -> MTGR:
    """The model as float32 (a copy if it is not): packages are float32 graphs."""
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def _export(model: MTGR, block_size: int, path: Path, limits: Limits) -> None:
    from grinfer.export.export import export_models

    root = path.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.parent.name}-", dir=root))
    staging.chmod(0o755)  # mkdtemp's 0700 would stay on the renamed package directory
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


def main(argv: list[str]) -> None:
    """`python -m grinfer.export.cache MODEL_DIR BLOCK_SIZE ROOT EXPECTED`: the background export's process."""
    from grinfer import load

    model_dir, block_size, root, expected = Path(argv[0]), int(argv[1]), Path(argv[2]), Path(argv[3])
    model = load(model_dir).float()
    if not isinstance(model, MTGR):
        raise SystemExit(f"{model_dir}: a {model.cfg.kind} model; the cached step is MTGR's")
    path = step_package(model, block_size, root)
    if path != expected:
        raise SystemExit(f"{model_dir}: exported {path}, but the server asked for {expected} (other weights?)")


if __name__ == "__main__":
    main(sys.argv[1:])
