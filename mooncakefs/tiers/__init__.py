"""Storage tiers: where object bytes live.  The store decides what goes where; a tier only keeps
bytes and its own space accounting."""

from mooncakefs.tiers.dram import DramTier
from mooncakefs.tiers.ssd import SsdTier

__all__ = ["DramTier", "SsdTier"]
