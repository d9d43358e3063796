"""Safetensors files without reading them whole: tensors memory-mapped in place, and a writer that streams
tensors in row chunks (so a table larger than memory can be written and served).

The layout is the format's own: an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data_offsets relative to the data start), then the tensors back to back.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I8": torch.int8,
          "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
# numpy views of the same bytes (bf16 has no numpy dtype: read as uint16, then viewed)
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "I8": np.int8, "I32": np.int32,
          "I64": np.int64, "BOOL": np.bool_}


def read_header(path: str | Path) -> tuple[dict, int]:
    """(the header's tensor entries, the byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def mmap_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a CPU tensor over a private (copy-on-write) memory map: nothing
    is read until used, and writes stay in this process."""
    header, start = read_header(path)
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            out[name] = torch.empty(shape, dtype=DTYPES[entry["dtype"]])
            continue
        array = np.memmap(path, dtype=_NUMPY[entry["dtype"]], mode="c", offset=start + begin, shape=shape)
        out[name] = torch.from_numpy(array).view(DTYPES[entry["dtype"]])
    return out


class FileRows:
    """Rows of one 2-D (or 1-D) tensor of a safetensors file read with pread: `take(rows)` reads exactly those
    rows' bytes (consecutive rows in one call), through the OS page cache. Unlike touching a memory map, which
    maps the pages around every fault into the process (64 KiB each), it leaves the process's RSS alone."""

    def __init__(self, path: str | Path, name: str):
        header, start = read_header(path)
        entry = header[name]
        self.dtype, self.shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.offset = start + entry["data_offsets"][0]
        self._fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead around each row

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows (an int64 CPU tensor, ascending and distinct as torch.unique gives them), in that order."""
        index = rows.numpy()
        if len(index) and (index[0] < 0 or index[-1] >= self.shape[0]):
            raise IndexError(f"rows: outside the tensor's {self.shape[0]} rows")
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        chunks = [os.pread(self._fd, len(run) * self.row_bytes, self.offset + int(run[0]) * self.row_bytes)
                  for run in np.split(index, breaks) if len(run)]
        data = bytearray(b"".join(chunks))
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(self.dtype).reshape(len(index), *self.shape[1:])

    def __del__(self) -> None:
        os.close(self._fd)


class StreamingWriter:
    """Writes a safetensors file whose tensors are declared up front (name -> (dtype, shape)) and then filled
    in any order, a row range at a time: `write(name, first_row, rows)`."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, (dtype, shape) in layout.items():
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
        self.path, self._layout, self._header = Path(path), layout, header
        self._start = 8 + len(raw)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._start + offset)

    def write(self, name: str, first_row: int, rows: torch.Tensor) -> None:
        """Write `rows` (the tensor's rows first_row .. first_row + len(rows)) in place."""
        dtype, shape = self._layout[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != tuple(shape[1:]) or first_row + len(rows) > shape[0]:
            raise ValueError(f"{name}: rows {first_row}+{len(rows)} of {tuple(rows.shape)} {rows.dtype} do not fit "
                             f"the declared {tuple(shape)} {dtype}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._file.seek(self._start + self._header[name]["data_offsets"][0] + first_row * row_bytes)
        self._file.write(rows.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        """Flush and close the file (readable by safetensors' own loaders from then on)."""
        self._file.close()
        os.chmod(self.path, 0o644 & ~_umask())

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
