"""Raw behaviour -> jagged token batches (CPU tensors; never touches the device)."""

from grinfer.features.batch import EventTokens, MTGRBatch, RetrievalBatch
from grinfer.features.featurizer import (
           NUM_CROSS_FEATURES,
           Featurizer,
           RankRequest,
           UserContext,
           retrieval_batch,
)

__all__ = [
           "NUM_CROSS_FEATURES",
           "EventTokens",
           "Featurizer",
           "MTGRBatch",
           "RankRequest",
           "RetrievalBatch",
           "UserContext",
           "retrieval_batch",
]
