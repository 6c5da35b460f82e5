"""The transfer engine as a product: move bytes between registered memory of any two processes.

``Engine`` is the Pythonic face (buffers or pointers in, exceptions out); ``TransferEngine``
(``compat.py``) wraps it with Mooncake's method names and return codes.  Each engine registers memory
(``register``), serves it to peers on its RPC port (``server.py``), and moves bytes to and from peers'
registered memory through the same core the node's clients use (``core.Router``), with one router
per peer:

- ``local`` (``ProcessTransport``): the peer is a process on this host (same boot id and pid
  namespace): memfd mapping or ``process_vm_readv/writev``, no socket on the data path;
- ``rdma``: where a device exists and the peer has one too (``rdma.py``);
- ``tcp`` (``TcpTransport``): the framed protocol, striped over several connections, small transfers
  of one batch gathered into one frame.

A transfer a transport cannot carry for reasons of the path (the kernel refuses ``process_vm``, a
device fails) goes to the next; one the peer refuses (not registered, out of bounds) fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mooncakefs.errors import (
    AddressNotRegistered,
    InvalidArgument,
    MooncakeError,
    Unavailable,
)
from mooncakefs.transfer import paths
from mooncakefs.transfer.core import READ, WRITE, Batch, Region, Router, Transfer, Transport
from mooncakefs.transfer.local import ProcessTransport
from mooncakefs.transfer.memory import ManagedBuffer, Registered, Registry
from mooncakefs.transfer.server import SegmentServer, host_identity
from mooncakefs.transfer.tcp import TcpTransport
from mooncakefs.wire import Channel, Op, client_handshake

log = logging.getLogger("mooncakefs.transfer")

DEFAULT_TIMEOUT = 30.0  # Mooncake's MC_TRANSFER_TIMEOUT default, seconds, plus a second per GiB
DEFAULT_STRIPE = 4 << 20
PROTOCOLS = ("auto", "tcp", "rdma")


def transfer_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get("MC_TRANSFER_TIMEOUT", DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def split_hostport(text: str, what: str = "session") -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as (host, port); InvalidArgument otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{what} must be a 'host:port' string, got {text!r:.60}")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise InvalidArgument(f"{what} {text!r:.60} is not 'host:port'")
    return host.strip("[]"), int(port)


@dataclass
class _Peer:
    session: str
    router: Router
    transports: list[Transport]
    control: Channel
    lock: threading.Lock = field(default_factory=threading.Lock)
    paths: list[str] = field(default_factory=list)


class Engine:
    """One process's transfer engine: its registered memory, its RPC server, its routes to peers."""

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        metadata: str = "P2PHANDSHAKE",
        protocol: str = "auto",
        devices: str = "",
        *,
        secret: bytes | str | None = None,
        connections: int = 4,
        stripe: int = DEFAULT_STRIPE,
        io_timeout: float = 10.0,
        same_host: bool = True,
    ) -> None:
        if metadata not in ("P2PHANDSHAKE", "p2p", "", None):
            raise InvalidArgument(
                f"metadata server {metadata!r:.60}: only P2PHANDSHAKE (peers named host:port, "
                "metadata exchanged on first contact) is supported so far"
            )
        if protocol not in PROTOCOLS:
            raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r:.40}")
        if not isinstance(hostname, str) or not hostname:
            raise InvalidArgument(f"hostname must be a non-empty str, got {hostname!r:.60}")
        host, port = hostname, 0
        if hostname.count(":") == 1 or hostname.startswith("["):
            host, port = split_hostport(hostname, "local hostname")
        secret = secret if secret is not None else os.environ.get("MOONCAKEFS_SECRET")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.connections, self.stripe, self.io_timeout = connections, stripe, io_timeout
        self.same_host = same_host and os.environ.get("MOONCAKEFS_TE_SAME_HOST", "1") != "0"
        self.protocol, self.why = self._choose(protocol, devices)
        self.registry = Registry()
        self._managed: dict[int, ManagedBuffer] = {}
        self.server = SegmentServer(self.registry, host, port, secret=self._secret, io_timeout=io_timeout)
        if self._secret is None and not _loopback(host):
            log.warning(
                "transfer engine on %s:%d has no secret: anyone who reaches the port can read and write "
                "the memory registered with it",
                host,
                self.server.port,
            )
        self.hostname = "localhost" if host in ("localhost", "") else host
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._identity = host_identity()
        self._closed = False

    def _choose(self, protocol: str, devices: str) -> tuple[str, str]:
        """The transport for other hosts, and why (``auto``: rdma where a device exists, else tcp)."""
        if protocol == "tcp":
            return "tcp", "asked for tcp"
        found = paths.rdma_devices(devices)
        if not found:
            why = paths.no_rdma_reason(devices)
            if protocol == "rdma":
                raise paths.DeviceNotFound(f"protocol 'rdma': {why}")
            log.info("transfer engine: using tcp, %s", why)
            return "tcp", why
        from mooncakefs.transfer import rdma

        if not rdma.available():
            why = f"RDMA devices {', '.join(d.name for d in found)} found, but {rdma.unavailable_reason()}"
            if protocol == "rdma":
                raise paths.DeviceNotFound(why)
            log.info("transfer engine: using tcp, %s", why)
            return "tcp", why
        return "rdma", f"RDMA devices {', '.join(d.name for d in found)}"

    # -- identity --------------------------------------------------------------------------------------

    @property
    def rpc_port(self) -> int:
        return self.server.port

    @property
    def session_id(self) -> str:
        """What peers name this engine by: ``host:port``."""
        return f"{self.hostname}:{self.rpc_port}"

    # -- memory ----------------------------------------------------------------------------------------

    def register(
        self, memory: Any, length: int | None = None, *, location: str = "*", writable: bool | None = None
    ) -> int:
        """Make memory reachable by peers; returns its address.  ``memory`` is a pointer (int, with
        ``length``) or a buffer (bytes-like, numpy array), which stays referenced while registered."""
        self._check_open()
        if type(memory) is int:
            if type(length) is not int:
                raise InvalidArgument("registering a pointer needs its length in bytes")
            entry = Registered(memory, length, True if writable is None else writable, location)
        else:
            view = _byte_view(memory, "memory")
            if length is not None and length != len(view):
                raise InvalidArgument(f"length {length} differs from the buffer's {len(view)} bytes")
            if writable and view.readonly:
                raise InvalidArgument("the buffer is read-only: it cannot be registered writable")
            from mooncakefs import _engine

            entry = Registered(
                _engine.address(view) if len(view) else 0,
                len(view),
                not view.readonly if writable is None else writable,
                location,
                owner=view,
            )
        self.registry.add(entry)
        return entry.addr

    def unregister(self, addr: int) -> None:
        self._check_open()
        self.registry.remove(addr)

    def allocate(self, length: int) -> int:
        """A managed buffer (a memfd, so same-host peers copy into it with memcpy), registered."""
        self._check_open()
        buf = ManagedBuffer(length)
        try:
            self.registry.add(Registered(buf.addr, length, True, "*", memfd=buf.fd, owner=buf))
        except BaseException:
            buf.close()
            raise
        self._managed[buf.addr] = buf
        return buf.addr

    def free(self, addr: int) -> None:
        buf = self._managed.pop(addr, None)
        if buf is None:
            raise AddressNotRegistered(f"no managed buffer at {addr:#x}")
        self.registry.remove(addr)
        buf.close()

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        """Registered memory of this process as a memoryview (bounds-checked)."""
        return self.registry.view(addr, length, write)

    # -- transfers -------------------------------------------------------------------------------------

    def submit(
        self, session: str, op: str, local: Sequence[Any], remote: Sequence[int], lengths: Sequence[int] | None = None
    ) -> Batch:
        """Start a batch: ``local[i]`` (a registered pointer, or a buffer) ↔ ``remote[i]`` (an address the
        peer registered) for ``lengths[i]`` bytes.  Every range is checked before any transfer starts."""
        self._check_open()
        if op not in (READ, WRITE):
            raise InvalidArgument(f"op must be {READ!r} or {WRITE!r}, not {op!r:.30}")
        if isinstance(local, str | bytes) or not isinstance(local, Sequence) or not isinstance(remote, Sequence):
            raise InvalidArgument("local and remote must be lists (one entry per transfer)")
        if lengths is None:
            lengths = [len(_byte_view(b, "local buffer")) if type(b) is not int else -1 for b in local]
        if not len(local) == len(remote) == len(lengths):
            raise InvalidArgument(
                f"a batch needs as many local buffers ({len(local)}), remote addresses "
                f"({len(remote)}) and lengths ({len(lengths)})"
            )
        transfers = []
        for buf, addr, n in zip(local, remote, lengths, strict=True):
            if type(n) is not int or n < 0:
                raise InvalidArgument(f"length must be a non-negative int, got {n!r:.30}")
            if type(addr) is not int or addr <= 0:
                raise AddressNotRegistered(f"remote address {addr!r:.30} is not a valid pointer")
            if type(buf) is int:
                view = self.registry.view(buf, n, write=op == READ)
            else:
                view = _byte_view(buf, "local buffer")
                if op == READ and view.readonly:
                    raise InvalidArgument("a read needs a writable local buffer")
                if len(view) < n:
                    raise InvalidArgument(f"the local buffer holds {len(view)} bytes, the transfer {n}")
                view = view[:n]
            if n:
                transfers.append(Transfer(op, view, Region(addr, n)))
        peer = self._peer(session)
        return peer.router.submit(transfers)

    def transfer(
        self,
        session: str,
        op: str,
        local: Sequence[Any],
        remote: Sequence[int],
        lengths: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> int:
        """``submit`` and wait (at most ``MC_TRANSFER_TIMEOUT`` plus a second per GiB); returns bytes moved."""
        batch = self.submit(session, op, local, remote, lengths)
        return batch.wait(timeout if timeout is not None else self.timeout_for(batch))

    def timeout_for(self, batch: Batch) -> float:
        return transfer_timeout() + getattr(batch, "nbytes", 0) / (1 << 30)

    def write(self, session: str, local: Any, remote: int, length: int | None = None) -> int:
        return self.transfer(session, WRITE, [local], [remote], None if length is None else [length])

    def read(self, session: str, local: Any, remote: int, length: int | None = None) -> int:
        return self.transfer(session, READ, [local], [remote], None if length is None else [length])

    def probe(self, session: str) -> None:
        """Reach the peer (connect, handshake, ping); Unavailable or AuthenticationError if it fails."""
        peer = self._peer(session)
        with peer.lock:
            if peer.control.closed:
                peer.control = self._connect(session)
            peer.control.send(Op.PING)
            peer.control.read_reply()

    def paths(self, session: str) -> list[str]:
        """The transports a session's transfers try, in order."""
        return list(self._peer(session).paths)

    # -- peers -----------------------------------------------------------------------------------------

    def _connect(self, session: str) -> Channel:
        host, port = split_hostport(session)
        try:
            sock = socket.create_connection((host, port), timeout=self.io_timeout)
        except OSError as exc:
            raise Unavailable(f"cannot reach the transfer engine at {session}: {exc.strerror or exc}") from None
        sock.settimeout(None)
        ch = Channel(sock, session, timeout=self.io_timeout)
        try:
            client_handshake(ch, self._secret, "transfer engine")
        except BaseException:
            ch.close()
            raise
        return ch

    def _peer(self, session: str) -> _Peer:
        peer = self._peers.get(session)
        if peer is not None:
            return peer
        with self._lock:
            peer = self._peers.get(session)
            if peer is not None:
                return peer
            control = self._connect(session)
            try:
                control.send(Op.MAP)
                info, _n = control.read_reply()
                pid, boot, pidns, version_fd, _version, _table = info[:6]
            except BaseException:
                control.close()
                raise
            tcp = TcpTransport(
                lambda: self._connect(session), connections=self.connections, stripe=self.stripe, vectored=True
            )
            transports: list[Transport] = [tcp]
            names = ["tcp"]
            if self.same_host and [boot, pidns] == list(self._identity) and boot:
                peer_box: list[_Peer] = []
                try:
                    local = ProcessTransport(pid, lambda: self._fetch_table(peer_box[0]), version_fd, tcp, session)
                except OSError as exc:
                    log.warning("same-host path to %s unusable (%s): using tcp", session, exc.strerror or exc)
                else:
                    transports.insert(0, local)
                    names.insert(0, "local")
            peer = _Peer(session, Router(transports), transports, control, paths=names)
            if names[0] == "local":
                peer_box.append(peer)
            self._peers[session] = peer
            return peer

    def _map(self, peer: _Peer) -> list[Any]:
        """The peer's MAP reply, asked now: its identity, table version, table and first buffer."""
        with peer.lock:
            if peer.control.closed:
                peer.control = self._connect(peer.session)
            peer.control.send(Op.MAP)
            info, _n = peer.control.read_reply()
        return info

    def _fetch_table(self, peer: _Peer) -> tuple[int, list[list[int]]]:
        info = self._map(peer)
        return info[4], info[5]

    def first_buffer(self, session: str) -> int:
        """The first memory ``session`` registered that is still registered (this engine's own when
        ``session`` is its session id), 0 when it has none: asked afresh, since peers register at any
        time.  Unavailable if the peer cannot be reached."""
        self._check_open()
        if session == self.session_id:
            return self.registry.first()
        info = self._map(self._peer(session))
        if len(info) > 6:
            return int(info[6])
        table = info[5]  # a peer from before the 7th field: its lowest registered address
        return int(table[0][0]) if table else 0

    def forget(self, session: str) -> None:
        """Drop a peer's connections (the next transfer to it starts afresh)."""
        with self._lock:
            peer = self._peers.pop(session, None)
        if peer is not None:
            _close_peer(peer)

    # -- life ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MooncakeError("the transfer engine is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            _close_peer(peer)
        self.server.close()
        for buf in self._managed.values():
            with contextlib.suppress(BufferError):
                buf.close()
        self._managed.clear()
        self.registry.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_peer(peer: _Peer) -> None:
    for t in peer.transports:
        with contextlib.suppress(Exception):
            t.close()
    peer.control.close()


def _loopback(host: str) -> bool:
    try:
        return all(info[4][0].startswith(("127.", "::1")) for info in socket.getaddrinfo(host, 0))
    except OSError:
        return False


def _byte_view(obj: Any, what: str) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgument(
            f"{what} must be a pointer (int) or a bytes-like object, not {type(obj).__name__}"
        ) from None
    if not view.c_contiguous:
        raise InvalidArgument(f"{what} must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
