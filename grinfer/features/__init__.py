"""Raw behaviour -> jagged token batches (Featurizer: CPU tensors; DeviceFeaturizer: built on the device)."""

from grinfer.features.batch import EventTokens, MTGRBatch, RetrievalBatch
from grinfer.features.device import DeviceFeaturizer
from grinfer.features.featurizer import (
           NUM_CROSS_FEATURES,
           FeatureRequest,
           Featurizer,
           UserContext,
           retrieval_batch,
)

__all__ = [
           "NUM_CROSS_FEATURES",
           "DeviceFeaturizer",
           "EventTokens",
           "FeatureRequest",
           "Featurizer",
           "MTGRBatch",
           "RetrievalBatch",
           "UserContext",
           "retrieval_batch",
]
