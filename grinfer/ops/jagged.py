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


def padded_index(offsets: torch.Tensor, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, position in sequence) of each of the T rows: where a row sits in the padded layout."""
    ids = seq_ids(offsets, total)
    return ids, torch.arange(len(ids), device=offsets.device) - offsets[ids]


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int, pad: float = 0.0,
                     index: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, ...] jagged -> ([B, max_len, ...] padded, [B, max_len] bool validity); `index` from padded_index."""
    batch = len(offsets) - 1
    out = values.new_full((batch, max_len, *values.shape[1:]), pad)
    valid = torch.zeros(batch, max_len, dtype=torch.bool, device=values.device)
    ids, pos = padded_index(offsets, values.shape[0]) if index is None else index
    out[ids, pos] = values
    valid[ids, pos] = True
    return out, valid


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor,
                     index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L, ...] padded -> [T, ...] jagged (the inverse of jagged_to_padded)."""
    ids, pos = padded_index(offsets, int(offsets[-1])) if index is None else index
    return padded[ids, pos]


def max_length(offsets: torch.Tensor) -> int:
    """Longest sequence (0 for an empty batch)."""
    return int(lengths_of(offsets).max()) if len(offsets) > 1 else 0
