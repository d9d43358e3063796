"""The `grinfer import-checkpoint` command (registered in grinfer.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def import_checkpoint_command(
    src: Annotated[Path, typer.Argument(help="The other project's checkpoint file (torch.save or .safetensors).")],
    out: Annotated[Path, typer.Option(help="grinfer checkpoint directory to write (config.json + safetensors).")],
    fmt: Annotated[str, typer.Option("--format", help="Source format: generative-recommenders (Meta's research "
                                                      "HSTU).")] = "generative-recommenders",
    gin: Annotated[Path | None, typer.Option(help="The training's gin config (heads, dqk, dv, norms).")] = None,
    set_: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE",
                                            help="A grinfer model setting, e.g. --set num_heads=1 (repeatable).")]
    = [],  # noqa: B006
    data: Annotated[str | None, typer.Option(help="Dataset whose catalogue orders the item rows (their rows are "
                                                  "raw item ids); recorded as the model's data for serve/eval.")]
    = None,
) -> None:
    """Convert another project's checkpoint into a grinfer checkpoint that computes the same outputs."""
    from grinfer.cli import _fail, _overrides
    from grinfer.importers import CheckpointImportError
    from grinfer.importers.run import import_checkpoint

    overrides, _ = _overrides(set_)
    try:
        path = import_checkpoint(fmt, src, out, gin=gin, overrides=overrides, data=data)
    except (CheckpointImportError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {path} ({fmt} checkpoint {src})")
