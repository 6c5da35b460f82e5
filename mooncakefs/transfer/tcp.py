"""The ``tcp`` transport: the framed stream protocol over several connections to one peer.

Each connection has a worker thread.  A transfer is cut into stripes of at most ``stripe`` bytes that
the workers take from one queue, so a large transfer travels on every connection at once; each stripe
is received straight into (or sent straight from) its slice of the caller's buffer.  A stripe whose
connection breaks is put back on the queue for another connection, up to ``attempts`` times.  Each
worker keeps ``depth`` requests in flight on its connection (the peer answers them in order), so the
peer finds the next request waiting when it finishes a reply and the stream does not drain between
stripes; a write is never sent behind a read whose reply is still coming back.  The same
transport runs over the node's Unix socket, for values a local client cannot reach in shared memory.

With ``vectored`` (a peer that serves ``READV`` / ``WRITEV``: the public engine's server), a worker
that takes a small stripe also takes the other small stripes of the same batch waiting in the queue
and moves them all in one frame: a batch of 32 blocks of 4 KiB costs one round trip, not 32.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mooncakefs.errors import MooncakeError, PathFailed, TransferError, Unavailable
from mooncakefs.transfer.core import READ, Progress, Transfer
from mooncakefs.wire import Channel, Op, ProtocolError

DEFAULT_STRIPE = 16 << 20
VECTOR_BYTES = 1 << 20  # stripes up to this size travel together in one READV / WRITEV
VECTOR_COUNT = 256
DEPTH = 2  # requests in flight per connection


@dataclass(slots=True)
class _Stripe:
    op: str
    buffer: memoryview
    handle: int
    offset: int
    batch: Progress
    attempts: int = 0


class TcpTransport:
    name = "tcp"

    def __init__(
        self,
        connect: Callable[[], Channel],
        *,
        connections: int = 4,
        stripe: int = DEFAULT_STRIPE,
        attempts: int = 3,
        vectored: bool = False,
        label: str = "tcp",
        depth: int = DEPTH,
    ) -> None:
        if connections < 1 or stripe < 1 or attempts < 1 or depth < 1:
            raise ValueError("connections, stripe, attempts and depth must all be positive")
        self._connect = connect
        self.label = label  # the path in messages: "tcp 10.0.0.2:7000 via eth1"
        self.vectored = vectored
        self.connections, self.stripe, self.attempts, self.depth = connections, stripe, attempts, depth
        self._queue: queue.SimpleQueue[_Stripe | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting for a stripe with nothing in flight
        self._idle_lock = threading.Lock()
        self._closed = False

    def accepts(self, transfer: Transfer) -> bool:
        return True

    def parts(self, transfer: Transfer) -> int:
        return max(1, -(-len(transfer.buffer) // self.stripe))

    def submit(self, transfers: list[Transfer], batch: Progress) -> None:
        self._start_workers()
        for t in transfers:
            n = len(t.buffer)
            for start in range(0, max(n, 1), self.stripe):
                end = min(n, start + self.stripe)
                self._queue.put(_Stripe(t.op, t.buffer[start:end], t.region.handle, t.offset + start, batch))

    def _start_workers(self) -> None:
        with self._lock:
            if self._closed:
                raise TransferError("the transport is closed")
            while len(self._workers) < self.connections:
                w = threading.Thread(target=self._work, name="mooncakefs-tcp", daemon=True)
                self._workers.append(w)
                w.start()

    def _work(self) -> None:
        """One connection's worker.  It keeps up to ``depth`` requests in flight on its connection, so the
        peer finds the next request waiting when it finishes a reply and the stream does not drain between
        stripes; the replies come back in order.  A connection that breaks puts every stripe in flight
        back on the queue; a request the peer refuses fails its batch alone."""
        channel: Channel | None = None
        inflight: collections.deque[list[_Stripe]] = collections.deque()
        stopping = False
        try:
            while inflight or not stopping:
                group = None
                try:
                    while not stopping and len(inflight) < self.depth:
                        group = self._take(inflight)
                        if group is None:
                            break
                        if not group:
                            stopping = True
                            break
                        if channel is None or channel.closed:
                            channel = self._connect()
                        self._send(channel, group)
                        inflight.append(group)
                    group = None
                    if inflight:
                        assert channel is not None
                        self._finish(channel, inflight[0])
                        for s in inflight.popleft():
                            s.batch.part_done(len(s.buffer))
                except Unavailable as exc:
                    if channel is not None:
                        channel.close()
                    self._retry([group, *inflight] if group else list(inflight), exc)
                    inflight.clear()
                except (MooncakeError, ValueError, TypeError) as exc:
                    # refused: an ERROR reply to the oldest request (the connection stays in step), or a
                    # request that could not be sent or a reply that broke the protocol (it does not)
                    failed = group or inflight.popleft()
                    failed[0].batch.fail(exc)
                    if group is not None or isinstance(exc, ProtocolError):
                        if channel is not None:
                            channel.close()
                        self._retry(list(inflight), exc)
                        inflight.clear()
        except BaseException as exc:
            for g in inflight:
                g[0].batch.fail(exc)
            raise
        finally:
            if channel is not None:
                channel.close()

    def _take(self, inflight: collections.deque[list[_Stripe]]) -> list[_Stripe] | None:
        """The next stripes to send as one request: waits for them only when nothing is in flight, and
        takes more behind a request in flight only when no other worker is idle (a batch spreads over the
        connections first).  None when none can be sent now; [] when the transport is closing."""
        while True:
            if inflight:
                if self._idle:  # a connection with nothing to do takes it: spread a batch before queueing
                    return None
                try:
                    stripe = self._queue.get_nowait()
                except queue.Empty:
                    return None
            else:
                with self._idle_lock:
                    self._idle += 1
                try:
                    stripe = self._queue.get()
                finally:
                    with self._idle_lock:
                        self._idle -= 1
            if stripe is None:
                return []
            if stripe.batch.error is not None:  # the batch failed already: skip its other stripes
                continue
            if stripe.op != READ and any(g[0].op == READ for g in inflight):
                # a write's payload sent while a read's reply comes back could fill both socket buffers
                # with neither side reading: it waits until the reads are in (never behind close's sentinels)
                with self._lock:
                    if self._closed:
                        stripe.batch.fail(TransferError("the transport is closed"))
                    else:
                        self._queue.put(stripe)
                return None
            return self._gather(stripe) if self.vectored and len(stripe.buffer) <= VECTOR_BYTES else [stripe]

    def _retry(self, groups: list[list[_Stripe]], exc: BaseException) -> None:
        """Stripes whose connection broke go back on the queue for another try, up to ``attempts``."""
        for group in groups:
            for s in group:
                s.attempts += 1
                if s.attempts < self.attempts and not self._closed:
                    self._queue.put(s)  # another connection (or a fresh one) takes it
                else:
                    s.batch.fail(PathFailed(f"{s.op} of {len(s.buffer)} bytes failed after {s.attempts} tries: {exc}"))

    def _gather(self, first: _Stripe) -> list[_Stripe]:
        """``first`` and the small stripes of its batch and op waiting behind it, up to a frame's worth."""
        group, size, others = [first], len(first.buffer), []
        while len(group) < VECTOR_COUNT and size < VECTOR_BYTES:
            try:
                s = self._queue.get_nowait()
            except queue.Empty:
                break
            if s is None or s.batch is not first.batch or s.op != first.op or len(s.buffer) > VECTOR_BYTES:
                others.append(s)
                break
            group.append(s)
            size += len(s.buffer)
        for s in others:
            self._queue.put(s)
        return group

    @staticmethod
    def _send(channel: Channel, group: list[_Stripe]) -> None:
        """The request for ``group``: one range (READ / WRITE) or several (READV / WRITEV)."""
        s = group[0]
        if len(group) > 1:
            ranges = [[g.handle + g.offset, len(g.buffer)] for g in group]
            if s.op == READ:
                channel.send(Op.READV, ranges)
            else:
                channel.send(Op.WRITEV, ranges, [g.buffer for g in group])
        elif s.op == READ:
            channel.send(Op.READ, [s.handle, s.offset, len(s.buffer)])
        else:
            channel.send(Op.WRITE, [s.handle, s.offset], s.buffer)

    @staticmethod
    def _finish(channel: Channel, group: list[_Stripe]) -> None:
        """The reply to ``group``'s request; a read's bytes go straight into the stripes' buffers."""
        _meta, size = channel.read_reply()
        if group[0].op != READ:
            return
        wanted = sum(len(s.buffer) for s in group)
        if size != wanted:
            raise ProtocolError(f"{channel.peer}: asked for {wanted} bytes, got {size}")
        for s in group:
            channel.read_payload_into(s.buffer)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for _ in workers:
            self._queue.put(None)
        for w in workers:
            with contextlib.suppress(RuntimeError):
                w.join(timeout=5)
