"""The ``tcp`` transport: the framed stream protocol over several connections to one peer.

Each connection has a worker thread.  A transfer is cut into stripes of at most ``stripe`` bytes that
the workers take from one queue, so a large transfer travels on every connection at once; each stripe
is received straight into (or sent straight from) its slice of the caller's buffer.  A stripe whose
connection breaks is put back on the queue for another connection, up to ``attempts`` times.  The same
transport runs over the node's Unix socket, for values a local client cannot reach in shared memory.

With ``vectored`` (a peer that serves ``READV`` / ``WRITEV``: the public engine's server), a worker
that takes a small stripe also takes the other small stripes of the same batch waiting in the queue
and moves them all in one frame: a batch of 32 blocks of 4 KiB costs one round trip, not 32.
"""

from __future__ import annotations

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
    ) -> None:
        if connections < 1 or stripe < 1 or attempts < 1:
            raise ValueError("connections, stripe and attempts must all be positive")
        self._connect = connect
        self.label = label  # the path in messages: "tcp 10.0.0.2:7000 via eth1"
        self.vectored = vectored
        self.connections, self.stripe, self.attempts = connections, stripe, attempts
        self._queue: queue.SimpleQueue[_Stripe | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
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
        channel: Channel | None = None
        try:
            while (stripe := self._queue.get()) is not None:
                if stripe.batch.error is not None:  # the batch failed already: skip its other stripes
                    continue
                group = self._gather(stripe) if self.vectored and len(stripe.buffer) <= VECTOR_BYTES else [stripe]
                try:
                    if channel is None or channel.closed:
                        channel = self._connect()
                    if len(group) == 1:
                        self._move(channel, stripe)
                    else:
                        self._move_many(channel, group)
                except Unavailable as exc:
                    if channel is not None:
                        channel.close()
                    for s in group:
                        s.attempts += 1
                        if s.attempts < self.attempts and not self._closed:
                            self._queue.put(s)  # another connection (or a fresh one) takes it
                        else:
                            s.batch.fail(
                                PathFailed(f"{s.op} of {len(s.buffer)} bytes failed after {s.attempts} tries: {exc}")
                            )
                except (MooncakeError, ValueError, TypeError) as exc:  # the peer refused it: no retry helps
                    stripe.batch.fail(exc)
                except BaseException as exc:
                    stripe.batch.fail(exc)
                    raise
                else:
                    for s in group:
                        s.batch.part_done(len(s.buffer))
        finally:
            if channel is not None:
                channel.close()

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
    def _move_many(channel: Channel, group: list[_Stripe]) -> None:
        ranges = [[s.handle + s.offset, len(s.buffer)] for s in group]
        if group[0].op == READ:
            channel.send(Op.READV, ranges)
            _meta, size = channel.read_reply()
            if size != sum(r[1] for r in ranges):
                raise ProtocolError(f"{channel.peer}: asked for {sum(r[1] for r in ranges)} bytes, got {size}")
            for s in group:
                channel.read_payload_into(s.buffer)
        else:
            channel.send(Op.WRITEV, ranges, [s.buffer for s in group])
            channel.read_reply()

    @staticmethod
    def _move(channel: Channel, s: _Stripe) -> None:
        n = len(s.buffer)
        if s.op == READ:
            channel.send(Op.READ, [s.handle, s.offset, n])
            _meta, size = channel.read_reply()
            if size != n:
                raise ProtocolError(f"{channel.peer}: asked for {n} bytes, got {size}")
            channel.read_payload_into(s.buffer)
        else:
            channel.send(Op.WRITE, [s.handle, s.offset], s.buffer)
            channel.read_reply()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for _ in workers:
            self._queue.put(None)
        for w in workers:
            with contextlib.suppress(RuntimeError):
                w.join(timeout=5)
