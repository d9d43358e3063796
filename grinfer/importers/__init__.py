"""Importers: checkpoints trained by other projects, converted to grinfer checkpoints (config.json + safetensors)."""

from __future__ import annotations


class CheckpointImportError(ValueError):
    """A source checkpoint cannot be converted; the message names the parameter or setting at fault."""


FORMATS = ("generative-recommenders",)

__all__ = ["FORMATS", "CheckpointImportError"]
