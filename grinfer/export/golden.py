"""Golden files: one check batch's inputs and eager's outputs beside an exported graph, re-checked later."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from grinfer.export.support import ExportError

TOLERANCE = 1e-5  # fp32: |exported - eager| <= TOLERANCE * max(1, |eager|)


class Mismatch(ExportError):
    """An exported graph's output differs from the expected one beyond the tolerance."""


def golden_path(artifact: Path) -> Path:
    """model.onnx -> model.golden.npz (beside it)."""
    return artifact.with_suffix(".golden.npz")


def write_golden(path: Path, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], meta: dict) -> Path:
    """Inputs as `input.NAME`, expected outputs as `output.NAME`, `meta` as JSON."""
    arrays = {f"input.{k}": v.detach().cpu().numpy() for k, v in inputs.items()}
    arrays.update({f"output.{k}": v.detach().cpu().numpy() for k, v in outputs.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)  # pyright: ignore[reportArgumentType]
    return path


def read_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(inputs, expected outputs, meta) of a golden file; ExportError naming the file if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a golden file ({exc})") from None
    if "meta" not in arrays:
        raise ExportError(f"{path}: not a golden file (no meta entry)")
    pick = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return pick("input."), pick("output."), json.loads(str(arrays["meta"]))


def max_errors(got: dict, expected: dict, tolerance: float = TOLERANCE) -> dict[str, float]:
    """Per output, max |got - expected| / max(1, |expected|); Mismatch naming the first output past the tolerance
    (or of another shape, or missing)."""
    errors = {}
    for name, want in expected.items():
        want = np.asarray(want, np.float64)
        if name not in got:
            raise Mismatch(f"output {name}: missing")
        have = np.asarray(got[name].detach().cpu() if isinstance(got[name], torch.Tensor) else got[name], np.float64)
        if have.shape != want.shape:
            raise Mismatch(f"output {name}: shape {list(have.shape)}, expected {list(want.shape)}")
        err = float((np.abs(have - want) / np.maximum(1.0, np.abs(want))).max(initial=0.0))
        if not err <= tolerance:  # NaN fails too
            raise Mismatch(f"output {name}: differs from the expected values by {err:.3g} (tolerance {tolerance:g})")
        errors[name] = err
    return errors
