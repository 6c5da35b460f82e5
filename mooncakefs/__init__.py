"""mooncakefs: a tiered KVCache storage engine.

import mooncakefs
with mooncakefs.open("./kv", dram="2GiB", ssd="20GiB") as store:
    store.put("model/layer0/blk-17", kv_block)
    n = store.get_into("model/layer0/blk-17", out)
"""

import os as _os
import sys as _sys

if _os.environ.get("MOONCAKEFS_ENGINE", "cython") not in ("cython", "python"):
    raise ImportError(f"MOONCAKEFS_ENGINE={_os.environ['MOONCAKEFS_ENGINE']!r}: expected 'cython' or 'python'")
if _os.environ.get("MOONCAKEFS_ENGINE") == "python":
    # The pure-Python twins stand in for the Cython hot paths everywhere, child processes included (they
    # inherit the variable): the test suite runs this way too, so both engines keep one behaviour.
    from mooncakefs import _reference as _engine

    _sys.modules["mooncakefs._engine"] = _engine

from mooncakefs.client import RemoteStore, connect
from mooncakefs.errors import (
    BufferTooSmall,
    ChecksumError,
    Fenced,
    InvalidArgument,
    InvalidKey,
    KeyExists,
    KeyNotFound,
    MooncakeError,
    NotNewer,
    OutOfSpace,
    StaleEpoch,
    StoreClosed,
    StoreLocked,
    Unavailable,
)
from mooncakefs.store import ObjectInfo, Store, open

__version__ = "0.1.0"

__all__ = [
    "BufferTooSmall",
    "ChecksumError",
    "ClusterStore",
    "Fenced",
    "InvalidArgument",
    "InvalidKey",
    "KeyExists",
    "KeyNotFound",
    "MooncakeError",
    "NotNewer",
    "ObjectInfo",
    "OutOfSpace",
    "RemoteStore",
    "StaleEpoch",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "Unavailable",
    "__version__",
    "connect",
    "open",
]


def __getattr__(name: str) -> object:
    """``ClusterStore`` loads the etcd client only when a cluster is used."""
    if name == "ClusterStore":
        from mooncakefs.cluster.client import ClusterStore

        return ClusterStore
    raise AttributeError(f"module 'mooncakefs' has no attribute {name!r}")
