"""Export a checkpoint directory (ranking and/or retrieval) to ONNX or AOTInductor, verify, write goldens.

Each graph is traced on a small example, then run by its runtime (ONNX Runtime, or the loaded .pt2)
on ragged check batches of other sizes and compared with the eager model (fp32: 1e-5); the last check
batch and eager's outputs become the golden file beside it, which `verify` re-checks later.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grinfer.config import EngineConfig
from grinfer.export.artifacts import Artifact, Limits, artifacts
from grinfer.export.dims import used_axes
from grinfer.export.golden import TOLERANCE, Mismatch, golden_path, max_errors, read_golden, write_golden
from grinfer.export.runtime import ExportedModel
from grinfer.export.support import ExportError, check_exportable
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR

FORMATS = {"onnx": ".onnx", "aoti": ".pt2"}
DEFAULT_BLOCK_SIZE = EngineConfig.model_fields["block_size"].default


@dataclass
class Exported:
    """One written graph: where, what, how long it took, and its worst error against eager."""

    part: str
    path: Path
    golden: Path
    export_s: float
    verify_s: float
    max_error: dict[str, float]
    runtime: str


def load_exported(path: Path) -> ExportedModel:
    """An exported file in its runtime, by suffix (.onnx: ONNX Runtime, .pt2: AOTInductor)."""
    if path.suffix == ".onnx":
        from grinfer.export.onnx_runtime import OnnxModel

        return OnnxModel(path)
    if path.suffix == ".pt2":
        from grinfer.export.aoti_runtime import AotiModel

        return AotiModel(path)
    raise ExportError(f"{path}: expected an .onnx or .pt2 file")


def _writer(fmt: str):
    if fmt == "onnx":
        from grinfer.export.onnx_export import export_onnx

        return export_onnx
    from grinfer.export.aoti_export import export_aoti

    return export_aoti


def _load_models(model_dir: Path) -> list[MTGR | HSTURetrieval]:
    from grinfer import load
    from grinfer.train.run import checkpoint_dirs

    try:
        dirs = checkpoint_dirs(model_dir)
        models = [load(d).float() for d in dirs]  # exports are float32 graphs
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    return models


def _metadata(art: Artifact, model: MTGR | HSTURetrieval, ranges: dict, fmt: str) -> dict[str, str]:
    axes = used_axes(art)
    return {"grinfer.part": art.part, "grinfer.format": fmt, "grinfer.inputs": json.dumps(art.inputs),
            "grinfer.outputs": json.dumps(art.outputs), "grinfer.axes": json.dumps({a: ranges[a] for a in axes}),
            "grinfer.model": model.cfg.model_dump_json(), "grinfer.block_size": str(art.block_size or ""),
            "grinfer.tolerance": str(TOLERANCE)}


def export_checkpoint(model_dir: Path, out: Path, fmt: str, limits: Limits = Limits(),
                      block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True) -> list[Exported]:
    """Export every graph of the checkpoint(s) at `model_dir`: to `out` when there is one graph, else to
    OUT_STEM.PART.SUFFIX per graph (PART: ranking, retrieval, step). ExportError on anything that fails."""
    _check_format(fmt, out)
    return export_models(_load_models(model_dir), out, fmt, limits, block_size, progress)


def export_models(models: list[MTGR | HSTURetrieval], out: Path, fmt: str, limits: Limits = Limits(),
                  block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True,
                  parts: tuple[str, ...] | None = None) -> list[Exported]:
    """Export the graphs of in-memory float32 models (those in `parts`, default all) as `export_checkpoint`
    does; the engine's `aoti` backend exports only the step of the model it serves."""
    _check_format(fmt, out)
    for m in models:
        check_exportable(m)
    jobs = [(m, a) for m in models for a in artifacts(m, with_step=fmt == "aoti", block_size=block_size)
            if parts is None or a.part in parts]
    if not jobs:
        raise ExportError(f"parts: none of {parts} is a graph of these models")
    out.parent.mkdir(parents=True, exist_ok=True)
    write, done = _writer(fmt), []
    with tqdm(total=3 * len(jobs), desc=f"export {fmt}", unit="step", disable=not progress) as bar:
        for model, art in jobs:
            path = out if len(jobs) == 1 else out.with_name(f"{out.stem}.{art.part}{out.suffix}")
            ranges = limits.ranges(block_size, len(model.cfg.profile_cardinalities))
            bar.set_postfix_str(f"{art.part}: tracing" + (" and compiling" if fmt == "aoti" else ""))
            start = time.perf_counter()
            try:
                write(art, ranges, _metadata(art, model, ranges, fmt), path)
            except ExportError:
                raise
            except Exception as exc:  # a tracer's error, named with the graph it came from
                raise ExportError(f"{art.part}: {fmt} export failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
            export_s = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix_str(f"{art.part}: checking against eager")
            start = time.perf_counter()
            loaded = load_exported(path)
            errors: dict[str, float] = {}
            checks = art.checks()
            for inputs, expected in checks:
                try:
                    for name, err in max_errors(loaded.run(inputs), expected).items():
                        errors[name] = max(err, errors.get(name, 0.0))
                except Mismatch as exc:
                    sizes = {k: list(v.shape) for k, v in inputs.items()}
                    raise ExportError(f"{path}: {art.part} on a check batch {sizes}: {exc}") from None
            bar.update(1)
            golden = write_golden(golden_path(path), *checks[-1], {"part": art.part, "format": fmt,
                                                                   "tolerance": TOLERANCE})
            bar.update(1)
            done.append(Exported(art.part, path, golden, export_s, time.perf_counter() - start, errors,
                                 getattr(loaded, "provider", "aoti")))
    return done


def _check_format(fmt: str, out: Path) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.suffix != FORMATS[fmt]:
        raise ExportError(f"--out: a {fmt} export is a {FORMATS[fmt]} file, got {out}")


def verify(path: Path) -> dict[str, float]:
    """Re-run an exported file on its golden inputs; per-output max error, or Mismatch / ExportError."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    golden = golden_path(path)
    if not golden.is_file():
        raise ExportError(f"{path}: no golden file {golden.name} beside it")
    inputs, expected, meta = read_golden(golden)
    try:
        loaded = load_exported(path)
    except ExportError:
        raise
    except Exception as exc:  # a corrupt or foreign file: the runtime's own first line
        raise ExportError(f"{path}: cannot be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from None
    try:
        got = loaded.run({k: torch.from_numpy(v) for k, v in inputs.items()})
    except Exception as exc:
        raise Mismatch(f"{path}: fails on its golden inputs: {str(exc).splitlines()[0]}") from None
    try:
        return max_errors(got, expected, float(meta.get("tolerance", TOLERANCE)))
    except Mismatch as exc:
        raise Mismatch(f"{path}: {exc}") from None
