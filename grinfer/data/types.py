"""Dataset types shared by the MovieLens reader, the synthetic generator and the featurizer.

Item ids are dense indices 1..num_items (0 means padding / unknown); every categorical profile
field likewise uses 0 for unknown. Each user's events are sorted by time with a stable sort, so
equal timestamps keep their file order (DESIGN §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROFILE_FIELDS = ("gender", "age", "occupation", "zip")


@dataclass(frozen=True)
class ItemCatalog:
    """Item side features indexed by dense item id (row 0 is the unknown item)."""

    genres: np.ndarray  # [num_items + 1, num_genres] uint8 multi-hot
    year_bucket: np.ndarray  # [num_items + 1] int64, 0 = unknown
    titles: list[str]  # [num_items + 1], "" for unknown
    genre_names: list[str]
    raw_ids: np.ndarray  # [num_items + 1] int64: dense id -> id in the source data (0 for row 0)

    @property
    def num_items(self) -> int:
        return len(self.titles) - 1

    @property
    def num_genres(self) -> int:
        return len(self.genre_names)

    @property
    def num_year_buckets(self) -> int:
        return int(self.year_bucket.max()) + 1


@dataclass
class UserTimeline:
    """One user's profile and time-ordered behaviour."""

    user_id: int  # id in the source data
    profile: np.ndarray  # [len(profile_fields)] int64 categorical indices, 0 = unknown
    items: np.ndarray  # [n] int64 dense item ids
    timestamps: np.ndarray  # [n] int64 seconds, non-decreasing
    ratings: np.ndarray  # [n] int64 in 1..5 (the action of the event)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Dataset:
    """Users with their timelines plus the item catalogue and profile vocabularies."""

    name: str
    catalog: ItemCatalog
    users: list[UserTimeline]
    profile_fields: tuple[str, ...] = PROFILE_FIELDS
    profile_cardinalities: tuple[int, ...] = field(default_factory=tuple)  # vocab sizes incl. 0

    @property
    def num_events(self) -> int:
        return sum(len(u) for u in self.users)
