"""The node daemon: one per host, owning the host's tier pools and serving them to every process.

Local clients connect over a Unix socket and are handed the DRAM pool's shared-memory file once
(SCM_RIGHTS), so their reads and writes of large values are a memcpy in their own process: the socket
only carries the small control messages (where is it, hold it, publish it).  Remote clients connect
over TCP and move the bytes through the framed protocol in ``mooncakefs.wire``.

Listeners, a thread per connection, the handshake, the request loop and the defences against
hostile clients are ``mooncakefs.serving``'s (docs/security.md); the store's lock orders what the
connections do.  Whatever a connection holds (read leases, half-written puts) is given back when it
goes away, however it goes; an unfinished put whose client stalls is reclaimed after the io timeout;
and only the node's own user, root and cluster peers reach mooncakefs's reserved keys (the
filesystem's file chunks).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import mmap
import os
import secrets
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mooncakefs import _engine
from mooncakefs.errors import (
    ChecksumError,
    InvalidArgument,
    InvalidKey,
    KeyNotFound,
    MooncakeError,
    Moved,
    ProtocolError,
    Unavailable,
    describe_key,
)
from mooncakefs.keys import INTERNAL_PREFIX, InternalKey, Key, wire_key
from mooncakefs.serving import ACCEPT_BACKLOG, Connection, FramedServer, Timeouts
from mooncakefs.sockets import make_socket_dir
from mooncakefs.store import PendingPut, Store, ValueView
from mooncakefs.wire import (
    CRC_TRAILER,
    MAX_BATCH,
    WITH_CRC,
    Channel,
    Op,
    check_crc,
    error_meta,
    pack_version,
    unpack_put_head,
    unpack_put_options,
)

if TYPE_CHECKING:
    from mooncakefs.cluster.agent import NodeAgent

log = logging.getLogger("mooncakefs.node")

# In a cluster, requests on a connection that named a placement epoch are checked against the node's.
WRITE_OPS = frozenset({Op.PUT, Op.PUT_BEGIN, Op.PUT_END, Op.BATCH_PUT, Op.REMOVE, Op.REMOVE_PREFIX, Op.PERSIST})
EPOCH_OPS = WRITE_OPS | {Op.GET, Op.BATCH_GET, Op.EXISTS, Op.BATCH_EXISTS, Op.BATCH_VERSIONS, Op.STAT, Op.MATCH_PREFIX}

BATCH_STAGE_MAX = 4 << 20  # a batched put this small is received whole, then stored under one lock
HEARTBEAT_S = 0.5  # readers of the shared index give up on a node silent for 2 s
INDEX_OBJECT_GUESS = 4096  # the shared index has two slots per this many bytes of pool


class Session(Connection):
    """One client connection and what it holds."""

    def __init__(self, channel: Channel, local: bool) -> None:
        super().__init__(channel, local)  # local: on the Unix socket, may be handed the pool
        self.trusted: bool | None = None  # may use reserved keys (decided on first use)
        self.mapped = False  # it has the pool mapped, so pool offsets mean something to it
        self.leases: set[int] = set()
        self.pending: set[int] = set()
        self.epoch: int | None = None  # the placement epoch a cluster client routes this connection by


class Reservation:
    """An unfinished put (PUT_BEGIN) and who is writing into it.  Its room is given back only when no
    WRITE is receiving into it, so a put dropped mid-stripe never frees memory still being written."""

    __slots__ = ("doomed", "pending", "session", "touched", "writers")

    def __init__(self, pending: PendingPut, session: Session) -> None:
        self.pending, self.session = pending, session
        self.touched = time.monotonic()
        self.writers = 0
        self.doomed = False


class Node(FramedServer):
    """Serve a Store on a Unix socket and, optionally, TCP.  ``start()``, then ``stop()``."""

    log = log
    refusal = "this node requires the cluster secret: connect with secret=... (or MOONCAKEFS_SECRET)"
    no_reply = frozenset({Op.RELEASE})

    def __init__(
        self,
        store: Store,
        *,
        unix_path: str | Path | None = None,
        tcp: tuple[str, int] | None = None,
        secret: bytes | None = None,
        socket_mode: int = 0o600,
        socket_group: str | int | None = None,
        socket_chosen: bool = True,
        timeouts: Timeouts | None = None,
    ) -> None:
        if unix_path is None and tcp is None:
            raise ValueError("a node needs a Unix socket path, a TCP address, or both")
        super().__init__(secret=secret, timeouts=timeouts)
        self.store = store
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self.socket_chosen = socket_chosen  # False: the default path, which must be in our own directories
        self.tcp = tcp
        self.socket_mode, self.socket_group = socket_mode, socket_group
        self.bytes_in = self.bytes_out = 0
        self.started = time.time()
        self._leases: dict[int, tuple[ValueView, memoryview, Session]] = {}
        self._pending: dict[int, Reservation] = {}
        self._pending_lock = threading.Lock()
        self.index: _engine.SharedIndex | None = None
        self.cluster: NodeAgent | None = None  # set when the node is a cluster member
        self._owns_socket = False
        self.handlers = {
            Op.PING: self._ping,
            Op.MAP: self._map,
            Op.PUT: self._put,
            Op.PUT_BEGIN: self._put_begin,
            Op.WRITE: self._write,
            Op.PUT_END: self._put_end,
            Op.PUT_ABORT: self._put_abort,
            Op.GET: self._get,
            Op.READ: self._read,
            Op.RELEASE: self._release,
            Op.EXISTS: self._exists,
            Op.REMOVE: self._remove,
            Op.REMOVE_PREFIX: self._remove_prefix,
            Op.STAT: self._stat,
            Op.KEYS: self._keys,
            Op.MATCH_PREFIX: self._match_prefix,
            Op.STATS: self._stats,
            Op.PERSIST: self._persist,
            Op.BATCH_PUT: self._batch_put,
            Op.BATCH_GET: self._batch_get,
            Op.BATCH_EXISTS: self._batch_exists,
            Op.BATCH_VERSIONS: self._batch_versions,
            Op.EPOCH: self._epoch,
        }

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> Node:
        try:
            if self.unix_path is not None:
                self._listen_unix(self.unix_path)
            if self.tcp is not None:
                self.tcp = self.listen_tcp(self.tcp)  # the real port when 0 was asked for
        except BaseException:
            self.close_listeners()
            if self._owns_socket:
                with contextlib.suppress(FileNotFoundError):
                    self.unix_path.unlink()  # type: ignore[union-attr]
            raise
        self._share_index()
        self.accept()
        self.spawn(self._reap_reservations, name="mooncakefs-reaper")
        return self

    def _share_index(self) -> None:
        """Put the index of DRAM-resident values in shared memory, so local clients read them with no
        round trip; a heartbeat thread tells them the node is alive."""
        _fd, pool_size = self.store.shared_pool()
        slots = max(1024, 1 << (2 * pool_size // INDEX_OBJECT_GUESS - 1).bit_length())
        size = _engine.INDEX_HEADER_BYTES + slots * _engine.INDEX_SLOT_BYTES
        self._index_fd = os.memfd_create("mooncakefs-index", os.MFD_CLOEXEC)
        os.ftruncate(self._index_fd, size)
        self._index_map = mmap.mmap(self._index_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.index = _engine.SharedIndex(self._index_map, create=True)
        self.store.share_index(self.index)
        self.spawn(self._heartbeat, name="mooncakefs-heartbeat")

    def _heartbeat(self) -> None:
        while not self._stopping.wait(HEARTBEAT_S):
            self.index.beat()

    def _listen_unix(self, path: Path) -> None:
        make_socket_dir(path, self.socket_chosen)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.closing(probe):
            if probe.connect_ex(str(path)) == 0:
                raise MooncakeError(f"another node already serves {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a node that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._owns_socket = True
        old_umask = os.umask(0o777 & ~self.socket_mode)  # never visible with looser permissions
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, self.socket_mode)
        if self.socket_group is not None:
            import grp

            gid = self.socket_group
            if not isinstance(gid, int):
                try:
                    gid = grp.getgrnam(gid).gr_gid
                except KeyError:
                    raise InvalidArgument(f"socket group {gid!r}: no such group on this host") from None
            os.chown(path, -1, gid)
        sock.listen(ACCEPT_BACKLOG)
        self._listeners.append(sock)

    def stop(self) -> None:
        """Stop serving: refuse new clients, drop connections (their unfinished puts are discarded),
        close the store.  Every put a client saw acknowledged as durable is on disk already."""
        if self._stopping.is_set():
            return
        if self.index is not None:
            self.index.stop()  # clients stop reading shared memory and ask the node, which is going
        self.stop_serving()
        self.store.close()
        if self.index is not None:
            self.index.release()
            self._index_map.close()
            os.close(self._index_fd)
        if self._owns_socket:  # never another node's: a refused second node must not unlink it
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()  # type: ignore[union-attr]
        log.info("stopped")

    def wait(self) -> None:
        self._stopping.wait()

    # -- connections --------------------------------------------------------------------------------------

    def connection(self, channel: Channel, local: bool) -> Session:
        return Session(channel, local)

    def check(self, session: Session, op: int) -> None:
        """In a cluster, a request on a connection that named a placement epoch must match the node's."""
        if session.epoch is not None and op in EPOCH_OPS:
            self.cluster.check(session.epoch, op in WRITE_OPS)  # type: ignore[union-attr]

    def end(self, session: Session) -> None:
        """Give back everything the connection held: a client killed mid-put leaks nothing."""
        for lease_id in list(session.leases):
            self._drop_lease(lease_id)
        for put_id in list(session.pending):
            self._discard_reservation(put_id)

    # -- reservations of unfinished puts ----------------------------------------------------------------

    def _discard_reservation(self, put_id: int) -> Reservation | None:
        """Take an unfinished put off the books and give its room back, now or, while a WRITE is still
        receiving into it, when that WRITE ends."""
        with self._pending_lock:
            r = self._pending.pop(put_id, None)
            if r is None:
                return None
            r.doomed = True
            busy = r.writers > 0
        r.session.pending.discard(put_id)
        if not busy:
            self.store.abort_put(r.pending)
        return r

    def _reap_reservations(self) -> None:
        """Give back the room of puts whose client stalled: no WRITE into it for the io timeout."""
        io = self.timeouts.io
        while not self._stopping.wait(min(1.0, io / 4)):
            now = time.monotonic()
            with self._pending_lock:
                stale = [put_id for put_id, r in self._pending.items() if not r.writers and now - r.touched > io]
            for put_id in stale:
                r = self._discard_reservation(put_id)
                if r is not None:
                    self.errors["ReservationTimeout"] += 1
                    log.warning(
                        "unfinished put abandoned: its room is reclaimed",
                        extra={
                            "peer": r.session.channel.peer,
                            "bytes": len(r.pending.buffer or b""),
                            "idle_s": round(now - r.touched, 1),
                        },
                    )

    # -- reserved keys ------------------------------------------------------------------------------------

    def _key(self, session: Session, raw: Any) -> Key:
        """A key from the wire.  Reserved keys (file chunks, cluster pointers) only from a trusted peer:
        the node's own user or root on this host, or a cluster member that proved the secret."""
        key = wire_key(raw)
        if isinstance(key, InternalKey):
            if session.trusted is None:
                session.trusted = self._trusts(session)
            if not session.trusted:
                raise InvalidKey(
                    f"key {raw!r:.80} starts with {INTERNAL_PREFIX!r}, which mooncakefs reserves for "
                    "its own use (file chunks): only the node's user, root and cluster peers may use it"
                )
        return key

    def _trusts(self, session: Session) -> bool:
        sock = session.channel.sock
        if session.local:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", creds)[1] in (0, os.geteuid())
        if self.secret:
            return True  # authenticated with the cluster secret
        uid = loopback_peer_uid(sock)
        return uid is not None and uid in (0, os.geteuid())

    # -- handlers: each reads its payload, then sends exactly one reply ------------------------------

    def _ok(self, session: Session, meta: Any = (), payload: Any = None) -> None:
        session.channel.send(Op.OK, meta, payload)

    def _ping(self, session: Session, meta: list[Any], _n: int) -> None:
        self._ok(session, [self.instance])

    def _map(self, session: Session, meta: list[Any], _n: int) -> None:
        if not session.local:
            raise ValueError("the pool can only be mapped over the node's Unix socket")
        fd, size = self.store.shared_pool()
        session.channel.send_with_fds(Op.OK, [size, len(self._index_map)], [fd, self._index_fd])
        session.mapped = True

    def _receive_put(
        self, session: Session, pending: PendingPut, crc: int | None = None, batched: bool = False
    ) -> None:
        """Receive a put's payload into its reserved room, check it against its CRC-32C, then publish it
        with that CRC.  The CRC follows the value in the payload (PUT flagged WITH_CRC), or ``crc``
        names it (BATCH_PUT; None: not named).  A mismatch stores nothing: ChecksumError."""
        ch = session.channel
        try:
            if not batched:
                crc = ch.read_value_into(pending.buffer, lambda: _value_name(pending.key))
            elif crc is None:
                ch.read_payload_into(pending.buffer)
            else:
                check_crc(crc, ch.read_payload_crc(pending.buffer), lambda: _value_name(pending.key))
            self._recheck(session)
        except BaseException:
            self.store.abort_put(pending)
            raise
        self.bytes_in += pending.size
        self.store.end_put(pending, crc)

    def _recheck(self, session: Session) -> None:
        """Check the epoch and the fence again right before a write is published: its bytes may have
        taken long enough to arrive for the node to be fenced or the map to move on meanwhile."""
        if session.epoch is not None:
            self.cluster.check(session.epoch, write=True)  # type: ignore[union-attr]

    def _put(self, session: Session, meta: list[Any], payload_len: int) -> None:
        key, size, options, tier = unpack_put_head(meta)
        if type(size) is not int or size + (CRC_TRAILER.size if session.channel.flags & WITH_CRC else 0) != payload_len:
            raise ValueError(f"put declares {size!r:.40} bytes but carries {payload_len}")
        self._receive_put(session, self.store.begin_put(self._key(session, key), size, options, tier))
        self._ok(session)

    def _put_begin(self, session: Session, meta: list[Any], _n: int) -> None:
        key, size, options, tier = unpack_put_head(meta)
        pending = self.store.begin_put(self._key(session, key), size, options, tier)
        put_id = secrets.randbits(63)
        with self._pending_lock:
            self._pending[put_id] = Reservation(pending, session)
        session.pending.add(put_id)
        self._ok(session, [put_id, pending.pool_offset if session.mapped else -1])

    def _own_reservation(self, session: Session, meta: list[Any]) -> int:
        """The unfinished put a PUT_END or PUT_ABORT names, checked to be this connection's."""
        (put_id,) = meta
        with self._pending_lock:
            r = self._pending.get(put_id)
            if r is None or r.session is not session:
                raise ValueError(
                    f"no unfinished put {put_id!r:.30} on this connection (finished, abandoned for "
                    f"{self.timeouts.io:g} s, or never begun)"
                )
            if r.writers:
                raise ValueError(f"put {put_id} still has writes in flight")
            del self._pending[put_id]
        session.pending.discard(put_id)
        return r.pending  # type: ignore[return-value]

    def _write(self, session: Session, meta: list[Any], payload_len: int) -> None:
        put_id, offset = meta
        with self._pending_lock:
            r = self._pending.get(put_id)  # any connection of the client may carry a stripe
            if r is None:
                raise ValueError(f"no unfinished put {put_id!r:.30}")
            buffer = r.pending.buffer
            if not (type(offset) is int and offset >= 0 and offset + payload_len <= len(buffer)):
                raise ValueError(f"write of {payload_len} bytes at {offset!r:.30} outside a {len(buffer)}-byte value")
            r.writers += 1
        try:
            session.channel.read_payload_into(buffer[offset : offset + payload_len])
        finally:
            with self._pending_lock:
                r.writers -= 1
                r.touched = time.monotonic()
                last = r.doomed and not r.writers
            if last:  # the put was dropped while this stripe was arriving
                self.store.abort_put(r.pending)
        self.bytes_in += payload_len
        self._ok(session)

    def _put_end(self, session: Session, meta: list[Any], payload_len: int) -> None:
        """Publish a striped put, once its bytes match the CRC-32C the writer names: the frame, flagged
        WITH_CRC, carries it as its payload.  Without it (the bytes came through the shared pool, on
        this host) the bytes are not checked."""
        ch = session.channel
        crc = None
        if ch.flags & WITH_CRC:
            if payload_len != CRC_TRAILER.size:
                raise ValueError(f"PUT_END carries a {CRC_TRAILER.size}-byte CRC-32C, not {payload_len} bytes")
            (crc,) = CRC_TRAILER.unpack(ch.read_payload(CRC_TRAILER.size))
        elif payload_len:
            raise ValueError("PUT_END carries no payload but its CRC-32C (flagged WITH_CRC)")
        pending = self._own_reservation(session, meta)
        if crc is not None:
            try:
                check_crc(crc, _engine.crc32c(pending.buffer), lambda: _value_name(pending.key))
            except ChecksumError:
                self.store.abort_put(pending)
                raise
        self.store.end_put(pending, crc)
        self._ok(session)

    def _put_abort(self, session: Session, meta: list[Any], _n: int) -> None:
        self.store.abort_put(self._own_reservation(session, meta))
        self._ok(session)

    def _lease(
        self, session: Session, key: Any, inline_max: int, with_crc: bool = True
    ) -> tuple[list[Any], _InlineValue | None]:
        """Look a value up for a reader: ([size, lease id, pool offset, CRC-32C], bytes to send inline or
        None).  Values larger than ``inline_max`` stay leased until the client releases them.  The CRC is
        the one kept with the value (computed now if it has none yet), for the reader to check where the
        bytes land; nil when the reader copies them out of the shared pool itself (same host).  Without
        ``with_crc`` (a reader that did not ask for it) the answer has no CRC."""
        try:
            view = self.store.view(self._key(session, key))
        except KeyNotFound:
            self._moved(key)
            raise
        data = view.__enter__()
        size = len(data)
        pool_offset = -1 if size <= inline_max or not session.mapped else view.pool_offset
        info = [size, 0, pool_offset]
        if with_crc:
            try:
                info.append(view.checksum() if pool_offset < 0 else None)
            except BaseException:
                view.__exit__(None, None, None)
                raise
        if size <= inline_max:
            self.bytes_out += size
            return info, _InlineValue(view, data)
        info[1] = lease_id = secrets.randbits(63)
        self._leases[lease_id] = (view, data, session)
        session.leases.add(lease_id)
        return info, None

    def _get(self, session: Session, meta: list[Any], _n: int) -> None:
        """GET [key, inline_max, with_crc (optional), the phase in a cache line of where the client lands
        the value (optional; wire.payload_phase)]."""
        key, inline_max, *rest = meta
        with_crc = len(rest) > 0 and rest[0] is True
        phase = rest[1] if len(rest) > 1 and type(rest[1]) is int else 0
        info, inline = self._lease(session, key, inline_max, with_crc)
        if inline is None:
            self._ok(session, info)
            return
        with inline:
            session.channel.send(Op.OK, info, inline.data, destination=phase)

    def _read(self, session: Session, meta: list[Any], _n: int) -> None:
        lease_id, offset, length = meta
        item = self._leases.get(lease_id)
        if item is None:
            raise ValueError(f"no lease {lease_id!r:.30} (released, or its client went away)")
        data = item[1]
        if not (
            type(offset) is int and type(length) is int and offset >= 0 and length >= 0 and offset + length <= len(data)
        ):
            raise ValueError(f"read of {length!r:.30} bytes at {offset!r:.30} outside a {len(data)}-byte value")
        self.bytes_out += length
        self._ok(session, (), data[offset : offset + length])

    def _release(self, session: Session, meta: list[Any], _n: int) -> None:
        for lease_id in meta:
            if lease_id in session.leases:
                session.leases.discard(lease_id)
                self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        item = self._leases.pop(lease_id, None)
        if item is not None:
            item[0].__exit__(None, None, None)

    def _moved(self, key: Any) -> None:
        """A key missing here may have been put with placement="local" on another node: say which."""
        if self.cluster is not None and type(key) is bytes and (node := self.cluster.pointer(key)) is not None:
            raise Moved(node)

    def _found(self, key: Any, present: bool) -> bool:
        """Whether a key exists in the cluster as far as this node knows (placed elsewhere counts)."""
        if present or self.cluster is None or type(key) is not bytes:
            return present
        return self.cluster.pointer(key) is not None

    def _exists(self, session: Session, meta: list[Any], _n: int) -> None:
        (key,) = meta
        self._ok(session, [self._found(key, self.store.exists(self._key(session, key)))])

    def _remove(self, session: Session, meta: list[Any], _n: int) -> None:
        (key,) = meta
        self._ok(session, [self.store.remove(self._key(session, key))])

    def _remove_prefix(self, session: Session, meta: list[Any], _n: int) -> None:
        (prefix,) = meta
        if type(prefix) is not bytes:
            raise TypeError("prefix must be bytes")
        self._ok(session, [self.store.remove_prefix(prefix)])

    def _stat(self, session: Session, meta: list[Any], _n: int) -> None:
        (key,) = meta
        info = self.store.stat(self._key(session, key))
        self._ok(session, [info.size, info.checksum, info.tier, info.pinned, info.expires, pack_version(info.version)])

    def _keys(self, session: Session, meta: list[Any], _n: int) -> None:
        (prefix,) = meta
        if type(prefix) is not bytes:
            raise TypeError("prefix must be bytes")
        keys = [k.encode() if isinstance(k, str) else k for k in self.store.keys(prefix)]
        self._ok(session, [keys])

    def _match_prefix(self, session: Session, meta: list[Any], _n: int) -> None:
        (keys,) = meta
        self._ok(session, [self.store.match_prefix([self._key(session, k) for k in _batch(keys)])])

    def _stats(self, session: Session, meta: list[Any], _n: int) -> None:
        stats = self.store.stats()
        stats["traffic"] = {"sent": self.bytes_out, "received": self.bytes_in}  # value bytes, as the metrics
        self._ok(session, [stats])

    def _persist(self, session: Session, meta: list[Any], _n: int) -> None:
        (keys,) = meta
        keys = None if keys is None else [self._key(session, k) for k in _batch(keys)]
        self._ok(session, [self.store.persist(keys)])

    def _batch_put(self, session: Session, meta: list[Any], payload_len: int) -> None:
        keys, sizes, flags, ttl, version, crcs = meta if len(meta) == 6 else (*meta, None)
        keys, sizes = _batch(keys), _batch(sizes)
        if len(keys) != len(sizes) or any(type(s) is not int or s < 0 for s in sizes) or sum(sizes) != payload_len:
            raise ValueError("batch put: keys, sizes and payload do not agree")
        if crcs is None:
            crcs = [None] * len(keys)
        elif (
            type(crcs) is not list
            or len(crcs) != len(keys)
            or any(type(c) is not int or not 0 <= c < 1 << 32 for c in crcs)
        ):
            raise ValueError("batch put: one CRC-32C (a 32-bit int) per value")
        options = unpack_put_options(flags, ttl, version)
        ch = session.channel
        results: list[Any] = []
        if payload_len <= BATCH_STAGE_MAX:  # small values: stage them, then one trip through the store lock
            staged = memoryview(ch.read_payload(payload_len))
            self.bytes_in += payload_len
            self._recheck(session)
            offsets = [0]
            for s in sizes:
                offsets.append(offsets[-1] + s)
            values = [staged[offsets[i] : offsets[i + 1]] for i in range(len(keys))]
            bad: dict[int, ChecksumError] = {}
            for i, (key, value, crc) in enumerate(zip(keys, values, crcs, strict=True)):
                try:
                    if crc is not None:
                        check_crc(crc, _engine.crc32c(value), lambda k=key: _value_name(k))
                except ChecksumError as exc:
                    bad[i] = exc
            good = [i for i in range(len(keys)) if i not in bad]
            stored = iter(self.store._batch_put([(self._key(session, keys[i]), values[i]) for i in good], options))
            results = [bad[i] if i in bad else next(stored) for i in range(len(keys))]
        else:
            for key, size, crc in zip(keys, sizes, crcs, strict=True):
                try:
                    pending = self.store.begin_put(self._key(session, key), size, options)
                except (MooncakeError, ValueError, TypeError) as exc:
                    if isinstance(exc, Unavailable):
                        raise
                    ch.read_payload(size)  # skip this value's bytes
                    results.append(exc)
                    continue
                try:
                    self._receive_put(session, pending, crc, batched=True)
                    results.append(None)
                except (MooncakeError, ValueError) as exc:
                    if isinstance(exc, Unavailable | ProtocolError):
                        raise
                    results.append(exc)
        self._ok(session, [[None if r is None else error_meta(r) for r in results]])

    def _batch_get(self, session: Session, meta: list[Any], _n: int) -> None:
        keys, limits, with_crc = meta if len(meta) == 3 else (*meta, False)  # limits: per key, largest inline
        if len(_batch(limits)) != len(_batch(keys)):
            raise ValueError("batch get: one inline limit per key")
        infos: list[Any] = []
        inline: list[_InlineValue] = []
        try:
            for key, inline_max in zip(keys, limits, strict=True):
                try:
                    info, value = self._lease(session, key, inline_max, with_crc is True)
                except (MooncakeError, ValueError, TypeError) as exc:
                    if isinstance(exc, Unavailable):
                        raise
                    infos.append(error_meta(exc))
                    continue
                infos.append(info)
                if value is not None:
                    inline.append(value)
            self._ok(session, [infos], [v.data for v in inline])
        finally:
            for v in inline:
                v.__exit__()

    def _batch_exists(self, session: Session, meta: list[Any], _n: int) -> None:
        (keys,) = meta
        present = self.store.batch_exists([self._key(session, k) for k in _batch(keys)])
        self._ok(session, [[self._found(k, p) for k, p in zip(keys, present, strict=True)]])

    def _batch_versions(self, session: Session, meta: list[Any], _n: int) -> None:
        (keys,) = meta
        versions = self.store.versions([self._key(session, k) for k in _batch(keys)])
        self._ok(session, [[False if v is None else pack_version(v) for v in versions]])  # False: absent

    def _epoch(self, session: Session, meta: list[Any], _n: int) -> None:
        (epoch,) = meta
        if self.cluster is None:
            raise ValueError("this node is not a cluster member: it has no placement epoch")
        if type(epoch) is not int:
            raise TypeError("the epoch is an int")
        self.cluster.catch_up(epoch)
        self.cluster.check(epoch, write=False)
        session.epoch = epoch
        self._ok(session, [epoch])


class _InlineValue:
    """A value sent inside the reply: its lease ends once the reply is out."""

    __slots__ = ("data", "view")

    def __init__(self, view: ValueView, data: memoryview) -> None:
        self.view, self.data = view, data

    def __enter__(self) -> _InlineValue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.view.__exit__(None, None, None)


def _value_name(key: Any) -> str:
    return f"the value of key {describe_key(key)} put over the wire"


def _batch(items: Any) -> list[Any]:
    if type(items) is not list or len(items) > MAX_BATCH:
        raise ValueError(f"a batch is a list of at most {MAX_BATCH} items")
    return items


def loopback_peer_uid(sock: socket.socket) -> int | None:
    """The user owning the other end of a TCP connection made on this host: SO_PEERCRED's answer for
    loopback TCP, read from /proc/net/tcp{,6}.  None when the peer is elsewhere or cannot be found."""
    try:
        peer, local = sock.getpeername()[:2], sock.getsockname()[:2]
        peer_ip, local_ip = _plain_ip(peer[0]), _plain_ip(local[0])
    except (OSError, ValueError):
        return None
    if not peer_ip.is_loopback:
        return None
    ports = (f"{peer[1]:04X}", f"{local[1]:04X}")
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            (ip_a, port_a), (ip_b, port_b) = fields[1].split(":"), fields[2].split(":")
            if (port_a, port_b) == ports and (_proc_ip(ip_a), _proc_ip(ip_b)) == (peer_ip, local_ip):
                return int(fields[7])
    return None


def _plain_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%")[0])
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _proc_ip(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp prints it: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(hex_ip)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _plain_ip(str(ipaddress.ip_address(raw)))
