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

``rdma`` slots in by implementing ``Transport`` (``rdma.py``).  The public engine gives a peer several
*paths* (one per address the peer serves on, each behind the local NIC that reaches it, and the
same-host path before them): the router orders them per transfer and moves the transfers of a failed
path to the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mooncakefs.errors import MooncakeError, PathFailed, TransferError, Unavailable

log = logging.getLogger("mooncakefs.transfer")

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
        self._helpers: list[Callable[[], None]] = []
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

    def assist(self, helper: Callable[[], None]) -> None:
        """A transport's offer to move part of the batch in the thread that waits for it: ``wait`` runs
        ``helper`` before it blocks, so a small batch needs no hand-off to another thread and back."""
        self._helpers.append(helper)

    def done(self) -> bool:
        """Poll: True once the batch has completed or failed."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the batch completes; returns the bytes moved.  TransferError if a transfer failed
        (or the wait timed out).  The transports' helpers run first, in this thread; a helper waits for a
        silent peer no longer than its connection's I/O timeout, which can carry the wait past ``timeout``."""
        if self._helpers:
            deadline = None if timeout is None else time.monotonic() + timeout
            helpers, self._helpers = self._helpers, []
            for helper in helpers:
                if not self._done.is_set():
                    helper()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._done.wait(timeout):
            raise TransferError(f"transfer batch not complete after {timeout} s")
        if self.error is not None:
            if isinstance(self.error, TransferError):
                raise self.error
            raise TransferError(f"transfer failed: {self.error}") from self.error
        return self.transferred


class Progress(Protocol):
    """What a transport reports a batch's progress to: the ``Batch``, or the router's share of it."""

    error: BaseException | None

    def part_done(self, nbytes: int) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def add_parts(self, n: int) -> None: ...

    def assist(self, helper: Callable[[], None]) -> None: ...


class Transport(Protocol):
    name: str

    def accepts(self, transfer: Transfer) -> bool:
        """Whether this transport can carry the transfer at all."""
        ...

    def submit(self, transfers: list[Transfer], batch: Progress) -> None:
        """Start the transfers; report each finished part (or the failure) to ``batch``."""
        ...

    def parts(self, transfer: Transfer) -> int:
        """How many ``part_done`` calls the transfer will make."""
        ...

    def close(self) -> None: ...


DOWN_SECONDS = 10.0  # a path that failed is tried after the others for this long


def path_failure(exc: BaseException) -> bool:
    """Whether a failure is the path's (another path may carry the transfer) rather than the request's
    (not registered, out of bounds, refused: no path helps)."""
    return isinstance(exc, PathFailed | Unavailable | ConnectionError | TimeoutError)


class _Leg:
    """The share of a batch one transport carries: it stands in for the batch towards the transport, so a
    failed path hands its transfers to the next path instead of failing the batch.  Once failed over, the
    leg is dead: its stripes still queued are skipped (their ``batch.error`` is set) and late completions
    are ignored."""

    __slots__ = ("_left", "_lock", "batch", "dead", "index", "items", "nbytes", "router")

    def __init__(self, router: Router, batch: Batch, index: int, items: list[_Routed], parts: int) -> None:
        self.router, self.batch, self.index, self.items = router, batch, index, items
        self.nbytes = sum(len(r.transfer.buffer) for r in items)
        self._left = parts
        self._lock = threading.Lock()
        self.dead = False

    @property
    def error(self) -> BaseException | None:
        return self.batch.error if not self.dead else _FAILED_OVER

    def add_parts(self, n: int) -> None:
        with self._lock:
            self._left += n

    def part_done(self, nbytes: int) -> None:
        with self._lock:
            if self.dead:
                return
            self._left -= 1
            finished = self._left == 0
        if finished:
            self.batch.part_done(self.nbytes)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
        self.router._leg_failed(self, exc)

    def assist(self, helper: Callable[[], None]) -> None:
        self.batch.assist(helper)


_FAILED_OVER = PathFailed("this path failed; its transfers went to another")


@dataclass(slots=True)
class _Routed:
    """A transfer, the transports that may carry it (most preferred first), and what failed so far."""

    transfer: Transfer
    candidates: list[int]
    failures: list[str] = field(default_factory=list)


class Router:
    """Routes each transfer of a batch to the first transport that accepts it, in preference order:
    the list's, or ``order(transfer, index in batch)``'s (the engine ranks its paths by NUMA node and
    spreads a batch over them).  A transport that fails for reasons of the path (``path_failure``) hands
    its transfers to the next candidate and is tried last for ``DOWN_SECONDS``; the batch fails when a
    request is refused, or when every path of a transfer failed (``PathFailed``, naming each)."""

    def __init__(
        self,
        transports: list[Transport],
        order: Callable[[Transfer, int], Sequence[int]] | None = None,
        peer: str = "",
    ) -> None:
        self.transports = transports
        self._order = order
        self.peer = peer
        self._down: dict[int, float] = {}

    def label(self, index: int) -> str:
        transport = self.transports[index]
        return getattr(transport, "label", transport.name)

    def is_down(self, index: int) -> bool:
        """Whether transport ``index`` failed lately (it is tried after the others until ``DOWN_SECONDS``)."""
        return bool(self._down) and self._down.get(index, 0.0) > time.monotonic()

    def _candidates(self, transfer: Transfer, position: int) -> list[int]:
        order = self._order(transfer, position) if self._order is not None else range(len(self.transports))
        usable = [i for i in order if self.transports[i].accepts(transfer)]
        if not self._down:
            return usable
        now = time.monotonic()
        up = [i for i in usable if self._down.get(i, 0.0) <= now]
        return up + [i for i in usable if i not in up]

    def submit(self, transfers: list[Transfer]) -> Batch:
        routed = []
        for position, t in enumerate(transfers):
            candidates = self._candidates(t, position)
            if not candidates:
                raise TransferError(f"no transport can carry a {t.op} of {len(t.buffer)} bytes")
            routed.append(_Routed(t, candidates))
        groups = _group(routed)
        batch = Batch(len(groups))
        batch.nbytes = sum(len(t.buffer) for t in transfers)
        for index, items in groups.items():
            self._start(batch, index, items, failing_over=False)
        return batch

    def _start(self, batch: Batch, index: int, items: list[_Routed], failing_over: bool = True) -> None:
        """Hand a group to its transport.  One that cannot even start (closed, no device) raises to the
        caller of ``submit``; while failing over, in a transport's thread, it counts as that path failing."""
        transport = self.transports[index]
        group = [r.transfer for r in items]
        leg = _Leg(self, batch, index, items, sum(transport.parts(t) for t in group))
        try:
            transport.submit(group, leg)
        except (MooncakeError, OSError) as exc:
            if not failing_over:
                raise
            leg.fail(exc)

    def _leg_failed(self, leg: _Leg, exc: BaseException) -> None:
        batch = leg.batch
        if batch.error is not None:
            return
        if not path_failure(exc):
            batch.fail(exc)
            return
        label = self.label(leg.index)
        self._down[leg.index] = time.monotonic() + DOWN_SECONDS
        moved: list[_Routed] = []
        for r in leg.items:
            r.failures.append(f"{label}: {exc}")
            r.candidates = [i for i in r.candidates if i != leg.index]
            if not r.candidates:
                batch.fail(
                    PathFailed(
                        f"every path{_to(self.peer)} failed for a {r.transfer.op} of {len(r.transfer.buffer)} bytes: "
                        + "; ".join(r.failures)
                    )
                )
                return
            moved.append(r)
        groups = _group(moved)
        log.warning("path %s%s failed (%s): %d transfers go to the next path", label, _to(self.peer), exc, len(moved))
        batch.add_parts(len(groups) - 1)  # the failed leg's part is replaced by the new legs'
        for index, items in groups.items():
            self._start(batch, index, items)

    def run(self, transfers: list[Transfer], timeout: float | None = None) -> int:
        """Submit and wait."""
        return self.submit(transfers).wait(timeout)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


def _group(routed: list[_Routed]) -> dict[int, list[_Routed]]:
    groups: dict[int, list[_Routed]] = {}
    for r in routed:
        groups.setdefault(r.candidates[0], []).append(r)
    return groups


def _to(peer: str) -> str:
    return f" to {peer}" if peer else ""


__all__ = ["READ", "WRITE", "Batch", "Progress", "Region", "Router", "Transfer", "Transport", "path_failure"]
