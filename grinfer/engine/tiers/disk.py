"""The disk tier: entries' K/V in files under a directory, memory-mapped on restore, LRU within a byte
budget; it survives a restart.

Each entry is two files named by a hash of its user: `<h>.kv` (K then V, raw bytes) and `<h>.json` (its
signature, token count, dtype and shape). A writer thread writes both through temporary names and renames
them into place, the index file last, so a file that is listed is whole; on start the directory is
scanned, entries ordered by modification time (oldest evicted first), and leftovers of interrupted writes
removed. The directory is keyed by the model's fingerprint (the caller's job), so K/V are never read by
a model that did not make them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from grinfer.engine.signature import ContextSignature
from grinfer.engine.tiers.base import Held

log = logging.getLogger("grinfer.engine")
DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass
class _File:
    signature: ContextSignature
    tokens: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # of K (V has the same)
    written: Future | None = None  # the writer's future while the files are being written


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
    def offload_launch(self, key: str, signature: ContextSignature, tokens: int, k: torch.Tensor,
                       v: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        self.discard(key)
        nbytes = 2 * k.numel() * k.element_size()
        if nbytes > self.capacity:
            return
        while self.used + nbytes > self.capacity:
            self._delete(next(iter(self.files)))
            self.evictions += 1
        entry = _File(signature, tokens, nbytes, k.dtype, tuple(k.shape))
        entry.written = self._writer.submit(self._write, self._stem(key), entry, k, v, done)
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
        k, v = self._read(self._stem(key), entry)
        self.files.pop(key)
        self.used -= entry.nbytes
        self._unlink(self._stem(key))  # the mapping stays readable; the entry now lives on the device
        self.restored += 1
        return Held(entry.signature, entry.tokens, k, v, source=self.name)

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
    def _write(stem: Path, entry: _File, k: torch.Tensor, v: torch.Tensor, done) -> None:
        if done is not None:
            done()
        data, meta = stem.with_suffix(".kv"), stem.with_suffix(".json")
        tmp = stem.with_suffix(".kv.tmp")
        with open(tmp, "wb") as f:
            for t in (k, v):
                f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, data)
        index = {"signature": entry.signature.to_json(), "tokens": entry.tokens, "dtype": str(entry.dtype),
                 "shape": list(entry.shape)}
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, meta)

    @staticmethod
    def _read(stem: Path, entry: _File) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.from_file(str(stem.with_suffix(".kv")), shared=False, size=entry.nbytes, dtype=torch.uint8)
        k, v = raw.view(entry.dtype).view(2, *entry.shape).unbind(0)
        return k, v

    def _scan(self) -> None:
        """Index the entries a previous process left, oldest first; remove partial writes."""
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        metas = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for meta in metas:
            try:
                index = json.loads(meta.read_text())
                sig = ContextSignature.from_json(index["signature"])
                dtype, shape = DTYPES[index["dtype"]], tuple(index["shape"])
                nbytes = 2 * torch.empty(shape, dtype=dtype, device="meta").numel() * dtype.itemsize
                if meta.with_suffix(".kv").stat().st_size != nbytes:
                    raise ValueError("size mismatch")
            except (OSError, ValueError, KeyError) as exc:
                log.warning("kv disk tier: dropping unreadable entry %s (%s)", meta.stem, exc)
                self._unlink(meta.with_suffix(""))
                continue
            self.files[sig.user] = _File(sig, int(index["tokens"]), nbytes, dtype, shape)
            self.used += nbytes
        for data in self.dir.glob("*.kv"):
            if not data.with_suffix(".json").exists():
                data.unlink(missing_ok=True)
        while self.used > self.capacity and self.files:
            self._delete(next(iter(self.files)))

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
