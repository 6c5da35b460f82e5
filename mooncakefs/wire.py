"""The wire protocol between clients and nodes: length-prefixed frames over a stream socket.

A frame is a 16-byte header (magic, opcode, flags, meta length, payload length), then ``meta`` (a
msgpack array of the request's arguments, at most MAX_META bytes), then ``payload`` (raw value bytes).
Both lengths are checked before anything is allocated for them, and a payload is received straight
into its destination (a pool block, the caller's buffer): only what came with the header, at most
FIRST_READ bytes, passes through the connection's buffer.  Conversation is strictly request then reply
on each connection, except RELEASE, which has no reply.  See docs/architecture.md.

Values carry their CRC-32C end to end (``crc32c`` from ``mooncakefs._engine``).  A frame flagged
WITH_CRC ends its payload with one (CRC_TRAILER): a PUT's is the value's, computed by the sender chunk
by chunk as it sends and checked by the receiver chunk by chunk as it receives; a PUT_END's (its only
payload) is its striped put's.  BATCH_PUT names its values' CRCs in its meta; a GET or BATCH_GET that
asks for them gets each value's CRC in its reply.  A mismatch is a ``ChecksumError`` for that value
only.  The CRCs are optional in each request (a client that names none is not checked), so the shapes
of version 2 still parse; mooncakefs's client always sends and asks for them.

A frame with a large payload pads its meta (flags bits 2-7: 0-63 bytes of padding between the meta and
the payload) so that the payload starts at a stream offset in step with its source's cache-line phase
(``payload_phase``).  The kernel copies a TCP send into its socket pages, and a receive out of them,
with ``rep movsb``, which on the AMD EPYC VMs takes twice as long when the destination lies 1-31 bytes
past the source modulo 4 KiB (its stores alias the loads that follow them): a 1 MiB put's header and
meta of a few dozen bytes put its value there whenever its buffer starts near the start of a page.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from mooncakefs import errors
from mooncakefs._engine import address, crc32c
from mooncakefs.api import PLAIN_PUT, PutOptions
from mooncakefs.errors import ChecksumError, MooncakeError, ProtocolError, Unavailable

MAGIC = 0x434D  # b"MC"
VERSION = 4  # 2: puts carry a version; 3: values carry their CRC-32C; 4: payloads may be padded
HEADER = struct.Struct("<HBBIQ")  # magic, opcode, flags, meta length, payload length
MAX_META = 8 << 20  # a batch of 4096 keys of 1 KiB fits
PREAUTH_MAX_META = 1 << 10  # before the handshake is done, a frame's meta is this small and has no payload
MAX_PAYLOAD = 1 << 48
MAX_BATCH = 4096
RECV_BUFFER = 256 << 10
SMALL_SEND = 64 << 10  # payloads up to this are copied next to the header: one send() per frame
# A frame's first recv asks for at most this much: enough for a small request whole, little enough that a
# large payload lands mostly in place (what the buffer took of it is copied out again).
FIRST_READ = 64 << 10
IOV_CHUNK = 512  # buffers handed to one sendmsg / recvmsg_into (the kernel takes at most IOV_MAX, 1024)
CRC_CHUNK = 1 << 20  # a value is checksummed in chunks this big as it is sent or received, while still in cache
CRC_TRAILER = struct.Struct("<I")  # the CRC-32C that follows a PUT's value in its payload
WITH_CRC = 1  # frame header flag: the payload is a value followed by its CRC-32C (CRC_TRAILER)
PAD_SHIFT = 2  # frame header flags from this bit up: bytes of padding between the meta and the payload
FLAGS_MASK = (1 << PAD_SHIFT) - 1
LINE = 64  # cache line: a large payload's stream offset is padded to its source's phase in one


class Op:
    """Opcodes.  Requests from clients, then the two replies."""

    HELLO, AUTH, MAP, PING = 1, 2, 3, 4
    NOTIFY = 5  # transfer engine: a (name, message) for the peer's get_notifies, sent after a transfer
    RDMA_CONNECT, RDMA_REGIONS = 6, 7  # transfer engine: connect rdma queue pairs; the regions and their rkeys
    PUT, PUT_BEGIN, PUT_END, PUT_ABORT, WRITE, WRITEV = 10, 11, 12, 13, 14, 15
    GET, READ, RELEASE, READV = 20, 21, 22, 23  # READV / WRITEV: many ranges in one frame (transfer engine)
    EXISTS, REMOVE, REMOVE_PREFIX, STAT, KEYS, MATCH_PREFIX, STATS, PERSIST = 30, 31, 32, 33, 34, 35, 36, 37
    BATCH_PUT, BATCH_GET, BATCH_EXISTS, BATCH_VERSIONS = 40, 41, 42, 43
    EPOCH = 50  # a cluster client names the placement epoch it routes by; the node checks it on each request
    OK, ERROR = 100, 101


# Put flags, in the meta of PUT, PUT_BEGIN and BATCH_PUT.  In a cluster, LOCAL marks a value kept on the
# writer's host, and the bits from REPLICAS_SHIFT up carry the replica count the client asked for: the
# node keeps both with the value (its tag), on SSD too, for repair.
PIN, IF_ABSENT, DURABLE, LOCAL, IF_NEWER = 1, 2, 4, 8, 16
REPLICAS_SHIFT = 8
PLACEMENT_FLAGS = LOCAL | ~((1 << REPLICAS_SHIFT) - 1)  # what a node keeps with the value (its tag)
_OPTION_FLAGS = {"pin": PIN, "if_absent": IF_ABSENT, "durable": DURABLE, "if_newer": IF_NEWER}
# The options of a cluster client's plain put by its placement flags (a few kinds: replica counts, LOCAL),
# made once each rather than checked again on every put a node receives.
_PLACED_PUTS: dict[int, PutOptions] = {}
_PLACED_PUTS_MAX = 64


def pack_put_options(options: PutOptions = PLAIN_PUT, cluster_flags: int = 0) -> list[Any]:
    """A put's options (checked ``PutOptions``, and the cluster's placement flags) as the end of its
    meta: [flags, ttl, version]."""
    flags = (
        (PIN if options.pin else 0)
        | (IF_ABSENT if options.if_absent else 0)
        | (DURABLE if options.durable else 0)
        | (IF_NEWER if options.if_newer else 0)
        | cluster_flags
    )
    return [flags, options.ttl, pack_version(options.version)]


def unpack_put_options(flags: Any, ttl: Any, version: Any) -> PutOptions:
    """``PutOptions`` from the end of a put's meta, checked as a local put's keywords are (InvalidArgument).
    The flags that say how a cluster client placed the value (LOCAL, the replica count) become its tag,
    which the node keeps for repair."""
    if type(flags) is not int or not 0 <= flags < 1 << 32:
        raise ValueError(f"put flags must be a 32-bit int, got {flags!r:.40}")
    if flags == 0 and ttl is None and version is None:
        return PLAIN_PUT  # the common case, which the store recognises by identity
    if flags & ~PLACEMENT_FLAGS == 0 and ttl is None:  # a cluster client's plain put: a tag and a version
        placed = _PLACED_PUTS.get(flags)
        if placed is None:
            placed = PutOptions(tag=flags)
            if len(_PLACED_PUTS) < _PLACED_PUTS_MAX:
                _PLACED_PUTS[flags] = placed
        return placed if version is None else placed.stamped(unpack_version(version))
    return PutOptions(
        **{name: bool(flags & bit) for name, bit in _OPTION_FLAGS.items()},
        ttl=ttl,
        version=unpack_version(version),
        tag=flags & PLACEMENT_FLAGS,
    )


def pack_version(version: int) -> bytes | None:
    """A value's version as it travels in put meta: 16 bytes big-endian, or nil for 0."""
    if type(version) is not int or not 0 <= version < 1 << 126:
        raise ValueError(f"a version is an int from 0 to 2**126, got {version!r:.40}")
    return version.to_bytes(16, "big") if version else None


def unpack_version(data: Any) -> int:
    if data is None:
        return 0
    if type(data) is not bytes or len(data) != 16:
        raise ValueError(f"a version on the wire is 16 bytes, got {data!r:.40}")
    return int.from_bytes(data, "big")


_pack = msgpack.Packer(use_bin_type=True).pack


def auth_proof(secret: bytes, nonce: bytes) -> bytes:
    """What a client sends to prove it holds the cluster secret without revealing it."""
    return hmac.new(secret, b"mooncakefs-client\0" + nonce, hashlib.sha256).digest()


def error_meta(exc: BaseException) -> list[Any]:
    """An exception as ERROR meta: [class name, message, key, needed, given]."""
    return [
        type(exc).__name__,
        str(exc),
        getattr(exc, "key", None),
        getattr(exc, "needed", 0),
        getattr(exc, "given", 0),
    ]


_WIRE_ERRORS: dict[str, type[BaseException]] = {
    name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, MooncakeError)
} | {"ValueError": ValueError, "TypeError": TypeError}


def error_from_meta(meta: Sequence[Any]) -> BaseException:
    """The exception an ERROR frame describes, as the same class the node raised where it can be."""
    try:
        name, message, key, needed, given = meta
        cls = _WIRE_ERRORS.get(name, MooncakeError)
        if cls is errors.KeyNotFound:
            return errors.KeyNotFound(key, message.split(": ", 1)[-1])
        if issubclass(cls, errors.KeyExists):
            return cls(key)
        if cls is errors.Moved:
            return errors.Moved(key)
        if cls is errors.BufferTooSmall:
            return errors.BufferTooSmall(key, needed, given)
        return cls(message)
    except (TypeError, ValueError, AttributeError):
        return ProtocolError(f"malformed error reply: {meta!r:.200}")


def crc_error(expected: int | None, got: int, what: Callable[[], str]) -> ChecksumError | None:
    """The ChecksumError of a value whose bytes (CRC ``got``) are not the ones sent (CRC ``expected``;
    None: the sender named none), else None.  ``what`` names the value."""
    if expected is None or expected == got:
        return None
    return ChecksumError(
        f"{what()} fails its CRC-32C check (expected {expected:#010x}, got {got:#010x}): its bytes "
        "were corrupted in transit or in the sender's memory"
    )


def check_crc(expected: int | None, got: int, what: Callable[[], str]) -> None:
    """Raise ``crc_error``'s ChecksumError, if any."""
    if (exc := crc_error(expected, got, what)) is not None:
        raise exc


def payload_phase(source: int, destination: int = 0) -> int:
    """The offset modulo LINE at which a payload from address ``source``, bound for address
    ``destination`` in the receiver (a pool block, on a line, unless the receiver said where), should
    start in the stream.

    Each copy of it (the sender's into the kernel's socket pages, the receiver's out of them) is slow
    when its destination lies 1-31 bytes past its source modulo a page (see the module docstring); the
    kernel's pages start each frame on a line (the previous frame's pages are freed by the time a
    request's reply or the next request comes).  The source's own phase makes the sender's copy
    aligned, and is kept unless it puts the receiver's destination 1-31 bytes past it: then half a line
    further keeps both copies 32-63 bytes apart."""
    if 0 < (destination - source) % LINE < LINE // 2:
        return (source + LINE // 2) % LINE
    return source % LINE


def _frame_head(op: int, flags: int, m: bytes, payload_len: int, first: Any = None, destination: int = 0) -> bytes:
    """A frame's header and meta ``m``; with ``first`` (the first buffer of a large payload) padded so
    that the payload starts at its ``payload_phase`` for ``destination``."""
    pad = 0 if first is None else (payload_phase(address(first), destination) - HEADER.size - len(m)) % LINE
    head = HEADER.pack(MAGIC, op, flags | pad << PAD_SHIFT, len(m), payload_len) + m
    return head + bytes(pad) if pad else head


def client_handshake(ch: Channel, secret: bytes | None, what: str) -> str:
    """Answer a server's HELLO with AUTH (proving the secret when it asks); the server's instance id.
    ``what`` names the kind of server for the messages ("node", "transfer engine")."""
    op, _flags, meta, _n = ch.read_frame()
    if op != Op.HELLO or not isinstance(meta, list) or len(meta) != 3:
        raise ProtocolError(f"{ch.peer}: not a mooncakefs {what} (opcode {op})")
    version, instance, nonce = meta
    if version != VERSION:
        raise ProtocolError(f"{ch.peer}: {what} speaks protocol {version}, this client {VERSION}")
    if nonce is not None and secret is None:
        raise errors.AuthenticationError(
            f"{ch.peer}: the {what} requires a cluster secret: pass secret=... or set MOONCAKEFS_SECRET"
        )
    ch.send(Op.AUTH, [VERSION, auth_proof(secret, nonce) if nonce is not None and secret else None])
    ch.read_reply()
    return instance


class Channel:
    """One framed connection.  Not thread-safe: one request at a time, by one thread.

    Reads are buffered, so a small frame costs one ``recv``; payloads bigger than what is buffered are
    received straight into the caller's memory."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = None) -> None:
        self.sock, self.peer = sock, peer
        if timeout is not None:
            self.set_timeout(timeout)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self.payload_left = 0  # bytes of the current frame's payload not yet read
        self.flags = 0  # the current frame's header flags
        self.closed = False
        self.epoch: int | None = None  # the placement epoch announced on this connection (cluster clients)
        # A node's limit on receiving the current frame (time.monotonic()): a peer that trickles its
        # bytes is dropped once it passes, even though each recv makes progress.
        self.deadline: float | None = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    # -- sending ----------------------------------------------------------------------------------------

    def send(self, op: int, meta: Any = (), payload: Any = None, flags: int = 0, destination: int = 0) -> None:
        """Send one frame; ``payload`` is a buffer or a list of buffers (sent without copying if large),
        ``destination`` the address (or only its phase in a line) where the peer receives a large one.

        A large payload goes out with its header in one ``sendmsg``: one system call fewer than the
        header sent on its own first, and the payload follows the header in the same call, as its padding
        (``payload_phase``) assumes.  The peer's first read then finds the header with the start of the
        payload (a reader expecting a large payload asks for little: ``read_frame``'s ``first_read``)."""
        m = _pack(meta)
        parts = payload if isinstance(payload, list) else ([] if payload is None else [payload])
        size = sum(memoryview(p).nbytes for p in parts)
        try:
            if size <= SMALL_SEND:
                head = _frame_head(op, flags, m, size)
                self.sock.sendall(b"".join([head, *parts]) if parts else head)
            else:  # one system call for the header and the payload (many ranges of a READV reply too)
                self._send_parts([_frame_head(op, flags, m, size, parts[0], destination), *parts])
        except OSError as exc:
            raise self._lost(exc) from None

    def send_value(self, op: int, meta: Any, value: memoryview, crc: int | None = None) -> int:
        """Send a frame whose payload is ``value`` then its CRC-32C (CRC_TRAILER); returns the CRC.  A
        large value goes CRC_CHUNK at a time (the header with the first), each chunk's CRC computed right
        after it is sent, while the peer receives it (and checks what came before); the CRC follows.  A
        ``crc`` the caller already has (a copy of a stored value, or of one sent to several nodes) goes out
        with the value in one call, as it is, so a copy whose bytes differ from it is refused."""
        n = len(value)
        if n <= SMALL_SEND:
            if crc is None:
                crc = crc32c(value)
            self.send(op, meta, [value, CRC_TRAILER.pack(crc)], flags=WITH_CRC)
            return crc
        parts: list[Any] = [_frame_head(op, WITH_CRC, _pack(meta), n + CRC_TRAILER.size, value)]
        running = 0
        try:
            if crc is not None:
                self._send_parts([*parts, value, CRC_TRAILER.pack(crc)])
                return crc
            for start in range(0, n, CRC_CHUNK):
                chunk = value[start : start + CRC_CHUNK]
                self._send_parts([*parts, chunk])
                parts = []
                running = crc32c(chunk, running)
            self.sock.sendall(CRC_TRAILER.pack(running))
        except OSError as exc:
            raise self._lost(exc) from None
        return running

    def _send_parts(self, parts: list[Any]) -> None:
        """Send a few buffers back to back in one system call (a partial send, which a send timeout can
        cause, goes on where it stopped)."""
        views = [memoryview(p) for p in parts]
        views = [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in views if v.nbytes]
        first = 0
        while first < len(views):
            sent = self.sock.sendmsg(views[first : first + IOV_CHUNK])
            while first < len(views) and sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            if sent:
                views[first] = views[first][sent:]

    def send_with_fds(self, op: int, meta: Any, fds: list[int]) -> None:
        m = _pack(meta)
        socket.send_fds(self.sock, [_frame_head(op, 0, m, 0)], fds)

    # -- receiving --------------------------------------------------------------------------------------

    def set_timeout(self, seconds: float) -> None:
        """How long one send or recv may wait: kernel-side timeouts keep the socket blocking, so a recv
        is one syscall."""
        tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def read_frame(
        self,
        max_meta: int = MAX_META,
        max_payload: int = MAX_PAYLOAD,
        *,
        idle: float | None = None,
        within: float | None = None,
        first_read: int = FIRST_READ,
    ) -> tuple[int, int, Any, int]:
        """The next frame's (opcode, flags, meta, payload length); read the payload next.  A frame larger
        than the limits is refused before anything is allocated for it.

        A server passes ``idle``, how long to wait for the frame to begin (the socket's own timeout
        repeats until then), and ``within``, how long its header and meta may take once it has begun:
        that sets ``deadline``, which a peer trickling bytes cannot push back."""
        if self.payload_left:
            self.skip_payload()
        if idle is not None and self._start == self._end:
            self._await_frame(idle)
        if within is not None:
            self.deadline = time.monotonic() + within
        self._fill(HEADER.size, first_read)
        magic, op, flags, meta_len, payload_len = HEADER.unpack_from(self._buf, self._start)
        if magic != MAGIC:
            raise ProtocolError(f"{self.peer}: bad frame magic {magic:#06x}")
        if meta_len > max_meta or payload_len > max_payload:
            raise ProtocolError(f"{self.peer}: frame too large (meta {meta_len}, payload {payload_len})")
        self._start += HEADER.size
        meta = self._read_meta(meta_len) if meta_len else ()
        if pad := flags >> PAD_SHIFT:
            self._fill(pad)
            self._start += pad
            flags &= FLAGS_MASK
        self.payload_left = payload_len
        self.flags = flags
        return op, flags, meta, payload_len

    def read_frame_with_fds(self, max_fds: int) -> tuple[int, int, Any, int, list[int]]:
        """``read_frame`` for a reply carrying file descriptors (SCM_RIGHTS); nothing may be buffered."""
        assert self._start == self._end
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, RECV_BUFFER, max_fds)
        except OSError as exc:
            raise self._lost(exc) from None
        if not data:
            raise self._lost(None)
        self._buf[: len(data)] = data
        self._start, self._end = 0, len(data)
        return (*self.read_frame(), fds)

    def read_reply(self, first_read: int = FIRST_READ) -> tuple[Any, int]:
        """The reply to a request: (meta, payload length); an ERROR reply is raised as its exception.
        ``first_read``: how much its first recv asks for (``read_frame``)."""
        op, _flags, meta, payload_len = self.read_frame(first_read=first_read)
        if op == Op.OK:
            return meta, payload_len
        if op == Op.ERROR:
            raise error_from_meta(meta)
        raise ProtocolError(f"{self.peer}: expected a reply, got opcode {op}")

    def read_payload_into(self, dst: memoryview) -> None:
        """Fill ``dst`` (a byte view) from the current payload.  What the buffer holds is copied; a small
        rest refills the buffer (one recv for the many small values of a batch); a large one is received
        in place."""
        n = len(dst)
        if n > self.payload_left:
            raise ProtocolError(f"{self.peer}: payload has {self.payload_left} bytes left, {n} wanted")
        self.payload_left -= n
        have = min(n, self._end - self._start)
        if have:
            dst[:have] = self._view[self._start : self._start + have]
            self._start += have
        if have < n and n - have < FIRST_READ:
            self._fill(n - have, ask=min(n - have + self.payload_left, RECV_BUFFER))
            dst[have:] = self._view[self._start : self._start + n - have]
            self._start += n - have
            return
        while have < n:
            try:
                got = self.sock.recv_into(dst[have:], n - have, socket.MSG_WAITALL)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            have += got
            if have < n and self.deadline is not None and time.monotonic() > self.deadline:
                raise self._lost(TimeoutError())

    def read_payload_into_many(self, dsts: Sequence[memoryview]) -> None:
        """Fill each of ``dsts`` (byte views) in turn from the current payload, with one ``recvmsg_into``
        for all of them where the kernel allows: the ranges of a READV reply cost one system call."""
        wanted = sum(len(d) for d in dsts)
        if wanted > self.payload_left:
            raise ProtocolError(f"{self.peer}: payload has {self.payload_left} bytes left, {wanted} wanted")
        self.payload_left -= wanted
        left = [d for d in dsts if len(d)]
        first = 0
        while first < len(left) and self._start < self._end:  # what is buffered already
            d = left[first]
            have = min(len(d), self._end - self._start)
            d[:have] = self._view[self._start : self._start + have]
            self._start += have
            if have < len(d):
                left[first] = d[have:]
            else:
                first += 1
        while first < len(left):
            try:
                chunk = left[first : first + IOV_CHUNK]
                got, _anc, _flags, _addr = self.sock.recvmsg_into(chunk, 0, socket.MSG_WAITALL)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            while got:  # what arrived: whole buffers, then part of one
                if got < len(left[first]):
                    left[first] = left[first][got:]
                    break
                got -= len(left[first])
                first += 1
            if first < len(left) and self.deadline is not None and time.monotonic() > self.deadline:
                raise self._lost(TimeoutError())

    def read_payload_crc(self, dst: memoryview) -> int:
        """``read_payload_into`` that returns the CRC-32C of what it received, computed chunk by chunk as
        the bytes arrive (the GIL is released for it), while the rest is still in flight."""
        if len(dst) <= CRC_CHUNK:  # the common small value: one read, one CRC
            self.read_payload_into(dst)
            return crc32c(dst)
        crc = 0
        for start in range(0, len(dst), CRC_CHUNK):
            chunk = dst[start : start + CRC_CHUNK]
            self.read_payload_into(chunk)
            crc = crc32c(chunk, crc)
        return crc

    def read_value_into(self, dst: memoryview, what: Callable[[], str]) -> int | None:
        """Receive a PUT's payload: the value into ``dst``, then, if the frame is flagged WITH_CRC, its
        CRC (CRC_TRAILER), which must match what arrived; returns the CRC (None: the sender named none).
        ChecksumError on a mismatch, with the whole payload read, so the connection stays in step.
        ``what`` names the value for the message."""
        if not self.flags & WITH_CRC:
            if self.payload_left != len(dst):
                raise ValueError(f"{what()}: {len(dst)} bytes expected, {self.payload_left} sent")
            self.read_payload_into(dst)
            return None
        if self.payload_left != len(dst) + CRC_TRAILER.size:
            raise ValueError(
                f"{what()}: a put's payload is its value then a {CRC_TRAILER.size}-byte CRC-32C: "
                f"{len(dst)} + {CRC_TRAILER.size} bytes expected, {self.payload_left} sent"
            )
        got = self.read_payload_crc(dst)  # while the sender computes the CRC it sends next
        trailer = bytearray(CRC_TRAILER.size)
        self.read_payload_into(memoryview(trailer))
        (sent,) = CRC_TRAILER.unpack(trailer)
        if sent != got:
            check_crc(sent, got, what)
        return got

    def read_payload(self, n: int) -> bytearray:
        out = bytearray(n)
        self.read_payload_into(memoryview(out))
        return out

    def skip_payload(self) -> None:
        """Drain what is left of the current payload (a request that failed before reading it)."""
        while self.payload_left:
            n = min(self.payload_left, RECV_BUFFER)
            self.read_payload_into(memoryview(bytearray(n)))

    def _read_meta(self, n: int) -> Any:
        if n <= RECV_BUFFER:
            self._fill(n)
            raw: Any = self._view[self._start : self._start + n]
            self._start += n
        else:
            raw = bytearray(n)
            self.payload_left = n
            self.read_payload_into(memoryview(raw))
        try:
            return msgpack.unpackb(raw, use_list=True, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"{self.peer}: undecodable frame meta ({exc})") from None

    def _await_frame(self, idle: float) -> None:
        """Block until a frame's first bytes arrive, for at most ``idle`` seconds."""
        self._start = self._end = 0
        until = time.monotonic() + idle
        while True:
            try:
                got = self.sock.recv_into(self._view, FIRST_READ)
            except OSError as exc:
                if _timed_out(exc) and time.monotonic() < until:
                    continue
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            self._end = got
            return

    def _fill(self, n: int, ask: int = FIRST_READ) -> None:
        """Make at least ``n`` bytes (at most RECV_BUFFER) readable from the buffer, each recv asking for
        up to ``ask`` (more when ``n`` needs it): a frame's first read takes little of a large payload,
        which is received in place instead."""
        if self._end - self._start >= n:
            return
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + max(n, ask) > RECV_BUFFER:  # no room behind: move what is left to the front
            left = self._end - self._start
            self._buf[:left] = self._view[self._start : self._end]
            self._start, self._end = 0, left
        while self._end - self._start < n:
            want = min(RECV_BUFFER - self._end, max(n - (self._end - self._start), ask))
            try:
                got = self.sock.recv_into(self._view[self._end :], want)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            self._end += got
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise self._lost(TimeoutError())

    def _lost(self, exc: OSError | None) -> Unavailable:
        """The peer is gone or silent: this channel is done for."""
        self.close()
        if exc is None:
            why = "closed by the peer"
        elif _timed_out(exc):
            why = "timed out"
        else:
            why = f"failed: {exc.strerror or exc}"
        return Unavailable(f"{self.peer}: connection {why}")


def _timed_out(exc: OSError) -> bool:
    """Whether a socket call failed only because its timeout passed."""
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(exc, TimeoutError)
