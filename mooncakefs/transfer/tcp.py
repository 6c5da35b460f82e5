"""The ``tcp`` transport: the framed stream protocol over several connections to one peer.

Each connection has a worker thread.  A transfer is cut into stripes of at most ``stripe`` bytes that
the workers take from one queue, so a large transfer travels on every connection at once; each stripe
is received straight into (or sent straight from) its slice of the caller's buffer.  A stripe whose
connection breaks is put back on the queue for another connection, up to ``attempts`` times.  The same
transport runs over the node's Unix socket, for values a local client cannot reach in shared memory.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mooncakefs.errors import MooncakeError, TransferError, Unavailable
from mooncakefs.transfer import READ, Batch, Transfer
from mooncakefs.wire import Channel, Op, ProtocolError

DEFAULT_STRIPE = 16 << 20


@dataclass(slots=True)
class _Stripe:
    op: str
    buffer: memoryview
    handle: int
    offset: int
    batch: Batch
    attempts: int = 0


class TcpTransport:
    name = "tcp"

    def __init__(self, connect: Callable[[], Channel], *, connections: int = 4, stripe: int = DEFAULT_STRIPE,
                 attempts: int = 3) -> None:
        if connections < 1 or stripe < 1 or attempts < 1:
            raise ValueError("connections, stripe and attempts must all be positive")
        self._connect = connect
        self.connections, self.stripe, self.attempts = connections, stripe, attempts
        self._queue: queue.SimpleQueue[_Stripe | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def accepts(self, transfer: Transfer) -> bool:
        return True

    def parts(self, transfer: Transfer) -> int:
        return max(1, -(-len(transfer.buffer) // self.stripe))

    def submit(self, transfers: list[Transfer], batch: Batch) -> None:
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
                try:
                    if channel is None or channel.closed:
                        channel = self._connect()
                    self._move(channel, stripe)
                except Unavailable as exc:
                    if channel is not None:
                        channel.close()
                    stripe.attempts += 1
                    if stripe.attempts < self.attempts and not self._closed:
                        self._queue.put(stripe)  # another connection (or a fresh one) takes it
                    else:
                        stripe.batch.fail(TransferError(
                            f"{stripe.op} of {len(stripe.buffer)} bytes failed after {stripe.attempts} tries: {exc}"))
                except (MooncakeError, ValueError, TypeError) as exc:  # the peer refused it: no retry helps
                    stripe.batch.fail(exc)
                except BaseException as exc:
                    stripe.batch.fail(exc)
                    raise
                else:
                    stripe.batch.part_done(len(stripe.buffer))
        finally:
            if channel is not None:
                channel.close()

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
