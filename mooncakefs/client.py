"""The client of a node: ``mooncakefs.connect(url)`` gives the same Store API as ``mooncakefs.open()``.

Over the node's Unix socket the client maps the node's DRAM pool, so large values move by memcpy in
this process and the socket only carries the control messages; small ones travel inside the request
or reply, which is one round trip.  Over TCP the bytes travel in frames, received straight into the
caller's buffer, large ones striped over several connections by the transfer engine.

Every request is bounded by ``timeout``: a node that dies or stops answering is an ``Unavailable``
error, never a hang.  A connection found dead when it is taken from the pool is replaced once (the
node restarted); a restarted node's new pool is mapped again.

Every value that crosses a socket carries its CRC-32C (``mooncakefs.wire``): the node refuses a put
whose bytes do not match it, and a get checks the bytes where they land, in the caller's buffer.
Values copied through the shared pool on the node's host are not checked (no wire to corrupt them).
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mooncakefs import shm
from mooncakefs._engine import SharedIndex, address, bytes_to_fill, crc32c, fill_bytes
from mooncakefs.api import (
    BATCH_ERRORS,
    PLAIN_PUT,
    KVMapping,
    ObjectInfo,
    PutOptions,
    batch_targets,
    check_seconds,
    check_tier,
    holds_objects,
    key_list,
    put_options,
    put_pairs,
    raise_buffer_error,
    value_error,
)
from mooncakefs.errors import (
    BufferTooSmall,
    InvalidArgument,
    MooncakeError,
    ProtocolError,
    Unavailable,
    describe_key,
)
from mooncakefs.heap import keep_freed, keep_values
from mooncakefs.keys import Key, decode_key, encode_key, encode_prefix, key_digest
from mooncakefs.sockets import check_socket_path, default_socket
from mooncakefs.transfer.core import READ, WRITE, Region, Router, Transfer, Transport
from mooncakefs.transfer.local import LocalTransport
from mooncakefs.transfer.tcp import DEFAULT_STRIPE, TcpTransport
from mooncakefs.wire import (
    CRC_TRAILER,
    FIRST_READ,
    LINE,
    MAX_BATCH,
    WITH_CRC,
    Channel,
    Op,
    check_crc,
    client_handshake,
    crc_error,
    error_from_meta,
    pack_put_options,
    unpack_version,
)

T = TypeVar("T")
DEFAULT_PORT = 7480
LOCAL_INLINE_MAX = 32 << 10  # same host: above this a value moves by memcpy through the mapped pool
# Over TCP, one connection streaming a value is as fast as striping it on these 2-core hosts (2.9 vs
# 2.4-2.6 GB/s for 16 MiB, tools/bench/node_bench.py); stripes pay off only for very large values.
TCP_INLINE_MAX = 64 << 20
BATCH_INLINE_MAX = 4 << 20  # a batched put up to this size goes in one frame
MADV_POPULATE_WRITE = 23  # Linux 5.14 (the mmap module of Python 3.11 does not name it)
PREFAULT_STEP = 4 << 20  # the pool is mapped in steps this big (each holds the GIL a millisecond or two)
REPLY_HEAD_READ = 256  # a get reply's header and meta (and what padding follows them) fit this


def prefault_mapping(pool: mmap.mmap) -> None:
    """Map every page of the node's pool into this process now, in a background thread.  The pool is
    backed by memory already (the node prefaults it), but each process that maps it pays a page fault
    the first time it touches each 4 KiB page: on these VMs a copy into pages not yet mapped here runs at
    ~0.5 GB/s against 3.5 GB/s into mapped ones (~7 ms per 4 MiB chunk, several times the copy).  A
    long-lived client that streams data through the pool (a cluster mount keeping what it fetched) pays
    it here once instead of on its data path."""
    try:
        for off in range(0, len(pool), PREFAULT_STEP):
            pool.madvise(MADV_POPULATE_WRITE, off, min(PREFAULT_STEP, len(pool) - off))
    except (OSError, ValueError):  # an older kernel, or the pool was closed meanwhile: faults as before
        pass


def parse_url(url: str | os.PathLike[str] | None) -> tuple[str, Any]:
    """("unix", path) or ("tcp", (host, port)) from "unix:///p", "/p", "tcp://host:port"."""
    if url is None:
        return "unix", str(default_socket()[0])
    text = os.fspath(url)
    if text.startswith("/") or text.startswith("."):
        return "unix", text
    parts = urlsplit(text)
    if parts.scheme == "unix":
        return "unix", parts.path
    try:
        port = parts.port  # ValueError for one that is not a number from 0 to 65535
    except ValueError:
        port = -1
    if parts.scheme == "tcp" and parts.hostname and port != -1:
        return "tcp", (parts.hostname, port or DEFAULT_PORT)
    raise InvalidArgument(
        f"node URL must be unix:///path/to/node.sock or tcp://host:port "
        f"(a cluster: etcd://host:2379/CLUSTER, through mooncakefs.connect), got {text!r}"
    )


def _bytes_of(value: Any) -> memoryview:
    """A value to put as flat bytes; InvalidArgument, worded as the embedded store words it, if it is
    not a C-contiguous buffer."""
    try:
        view = memoryview(value)
    except TypeError:
        raise value_error(value) from None
    if not view.c_contiguous or holds_objects(view.format):
        raise value_error(value)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def batch_values(slots: list[Any]) -> list[bytes | None]:
    """``batch_get``'s answer from ``_batch_read``'s slots: each value as bytes, None for a miss or an
    error; the heap they take is kept for the next batch (``heap.keep_freed``)."""
    values = [bytes(v) if isinstance(v, bytearray) else v if isinstance(v, bytes) else None for v in slots]
    keep_freed(sum(map(len, filter(None, values))))
    return values


def _writable_bytes_of(buffer: Any) -> memoryview:
    """A buffer to read a value into, as flat bytes; InvalidArgument if it cannot take one."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise_buffer_error(buffer)  # says why
        raise
    if view.readonly or not view.c_contiguous or holds_objects(view.format):
        raise_buffer_error(buffer)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class RemoteValueView:
    """``RemoteStore.view``'s context manager: the value in the mapped pool (no copy) under a lease, or
    a private copy of it."""

    def __init__(self, store: RemoteStore, key: Key) -> None:
        self._store, self._key = store, key
        self._view: memoryview | None = None
        self._lease: tuple[Channel, int] | None = None

    def __enter__(self) -> memoryview:
        self._view, self._lease = self._store._view(self._key)
        return self._view

    def __exit__(self, *exc: object) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._lease is not None:
            ch, lease = self._lease
            self._store._release(ch, [lease])
            self._lease = None


class RemoteStore(KVMapping):
    """A node's store, seen from a client process.  Thread-safe: each thread borrows a connection."""

    _fatal = Unavailable  # fails a whole batch call; other errors are reported per item

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        secret: bytes | str | None = None,
        timeout: float = 10.0,
        connections: int = 4,
        stripe: int = DEFAULT_STRIPE,
        inline_max: int | None = None,
        map_pool: bool = True,
        prefault_pool: bool = False,
    ) -> None:
        self.kind, self.address = parse_url(url)
        self.url = f"unix://{self.address}" if self.kind == "unix" else f"tcp://{self.address[0]}:{self.address[1]}"
        self.path = self.url  # what the embedded Store calls its location
        self._socket_chosen = url is not None or default_socket()[1]  # a default path must be in our dirs
        secret = secret if secret is not None else os.environ.get("MOONCAKEFS_SECRET")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.timeout = check_seconds(timeout, "timeout")
        self._idle: list[Channel] = []
        self._lock = threading.Lock()
        self._closed = False
        self._instance: str | None = None
        self._pool: mmap.mmap | None = None
        self._pool_view: memoryview | None = None
        self._index: SharedIndex | None = None  # the node's index of DRAM values, read with no round trip
        self._map_pool = map_pool and self.kind == "unix"
        self._prefault_pool = prefault_pool  # map the node's pool's pages in the background (prefault_mapping)
        # Values up to inline_max travel inside the request or reply; larger ones through the engine.
        self.inline_max = (
            inline_max if inline_max is not None else (LOCAL_INLINE_MAX if self._map_pool else TCP_INLINE_MAX)
        )
        self._tcp = TcpTransport(self._connect, connections=connections, stripe=stripe)
        self._engine = Router([self._tcp])
        self._give_back(self._connect())  # fail now, clearly, if the node is not there
        keep_values()  # values of up to 32 MiB leave the heap they free to the next (heap.py)

    # -- connections ------------------------------------------------------------------------------------

    def _connect(self) -> Channel:
        """A fresh connection, past the handshake (and the pool mapped, the first time or after the node
        restarted)."""
        if self.kind == "unix":
            check_socket_path(self.address, self._socket_chosen)
        family = (
            socket.AF_UNIX if self.kind == "unix" else socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot reach the node at {self.url}: {exc.strerror or exc}") from None
        sock.settimeout(None)
        ch = Channel(sock, self.url, timeout=self.timeout)
        try:
            instance = client_handshake(ch, self._secret, "node")
            if instance != self._instance:
                self._attach(ch, instance)
            elif self._map_pool:
                self._mark_mapped(ch)
        except BaseException:
            ch.close()
            raise
        return ch

    def _attach(self, ch: Channel, instance: str) -> None:
        """A node instance seen for the first time: map its pool (same host) and route through it."""
        with self._lock:
            if instance == self._instance:
                return
            transports: list[Transport] = [self._tcp]
            if self._map_pool:
                ch.send(Op.MAP)
                op, _flags, meta, _n, fds = ch.read_frame_with_fds(2)
                try:
                    if op == Op.ERROR:
                        raise error_from_meta(meta)
                    if len(fds) != 2:
                        raise ProtocolError(f"{self.url}: the node did not pass its pool and index")
                    self._pool = shm.map_whole(fds[0], meta[0])
                    index_map = mmap.mmap(fds[1], meta[1], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    for fd in fds:
                        os.close(fd)
                self._pool_view = memoryview(self._pool)
                if self._prefault_pool:
                    threading.Thread(
                        target=prefault_mapping, args=(self._pool,), daemon=True, name="mooncakefs-pool-prefault"
                    ).start()
                try:
                    self._index = SharedIndex(index_map, self._pool)
                except ValueError:
                    raise MooncakeError(
                        f"{self.url}: the node's shared index is damaged, so its pool cannot be trusted either: "
                        "a process with access to the node's socket wrote over it (see docs/security.md).  "
                        "Restart the node, and find who has access to its socket (--socket-mode, --socket-group)"
                    ) from None
                transports.insert(0, LocalTransport(self._pool_view))
            self._engine = Router(transports)
            self._instance = instance

    def _mark_mapped(self, ch: Channel) -> None:
        """Tell the node that this further connection has the pool mapped too (the node hands out pool
        offsets only on connections that asked for the pool; without this, every connection but the
        first would move large values in frames over the socket instead of by memcpy)."""
        ch.send(Op.MAP)
        op, _flags, meta, _n, fds = ch.read_frame_with_fds(2)
        for fd in fds:
            os.close(fd)
        if op == Op.ERROR:
            raise error_from_meta(meta)

    def _take(self) -> tuple[Channel, bool]:
        with self._lock:
            if self._closed:
                raise Unavailable(f"client of {self.url} is closed")
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _give_back(self, ch: Channel) -> None:
        with self._lock:
            if not self._closed and not ch.closed:
                self._idle.append(ch)
                return
        ch.close()

    def _ask(self, fn: Callable[[Channel], T]) -> tuple[T, Channel]:
        """Run one request on a pooled connection and return its result with the connection, which the
        caller gives back (it may still hold leases).  A pooled connection that turns out dead (the node
        restarted) is replaced and the request tried once more.  On an error the connection goes back
        to the pool if it is still in step with the node, else it is closed."""
        ch, reused = self._take()
        try:
            try:
                return fn(ch), ch
            except Unavailable:
                if not reused:
                    raise
                ch = self._connect()  # the node restarted since this connection was pooled
                return fn(ch), ch
        except (MooncakeError, ValueError, TypeError) as exc:
            if isinstance(exc, ProtocolError):
                ch.close()
            self._give_back(ch)  # a closed one is not pooled
            raise
        except BaseException:
            ch.close()
            raise

    def _call(self, fn: Callable[[Channel], T]) -> T:
        result, ch = self._ask(fn)
        self._give_back(ch)
        return result

    def _rpc(self, op: int, meta: Any) -> Any:
        def call(ch: Channel) -> Any:
            ch.send(op, meta)
            return ch.read_reply()[0]

        return self._call(call)

    def _release(self, ch: Channel, leases: list[int]) -> None:
        """End read leases and pool their connection (no reply is awaited; the connection that took
        the leases must send it).  A dead connection's leases the node released already."""
        if not leases:
            self._give_back(ch)
            return
        if ch.closed:
            return
        try:
            ch.send(Op.RELEASE, leases)
        except Unavailable:
            return
        self._give_back(ch)

    # -- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
        for ch in idle:
            ch.close()
        self._engine.close()

    def __repr__(self) -> str:
        return f"<mooncakefs.RemoteStore {self.url}{' closed' if self._closed else ''}>"

    # -- writing ----------------------------------------------------------------------------------------

    def put(
        self,
        key: Key,
        value: Any,
        *,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        version: int = 0,
        if_newer: bool = False,
        replicas: int | None = None,
        placement: str | None = None,
        tier: str | None = None,
        cluster_flags: int = 0,
        crc: int | None = None,
    ) -> None:
        """As ``Store.put``; its arguments are checked here, before anything is sent.  The value travels
        with its CRC-32C, computed as it is sent; the node refuses it (ChecksumError, nothing stored) if
        the bytes that arrive do not match.  ``tier`` ("vram" or "dram") travels with the value: the
        node's store places it as ``Store.put`` places a host buffer (tier='vram' needs a node with a
        VRAM tier, ``mooncakefs node --vram``).  (``cluster_flags``: the cluster client's LOCAL and
        replica count.  ``crc``: the value's CRC-32C when the caller keeps one, as a node copying a stored
        value does: sent instead of computed, so a copy whose bytes differ from the original is refused.)"""
        options = put_options(pin, ttl, if_absent, durable, version, if_newer, 0, replicas, placement)
        if options is not PLAIN_PUT:
            options.single_store("put", "node", self.url)
        self._put(key, value, options, cluster_flags, crc, check_tier(tier))

    def _put(
        self,
        key: Key,
        value: Any,
        options: PutOptions,
        cluster_flags: int = 0,
        crc: int | None = None,
        tier: str | None = None,
    ) -> None:
        """``put`` with its options and tier checked (``replicas`` and ``placement`` are the cluster
        client's, which tells the node how it placed the value through ``cluster_flags``)."""
        raw, src = encode_key(key), _bytes_of(value)
        head = [raw, len(src), *pack_put_options(options, cluster_flags, tier)]
        if len(src) <= self.inline_max:

            def put_inline(ch: Channel) -> None:
                ch.send_value(Op.PUT, head, src, crc)
                ch.read_reply()

            self._call(put_inline)
            return

        def put_through_engine(ch: Channel) -> None:
            ch.send(Op.PUT_BEGIN, head)
            (put_id, pool_offset), _ = ch.read_reply()
            checksum = crc
            try:
                batch = self._engine.submit([Transfer(WRITE, src, Region(put_id, len(src), pool_offset))])
                if checksum is None and (pool_offset < 0 or self._pool_view is None):  # over a socket
                    checksum = crc32c(src)  # while the stripes travel (the GIL is released)
                batch.wait()
            except BaseException:
                if not ch.closed:
                    ch.send(Op.PUT_ABORT, [put_id])
                    ch.read_reply()
                raise
            if checksum is None:
                ch.send(Op.PUT_END, [put_id])
            else:
                ch.send(Op.PUT_END, [put_id], CRC_TRAILER.pack(checksum), flags=WITH_CRC)
            ch.read_reply()

        self._call(put_through_engine)

    def put_in_place(self, key: Key, size: int, fill: Callable[[memoryview], bool], *, cluster_flags: int = 0) -> bool:
        """Store a value of ``size`` bytes that ``fill`` writes where it will live: on the node's host
        straight into its pool (no buffer of the caller's, no copy), else into a buffer then sent as
        ``put`` sends one.  ``fill`` returns True once it has written all of it, or False to store
        nothing (what it raises is raised, nothing stored either); returns what ``fill`` returned.
        Errors of the node are raised as ``put``'s."""
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"size must be a non-negative int, got {size!r:.40}")
        if self._pool_view is None or size <= self.inline_max:
            buffer = bytearray(size)
            if not fill(memoryview(buffer)):
                return False
            self._put(key, buffer, PLAIN_PUT, cluster_flags)
            return True
        head = [encode_key(key), size, *pack_put_options(PLAIN_PUT, cluster_flags)]
        outcome: list[Any] = []  # what fill returned or raised: kept apart from the node's own errors

        def put_into_pool(ch: Channel) -> None:
            outcome.clear()  # (run again on a fresh connection if the pooled one was found dead)
            ch.send(Op.PUT_BEGIN, head)
            (put_id, pool_offset), _ = ch.read_reply()
            pool = self._pool_view
            try:
                if pool_offset < 0 or pool is None:  # (the node did not hand out its pool on this connection)
                    raise ProtocolError(f"{self.url}: the node gave no pool offset to a client that maps its pool")
                outcome.append(fill(pool[pool_offset : pool_offset + size]))
            except BaseException as exc:
                outcome.append(exc)
            if outcome[0] is not True:
                ch.send(Op.PUT_ABORT, [put_id])
                ch.read_reply()
                return
            ch.send(Op.PUT_END, [put_id])
            ch.read_reply()

        self._call(put_into_pool)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0] is True

    def batch_put(
        self,
        items: Mapping[Key, Any] | Iterable[tuple[Key, Any]],
        *,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        version: int = 0,
        if_newer: bool = False,
        replicas: int | None = None,
        placement: str | None = None,
        cluster_flags: int = 0,
    ) -> list[Any]:
        """As ``Store.batch_put`` (and ``put``'s options): one result per item, None or the exception it
        raised; bad options or items that are not pairs fail the call before anything is sent.  Small
        values go in one frame; large ones one by one."""
        options = put_options(pin, ttl, if_absent, durable, version, if_newer, 0, replicas, placement)
        options.single_store("batch_put", "node", self.url)
        return self._batch_put(put_pairs(items), options, cluster_flags)

    def _batch_put(self, pairs: list[tuple[Any, Any]], options: PutOptions, cluster_flags: int = 0) -> list[Any]:
        """``batch_put`` with its items and options checked (as ``_put``)."""
        head = pack_put_options(options, cluster_flags)
        if len(pairs) > MAX_BATCH:  # the node takes at most MAX_BATCH items a request
            return [
                r
                for i in range(0, len(pairs), MAX_BATCH)
                for r in self._batch_put(pairs[i : i + MAX_BATCH], options, cluster_flags)
            ]
        results: list[Any] = [None] * len(pairs)
        keys: list[bytes] = []
        values: list[memoryview] = []
        where: list[int] = []
        total = 0
        for i, (key, value) in enumerate(pairs):
            try:
                raw, src = encode_key(key), _bytes_of(value)
            except BATCH_ERRORS as exc:
                results[i] = exc
                continue
            if total + len(src) > BATCH_INLINE_MAX:
                results[i] = self._each(self._put, key, src, options, cluster_flags)
                continue
            keys.append(raw)
            values.append(src)
            where.append(i)
            total += len(src)
        if keys:
            meta = [keys, [len(v) for v in values], *head, [crc32c(v) for v in values]]

            def send_batch(ch: Channel) -> Any:
                ch.send(Op.BATCH_PUT, meta, values)
                return ch.read_reply()[0][0]

            for i, err in zip(where, self._call(send_batch), strict=True):
                results[i] = None if err is None else error_from_meta(err)
        return results

    # -- reading ----------------------------------------------------------------------------------------

    def get(self, key: Key, *, crc: int | None = None) -> bytes:
        """As ``Store.get``.  ``crc``: the CRC-32C the value must have (a copy checked against what its
        writer published): its bytes are checked against it where they land, in the same pass as the
        check of the wire, and ChecksumError is raised if they differ (whatever the node's own CRC of
        them says: a stale or bad copy is consistent with its own CRC)."""
        if self._index is not None:
            value = self._index.read(key_digest(encode_key(key)))
            if value is not None:
                if crc is not None:
                    check_crc(crc, crc32c(value), self._what(key))
                return value
        return self._read(key, None, crc)

    def get_into(self, key: Key, buffer: Any, *, crc: int | None = None) -> int:
        """As ``Store.get_into``: BufferTooSmall (nothing written) if ``buffer`` is too short.
        ChecksumError if the bytes that crossed the wire fail the value's CRC-32C (corrupted in transit
        or in the node's memory), or ``crc`` (as ``get``'s) if given: ``buffer`` then holds those bad
        bytes, and must not be used."""
        if self._index is not None:
            try:
                n = self._index.read_into(key_digest(encode_key(key)), buffer)
            except TypeError:  # not a buffer, or a read-only one: say so as every store does
                raise_buffer_error(buffer)
                raise
            if n >= 0:
                if crc is not None:
                    check_crc(crc, crc32c(_writable_bytes_of(buffer)[:n]), self._what(key))
                return n
        return self._read(key, _writable_bytes_of(buffer), crc)

    def _what(self, key: Key) -> Callable[[], str]:
        """Names a value read from the node, for a ChecksumError's message."""
        return lambda: f"the value of key {describe_key(key)} read from {self.url}"

    def _read(self, key: Key, dst: memoryview | None, expected: int | None = None) -> Any:
        """``get`` / ``get_into``: the value checked against the node's CRC-32C of it, or (``expected``)
        against that one, also where the bytes came through the shared pool."""
        raw = encode_key(key)
        room = len(dst) if dst is not None else 1 << 62
        what = self._what(key)
        crc: int | None = None
        phase = 0 if dst is None else address(dst) % LINE  # where in a line the value lands: see wire.payload_phase
        # A large buffer is likely for a large value, which comes in the reply's first segments: its first
        # recv takes the reply's header and little of the value, which then arrives straight in place.  A
        # get has no buffer to land in and its values are mostly small: one recv takes a small one whole.
        first_read = REPLY_HEAD_READ if dst is not None and room > FIRST_READ else FIRST_READ

        def ask(ch: Channel) -> Any:
            """The value (small ones come inline, checked as they arrive), or the Region of a value
            leased for the engine."""
            nonlocal crc
            ch.send(Op.GET, [raw, min(room, self.inline_max), True, phase])
            (size, lease, pool_offset, crc), _ = ch.read_reply(first_read)
            if expected is not None:
                crc = expected
            if lease:
                return Region(lease, size, pool_offset)
            if dst is None:
                return fill_bytes(size, lambda out: check_crc(crc, ch.read_payload_crc(out), what))
            check_crc(crc, ch.read_payload_crc(dst[:size]), what)
            return size

        # The connection that took a lease stays out of the pool until the lease is released.
        answer, ch = self._ask(ask)
        if not isinstance(answer, Region):
            self._give_back(ch)
            return answer
        try:
            if answer.size > room:
                raise BufferTooSmall(key, answer.size, room)
            if dst is None:
                return fill_bytes(answer.size, lambda out: self._fetch(out, answer, crc, what))
            self._fetch(dst[: answer.size], answer, crc, what)
            return answer.size
        finally:
            self._release(ch, [answer.handle])

    def _fetch(self, out: memoryview, region: Region, crc: int | None, what: Callable[[], str]) -> None:
        """Read a leased value into ``out`` through the engine and check it against ``crc`` (None: the
        bytes came from the shared pool)."""
        self._engine.run([Transfer(READ, out, region)])
        if crc is not None:
            check_crc(crc, crc32c(out), what)

    def _view(self, key: Key) -> tuple[memoryview, tuple[Channel, int] | None]:
        """A value in the mapped pool under a lease (no copy), else a private copy."""
        if self._pool_view is None:
            return memoryview(self.get(key)), None
        raw = encode_key(key)

        def ask(ch: Channel) -> Any:
            ch.send(Op.GET, [raw, 0, True])
            return ch.read_reply()[0]

        (size, lease, pool_offset, crc), ch = self._ask(ask)
        if not lease:  # empty: nothing to hold
            self._give_back(ch)
            return memoryview(b""), None
        if pool_offset < 0 or self._pool_view is None:
            try:
                out = memoryview(bytearray(size))
                self._fetch(out, Region(lease, size, -1), crc, self._what(key))
                return out.toreadonly(), None
            finally:
                self._release(ch, [lease])
        return self._pool_view[pool_offset : pool_offset + size].toreadonly(), (ch, lease)

    def view(self, key: Key) -> RemoteValueView:
        """As ``Store.view``: on the node's host, the value in place in the shared pool (no copy), held
        until the block exits; elsewhere a private copy."""
        return RemoteValueView(self, key)

    def batch_get_into(self, keys: Iterable[Key], buffers: Iterable[Any]) -> list[Any]:
        """As ``Store.batch_get_into``: one result per key, the byte count or the exception."""
        keys, buffers = batch_targets(keys, buffers)
        dsts: list[Any] = []
        for b in buffers:
            try:
                dsts.append(_writable_bytes_of(b))
            except TypeError as exc:
                dsts.append(exc)
        return self._batch_read(keys, dsts)

    def batch_get(self, keys: Iterable[Key]) -> list[bytes | None]:
        """As ``Store.batch_get``: the values, None where a key is missing."""
        keys = list(key_list(keys, "batch_get"))
        return batch_values(self._batch_read(keys, [None] * len(keys)))

    def _batch_read(self, keys: list[Key], dsts: list[Any]) -> list[Any]:
        if len(keys) > MAX_BATCH:
            return [
                r
                for i in range(0, len(keys), MAX_BATCH)
                for r in self._batch_read(keys[i : i + MAX_BATCH], dsts[i : i + MAX_BATCH])
            ]
        results: list[Any] = [d if isinstance(d, Exception) else None for d in dsts]
        if self._index is not None:  # served from shared memory where the index has them
            asked = self._index.read_batch(keys, dsts, results)
        else:
            asked = [i for i, r in enumerate(results) if r is None]
        raws: list[bytes] = []
        limits: list[int] = []
        where: list[int] = []
        for i in asked:
            try:
                raws.append(encode_key(keys[i]))
            except MooncakeError as exc:
                results[i] = exc
                continue
            limits.append(min(self.inline_max, len(dsts[i]) if dsts[i] is not None else 1 << 62))
            where.append(i)
        if not raws:
            return results
        ch, _ = self._take()
        leases: list[int] = []
        transfers: list[Transfer] = []
        checks: list[tuple[int, int, memoryview]] = []  # (item, CRC-32C, buffer) of values the engine fetches
        try:
            ch.send(Op.BATCH_GET, [raws, limits, True])
            (infos,), _ = ch.read_reply()
            for i, info in zip(where, infos, strict=True):
                if len(info) != 4:
                    results[i] = error_from_meta(info)
                    continue
                size, lease, pool_offset, crc = info
                dst = dsts[i]
                if lease:
                    leases.append(lease)
                if dst is not None and size > len(dst):
                    results[i] = BufferTooSmall(keys[i], size, len(dst))
                    continue
                if dst is not None:
                    out, results[i] = dst[:size], size
                else:
                    results[i], out = bytes_to_fill(size)
                if lease:
                    transfers.append(Transfer(READ, out, Region(lease, size, pool_offset)))
                    checks.append((i, crc, out))
                elif (bad := crc_error(crc, ch.read_payload_crc(out), self._what(keys[i]))) is not None:
                    results[i] = bad
            if transfers:
                self._engine.run(transfers)
                for i, crc, out in checks:
                    if crc is not None and (bad := crc_error(crc, crc32c(out), self._what(keys[i]))) is not None:
                        results[i] = bad
        finally:
            self._release(ch, leases)
        return results

    # -- queries ----------------------------------------------------------------------------------------

    def exists(self, key: Key) -> bool:
        return self._rpc(Op.EXISTS, [encode_key(key)])[0]

    def batch_exists(self, keys: Iterable[Key]) -> list[bool]:
        return self._per_key(Op.BATCH_EXISTS, key_list(keys, "batch_exists"))

    def versions(self, keys: Iterable[Key]) -> list[int | None]:
        """As ``Store.versions``: each key's version, None where it is absent."""
        return [
            None if v is False else unpack_version(v)
            for v in self._per_key(Op.BATCH_VERSIONS, key_list(keys, "versions"))
        ]

    def _per_key(self, op: int, keys: Iterable[Key]) -> list[Any]:
        """A batched question with one answer per key, asked MAX_BATCH keys a request."""
        raws = []
        for key in keys:
            try:
                raws.append(encode_key(key))
            except MooncakeError:
                raws.append(b"")  # never a valid key: reported absent, as Store.batch_exists does
        return [
            answer for i in range(0, len(raws), MAX_BATCH) for answer in self._rpc(op, [raws[i : i + MAX_BATCH]])[0]
        ]

    def remove(self, key: Key) -> bool:
        return self._rpc(Op.REMOVE, [encode_key(key)])[0]

    def remove_prefix(self, prefix: Key) -> int:
        return self._rpc(Op.REMOVE_PREFIX, [encode_prefix(prefix)])[0]

    def stat(self, key: Key) -> ObjectInfo:
        size, checksum, tier, pinned, expires, version = self._rpc(Op.STAT, [encode_key(key)])
        return ObjectInfo(key, size, checksum, tier, pinned, expires, unpack_version(version))

    def keys(self, prefix: Key = "") -> Iterator[Key]:
        return map(decode_key, self._rpc(Op.KEYS, [encode_prefix(prefix)])[0])

    def match_prefix(self, keys: Iterable[Key]) -> int:
        raws = []
        for key in key_list(keys, "match_prefix"):
            try:
                raws.append(encode_key(key))
            except MooncakeError:
                break
        return self._rpc(Op.MATCH_PREFIX, [raws])[0]

    def stats(self) -> dict[str, Any]:
        return self._rpc(Op.STATS, [])[0]

    def persist(self, keys: Iterable[Key] | None = None) -> int:
        return self._rpc(Op.PERSIST, [None if keys is None else [encode_key(k) for k in key_list(keys, "persist")]])[0]

    def ping(self) -> str:
        """The node's instance id (it changes when the node restarts)."""
        return self._rpc(Op.PING, [])[0]

    def __len__(self) -> int:
        return self.stats()["objects"]
