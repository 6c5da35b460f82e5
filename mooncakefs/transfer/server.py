"""The engine's RPC server: lets peers read and write this process's registered memory over TCP.

It speaks the node's framed protocol (``wire.py``) and its handshake: ``HELLO`` (with a nonce when a
secret is set), ``AUTH`` (HMAC of the nonce), then requests, each answered in order.  ``MAP`` returns
what a peer needs to choose a path (this process's pid, boot id and pid namespace for the same-host
path, the registered table and the memfd of its version, the first registered buffer, every address
it serves on); ``READ`` / ``WRITE`` move one range and ``READV`` / ``WRITEV`` many at once; ``NOTIFY``
leaves a (name, message) for the owner's ``get_notifies``.  Every range is checked against the registry
before a byte moves: memory nobody registered, or past a registration's end, is an ``ERROR`` reply,
never a touch.

With rdma devices (``rdma.RdmaService``), ``MAP`` also lists their ports, ``RDMA_CONNECT`` makes queue
pairs for the peer on the device it names and answers with their numbers and every registered region's
rkey on that device, and ``RDMA_REGIONS`` answers the regions again.  A connection holds at most one such
set of queue pairs, destroyed when it closes: the peer's rdma path lives as long as its connection.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mooncakefs.errors import InvalidArgument, OutOfSpace
from mooncakefs.serving import Connection, FramedServer, Timeouts
from mooncakefs.transfer.memory import Registry
from mooncakefs.wire import Op

if TYPE_CHECKING:
    from mooncakefs.transfer.rdma import Link, RdmaService, VerbsDevice

log = logging.getLogger("mooncakefs.transfer")

MAX_VECTOR = 4096  # ranges in one READV / WRITEV
MAX_NOTIFIES = 65536  # notifications waiting for get_notifies; past this, senders are refused
MAX_NOTIFY_BYTES = 1 << 20  # a notification's name and message together


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


class SegmentServer(FramedServer):
    """Serves one engine's registered memory on a TCP port; a thread per connection, with the node's
    defences against hostile peers (``mooncakefs.serving``)."""

    log = log
    refusal = "this transfer engine requires the cluster secret (secret=... or MOONCAKEFS_SECRET)"

    def __init__(
        self,
        registry: Registry,
        host: str,
        port: int = 0,
        *,
        secret: bytes | None = None,
        io_timeout: float = 30.0,
        more: Sequence[tuple[str, int]] = (),
        rdma: RdmaService | None = None,
    ) -> None:
        """Serve on ``host:port`` (its main address) and on each of ``more`` (one per NIC to offer peers);
        with ``rdma``, answer peers' rdma set-up on its devices."""
        super().__init__(secret=secret, timeouts=Timeouts(handshake=min(10.0, io_timeout), io=io_timeout))
        self.registry = registry
        self.rdma = rdma
        self._links: dict[Connection, tuple[VerbsDevice, Link]] = {}
        try:
            self.address: tuple[str, int] = self.listen_tcp((host, port))
            self.addresses = [self.address, *(self.listen_tcp(a) for a in more)]
        except BaseException:
            self.close_listeners()
            raise
        self._notifies: collections.deque[tuple[str, str]] = collections.deque()
        self._notify_lock = threading.Lock()
        boot, pidns = host_identity()
        self._identity = [os.getpid(), boot, pidns]
        self.bytes_in = self.bytes_out = 0
        self.handlers = {
            Op.MAP: self._map,
            Op.READ: self._read,
            Op.WRITE: self._write,
            Op.READV: self._readv,
            Op.WRITEV: self._writev,
            Op.PING: self._ping,
            Op.NOTIFY: self._notify,
            Op.RDMA_CONNECT: self._rdma_connect,
            Op.RDMA_REGIONS: self._rdma_regions,
        }
        self.accept(name="mooncakefs-te-accept")

    @property
    def port(self) -> int:
        return self.address[1]

    def close(self) -> None:
        self.stop_serving(join=5)

    def _ping(self, conn: Connection, meta: list[Any], _n: int) -> None:
        conn.channel.send(Op.OK, [])

    def served(self) -> list[str]:
        """Every address this server listens on, as ``host:port``, the main one first."""
        return [_hostport(h, p) for h, p in self.addresses]

    def take_notifies(self) -> list[tuple[str, str]]:
        """The notifications received since the last call, oldest first."""
        with self._notify_lock:
            out = list(self._notifies)
            self._notifies.clear()
        return out

    def _map(self, conn: Connection, meta: list[Any], _n: int) -> None:
        registry = self.registry
        # the 7th field, the first registered address, answers a peer's get_first_buffer_address; the 8th
        # lists the addresses served, each a path the peer may use; the 9th, this engine's rdma ports
        # (None without rdma)
        conn.channel.send(
            Op.OK,
            [
                *self._identity,
                registry.version_fd,
                registry.version,
                registry.table(),
                registry.first(),
                self.served(),
                self._rdma_ports(),
            ],
        )

    def _rdma_ports(self) -> list[dict[str, Any]] | None:
        if self.rdma is None:
            return None
        from mooncakefs.transfer.rdma import encode_ports

        return encode_ports(self.rdma.ports())

    def _rdma_connect(self, conn: Connection, meta: list[Any], _n: int) -> None:
        if self.rdma is None:
            raise InvalidArgument("this transfer engine has no rdma device: use tcp")
        if conn in self._links:
            raise InvalidArgument("this connection has its rdma queue pairs already: open another for more")
        device_name, endpoint = meta
        reply, link = self.rdma.accept(device_name, endpoint, self.registry, conn.channel.peer)
        self._links[conn] = (self.rdma.device(device_name), link)
        conn.channel.send(Op.OK, [reply])

    def _rdma_regions(self, conn: Connection, meta: list[Any], _n: int) -> None:
        held = self._links.get(conn)
        if held is None or self.rdma is None:
            raise InvalidArgument("RDMA_REGIONS before RDMA_CONNECT on this connection")
        from mooncakefs.transfer.rdma import encode_regions

        conn.channel.send(Op.OK, [encode_regions(self.rdma.regions(held[0], self.registry))])

    def end(self, conn: Connection) -> None:
        """A connection that set up rdma queue pairs takes them with it."""
        held = self._links.pop(conn, None)
        if held is not None:
            held[1].close()

    def _notify(self, conn: Connection, meta: list[Any], _n: int) -> None:
        name, message = meta
        if type(name) is not str or type(message) is not str:
            raise TypeError("a notification is a name and a message, both str")
        if len(name) + len(message) > MAX_NOTIFY_BYTES:
            raise ValueError(f"a notification holds at most {MAX_NOTIFY_BYTES} bytes of name and message")
        with self._notify_lock:
            if len(self._notifies) >= MAX_NOTIFIES:
                raise OutOfSpace(f"the peer holds {MAX_NOTIFIES} notifications nobody collected (get_notifies)")
            self._notifies.append((name, message))
        conn.channel.send(Op.OK, [])

    def _read(self, conn: Connection, meta: list[Any], n: int) -> None:
        addr, offset, length = meta
        view = self.registry.view(_int(addr) + _int(offset), _int(length))
        self.bytes_out += length
        conn.channel.send(Op.OK, (), view)

    def _write(self, conn: Connection, meta: list[Any], payload_len: int) -> None:
        addr, offset = meta
        view = self.registry.view(_int(addr) + _int(offset), payload_len, write=True)
        conn.channel.read_payload_into(view)
        self.bytes_in += payload_len
        conn.channel.send(Op.OK, [])

    def _ranges(self, meta: list[Any], write: bool) -> list[memoryview]:
        if not 0 < len(meta) <= MAX_VECTOR:
            raise ValueError(f"a vector holds 1 to {MAX_VECTOR} ranges, not {len(meta)}")
        return [self.registry.view(_int(r[0]), _int(r[1]), write) for r in meta]

    def _readv(self, conn: Connection, meta: list[Any], _n: int) -> None:
        views = self._ranges(meta, False)  # every range checked before any is sent
        self.bytes_out += sum(len(v) for v in views)
        conn.channel.send(Op.OK, (), views)

    def _writev(self, conn: Connection, meta: list[Any], payload_len: int) -> None:
        views = self._ranges(meta, True)
        if sum(len(v) for v in views) != payload_len:
            raise ValueError(f"a WRITEV of {payload_len} bytes names ranges of {sum(len(v) for v in views)}")
        conn.channel.read_payload_into_many(views)
        self.bytes_in += payload_len
        conn.channel.send(Op.OK, [])


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"expected an int, got {type(v).__name__}")
    return v
