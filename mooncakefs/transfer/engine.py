"""The transfer engine as a product: move bytes between registered memory of any two processes.

``Engine`` is the Pythonic face (buffers or pointers in, exceptions out); ``TransferEngine``
(``compat.py``) wraps it with Mooncake's method names and return codes.  Each engine registers memory
(``register``), serves it to peers on its RPC port (``server.py``), and moves bytes to and from peers'
registered memory through the same core the node's clients use (``core.Router``), with one router
per peer:

- ``local`` (``ProcessTransport``): the peer is a process on this host (same boot id and pid
  namespace): memfd mapping or ``process_vm_readv/writev``, no socket on the data path;
- ``rdma``: where this engine has a device and the peer advertises one of the same link layer, one path
  per local device (``rdma.RdmaTransport``), for local buffers registered with the engine (others go by
  the next path); the queue pairs are set up through the control connection (``RDMA_CONNECT``);
- ``tcp`` (``TcpTransport``): the framed protocol, striped over several connections, small transfers
  of one batch gathered into one frame.

A peer that serves on several addresses (``addresses=``: one per NIC) gives this engine one tcp path
per address, each behind the local NIC that reaches it (``paths.route_device``).  Per transfer, the
paths are ranked by the NUMA node of its local buffer against each NIC's (``paths.rank_nodes``), and the
transfers of a batch are spread over the paths nearest to their memory.  A transfer a path cannot carry
(the kernel refuses ``process_vm``, a connection or a device fails) goes to the next path
(``core.Router``); one the peer refuses (not registered, out of bounds) fails at once; ``PathFailed``
names every path tried when none could carry it.

Peers are found through the metadata named at start (``metadata.py``): ``P2PHANDSHAKE`` (a peer is its
``host:port``) or ``etcd://``, where this engine publishes its segment descriptor under a lease and
looks its peers' up by segment name.  ``notify`` leaves a (name, message) with a peer, which collects
them with ``notifies``: how the side that wrote KV cache tells the side that reads it that it is there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mooncakefs import _engine
from mooncakefs.errors import (
    AddressNotRegistered,
    InvalidArgument,
    MooncakeError,
    SegmentNotFound,
    Unavailable,
)
from mooncakefs.transfer import paths, rdma
from mooncakefs.transfer.core import READ, WRITE, Batch, Region, Router, Transfer, Transport, path_failure
from mooncakefs.transfer.local import ProcessTransport
from mooncakefs.transfer.memory import ManagedBuffer, Registered, Registry
from mooncakefs.transfer.metadata import EtcdMetadata, SegmentDescriptor, parse_metadata
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
    addresses: list[str]  # where the peer serves, its main address first
    lock: threading.Lock = field(default_factory=threading.Lock)


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
        addresses: Sequence[str] = (),
        lease_ttl: int | None = None,
    ) -> None:
        """Serve on ``hostname`` (``host`` or ``host:port``) and on each of ``addresses`` (more
        ``host[:port]``, one per NIC peers may use).  With ``etcd://`` metadata, ``hostname`` as given is
        this engine's segment name, and its descriptor lives under a lease of ``lease_ttl`` seconds
        (``MOONCAKEFS_TE_LEASE_TTL``, 10)."""
        spec = parse_metadata(metadata)
        if protocol not in PROTOCOLS:
            raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r:.40}")
        if not isinstance(hostname, str) or not hostname:
            raise InvalidArgument(f"hostname must be a non-empty str, got {hostname!r:.60}")
        host, port = _listen_address(hostname, "local hostname")
        if isinstance(addresses, str) or not all(isinstance(a, str) for a in addresses):
            raise InvalidArgument("addresses must be a list of 'host[:port]' strings")
        more = [_listen_address(a, "address") for a in addresses]
        secret = secret if secret is not None else os.environ.get("MOONCAKEFS_SECRET")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.connections, self.stripe, self.io_timeout = connections, stripe, io_timeout
        self.same_host = same_host and os.environ.get("MOONCAKEFS_TE_SAME_HOST", "1") != "0"
        self._rdma: rdma.RdmaService | None = None
        self.protocol, self.why = self._choose(protocol, devices)
        self.registry = Registry()
        self._managed: dict[int, ManagedBuffer] = {}
        try:
            self.server = SegmentServer(
                self.registry, host, port, secret=self._secret, io_timeout=io_timeout, more=more, rdma=self._rdma
            )
        except BaseException:
            self.registry.close()
            if self._rdma is not None:
                self._rdma.close()
            raise
        if self._secret is None and not all(_loopback(h) for h, _p in [(host, 0), *more]):
            log.warning(
                "transfer engine on %s has no secret: anyone who reaches the port can read and write "
                "the memory registered with it",
                ", ".join(self.server.served()),
            )
        self.hostname = "localhost" if host in ("localhost", "") else host
        # the name peers know this engine by: host:port, or with etcd the local hostname as given
        self.segment_name = f"{self.hostname}:{self.rpc_port}" if spec.p2p else hostname
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._identity = host_identity()
        self._closed = False
        self._meta: EtcdMetadata | None = None
        if not spec.p2p:
            try:
                self._meta = EtcdMetadata(spec, lease_ttl)
                self._meta.publish(self.descriptor())
            except BaseException:
                if self._meta is not None:
                    self._meta.close()
                self.server.close()
                self.registry.close()
                if self._rdma is not None:
                    self._rdma.close()
                raise

    def _choose(self, protocol: str, devices: str) -> tuple[str, str]:
        """The transport for other hosts, and why (``auto``: rdma where a device exists and opens, else
        tcp, with one log line saying why); with rdma, the devices opened (``self._rdma``)."""
        if protocol == "tcp":
            return "tcp", "asked for tcp"
        found = paths.rdma_devices(devices)
        if not found:
            why = paths.no_rdma_reason(devices)
            if protocol == "rdma":
                raise paths.DeviceNotFound(f"protocol 'rdma': {why}")
            log.info("transfer engine: using tcp, %s", why)
            return "tcp", why
        names = ", ".join(d.name for d in found)
        try:
            self._rdma = rdma.RdmaService(found)
        except MooncakeError as exc:
            why = f"RDMA devices {names} found, but {exc}"
            if protocol == "rdma":
                raise paths.DeviceNotFound(why) from None
            log.info("transfer engine: using tcp, %s", why)
            return "tcp", why
        return "rdma", f"RDMA devices {names}"

    # -- identity --------------------------------------------------------------------------------------

    @property
    def rpc_port(self) -> int:
        return self.server.port

    @property
    def session_id(self) -> str:
        """What peers name this engine by: ``host:port``, or with etcd metadata its segment name."""
        return self.segment_name

    def descriptor(self) -> SegmentDescriptor:
        """This engine's segment as peers see it (what it publishes in etcd)."""
        ports = rdma.encode_ports(self._rdma.ports()) if self._rdma is not None else []
        return SegmentDescriptor(self.segment_name, self.protocol, self.server.served(), self.registry.ordered(), ports)

    def _published(self, undo: Callable[[], None] | None = None) -> None:
        """After a registration change: write the descriptor to etcd (no-op with the direct handshake).
        If etcd refuses, ``undo`` takes the change back here, and Unavailable says why."""
        if self._meta is None:
            return
        try:
            self._meta.update(self.descriptor())
        except Unavailable as exc:
            if undo is not None:
                undo()
                raise
            raise Unavailable(
                f"{exc}: the memory is unregistered here (the engine refuses transfers to it), but "
                "peers reading the descriptor still see it"
            ) from None

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
            entry = Registered(
                _engine.address(view) if len(view) else 0,
                len(view),
                not view.readonly if writable is None else writable,
                location,
                owner=view,
            )
        self._add(entry)
        self._published(undo=lambda: self._remove(entry.addr))
        return entry.addr

    def _add(self, entry: Registered) -> None:
        """Into the registry, and with rdma a memory region on every device (or neither)."""
        self.registry.add(entry)
        if self._rdma is not None:
            try:
                self._rdma.register(entry.addr, entry.length, entry.writable)
            except BaseException:
                self.registry.remove(entry.addr)
                raise

    def _remove(self, addr: int) -> Registered:
        entry = self.registry.remove(addr)
        if self._rdma is not None:
            self._rdma.unregister(addr)
        return entry

    def unregister(self, addr: int) -> None:
        self._check_open()
        self._remove(addr)
        self._published()

    def allocate(self, length: int) -> int:
        """A managed buffer (a memfd, so same-host peers copy into it with memcpy), registered."""
        self._check_open()
        buf = ManagedBuffer(length)
        try:
            self._add(Registered(buf.addr, length, True, "*", memfd=buf.fd, owner=buf))
        except BaseException:
            buf.close()
            raise
        self._managed[buf.addr] = buf
        self._published(undo=lambda: self.free(buf.addr, publish=False))
        return buf.addr

    def free(self, addr: int, *, publish: bool = True) -> None:
        buf = self._managed.pop(addr, None)
        if buf is None:
            raise AddressNotRegistered(f"no managed buffer at {addr:#x}")
        self._remove(addr)
        buf.close()
        if publish:
            self._published()

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
        views: list[memoryview | None] = []  # None: a registered pointer, checked
        pointers = True
        start, end = 1, 0  # the registered range the last pointer fell in: a batch's blocks are usually in one
        for buf, addr, n in zip(local, remote, lengths, strict=True):
            if type(n) is not int or n < 0:
                raise InvalidArgument(f"length must be a non-negative int, got {n!r:.30}")
            if type(addr) is not int or addr <= 0:
                raise AddressNotRegistered(f"remote address {addr!r:.30} is not a valid pointer")
            if type(buf) is int:
                if not start <= buf <= buf + n <= end:
                    entry = self.registry.find(buf, n, write=op == READ)
                    start, end = entry.addr, entry.end
                views.append(None)
            else:
                pointers = False
                view = _byte_view(buf, "local buffer")
                if op == READ and view.readonly:
                    raise InvalidArgument("a read needs a writable local buffer")
                if len(view) < n:
                    raise InvalidArgument(f"the local buffer holds {len(view)} bytes, the transfer {n}")
                views.append(view[:n])
        peer = self._peer(session)
        same_host = peer.transports[0]
        if isinstance(same_host, ProcessTransport) and pointers and not peer.router.is_down(0):
            batch = same_host.copy_now(op, local, remote, lengths)  # every block in one call, no routing
            if batch is not None:
                return batch
        transfers = [
            Transfer(op, view if view is not None else _engine.view_at(buf, n, op == READ), Region(addr, n))
            for buf, addr, n, view in zip(local, remote, lengths, views, strict=True)
            if n
        ]
        return peer.router.submit(transfers)

    def transfer(
        self,
        session: str,
        op: str,
        local: Sequence[Any],
        remote: Sequence[int],
        lengths: Sequence[int] | None = None,
        timeout: float | None = None,
        notify: tuple[str, str] | None = None,
    ) -> int:
        """``submit`` and wait (at most ``MC_TRANSFER_TIMEOUT`` plus a second per GiB); returns bytes moved.
        With ``notify`` (name, message), the peer gets that notification once every byte has arrived."""
        if notify is not None:
            _check_notify(*notify)
        try:
            batch = self.submit(session, op, local, remote, lengths)
            moved = batch.wait(timeout if timeout is not None else self.timeout_for(batch))
        except MooncakeError as exc:
            if path_failure(exc):
                self._explain(session, exc)
            raise
        if notify is not None:
            self.notify(session, *notify)
        return moved

    def timeout_for(self, batch: Batch) -> float:
        return transfer_timeout() + getattr(batch, "nbytes", 0) / (1 << 30)

    def write(self, session: str, local: Any, remote: int, length: int | None = None) -> int:
        return self.transfer(session, WRITE, [local], [remote], None if length is None else [length])

    def read(self, session: str, local: Any, remote: int, length: int | None = None) -> int:
        return self.transfer(session, READ, [local], [remote], None if length is None else [length])

    def probe(self, session: str) -> None:
        """Reach the peer (connect, handshake, ping); Unavailable or AuthenticationError if it fails."""
        self._ask(self._peer(session), Op.PING)

    def notify(self, session: str, name: str, message: str) -> None:
        """Leave (name, message) with the peer, for its ``notifies()``; sent after the transfers before it
        completed, so the peer that collects it finds their bytes in place."""
        _check_notify(name, message)
        self._ask(self._peer(session), Op.NOTIFY, [name, message])

    def notifies(self) -> list[tuple[str, str]]:
        """The (name, message) notifications peers left since the last call, oldest first."""
        self._check_open()
        return self.server.take_notifies()

    def paths(self, session: str) -> list[str]:
        """The kind of each path a session's transfers may take, in the list's order (``local``, ``rdma``,
        ``tcp``)."""
        return [t.name for t in self._peer(session).transports]

    def routes(self, session: str) -> list[str]:
        """Each path to a session in words: ``local``, ``tcp 10.0.0.2:7000 via eth1``."""
        return [getattr(t, "label", t.name) for t in self._peer(session).transports]

    def segment(self, session: str) -> SegmentDescriptor:
        """A peer's segment as published now: from etcd, or (direct handshake) asked of the peer."""
        self._check_open()
        if self._meta is not None:
            return self._meta.resolve(session)
        peer = self._peer(session)
        info = self._map(peer)
        buffers = [row[:3] for row in info[5]]
        return SegmentDescriptor(session, "", list(peer.addresses), buffers)

    # -- peers -----------------------------------------------------------------------------------------

    def _connect(self, address: str) -> Channel:
        host, port = split_hostport(address)
        try:
            sock = socket.create_connection((host, port), timeout=self.io_timeout)
        except OSError as exc:
            raise Unavailable(f"cannot reach the transfer engine at {address}: {exc.strerror or exc}") from None
        sock.settimeout(None)
        ch = Channel(sock, address, timeout=self.io_timeout)
        try:
            client_handshake(ch, self._secret, "transfer engine")
        except BaseException:
            ch.close()
            raise
        return ch

    def _connect_any(self, session: str, addresses: Sequence[str]) -> Channel:
        """A control connection to the first of the peer's addresses that answers."""
        failures = []
        for address in addresses:
            try:
                return self._connect(address)
            except Unavailable as exc:
                failures.append(str(exc))
        if len(failures) == 1:
            raise Unavailable(failures[0])
        raise Unavailable(f"cannot reach {session} on any of its addresses: {'; '.join(failures)}")

    def _locate(self, session: str) -> list[str]:
        """The addresses a session is served on: itself (``host:port``), or its descriptor's in etcd."""
        if self._meta is None:
            split_hostport(session)
            return [session]
        return self._meta.resolve(session).addresses

    def _peer(self, session: str) -> _Peer:
        peer = self._peers.get(session)
        if peer is not None:
            return peer
        with self._lock:
            self._check_open()
            peer = self._peers.get(session)
            if peer is not None:
                return peer
            addresses = self._locate(session)
            control = self._connect_any(session, addresses)
            try:
                control.send(Op.MAP)
                info, _n = control.read_reply()
                pid, boot, pidns, version_fd, _version, _table = info[:6]
                if self._meta is None and len(info) > 7:  # the peer's other addresses: more paths to it
                    addresses += [a for a in info[7][1:] if isinstance(a, str) and a not in addresses]
                ports = self._rdma_ports(session, info[8] if len(info) > 8 else None)
            except BaseException:
                control.close()
                raise
            transports, order, tcp = self._network_paths(session, addresses, ports)
            if self.same_host and [boot, pidns] == list(self._identity) and boot:
                peer_box: list[_Peer] = []
                try:
                    local = ProcessTransport(pid, lambda: self._fetch_table(peer_box[0]), version_fd, tcp, session)
                except OSError as exc:
                    log.warning("same-host path to %s unusable (%s): using tcp", session, exc.strerror or exc)
                else:
                    transports.insert(0, local)
                    order = _after_local(order)
            peer = _Peer(session, Router(transports, order, session), transports, control, addresses)
            if transports[0].name == "local":
                peer_box.append(peer)
            self._peers[session] = peer
            return peer

    def _rdma_ports(self, session: str, advertised: Any) -> list[rdma.PortInfo]:
        """The peer's rdma ports this engine can reach (none without rdma on either side); BadEndpoint if
        the peer's description of them is malformed."""
        if self._rdma is None:
            return []
        ports = rdma.decode_ports(advertised, f"the rdma devices {session} advertises") if advertised else []
        if not ports:
            log.info("transfer engine: %s has no rdma device, its transfers go by tcp", session)
        return ports

    def _rdma_paths(self, session: str, addresses: list[str], ports: list[rdma.PortInfo]) -> list[rdma.RdmaTransport]:
        """One rdma path per local device that has a peer device of its link layer (the peer's devices
        dealt out in turn), connected on first use through an authenticated control connection."""
        if self._rdma is None:
            return []
        out = []
        for i, (device, verbs) in enumerate(self._rdma.devices):
            same = [p for p in ports if p.link_layer == verbs.info.link_layer]
            if not same:
                continue
            remote = same[i % len(same)]
            out.append(
                rdma.RdmaTransport(
                    verbs,
                    self.registry,
                    lambda: self._connect_any(session, addresses),
                    remote,
                    peer=session,
                    numa=device.numa,
                    deadline_for=lambda nbytes: transfer_timeout() + nbytes / (1 << 30),
                    label=f"rdma {verbs.name} to {session} {remote.device}",
                )
            )
        return out

    def _network_paths(
        self, session: str, addresses: list[str], ports: list[rdma.PortInfo]
    ) -> tuple[list[Transport], Callable[[Transfer, int], list[int]], Transport]:
        """The rdma paths (one per local device) and one tcp path per address, each behind the NIC that
        reaches it; the order a transfer tries them: rdma first, then tcp, in each the devices on its
        buffer's NUMA node first, the transfers of a batch spread over them; and the first tcp path (the
        same-host path's fallback)."""
        rdma_paths = self._rdma_paths(session, addresses, ports)
        rdma_nodes = [t.numa for t in rdma_paths]
        transports: list[Transport] = []
        nodes = []
        for address in addresses:
            device = paths.route_device(split_hostport(address)[0])
            nodes.append(device.numa)
            transports.append(
                TcpTransport(
                    lambda address=address: self._connect(address),
                    connections=self.connections,
                    stripe=self.stripe,
                    vectored=True,
                    assist=True,
                    label=f"tcp {address} via {device.name or 'an unknown interface'}",
                )
            )
        tcp, k = transports[0], len(rdma_paths)
        if not rdma_paths and len(nodes) == 1:
            return transports, lambda t, i: [0], tcp
        numa_matters = paths.numa_matters(nodes) or paths.numa_matters(rdma_nodes)

        def order(t: Transfer, position: int) -> list[int]:
            numa = paths.buffer_node(_engine.address(t.buffer)) if numa_matters else -1
            return [
                *paths.rank_nodes(rdma_nodes, numa, position),
                *(k + j for j in paths.rank_nodes(nodes, numa, position)),
            ]

        return [*rdma_paths, *transports], order, tcp

    def _ask(self, peer: _Peer, op: int, meta: Sequence[Any] = ()) -> Any:
        """One request on the peer's control connection (connected again if it broke); its reply's meta."""
        with peer.lock:
            if peer.control.closed:
                peer.control = self._connect_any(peer.session, peer.addresses)
            try:
                peer.control.send(op, list(meta))
                reply, _n = peer.control.read_reply()
            except Unavailable:
                peer.control.close()
                raise
        return reply

    def _map(self, peer: _Peer) -> list[Any]:
        """The peer's MAP reply, asked now: its identity, table version, table and first buffer."""
        return self._ask(peer, Op.MAP)

    def _fetch_table(self, peer: _Peer) -> tuple[int, list[list[int]]]:
        info = self._map(peer)
        return info[4], info[5]

    def _explain(self, session: str, failure: BaseException) -> None:
        """After a path failure with etcd metadata: drop the peer, and if its segment is gone from etcd,
        say so (SegmentNotFound) rather than what broke on the way."""
        if self._meta is None:
            return
        self.forget(session)
        try:
            self._meta.resolve(session)
        except SegmentNotFound as gone:
            raise gone from failure
        except Unavailable:
            return

    def first_buffer(self, session: str) -> int:
        """The first memory ``session`` registered that is still registered (this engine's own when
        ``session`` is its session id), 0 when it has none: asked afresh, since peers register at any
        time.  Unavailable if the peer cannot be reached."""
        self._check_open()
        if session == self.session_id:
            return self.registry.first()
        if self._meta is not None:
            return self._meta.resolve(session).first_buffer()
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
        if self._meta is not None:
            self._meta.close()  # peers stop finding this engine before it stops answering
        for peer in peers:
            _close_peer(peer)
        self.server.close()
        for buf in self._managed.values():
            with contextlib.suppress(BufferError):
                buf.close()
        self._managed.clear()
        self.registry.close()
        if self._rdma is not None:
            self._rdma.close()  # memory regions, protection domains, contexts: after every queue pair

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_peer(peer: _Peer) -> None:
    for t in peer.transports:
        with contextlib.suppress(Exception):
            t.close()
    peer.control.close()


def _after_local(network: Callable[[Transfer, int], list[int]]) -> Callable[[Transfer, int], list[int]]:
    """The order of a peer's paths when the same-host path (index 0) comes before the network ones."""
    return lambda t, i: [0, *(k + 1 for k in network(t, i))]


def _listen_address(text: str, what: str) -> tuple[str, int]:
    """(host, port) to listen on from ``host`` or ``host:port`` (port 0: any free one)."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{what} must be a non-empty str, got {text!r:.60}")
    if text.count(":") == 1 or text.startswith("["):
        return split_hostport(text, what)
    return text, 0


def _check_notify(name: Any, message: Any) -> None:
    if not isinstance(name, str) or not isinstance(message, str):
        raise InvalidArgument(
            f"a notification is a name and a message, both str, not {type(name).__name__} and {type(message).__name__}"
        )


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
