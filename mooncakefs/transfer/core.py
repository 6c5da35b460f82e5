"""The transfer engine's core: batches, transfers and the router that hands each to a transport.

Both faces of the engine run on this: the node's clients (``client.py``: a region is a leased value or
a reserved put) and the public ``TransferEngine`` (``engine.py``: a region is memory a peer registered).

A *region* is memory a peer has made reachable for one purpose: a value it leased for reading, or the
room it reserved for a put.  A transfer reads a region into a local buffer or writes a local buffer
into one.  Transfers are submitted in batches and complete asynchronously (``Batch.wait`` /
``Batch.done``); the engine hands each to the first transport that can carry it:

- ``local``: the region is in a pool this process has mapped (same host): a memcpy with the GIL
  released, no socket at all;
- ``tcp``: the framed stream protocol, over several connections per peer; large transfers are split
  into stripes that travel on different connections at once, and a stripe whose connection fails is
  retried on another.

``rdma`` slots in by implementing ``Transport`` (``rdma.py``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from mooncakefs.errors import TransferError

READ, WRITE = "read", "write"


@dataclass(frozen=True, slots=True)
class Region:
    """A peer's memory a transfer may touch: ``handle`` names it to the peer; ``pool_offset`` is where
    it sits in the peer's shared pool (-1 if it is not there, or the pool is not mapped here)."""

    handle: int
    size: int
    pool_offset: int = -1


@dataclass(slots=True)
class Transfer:
    """Move ``len(buffer)`` bytes between ``buffer`` and ``region`` at ``offset``."""

    op: str  # READ (region → buffer) or WRITE (buffer → region)
    buffer: memoryview  # a byte view; writable for a READ
    region: Region
    offset: int = 0

    def __post_init__(self) -> None:
        if self.op not in (READ, WRITE):
            raise ValueError(f"transfer op must be {READ!r} or {WRITE!r}, got {self.op!r}")
        if not 0 <= self.offset <= self.offset + len(self.buffer) <= self.region.size:
            raise ValueError(
                f"transfer of {len(self.buffer)} bytes at {self.offset} is outside a {self.region.size}-byte region"
            )


class Batch:
    """Transfers submitted together; complete when every part of every one has moved, or one failed."""

    def __init__(self, parts: int) -> None:
        self._left = parts
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.transferred = 0
        self.nbytes = 0  # what the batch will move in all (set by the router)
        if parts == 0:
            self._done.set()

    def add_parts(self, n: int) -> None:
        """A transport handing a transfer to another that cuts it finer says how many more parts come."""
        with self._lock:
            self._left += n

    def part_done(self, nbytes: int) -> None:
        with self._lock:
            self.transferred += nbytes
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
            self._done.set()

    def done(self) -> bool:
        """Poll: True once the batch has completed or failed."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the batch completes; returns the bytes moved.  TransferError if a transfer failed
        (or the wait timed out)."""
        if not self._done.wait(timeout):
            raise TransferError(f"transfer batch not complete after {timeout} s")
        if self.error is not None:
            if isinstance(self.error, TransferError):
                raise self.error
            raise TransferError(f"transfer failed: {self.error}") from self.error
        return self.transferred


class Transport(Protocol):
    name: str

    def accepts(self, transfer: Transfer) -> bool:
        """Whether this transport can carry the transfer at all."""
        ...

    def submit(self, transfers: list[Transfer], batch: Batch) -> None:
        """Start the transfers; report each finished part (or the failure) to ``batch``."""
        ...

    def parts(self, transfer: Transfer) -> int:
        """How many ``part_done`` calls the transfer will make."""
        ...

    def close(self) -> None: ...


class Router:
    """Routes each transfer of a batch to the first transport (in preference order) that accepts it."""

    def __init__(self, transports: list[Transport]) -> None:
        self.transports = transports

    def submit(self, transfers: list[Transfer]) -> Batch:
        routed: dict[int, list[Transfer]] = {}
        parts = 0
        for t in transfers:
            for i, transport in enumerate(self.transports):
                if transport.accepts(t):
                    routed.setdefault(i, []).append(t)
                    parts += transport.parts(t)
                    break
            else:
                raise TransferError(f"no transport can carry a {t.op} of {len(t.buffer)} bytes")
        batch = Batch(parts)
        batch.nbytes = sum(len(t.buffer) for t in transfers)
        for i, group in routed.items():
            self.transports[i].submit(group, batch)
        return batch

    def run(self, transfers: list[Transfer], timeout: float | None = None) -> int:
        """Submit and wait."""
        return self.submit(transfers).wait(timeout)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


__all__ = ["READ", "WRITE", "Batch", "Region", "Router", "Transfer", "Transport"]
