"""The ``tcp`` transport: the framed stream protocol over several connections to one peer.

Each connection has a worker thread.  A transfer is cut into stripes of at most ``stripe`` bytes that
the workers take from one queue, so a large transfer travels on every connection at once; each stripe
is received straight into (or sent straight from) its slice of the caller's buffer.  A stripe whose
connection breaks is put back on the queue for another connection, up to ``attempts`` times.  Each
worker keeps ``depth`` requests in flight on its connection (the peer answers them in order), so the
peer finds the next request waiting when it finishes a reply and the stream does not drain between
stripes; a write is never sent behind a read whose reply is still coming back.  The same
transport runs over the node's Unix socket, for values a local client cannot reach in shared memory.

With ``vectored`` (a peer that serves ``READV`` / ``WRITEV``: the public engine's server), the small
stripes of a batch are grouped when it is submitted into requests of many ranges each, one frame per
request, sent with one ``sendmsg`` and received with one ``recvmsg_into`` straight into the stripes'
buffers: a batch of 32 blocks of 4 KiB or of 64 KiB costs one round trip, not 32 hand-offs between
threads and requests.

With ``assist``, the thread that waits for a batch of at most ``connections`` requests (``Batch.wait``)
runs the batch's requests still queued itself, on a connection kept for waiting threads: a small
synchronous batch goes from the caller to the peer and back with no thread hand-off, while the workers
take what the caller has not.  Longer batches are left to the workers, whose pipelines do better.
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
VECTOR_BYTES = 2 << 20  # stripes up to this size travel together in one READV / WRITEV, at most this much
VECTOR_COUNT = 256  # ranges in one READV / WRITEV
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
        assist: bool = False,
    ) -> None:
        if connections < 1 or stripe < 1 or attempts < 1 or depth < 1:
            raise ValueError("connections, stripe, attempts and depth must all be positive")
        self._connect = connect
        self.label = label  # the path in messages: "tcp 10.0.0.2:7000 via eth1"
        self.vectored, self.assist = vectored, assist
        self._spare: list[Channel] = []  # connections of the threads that wait for their batches (``assist``)
        self.connections, self.stripe, self.attempts, self.depth = connections, stripe, attempts, depth
        self._queue: queue.SimpleQueue[list[_Stripe] | None] = queue.SimpleQueue()  # one request each
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
        stripes = []
        for t in transfers:
            n = len(t.buffer)
            for start in range(0, max(n, 1), self.stripe):
                end = min(n, start + self.stripe)
                stripes.append(_Stripe(t.op, t.buffer[start:end], t.region.handle, t.offset + start, batch))
        requests = self._requests(stripes)
        for request in requests:
            self._queue.put(request)
        if self.assist and len(requests) <= self.connections:  # a longer batch: the workers' pipelines do better
            batch.assist(lambda: self._assist(batch))

    def _requests(self, stripes: list[_Stripe]) -> list[list[_Stripe]]:
        """The stripes of one batch as requests, in order.  Without ``vectored``, one stripe each; with it,
        the small stripes of each op share requests of up to VECTOR_BYTES and VECTOR_COUNT ranges.  Full
        requests beat spreading a batch thinner over the connections on 2 cores (docs/architecture.md)."""
        if not self.vectored:
            return [[s] for s in stripes]
        out: list[list[_Stripe]] = []
        filling: dict[str, tuple[list[_Stripe], int]] = {}  # op -> (its open request, the request's bytes)
        for s in stripes:
            n = len(s.buffer)
            if n > VECTOR_BYTES:
                out.append([s])
                continue
            request, size = filling.get(s.op, (None, 0))
            if request is None or size + n > VECTOR_BYTES or len(request) >= VECTOR_COUNT:
                request, size = [], 0
                out.append(request)
            request.append(s)
            filling[s.op] = (request, size + n)
        return out

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
        """The next request to send: waits for one only when nothing is in flight, and takes another
        behind a request in flight only when no other worker is idle (a batch spreads over the
        connections first).  None when none can be sent now; [] when the transport is closing."""
        while True:
            if inflight:
                if self._idle:  # a connection with nothing to do takes it: spread a batch before queueing
                    return None
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    return None
            else:
                with self._idle_lock:
                    self._idle += 1
                try:
                    request = self._queue.get()
                finally:
                    with self._idle_lock:
                        self._idle -= 1
            if request is None:
                return []
            first = request[0]
            if first.batch.error is not None:  # the batch failed already: skip its other requests
                continue
            if first.op != READ and any(g[0].op == READ for g in inflight):
                # a write's payload sent while a read's reply comes back could fill both socket buffers
                # with neither side reading: it waits until the reads are in (never behind close's sentinels)
                with self._lock:
                    if self._closed:
                        first.batch.fail(TransferError("the transport is closed"))
                    else:
                        self._queue.put(request)
                return None
            return request

    def _assist(self, batch: Progress) -> None:
        """In the thread that waits for ``batch``: run its requests still queued, one at a time, on a
        connection kept for waiting threads.  A connection that breaks sends its request back to the
        workers (``_retry``); a request of another batch (or close's sentinel) goes back and ends it."""
        with self._lock:
            if self._closed:
                return
            channel = self._spare.pop() if self._spare else None
        try:
            while batch.error is None:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None or request[0].batch is not batch:
                    self._queue.put(request)
                    break
                if channel is None or channel.closed:
                    try:
                        channel = self._connect()
                    except Unavailable:
                        self._queue.put(request)  # the workers connect, and count the tries
                        break
                if not self._exchange(channel, request):
                    break
        finally:
            if channel is not None and not channel.closed:
                with self._lock:
                    keep = not self._closed and len(self._spare) < self.connections
                    if keep:
                        self._spare.append(channel)
                if not keep:
                    channel.close()

    def _exchange(self, channel: Channel, request: list[_Stripe]) -> bool:
        """One request and its reply on ``channel``; whether it completed.  A broken connection retries
        the request elsewhere; a refusal fails its batch."""
        sent = False
        try:
            self._send(channel, request)
            sent = True
            self._finish(channel, request)
        except Unavailable as exc:
            channel.close()
            self._retry([request], exc)
            return False
        except (MooncakeError, ValueError, TypeError) as exc:
            request[0].batch.fail(exc)
            if not sent or isinstance(exc, ProtocolError):  # otherwise an ERROR reply: still in step
                channel.close()
            return False
        except BaseException as exc:
            channel.close()
            request[0].batch.fail(exc)
            raise
        for s in request:
            s.batch.part_done(len(s.buffer))
        return True

    def _retry(self, groups: list[list[_Stripe]], exc: BaseException) -> None:
        """Requests whose connection broke go back on the queue for another try, up to ``attempts``."""
        for group in groups:
            s = group[0]
            for t in group:
                t.attempts += 1
            if s.attempts < self.attempts and not self._closed:
                self._queue.put(group)  # another connection (or a fresh one) takes it
            else:
                total = sum(len(t.buffer) for t in group)
                s.batch.fail(PathFailed(f"{s.op} of {total} bytes failed after {s.attempts} tries: {exc}"))

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
        if len(group) == 1:
            channel.read_payload_into(group[0].buffer)
        else:
            channel.read_payload_into_many([s.buffer for s in group])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
            spare, self._spare = self._spare, []
        for channel in spare:
            channel.close()
        for _ in workers:
            self._queue.put(None)
        for w in workers:
            with contextlib.suppress(RuntimeError):
                w.join(timeout=5)
