"""mooncakefs: a tiered KVCache storage engine.

import mooncakefs
with mooncakefs.open("./kv", dram="2GiB", ssd="20GiB") as store:
    store.put("model/layer0/blk-17", kv_block)
    n = store.get_into("model/layer0/blk-17", out)

store = mooncakefs.connect("unix:///run/mooncakefs/node.sock")    # a node; "etcd://host:2379/prod": a cluster
"""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import TYPE_CHECKING, Any

if _os.environ.get("MOONCAKEFS_ENGINE", "cython") not in ("cython", "python"):
    raise ImportError(f"MOONCAKEFS_ENGINE={_os.environ['MOONCAKEFS_ENGINE']!r}: expected 'cython' or 'python'")
if _os.environ.get("MOONCAKEFS_ENGINE") == "python":
    # The pure-Python twins stand in for the Cython hot paths everywhere, child processes included (they
    # inherit the variable): the test suite runs this way too, so both engines keep one behaviour.
    from mooncakefs import _reference as _engine

    _sys.modules["mooncakefs._engine"] = _engine

from mooncakefs.api import KVStore, ObjectInfo, PutOptions
from mooncakefs.client import RemoteStore
from mooncakefs.errors import (
    BufferTooSmall,
    ChecksumError,
    CudaUnavailable,
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
from mooncakefs.store import Store, open

if TYPE_CHECKING:
    from mooncakefs.cluster.client import ClusterStore  # loaded on first use: __getattr__, connect

__version__ = "0.1.0"

__all__ = [
    "BufferTooSmall",
    "ChecksumError",
    "ClusterStore",
    "CudaUnavailable",
    "Fenced",
    "InvalidArgument",
    "InvalidKey",
    "KVStore",
    "KeyExists",
    "KeyNotFound",
    "MooncakeError",
    "NotNewer",
    "ObjectInfo",
    "OutOfSpace",
    "PutOptions",
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


def connect(url: str | _os.PathLike[str] | None = None, **options: Any) -> RemoteStore | ClusterStore:
    """A client of the node at ``url``: "unix:///run/mooncakefs/node.sock" (same host: data moves by
    memcpy through the shared pool) or "tcp://host:7480".  Default: the local node's socket.
    "etcd://host:2379/CLUSTER" gives a ``ClusterStore`` over every node of a cluster instead (its
    put takes replicas=R and placement="local"; option failover: seconds to wait out a dead node).

    Options: secret (the cluster secret, default $MOONCAKEFS_SECRET), timeout (seconds a request may
    wait on the node, 10), connections (TCP connections for large transfers, 4), stripe (bytes per
    stripe of a large transfer, 16 MiB), inline_max (largest value carried in the request or reply
    itself: 32 KiB on the Unix socket, 64 MiB over TCP), prefault_pool (same host: map every page of
    the node's pool in a background thread at once, for a long-lived client that moves much data
    through it; False)."""
    if isinstance(url, str) and url.startswith("etcd://"):
        from mooncakefs.cluster.client import ClusterStore  # not at the top: it loads grpc, for clusters only

        return ClusterStore(url, **options)
    return RemoteStore(url, **options)


def __getattr__(name: str) -> object:
    """``ClusterStore`` loads the etcd client only when a cluster is used."""
    if name == "ClusterStore":
        from mooncakefs.cluster.client import ClusterStore

        return ClusterStore
    raise AttributeError(f"module 'mooncakefs' has no attribute {name!r}")
