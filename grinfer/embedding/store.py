"""The full table of one embedding: its stored parts (in memory or memory-mapped) and batched, dequantised
row gathers from them."""

from __future__ import annotations

import torch

from grinfer.embedding.formats import bytes_per_row, check_format, decode_rows, encode_rows, part_names, row_dim
from grinfer.embedding.safetensors_io import FileRows


class RowStore:
    """A table's rows in one row format, on the host; `gather` reads only the rows asked for: from the parts'
    tensors, or with `files` (part -> FileRows of the same tensors in a checkpoint) by reading the file."""

    def __init__(self, parts: dict[str, torch.Tensor], fmt: str, files: dict[str, FileRows] | None = None):
        missing = [p for p in part_names(fmt) if p not in parts]
        if missing:
            raise ValueError(f"parts: a {fmt} table needs {', '.join(part_names(fmt))}; missing {', '.join(missing)}")
        self.fmt = check_format(fmt, row_dim(parts, fmt))
        self.parts = {p: parts[p] for p in part_names(fmt)}
        self.files = files
        self.num_rows, self.dim = len(self.parts[part_names(fmt)[0]]), row_dim(parts, fmt)
        for name, part in self.parts.items():
            if len(part) != self.num_rows:
                raise ValueError(f"parts: {name} has {len(part)} rows, the table {self.num_rows}")

    @classmethod
    def from_rows(cls, rows: torch.Tensor, fmt: str) -> RowStore:
        """A store of float rows [n, dim] encoded in `fmt`."""
        return cls(encode_rows(rows.detach().cpu(), fmt), fmt)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [len(rows), dim] of the given rows (an int64 CPU tensor; with `files`, ascending and distinct)."""
        if self.files is not None:
            return decode_rows({p: f.take(rows) for p, f in self.files.items()}, self.fmt)
        return decode_rows({p: t.index_select(0, rows) for p, t in self.parts.items()}, self.fmt)

    def copy_row(self, src: int, dst: torch.Tensor) -> None:
        """Overwrite rows `dst` with row `src` (a managed table resets a reassigned row to its fallback)."""
        if self.files is not None:
            raise ValueError("store: a table read from its checkpoint file is read-only; a managed table needs its "
                             "rows in memory")
        for part in self.parts.values():
            part[dst] = part[src].clone()

    def dense(self) -> torch.Tensor:
        """Every row as float32 (for small tables: retrieval scoring, the reference lookup)."""
        return decode_rows(self.parts, self.fmt)

    @property
    def nbytes(self) -> int:
        return self.num_rows * bytes_per_row(self.fmt, self.dim)
