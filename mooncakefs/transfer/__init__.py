"""The transfer engine: moves bytes between registered memory of any two processes, on one host or many.

``TransferEngine`` has Mooncake's Python API (method names, arguments, return codes); ``Engine`` is the
same engine with buffers and exceptions.  ``core`` holds what both share with the node's clients:
transfers, batches, and the router that hands each transfer to a transport (``local``, ``tcp``,
``rdma``).  See docs/architecture.md.

The names are imported on first use: a store client needs ``core`` and two transports, not the engine
with its etcd client (grpc) and RDMA driver, which take most of ``import mooncakefs``'s time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mooncakefs.transfer.compat import TransferEngine, TransferNotify, TransferOpcode
    from mooncakefs.transfer.core import READ, WRITE, Batch, Region, Router, Transfer, Transport
    from mooncakefs.transfer.engine import Engine

_WHERE = {
    "TransferEngine": "compat",
    "TransferNotify": "compat",
    "TransferOpcode": "compat",
    "READ": "core",
    "WRITE": "core",
    "Batch": "core",
    "Region": "core",
    "Router": "core",
    "Transfer": "core",
    "Transport": "core",
    "Engine": "engine",
}

__all__ = [
    "READ",
    "WRITE",
    "Batch",
    "Engine",
    "Region",
    "Router",
    "Transfer",
    "TransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "Transport",
]


def __getattr__(name: str) -> Any:
    """``Engine`` and the rest, imported from their module the first time they are asked for."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
