"""The transfer engine: moves bytes between registered memory of any two processes, on one host or many.

``TransferEngine`` has Mooncake's Python API (method names, arguments, return codes); ``Engine`` is the
same engine with buffers and exceptions.  ``core`` holds what both share with the node's clients:
transfers, batches, and the router that hands each transfer to a transport (``local``, ``tcp``,
``rdma``).  See docs/architecture.md.
"""

from mooncakefs.transfer.compat import TransferEngine, TransferNotify, TransferOpcode
from mooncakefs.transfer.core import READ, WRITE, Batch, Region, Router, Transfer, Transport
from mooncakefs.transfer.engine import Engine

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
