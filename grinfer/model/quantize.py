"""`grinfer quantize`: a checkpoint converted to low precision, written as a new checkpoint directory.

Each kind of conversion is one step over (config.json meta, state dict); `QuantizeOptions` says which
steps run. Embeddings: every sparse table (model.tables) re-stored in a row format (formats.ROW_FORMATS).
Dense: config.json records the mode (DENSE in the meta) the HSTU projections are served in; their weights
stay full precision in the file and the engine quantises them at load (grinfer.model.quantize_dense: the
per-channel scales take milliseconds to compute, and fp8 exists only on the GPU that serves it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from grinfer.config import ModelConfig
from grinfer.embedding.formats import bytes_per_row, check_format, encode_rows
from grinfer.model.checkpoint import EMBEDDINGS, WEIGHTS_FILE, CheckpointError, read_checkpoint_meta, write_checkpoint
from grinfer.model.quantize_dense import DENSE_MODES
from grinfer.model.tables import table_shapes

DENSE = "dense"  # config.json key: the mode the HSTU projections are served in (none when absent)


@dataclass(frozen=True)
class QuantizeOptions:
    """What to convert; None leaves that part as it is."""

    embeddings: str | None = None  # row format of every sparse table
    dense: str | None = None  # low-precision mode of the HSTU projections (quantize_dense.DENSE_MODES)

    def check(self) -> None:
        """A ValueError naming the option when nothing is asked for or a value is unknown."""
        if self.embeddings is None and self.dense is None:
            raise ValueError("--embeddings: nothing to convert; give a row format (int8, int4, fp16, bf16), or "
                             "--dense int8 | int8-dynamic | fp8")
        if self.embeddings is not None:
            check_format(self.embeddings, 2)
        if self.dense is not None and self.dense not in DENSE_MODES:
            raise ValueError(f"--dense: expected one of {', '.join(DENSE_MODES)}, got {self.dense!r}")


def quantize_embeddings(meta: dict, state: dict[str, torch.Tensor], fmt: str) -> list[dict]:
    """Re-store every sparse table of the checkpoint in `fmt` (in place); one summary row per table."""
    if meta.get(EMBEDDINGS):
        stored = ", ".join(sorted(set(meta[EMBEDDINGS].values())))
        raise CheckpointError(f"--model: its tables are already stored as {stored}; quantise the full-precision "
                              "checkpoint instead")
    rows = []
    for name, shape in table_shapes(ModelConfig.model_validate(meta["model"])).items():
        weight = state.pop(f"{name}.weight")
        check_format(fmt, weight.shape[1])
        state.update({f"{name}.{part}": t for part, t in encode_rows(weight, fmt).items()})
        rows.append({"table": name, "rows": shape.rows, "dim": shape.dim, "fp32_bytes": weight.numel() * 4,
                     "bytes": shape.rows * bytes_per_row(fmt, shape.dim)})
    meta[EMBEDDINGS] = {r["table"]: fmt for r in rows}
    return rows


def quantize_checkpoint(src: str | Path, out: str | Path, options: QuantizeOptions) -> list[dict]:
    """Write the converted copy of checkpoint `src` to `out`; returns the per-table summary."""
    options.check()
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("--out: must differ from --model (the full-precision checkpoint is kept)")
    meta = read_checkpoint_meta(src)
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{src}: missing {WEIGHTS_FILE}")
    state = load_file(str(weights))
    summary = quantize_embeddings(meta, state, options.embeddings) if options.embeddings else []
    if options.dense is not None:
        meta[DENSE] = options.dense
    meta["quantized_from"] = str(src.resolve())
    write_checkpoint(out, meta, state)
    return summary
