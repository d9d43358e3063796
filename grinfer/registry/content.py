"""What the registry records about a model directory: its content hash, configs and training metrics.

A model directory is one checkpoint (config.json + weights) or a `--task both` output with ranking/ and
retrieval/ checkpoints. The content hash is a SHA-256 over every regular file under the directory (its
relative path, size and bytes, in path order), so any changed, added or removed file changes it; it reads
the whole directory once (about a second per GB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.json"
PARTS = ("ranking", "retrieval")
CHUNK = 1 << 20


class ModelDirError(ValueError):
    """The directory is not a model directory, or a file in it cannot be read."""


def checkpoint_parts(path: Path) -> dict[str, Path]:
    """{"ranking": dir, "retrieval": dir} of a `--task both` output, or {"ranking": path} of one checkpoint."""
    parts = {name: path / name for name in PARTS if (path / name / CONFIG_FILE).is_file()}
    if parts:
        return parts
    if (path / CONFIG_FILE).is_file():
        return {"ranking": path}
    raise ModelDirError(f"{path}: no checkpoint here (config.json, or ranking/ and retrieval/ holding one)")


def content_hash(path: Path) -> str:
    """sha256 hex digest over every file under `path` (relative path, size, bytes; sorted by path)."""
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def _json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{file}: cannot read it as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelDirError(f"{file}: expected a JSON object")
    return value


def describe(path: Path) -> tuple[dict, dict]:
    """(configs, training metrics) of a model directory, each keyed by part (ranking, retrieval); a part
    without metrics.json has none."""
    configs, metrics = {}, {}
    for name, part in checkpoint_parts(path).items():
        configs[name] = _json(part / CONFIG_FILE).get("model", {})
        if (part / METRICS_FILE).is_file():
            metrics[name] = _json(part / METRICS_FILE)
    return configs, metrics
