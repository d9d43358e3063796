"""A managed id -> row map: ids earn a row by admission and lose it by LRU eviction (after TorchRec's managed
collision handling and NVIDIA's DynamicEmb), so items that did not exist at training time get a row of
their own without retraining and without colliding with the ids already in the table.

Row 0 is the fallback that every not-(yet-)admitted id reads. An id is admitted the `admit_after`-th step
it is seen (its sightings are counted in a bounded probation list, LRU too); a newly admitted id takes a
free row, or the row of the least recently used id when the table is full. An id used in the current call
is never evicted by it; when no row can be freed the id stays on the fallback.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

FALLBACK_ROW = 0


class ManagedIds:
    """Admission by sighting count, eviction of the least recently used id; see the module docstring."""

    def __init__(self, num_rows: int, admit_after: int = 2, probation: int | None = None):
        if num_rows < 2:
            raise ValueError(f"num_rows: a managed table needs a fallback row and one more, got {num_rows}")
        if admit_after < 1:
            raise ValueError(f"admit_after: must be >= 1, got {admit_after}")
        self.num_rows, self.admit_after = num_rows, admit_after
        self.probation = num_rows if probation is None else probation
        self._rows: OrderedDict[int, tuple[int, int]] = OrderedDict()  # id -> (row, last call), oldest first
        self._seen: OrderedDict[int, int] = OrderedDict()  # not-yet-admitted id -> sightings
        self._free = list(range(num_rows - 1, FALLBACK_ROW, -1))
        self._call = 0
        self.admitted = self.evicted = 0
        self.assigned = torch.empty(0, dtype=torch.int64)  # rows given to a new id by the last call

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id (same shape); each distinct id counts as one sighting per call."""
        self._call += 1
        unique, inverse = ids.reshape(-1).cpu().unique(return_inverse=True)
        out, assigned = [], []
        for key in unique.tolist():
            row = self._row_of(key, assigned)
            out.append(row)
        self.assigned = torch.tensor(assigned, dtype=torch.int64)
        return torch.tensor(out, dtype=torch.int64)[inverse].reshape(ids.shape).to(ids.device)

    def _row_of(self, key: int, assigned: list[int]) -> int:
        hit = self._rows.get(key)
        if hit is not None:
            self._rows[key] = (hit[0], self._call)
            self._rows.move_to_end(key)
            return hit[0]
        seen = self._seen.pop(key, 0) + 1
        row = self._take_row() if seen >= self.admit_after else None
        if row is None:
            self._seen[key] = seen
            if len(self._seen) > self.probation:
                self._seen.popitem(last=False)
            return FALLBACK_ROW
        self._rows[key] = (row, self._call)
        self.admitted += 1
        assigned.append(row)
        return row

    def _take_row(self) -> int | None:
        if self._free:
            return self._free.pop()
        oldest = next(iter(self._rows))
        row, last = self._rows[oldest]
        if last == self._call:  # everything left was used by this call
            return None
        del self._rows[oldest]
        self.evicted += 1
        return row

    def __len__(self) -> int:
        """Ids holding a row of their own."""
        return len(self._rows)
