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

import hashlib
import hmac
import socket
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from mooncakefs import errors
from mooncakefs._engine import Framing, frame_head
from mooncakefs.api import PLAIN_PUT, PutOptions
from mooncakefs.errors import MooncakeError, ProtocolError
from mooncakefs.frame import (  # noqa: F401  (the frame's layout, named here too for wire's users)
    CRC_CHUNK,
    CRC_TRAILER,
    FIRST_READ,
    HEADER,
    IOV_CHUNK,
    LINE,
    MAGIC,
    MAX_META,
    PAD_SHIFT,
    RECV_BUFFER,
    SMALL_SEND,
    WITH_CRC,
    check_crc,
    crc_error,
    payload_phase,
)

VERSION = 4  # 2: puts carry a version; 3: values carry their CRC-32C; 4: payloads may be padded
PREAUTH_MAX_META = 1 << 10  # before the handshake is done, a frame's meta is this small and has no payload
MAX_BATCH = 4096


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


def pack_put_options(options: PutOptions = PLAIN_PUT, cluster_flags: int = 0, tier: str | None = None) -> list[Any]:
    """A put's options (checked ``PutOptions``, the cluster's placement flags, and a PUT's or PUT_BEGIN's
    tier hint) as the end of its meta: [flags, ttl, version], then the tier where one is given (a put
    without one is the frame of before the field came, which every node takes)."""
    flags = (
        (PIN if options.pin else 0)
        | (IF_ABSENT if options.if_absent else 0)
        | (DURABLE if options.durable else 0)
        | (IF_NEWER if options.if_newer else 0)
        | cluster_flags
    )
    packed = [flags, options.ttl, pack_version(options.version)]
    if tier is not None:
        packed.append(tier)
    return packed


def unpack_put_head(meta: Sequence[Any]) -> tuple[Any, Any, PutOptions, Any]:
    """A PUT's or PUT_BEGIN's meta, [key, size, flags, ttl, version] and maybe a tier: (key, size,
    options, tier), the tier None where the client sent none (as one from before it travelled does);
    the store checks it."""
    key, size, flags, ttl, version, tier = meta if len(meta) == 6 else (*meta, None)
    return key, size, unpack_put_options(flags, ttl, version), tier


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


class Channel(Framing):
    """One framed connection: ``Framing`` (in the engine: every frame goes through it) and what only
    some requests need.  Not thread-safe: one request at a time, by one thread."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = None) -> None:
        super().__init__(sock, peer, timeout)
        self.epoch: int | None = None  # the placement epoch announced on this connection (cluster clients)

    # -- sending ----------------------------------------------------------------------------------------

    def send_with_fds(self, op: int, meta: Any, fds: list[int]) -> None:
        m = _pack(meta)
        socket.send_fds(self.sock, [frame_head(op, 0, m, 0)], fds)

    # -- receiving --------------------------------------------------------------------------------------

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

    def read_payload(self, n: int) -> bytearray:
        out = bytearray(n)
        self.read_payload_into(memoryview(out))
        return out
