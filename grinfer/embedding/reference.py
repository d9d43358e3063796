"""The plain-PyTorch definition of a table lookup: the whole table dequantised, then F.embedding.

The served path (`ServedTable`: distinct rows, device cache, batched dequantisation) must equal it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grinfer.embedding.managed import FALLBACK_ROW, ManagedIds
from grinfer.embedding.store import RowStore
from grinfer.embedding.table import IdMap


def reference_lookup(ids: torch.Tensor, store: RowStore, id_map: IdMap) -> torch.Tensor:
    """float32 [*ids.shape, dim]: F.embedding over the fully dequantised table (a managed map's newly
    assigned rows are first reset to the fallback row, as the served table does)."""
    rows = id_map.rows(ids)
    if isinstance(id_map, ManagedIds) and len(id_map.assigned):
        store.copy_row(FALLBACK_ROW, id_map.assigned)
    return F.embedding(rows.cpu(), store.dense())
