"""Raw 64-bit ids -> table rows: identity (the id is the row) or a hash into a fixed number of rows.

The hash is splitmix64's finaliser (a bijection of 64-bit words, so two ids collide only through the
final modulo), computed on int64 tensors with wrapping arithmetic, on any device. Hashing n distinct
ids into m rows, an id shares its row with another id with probability 1 - (1 - 1/m)^(n-1) ~ n/m
(`expected_collision_rate`); `collision_rate` measures it for a given set of ids.
"""

from __future__ import annotations

import torch

_M1, _M2 = -4658895280553007687, -7723592293110705685  # 0xBF58476D1CE4E5B9, 0x94D049BB133111EB as int64
_GOLDEN = 0x9E3779B97F4A7C15


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """splitmix64(id + seed * golden) of every int64 id (a bijection on 64-bit words)."""
    offset = (seed * _GOLDEN) & ((1 << 64) - 1)
    z = ids.to(torch.int64) + (offset - (1 << 64) if offset >= 1 << 63 else offset)  # the same word as an int64
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


class IdentityIds:
    """The id is the row (catalogue positions 0..num_rows-1); out-of-range ids are an error."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id (same shape)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
            raise IndexError(f"ids: an id outside the table's {self.num_rows} rows "
                             f"(min {int(ids.min())}, max {int(ids.max())})")
        return ids.to(torch.int64)


class HashedIds:
    """Any 64-bit id -> row mix64(id, seed) mod num_rows: new ids get a row without retraining, at the cost of
    collisions (see the module docstring)."""

    def __init__(self, num_rows: int, seed: int = 0):
        if num_rows < 1:
            raise ValueError(f"num_rows: a hashed table needs at least one row, got {num_rows}")
        self.num_rows, self.seed = num_rows, seed

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id (same shape)."""
        return torch.remainder(mix64(ids, self.seed), self.num_rows)


def collision_rate(ids: torch.Tensor, num_rows: int, seed: int = 0) -> float:
    """Fraction of the distinct `ids` whose hashed row is shared with another distinct id."""
    unique = ids.unique()
    rows = HashedIds(num_rows, seed).rows(unique)
    _, inverse, counts = rows.unique(return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean()) if len(unique) else 0.0


def expected_collision_rate(num_ids: int, num_rows: int) -> float:
    """The chance that one of `num_ids` distinct ids hashed uniformly into `num_rows` rows shares its row."""
    return 1.0 - (1.0 - 1.0 / num_rows) ** max(num_ids - 1, 0)
