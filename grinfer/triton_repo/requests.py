"""The request rules of the repository's Python models, free of Triton so that they can be tested alone.

Raw request tensors are checked as grinfer's /v1/rank checks its JSON (the messages name the tensor and
index), windowed as RecommenderService.context windows a stored user (the last `max_static` static
events, the last `max_realtime` real-time ones), and mapped from catalogue ids to model ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from grinfer.data.types import ItemCatalog
from grinfer.schema import MAX_CANDIDATES, MAX_K, MAX_TS

USER_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


class BadInput(ValueError):
    """A request tensor the model cannot accept; the message starts with the tensor's name."""


@dataclass
class Context:
    """One request after preprocess: a user's windowed context (catalogue ids) and candidates."""

    user: str
    history_version: int
    profile: np.ndarray  # [num_profile] int64
    items: np.ndarray  # [n] int64, S then R
    timestamps: np.ndarray
    actions: np.ndarray
    num_static: int
    candidates: np.ndarray  # [K] int64
    request_ts: int
    top_k: int


def vector(name: str, value: np.ndarray | None, dtype: DTypeLike | None = np.int64) -> np.ndarray:
    """A request tensor as a flat array (its batch dimension of 1 dropped)."""
    if value is None:
        raise BadInput(f"{name}: missing")
    array = np.asarray(value)
    if array.ndim > 1 and array.shape[0] == 1:
        array = array.reshape(array.shape[1:])
    if array.ndim != 1:
        raise BadInput(f"{name}: expected a vector, got shape {list(np.shape(value))}")
    return array.astype(dtype, copy=False) if dtype is not None else array


def scalar(name: str, value: np.ndarray | None, default: int | None, low: int, high: int) -> int:
    """A one-element integer tensor within [low, high] (`default` when the optional tensor is absent)."""
    if value is None:
        if default is None:
            raise BadInput(f"{name}: missing")
        return default
    array = np.asarray(value).reshape(-1)
    if array.size != 1:
        raise BadInput(f"{name}: expected one value, got {array.size}")
    number = int(array[0])
    if not low <= number <= high:
        raise BadInput(f"{name}: {number} is outside [{low}, {high}]")
    return number


def user_id(value: np.ndarray | None) -> str:
    """The USER_ID tensor's one string, checked as /v1/rank checks `user`."""
    array = vector("USER_ID", value, dtype=None)
    if array.size != 1:
        raise BadInput(f"USER_ID: expected one id, got {array.size}")
    raw = array[0]
    user = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if not USER_ID_RE.fullmatch(user):
        raise BadInput("USER_ID: user id must be 1-128 letters, digits or _ . : @ -")
    return user


def _in_range(name: str, values: np.ndarray, low: int, high: int) -> None:
    bad = np.flatnonzero((values < low) | (values > high))
    if bad.size:
        raise BadInput(f"{name}[{bad[0]}]: {values[bad[0]]} is outside [{low}, {high}]")


def preprocess(tensors: dict[str, np.ndarray | None], cardinalities: list[int], max_static: int,
               max_realtime: int, now: int) -> Context:
    """Check raw request tensors and window the context as grinfer's service does for a stored user."""
    user = user_id(tensors.get("USER_ID"))
    items, stamps, actions = (vector(n, tensors.get(n)) for n in ("EVENT_ITEMS", "EVENT_TIMESTAMPS", "EVENT_ACTIONS"))
    if not len(items) == len(stamps) == len(actions):
        raise BadInput(f"EVENT_TIMESTAMPS, EVENT_ACTIONS: {len(stamps)} and {len(actions)} values for "
                       f"{len(items)} EVENT_ITEMS; give one per event")
    _in_range("EVENT_TIMESTAMPS", stamps, 0, MAX_TS)
    _in_range("EVENT_ACTIONS", actions, 1, 5)
    num_static = scalar("NUM_STATIC", tensors.get("NUM_STATIC"), len(items), 0, len(items))
    candidates = vector("CANDIDATE_ITEMS", tensors.get("CANDIDATE_ITEMS"))
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise BadInput(f"CANDIDATE_ITEMS: {len(candidates)} candidates; give 1 to {MAX_CANDIDATES}")
    profile = vector("PROFILE", tensors.get("PROFILE"))
    if len(profile) > len(cardinalities):
        raise BadInput(f"PROFILE: {len(profile)} values; the model has {len(cardinalities)} profile fields")
    profile = np.concatenate([profile, np.zeros(len(cardinalities) - len(profile), np.int64)])
    for i, (value, size) in enumerate(zip(profile, cardinalities)):
        if not 0 <= value < size:
            raise BadInput(f"PROFILE[{i}]: {value} is outside [0, {size - 1}]")
    static = np.arange(num_static)[-max_static:] if max_static else np.arange(0)
    keep = np.concatenate([static, np.arange(num_static, len(items))[-max_realtime:]]).astype(np.int64)
    return Context(
        user=user, history_version=scalar("HISTORY_VERSION", tensors.get("HISTORY_VERSION"), 0, 0, 2**62),
        profile=profile, items=items[keep], timestamps=stamps[keep], actions=actions[keep],
        num_static=len(static), candidates=candidates,
        request_ts=scalar("REQUEST_TS", tensors.get("REQUEST_TS"), now, 0, MAX_TS),
        top_k=scalar("TOP_K", tensors.get("TOP_K"), min(len(candidates), MAX_K), 1, MAX_K))


class IdLookup:
    """Catalogue ids -> the model's row ids (the catalogue's id map, vectorised)."""

    def __init__(self, catalog: ItemCatalog):
        raw = np.asarray(catalog.raw_ids[1:], np.int64)
        self.order = np.argsort(raw, kind="stable")
        self.sorted_raw = raw[self.order]

    def rows(self, name: str, items: np.ndarray, unique: bool = False) -> np.ndarray:
        """Model ids of `items`; an unknown (or, with unique, repeated) id raises BadInput naming its index."""
        items = np.asarray(items, np.int64)
        at = np.clip(np.searchsorted(self.sorted_raw, items), 0, max(len(self.sorted_raw) - 1, 0))
        known = self.sorted_raw[at] == items if len(self.sorted_raw) else np.zeros(len(items), bool)
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            raise BadInput(f"{name}[{i}]: item {items[i]} is not in the catalogue")
        if unique and len(np.unique(items)) != len(items):
            _, first = np.unique(items, return_index=True)
            i = int(np.setdiff1d(np.arange(len(items)), first)[0])
            j = int(np.flatnonzero(items == items[i])[0])
            raise BadInput(f"{name}[{i}]: item {items[i]} is already candidate {j}")
        return self.order[at] + 1
