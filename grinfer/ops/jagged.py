"""Jagged-tensor helpers: values + offsets (offsets[b]..offsets[b+1] are sequence b's rows)."""

from __future__ import annotations

import torch


def lengths_of(offsets: torch.Tensor) -> torch.Tensor:
    """Per-sequence lengths from offsets [B+1]."""
    return offsets[1:] - offsets[:-1]


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """Offsets [B+1] from per-sequence lengths [B]."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))


def seq_ids(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """For each of the T rows, the index of the sequence it belongs to."""
    lengths = lengths_of(offsets)
    return torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths,
                                   output_size=total)


def positions_in_seq(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """For each of the T rows, its index within its own sequence."""
    ids = seq_ids(offsets, total)
    return torch.arange(len(ids), device=offsets.device) - offsets[ids]


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int,
                     pad: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, ...] jagged -> ([B, max_len, ...] padded, [B, max_len] bool validity)."""
    batch = len(offsets) - 1
    out = values.new_full((batch, max_len, *values.shape[1:]), pad)
    valid = torch.zeros(batch, max_len, dtype=torch.bool, device=values.device)
    ids = seq_ids(offsets, values.shape[0])
    pos = torch.arange(values.shape[0], device=values.device) - offsets[ids]
    out[ids, pos] = values
    valid[ids, pos] = True
    return out, valid


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] padded -> [T, ...] jagged (the inverse of jagged_to_padded)."""
    total = int(offsets[-1])
    ids = seq_ids(offsets, total)
    pos = torch.arange(total, device=padded.device) - offsets[ids]
    return padded[ids, pos]


def max_length(offsets: torch.Tensor) -> int:
    """Longest sequence (0 for an empty batch)."""
    return int(lengths_of(offsets).max()) if len(offsets) > 1 else 0
