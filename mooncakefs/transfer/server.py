"""The engine's RPC server: lets peers read and write this process's registered memory over TCP.

It speaks the node's framed protocol (``wire.py``) and its handshake: ``HELLO`` (with a nonce when a
secret is set), ``AUTH`` (HMAC of the nonce), then requests, each answered in order.  ``MAP`` returns
what a peer needs to choose a path (this process's pid, boot id and pid namespace for the same-host
path, the registered table and the memfd of its version); ``READ`` / ``WRITE`` move one range and
``READV`` / ``WRITEV`` many at once.  Every range is checked against the registry before a byte moves:
memory nobody registered, or past a registration's end, is an ``ERROR`` reply, never a touch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from mooncakefs.errors import AuthenticationError, MooncakeError, ProtocolError, Unavailable
from mooncakefs.transfer.memory import Registry
from mooncakefs.wire import PREAUTH_MAX_META, VERSION, Channel, Op, auth_proof, error_meta

log = logging.getLogger("mooncakefs.transfer")

HANDSHAKE_TIMEOUT = 10.0
MAX_VECTOR = 4096  # ranges in one READV / WRITEV
MIN_PAYLOAD_RATE = 1 << 20  # a frame's payload must arrive at 1 MiB/s at least


def host_identity() -> tuple[str, int]:
    """(boot id + network namespace, pid namespace inode): two processes with the same pair reach each
    other's memory.  The network namespace is part of it so that namespaces simulating hosts act as hosts."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    with contextlib.suppress(OSError):
        boot += f"/net:{os.stat('/proc/self/ns/net').st_ino}"
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return boot, pidns


class SegmentServer:
    """Serves one engine's registered memory on a TCP port; a thread per connection."""

    def __init__(self, registry: Registry, host: str, port: int = 0, *, secret: bytes | None = None,
                 io_timeout: float = 30.0) -> None:
        self.registry = registry
        self.secret = secret
        self.io_timeout = io_timeout
        self.instance = secrets.token_hex(8)
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._listener = socket.socket(info[0], socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind(info[4])
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._channels: set[Channel] = set()
        boot, pidns = host_identity()
        self._identity = [os.getpid(), boot, pidns]
        self.bytes_in = self.bytes_out = 0
        self._thread = threading.Thread(target=self._accept_loop, name="mooncakefs-te-accept", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            with contextlib.suppress(OSError):
                ch.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # out of descriptors: back off, keep serving
                continue
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(target=self._serve, args=(sock, peer), name=f"mooncakefs-te-{peer}",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        ch = Channel(sock, peer, timeout=self.io_timeout)
        with self._lock:
            self._channels.add(ch)
        try:
            self._handshake(ch)
            self._loop(ch)
        except (Unavailable, ProtocolError, AuthenticationError) as exc:
            if not self._stopping.is_set():
                log.debug("transfer peer dropped", extra={"peer": peer, "why": str(exc)})
        except Exception:
            log.exception("transfer connection failed", extra={"peer": peer})
        finally:
            ch.close()
            with self._lock:
                self._channels.discard(ch)

    def _handshake(self, ch: Channel) -> None:
        nonce = secrets.token_bytes(16) if self.secret else None
        ch.send(Op.HELLO, [VERSION, self.instance, nonce])
        if not ch.wait_readable(HANDSHAKE_TIMEOUT):
            raise ProtocolError(f"{ch.peer}: no handshake within {HANDSHAKE_TIMEOUT:g} s")
        ch.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        op, _flags, meta, _n = ch.read_frame(max_meta=PREAUTH_MAX_META, max_payload=0)
        if op != Op.AUTH or not isinstance(meta, list) or len(meta) != 2 or meta[0] != VERSION:
            raise ProtocolError(f"{ch.peer}: bad handshake (opcode {op}, {meta!r:.100})")
        if nonce is not None:
            assert self.secret is not None
            proof = meta[1]
            if not isinstance(proof, bytes) or not secrets.compare_digest(proof, auth_proof(self.secret, nonce)):
                ch.send(Op.ERROR, error_meta(AuthenticationError(
                    "this transfer engine requires the cluster secret (secret=... or MOONCAKEFS_SECRET)")))
                raise AuthenticationError(f"{ch.peer}: wrong or missing cluster secret")
        ch.send(Op.OK, [])
        ch.deadline = None

    def _loop(self, ch: Channel) -> None:
        handlers = {Op.MAP: self._map, Op.READ: self._read, Op.WRITE: self._write, Op.READV: self._readv,
                    Op.WRITEV: self._writev, Op.PING: self._ping}
        while not self._stopping.is_set():
            op, _flags, meta, payload_len = ch.read_frame()
            ch.deadline = time.monotonic() + self.io_timeout + payload_len / MIN_PAYLOAD_RATE
            handler = handlers.get(op)
            if handler is None:
                raise ProtocolError(f"{ch.peer}: unknown opcode {op}")
            try:
                if not isinstance(meta, list):
                    raise TypeError(f"request meta must be an array, got {type(meta).__name__}")
                handler(ch, meta, payload_len)
            except (MooncakeError, ValueError, TypeError, IndexError) as exc:
                if isinstance(exc, ProtocolError | Unavailable):
                    raise
                ch.skip_payload()
                ch.send(Op.ERROR, error_meta(exc if isinstance(exc, MooncakeError | ValueError | TypeError)
                                             else ValueError(f"malformed request: {exc!r:.100}")))
            ch.deadline = None

    def _ping(self, ch: Channel, meta: list[Any], _n: int) -> None:
        ch.send(Op.OK, [])

    def _map(self, ch: Channel, meta: list[Any], _n: int) -> None:
        ch.send(Op.OK, [*self._identity, self.registry.version_fd, self.registry.version, self.registry.table()])

    def _read(self, ch: Channel, meta: list[Any], n: int) -> None:
        addr, offset, length = meta
        view = self.registry.view(_int(addr) + _int(offset), _int(length))
        self.bytes_out += length
        ch.send(Op.OK, (), view)

    def _write(self, ch: Channel, meta: list[Any], payload_len: int) -> None:
        addr, offset = meta
        view = self.registry.view(_int(addr) + _int(offset), payload_len, write=True)
        ch.read_payload_into(view)
        self.bytes_in += payload_len
        ch.send(Op.OK, [])

    def _ranges(self, meta: list[Any], write: bool) -> list[memoryview]:
        if not 0 < len(meta) <= MAX_VECTOR:
            raise ValueError(f"a vector holds 1 to {MAX_VECTOR} ranges, not {len(meta)}")
        return [self.registry.view(_int(r[0]), _int(r[1]), write) for r in meta]

    def _readv(self, ch: Channel, meta: list[Any], _n: int) -> None:
        views = self._ranges(meta, False)  # every range checked before any is sent
        self.bytes_out += sum(len(v) for v in views)
        ch.send(Op.OK, (), views)

    def _writev(self, ch: Channel, meta: list[Any], payload_len: int) -> None:
        views = self._ranges(meta, True)
        if sum(len(v) for v in views) != payload_len:
            raise ValueError(f"a WRITEV of {payload_len} bytes names ranges of {sum(len(v) for v in views)}")
        for v in views:
            ch.read_payload_into(v)
        self.bytes_in += payload_len
        ch.send(Op.OK, [])


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"expected an int, got {type(v).__name__}")
    return v
