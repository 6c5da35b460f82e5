"""Storage tiers: where object bytes live.  Each tier (the ``Tier`` protocol, tiers/base.py) keeps its
bytes, its space accounting and its eviction order; the store decides what goes where and moves values
between tiers in ``TIER_ORDER``."""

from mooncakefs.tiers.dram import DramTier
from mooncakefs.tiers.ssd import SsdTier

__all__ = ["DramTier", "SsdTier"]
