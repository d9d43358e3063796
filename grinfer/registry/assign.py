"""Arm assignment: a stable hash of (experiment, user) picks the arm, the same on every replica and after
every restart, and a user stays in one arm for the experiment's whole life."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from grinfer.registry.records import Arm

A = TypeVar("A", bound=Arm)


def unit_hash(experiment: str, user: str) -> float:
    """A number in [0, 1) fixed by (experiment, user): the first 8 bytes of their SHA-256, scaled."""
    digest = hashlib.sha256(f"{experiment}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(experiment: str, user: str, arms: Sequence[A]) -> A:
    """The user's arm: arms take consecutive slices of [0, 1) in their order, each as wide as its share of
    the total weight, and the user's `unit_hash` falls in one of them."""
    if not arms:
        raise ValueError("arms: an experiment needs at least one arm")
    point = unit_hash(experiment, user) * sum(a.weight for a in arms)
    edge = 0.0
    for arm in arms:
        edge += arm.weight
        if point < edge:
            return arm
    return arms[-1]  # rounding at the very top of the range
