"""``mooncake.store`` on mooncakefs: see ``mooncakefs.compat.store``."""

from mooncakefs.compat.store import (
    BufferHandle,
    MooncakeDistributedStore,
    MooncakeHostMemAllocator,
    ObjectDataType,
    ReplicateConfig,
    SoftPinAction,
    bind_to_numa_node,
)

__mooncakefs__ = True
__all__ = [
    "BufferHandle",
    "MooncakeDistributedStore",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "ReplicateConfig",
    "SoftPinAction",
    "bind_to_numa_node",
]
