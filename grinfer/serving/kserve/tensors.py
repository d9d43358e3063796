"""KServe v2 tensors: the protocol's datatypes, and tensor data as JSON lists or raw little-endian bytes.

A bad tensor is a FieldError (400) naming it, e.g. "inputs.candidates: 3 values for shape [4]".
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from grinfer.serving.service import FieldError

DTYPES: dict[str, np.dtype] = {name: np.dtype(kind) for name, kind in (
    ("BOOL", "?"), ("INT8", "<i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"), ("UINT8", "<u1"),
    ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"), ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"),
    ("BYTES", "O"))}
INTEGER = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
MAX_ELEMENTS = 1 << 20  # a tensor of more elements is refused before anything is allocated


@dataclass
class Tensor:
    """One named tensor: `data` is a numpy array of `shape` (BYTES: an object array of bytes)."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


def _bad(name: str, message: str) -> FieldError:
    return FieldError(f"inputs.{name}", message, status=400)


def element_count(name: str, datatype: str, shape) -> int:
    """The number of elements `shape` holds; FieldError for an unknown datatype or a bad shape."""
    if datatype not in DTYPES:
        raise _bad(name, f"unknown datatype {datatype!r} (one of {', '.join(DTYPES)})")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(name, f"shape must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)  # Python ints: no overflow whatever the dimensions
    if count > MAX_ELEMENTS:
        raise _bad(name, f"{count} elements exceed the limit of {MAX_ELEMENTS}")
    return count


def _flatten(values: list) -> list:
    """The leaves of nested lists, row-major (iterative: any nesting depth)."""
    out, stack = [], [iter(values)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_VALID = {"BOOL": lambda v: isinstance(v, bool), "BYTES": lambda v: isinstance(v, str | bytes),
          **dict.fromkeys(INTEGER, _is_int), **dict.fromkeys(("FP16", "FP32", "FP64"), _is_real)}


def from_list(name: str, datatype: str, shape, values) -> Tensor:
    """A tensor from a list of values (JSON `data`, flat or nested row-major; BYTES elements as str or bytes)."""
    count = element_count(name, datatype, shape)
    flat = _flatten(values if isinstance(values, list) else [values])
    if len(flat) != count:
        raise _bad(name, f"{len(flat)} values for shape {list(shape)} ({count} expected)")
    valid = _VALID[datatype]
    wrong = next((v for v in flat if not valid(v)), None)
    if wrong is not None:
        raise _bad(name, f"data are not {datatype} values ({wrong!r})")
    if datatype == "BYTES":
        array = np.empty(count, object)
        array[:] = [v.encode() if isinstance(v, str) else v for v in flat]
        return Tensor(name, datatype, array.reshape(shape))
    try:
        with np.errstate(over="raise"):  # 1e39 as FP32 is an error, not inf
            array = np.asarray(flat, DTYPES[datatype]) if flat else np.empty(0, DTYPES[datatype])
    except (OverflowError, FloatingPointError) as exc:
        raise _bad(name, f"data are not {datatype} values ({exc})") from None
    return Tensor(name, datatype, array.reshape(shape))


def from_raw(name: str, datatype: str, shape, raw: bytes) -> Tensor:
    """A tensor from raw bytes: little-endian elements, or BYTES elements each after a 4-byte length."""
    count = element_count(name, datatype, shape)
    if datatype != "BYTES":
        dtype = DTYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise _bad(name, f"{len(raw)} raw bytes for shape {list(shape)} of {datatype} "
                             f"({count * dtype.itemsize} expected)")
        return Tensor(name, datatype, np.frombuffer(raw, dtype).reshape(shape))
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _bad(name, "raw BYTES data end inside an element's length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise _bad(name, f"raw BYTES element {len(items)} runs past the data")
        items.append(raw[offset:offset + size])
        offset += size
    if len(items) != count:
        raise _bad(name, f"{len(items)} BYTES elements for shape {list(shape)} ({count} expected)")
    array = np.empty(count, object)
    array[:] = items
    return Tensor(name, datatype, array.reshape(shape))


def to_raw(tensor: Tensor) -> bytes:
    """The tensor's raw bytes (the inverse of from_raw)."""
    if tensor.datatype != "BYTES":
        return np.ascontiguousarray(tensor.data, DTYPES[tensor.datatype]).tobytes()
    return b"".join(struct.pack("<I", len(v)) + v for v in tensor.data.reshape(-1))


def to_list(tensor: Tensor) -> list:
    """The tensor's elements as a flat JSON list (BYTES as UTF-8 strings)."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in flat]
    return flat.tolist()
