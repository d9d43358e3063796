"""The disk tier: entries' K/V in files under a directory, memory-mapped on restore, LRU within a byte
budget; it survives a restart.

Each entry is two files named by a hash of its user: `<h>.kv` (K then V, raw bytes; with 8-bit K/V then
their float32 scales, K's then V's) and `<h>.json` (its signature, token count, kv_dtype, the K/V storage
dtype, K's shape and V's head dim, the scales' dtype). An index without kv_dtype (written before 8-bit K/V existed) is a
model-dtype entry. A writer thread writes both through temporary names and renames
them into place, the index file last, so a file that is listed is whole; on start the directory is
scanned, entries ordered by modification time (oldest evicted first), and leftovers of interrupted writes
removed. The directory is keyed by the model's fingerprint (the caller's job), so K/V are never read by
a model that did not make them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from grinfer.engine.kv_pool import KVData
from grinfer.engine.signature import ContextSignature
from grinfer.engine.tiers.base import Held
from grinfer.ops.reference.kv_quant import SCALE_DTYPE, kv_dtype_of

log = logging.getLogger("grinfer.engine")
DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn)}


@dataclass
class _File:
    signature: ContextSignature
    tokens: int
    dtype: torch.dtype  # of K and V
    shape: tuple[int, ...]  # of K
    scale_dtype: torch.dtype | None = None  # 8-bit K/V: their scales' (shape[:-1] each)
    v_dim: int | None = None  # V's head dim where it differs from K's (KVPool's v_head_dim)
    written: Future | None = None  # the writer's future while the files are being written

    @property
    def kv_dtype(self) -> str:
        return kv_dtype_of(self.dtype)

    @property
    def sizes(self) -> list[int]:
        """Bytes of K, V (and their scales) in the file, in order."""
        values = math.prod(self.shape)
        out = [values * self.dtype.itemsize, values // self.shape[-1] * self.v_shape[-1] * self.dtype.itemsize]
        if self.scale_dtype is not None:
            out += [values // self.shape[-1] * self.scale_dtype.itemsize] * 2
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    @property
    def v_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.v_dim or self.shape[-1])


class DiskTier:
    name = "disk"

    def __init__(self, directory: str | Path, capacity_bytes: int):
        self.dir, self.capacity = Path(directory), capacity_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: OrderedDict[str, _File] = OrderedDict()
        self.used = self.evictions = self.restored = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="grinfer-kv-disk")
        self._scan()

    # ---- the tier protocol -------------------------------------------------------------------
    def offload_launch(self, key: str, signature: ContextSignature, tokens: int, kv: KVData,
                       done: Callable[[], None] | None = None) -> None:
        self.discard(key)
        entry = _File(signature, tokens, kv.k.dtype, tuple(kv.k.shape),
                      None if kv.k_scale is None else kv.k_scale.dtype,
                      None if kv.v.shape == kv.k.shape else kv.v.shape[-1])
        nbytes = entry.nbytes
        if nbytes > self.capacity:
            return
        while self.used + nbytes > self.capacity:
            self._delete(next(iter(self.files)))
            self.evictions += 1
        entry.written = self._writer.submit(self._write, self._stem(key), entry, kv, done)
        self.files[key] = entry
        self.used += nbytes

    def take(self, key: str, version: int) -> Held | None:
        entry = self.files.get(key)
        if entry is None:
            return None
        if entry.signature.version != version:
            self._delete(key)
            return None
        if entry.written is not None:
            try:
                entry.written.result()  # an entry still being written is read whole, never half
            except Exception:
                log.exception("kv disk tier: writing %s failed", key)
                self._delete(key)
                return None
        kv = self._read(self._stem(key), entry)
        self.files.pop(key)
        self.used -= entry.nbytes
        self._unlink(self._stem(key))  # the mapping stays readable; the entry now lives on the device
        self.restored += 1
        return Held(entry.signature, entry.tokens, kv, source=self.name)

    def discard(self, key: str) -> None:
        if key in self.files:
            self._delete(key)

    def discard_older(self, key: str, version: int) -> None:
        entry = self.files.get(key)
        if entry is not None and entry.signature.version < version:
            self._delete(key)

    def flush(self) -> None:
        for entry in list(self.files.values()):
            if entry.written is not None:
                entry.written.exception()

    def close(self) -> None:
        """Finish the writes in flight and stop the writer thread."""
        self.flush()
        self._writer.shutdown(wait=True)

    def snapshot(self) -> dict:
        return {"disk_users": len(self.files), "disk_bytes_used": self.used, "disk_evictions": self.evictions,
                "disk_restores": self.restored}

    # ---- files -------------------------------------------------------------------------------
    def _stem(self, key: str) -> Path:
        return self.dir / hashlib.sha1(key.encode()).hexdigest()

    @staticmethod
    def _write(stem: Path, entry: _File, kv: KVData, done) -> None:
        if done is not None:
            done()
        data, meta = stem.with_suffix(".kv"), stem.with_suffix(".json")
        tmp = stem.with_suffix(".kv.tmp")
        with open(tmp, "wb") as f:
            for t in kv.tensors():
                f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, data)
        index = {"signature": entry.signature.to_json(), "tokens": entry.tokens, "kv_dtype": entry.kv_dtype,
                 "dtype": str(entry.dtype), "shape": list(entry.shape)}
        if entry.scale_dtype is not None:
            index["scale_dtype"] = str(entry.scale_dtype)
        if entry.v_dim is not None:
            index["v_dim"] = entry.v_dim
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, meta)

    @staticmethod
    def _read(stem: Path, entry: _File) -> KVData:
        raw = torch.from_file(str(stem.with_suffix(".kv")), shared=False, size=entry.nbytes, dtype=torch.uint8)
        parts = raw.split(entry.sizes)
        k, v = parts[0].view(entry.dtype).view(entry.shape), parts[1].view(entry.dtype).view(entry.v_shape)
        if entry.scale_dtype is None:
            return KVData(k, v)
        # the scales follow bytes of K/V whose count may not be a multiple of 4: copied out, not viewed
        ks, vs = (p.clone().view(entry.scale_dtype).view(entry.shape[:-1]) for p in parts[2:])
        return KVData(k, v, ks, vs)

    def _scan(self) -> None:
        """Index the entries a previous process left, oldest first; remove partial writes."""
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        metas = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for meta in metas:
            try:
                index = json.loads(meta.read_text())
                entry = self._indexed(index)
                if meta.with_suffix(".kv").stat().st_size != entry.nbytes:
                    raise ValueError("size mismatch")
            except (OSError, ValueError, KeyError) as exc:
                log.warning("kv disk tier: dropping unreadable entry %s (%s)", meta.stem, exc)
                self._unlink(meta.with_suffix(""))
                continue
            self.files[entry.signature.user] = entry
            self.used += entry.nbytes
        for data in self.dir.glob("*.kv"):
            if not data.with_suffix(".json").exists():
                data.unlink(missing_ok=True)
        while self.used > self.capacity and self.files:
            self._delete(next(iter(self.files)))

    @staticmethod
    def _indexed(index: dict) -> _File:
        """The entry an index file describes (KeyError / ValueError when it is not one)."""
        dtype = DTYPES[index["dtype"]]
        kv_dtype = index.get("kv_dtype", "model")
        if kv_dtype != kv_dtype_of(dtype):
            raise ValueError(f"kv_dtype {kv_dtype} stored as {dtype}")
        scale = DTYPES[index["scale_dtype"]] if kv_dtype != "model" else None
        if scale not in (None, SCALE_DTYPE):
            raise ValueError(f"scale dtype {scale}")
        return _File(ContextSignature.from_json(index["signature"]), int(index["tokens"]), dtype,
                     tuple(int(n) for n in index["shape"]), scale, index.get("v_dim"))

    def _delete(self, key: str) -> None:
        entry = self.files.pop(key)
        self.used -= entry.nbytes
        if entry.written is not None:
            entry.written.exception()  # let the write finish before its files go
        self._unlink(self._stem(key))

    @staticmethod
    def _unlink(stem: Path) -> None:
        for suffix in (".json", ".kv"):
            stem.with_suffix(suffix).unlink(missing_ok=True)
