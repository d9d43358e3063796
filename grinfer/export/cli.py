"""`grinfer export onnx | aoti | verify`: wiring only (the work is in grinfer.export.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from grinfer.config import EngineConfig

BLOCK_SIZE = EngineConfig.model_fields["block_size"].default
ModelOpt = Annotated[Path, typer.Option(help="Checkpoint directory (ranking, retrieval, or ranking/ + retrieval/).")]
MaxBatch = Annotated[int, typer.Option(min=1, help="Largest batch the graph accepts (its batch axis's range).")]
MaxCandidates = Annotated[int, typer.Option(min=1, help="Most candidates per request the graph accepts.")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _export(model: Path, out: Path, fmt: str, max_batch: int, max_candidates: int, block_size: int,
            progress: bool) -> None:
    from grinfer.export.artifacts import Limits
    from grinfer.export.export import export_checkpoint
    from grinfer.export.support import ExportError

    try:
        done = export_checkpoint(model, out, fmt, Limits(batch=max_batch, candidates=max_candidates), block_size,
                                 progress)
    except ExportError as exc:
        raise _fail(str(exc)) from None
    for e in done:
        worst = max(e.max_error.values())
        typer.echo(f"wrote {e.path} ({e.part}; exported in {e.export_s:.1f} s; {e.runtime} vs eager on ragged "
                   f"batches: max error {worst:.2g}; golden {e.golden.name})")


def onnx_command(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="The .onnx file (with ranking and retrieval: OUT_STEM.PART.onnx).")],
    max_batch: MaxBatch = 64, max_candidates: MaxCandidates = 512, progress: Progress = True,
) -> None:
    """Export the uncached ranking (MTGR) and retrieval (HSTU) forwards to standard ONNX, checked with ONNX
    Runtime against the eager model; a golden file is written beside each."""
    _export(model, out, "onnx", max_batch, max_candidates, BLOCK_SIZE, progress)


def aoti_command(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="The .pt2 package; with several graphs OUT_STEM.PART.pt2 (PART: "
                                           "ranking, step, retrieval).")],
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per KV-cache page of the cached step "
                                                        "(the engine's block_size).")] = BLOCK_SIZE,
    max_batch: MaxBatch = 64, max_candidates: MaxCandidates = 512, progress: Progress = True,
) -> None:
    """torch.export + AOTInductor packages of the uncached forwards and of MTGR's cached step over a paged
    K/V pool, reloaded and checked against eager; a golden file is written beside each."""
    _export(model, out, "aoti", max_batch, max_candidates, block_size, progress)


def verify_command(file: Annotated[Path, typer.Argument(help="An exported .onnx or .pt2 file.")]) -> None:
    """Re-run an export on the golden inputs beside it; exit 1 with one line if its outputs differ."""
    from grinfer.export.export import verify
    from grinfer.export.golden import Mismatch
    from grinfer.export.support import ExportError

    try:
        errors = verify(file)
    except Mismatch as exc:
        raise _fail(str(exc), 1) from None
    except ExportError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{file}: ok, outputs match the golden file (max error {max(errors.values()):.2g})")
