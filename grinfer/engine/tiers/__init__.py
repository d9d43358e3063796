"""Lower tiers of the KV cache (host memory, disk) behind one protocol: offload launch, take, wait."""

from grinfer.engine.tiers.base import Held, Tier
from grinfer.engine.tiers.disk import DiskTier
from grinfer.engine.tiers.host import HostTier

__all__ = ["DiskTier", "Held", "HostTier", "Tier"]
