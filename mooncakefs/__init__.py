"""mooncakefs: a tiered KVCache storage engine.

    import mooncakefs
    with mooncakefs.open("./kv", dram="2GiB", ssd="20GiB") as store:
        store.put("model/layer0/blk-17", kv_block)
        n = store.get_into("model/layer0/blk-17", out)
"""

from mooncakefs.client import RemoteStore, connect
from mooncakefs.errors import (
    BufferTooSmall,
    ChecksumError,
    InvalidKey,
    KeyExists,
    KeyNotFound,
    MooncakeError,
    OutOfSpace,
    StoreClosed,
    StoreLocked,
    Unavailable,
)
from mooncakefs.store import ObjectInfo, Store, open

__version__ = "0.1.0"

__all__ = [
    "BufferTooSmall",
    "ChecksumError",
    "InvalidKey",
    "KeyExists",
    "KeyNotFound",
    "MooncakeError",
    "ObjectInfo",
    "OutOfSpace",
    "RemoteStore",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "Unavailable",
    "__version__",
    "connect",
    "open",
]
