"""A server of the framed protocol (``wire.py``): listeners, a thread per connection, the handshake and
the request loop, with the limits that keep a hostile or careless client from hurting the process.

The node (``node/server.py``) and the transfer engine's segment server (``transfer/server.py``) are
both one of these, so both get the same defences (docs/security.md): every wait on a client is bounded
(the handshake, the gap between requests, each frame's bytes), frames before authentication are tiny,
connections still in their handshake are capped and shed first when file descriptors run out, and no
error ends the accept loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from mooncakefs.api import check_seconds
from mooncakefs.errors import AuthenticationError, MooncakeError, NotServing, ProtocolError, Unavailable
from mooncakefs.wire import PREAUTH_MAX_META, VERSION, Channel, Op, auth_proof, error_meta

ACCEPT_BACKLOG = 128
MAX_UNAUTHENTICATED = 64  # connections still in their handshake; past this the oldest is dropped
MIN_PAYLOAD_RATE = 1 << 20  # bytes/s: a frame's payload arriving slower than this is a stalled client
ACCEPT_BACKOFF_MAX = 1.0  # seconds between accept() attempts while file descriptors run out


class Timeouts:
    """How long a server waits on a client, in seconds.

    ``handshake``: from connecting to being authenticated.  ``idle``: between requests (clients pool
    connections and reconnect transparently).  ``io``: for a frame's bytes to arrive (plus a second per
    MiB of payload), for a reply to be taken, and (on a node) for an unfinished put to see progress
    before its room is reclaimed."""

    __slots__ = ("handshake", "idle", "io")

    def __init__(self, handshake: float = 10.0, idle: float = 600.0, io: float = 30.0) -> None:
        self.handshake = check_seconds(handshake, "the handshake timeout")
        self.idle = check_seconds(idle, "the idle timeout")
        self.io = check_seconds(io, "the io timeout")


class Connection:
    """One client connection; servers that keep more per connection subclass it."""

    def __init__(self, channel: Channel, local: bool) -> None:
        self.channel = channel
        self.local = local  # on a Unix socket: no secret asked, peer credentials known
        self.opened = time.monotonic()
        self.authenticated = False  # past the handshake

    def shed(self) -> None:
        """Cut the connection from another thread: its own thread sees it closed and cleans up."""
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)


Handler = Callable[[Any, list[Any], int], None]


class FramedServer:
    """Listeners and connections of one server.  A subclass fills ``handlers`` (opcode -> handler of
    (connection, meta, payload length) that sends exactly one reply) and may override the hooks
    ``connection``, ``check``, ``end`` and ``log``."""

    log = logging.getLogger("mooncakefs.serving")
    refusal = "this server requires the cluster secret: connect with secret=... (or MOONCAKEFS_SECRET)"
    no_reply: frozenset[int] = frozenset()  # requests answered by nothing, not even an error

    def __init__(self, *, secret: bytes | None = None, timeouts: Timeouts | None = None) -> None:
        self.secret = secret
        self.timeouts = timeouts or Timeouts()
        self.instance = uuid.uuid4().hex  # changes on every start
        self.handlers: dict[int, Handler] = {}
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._names = {v: k.lower() for k, v in vars(Op).items() if isinstance(v, int)}
        self._listeners: list[socket.socket] = []
        self._connections: set[Connection] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _connections and _threads
        self._stopping = threading.Event()

    @property
    def clients(self) -> int:
        """Connections open now."""
        return len(self._connections)

    # -- listeners and threads -------------------------------------------------------------------------

    def listen_tcp(self, address: tuple[str, int]) -> tuple[str, int]:
        """Bind and listen on a TCP address (port 0: any free one); the address bound."""
        try:
            family, _type, _proto, _name, where = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
            sock = socket.create_server(where, family=family, backlog=ACCEPT_BACKLOG, reuse_port=False)
        except OSError as exc:
            raise MooncakeError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        self._listeners.append(sock)
        return sock.getsockname()[:2]

    def accept(self, name: str = "mooncakefs-accept") -> None:
        """Start serving every listener (once all are bound, so 'listening' is never said too early)."""
        _raise_fd_limit()
        for sock in self._listeners:
            if sock.family == socket.AF_UNIX:
                where: dict[str, Any] = {"unix": str(sock.getsockname())}
            else:
                where = {"tcp": "{}:{}".format(*sock.getsockname()[:2]), "auth": bool(self.secret)}
            self.log.info("listening", extra=where)
            self.spawn(self._accept_loop, sock, name=name)

    def close_listeners(self) -> None:
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._listeners.clear()

    def stop_serving(self, join: float = 10.0) -> None:
        """Refuse new clients, cut every connection and wait for the server's threads to end."""
        self._stopping.set()
        self.close_listeners()
        with self._lock:
            for conn in list(self._connections):
                conn.shed()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=join)

    def spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept until the server stops.  No failure ends the loop: out of file descriptors (or
        threads), it sheds the oldest connections still in their handshake, backs off, and tries again."""
        local = listener.family == socket.AF_UNIX
        backoff = 0.0
        failures = 0
        while not self._stopping.is_set():
            try:
                sock, addr = listener.accept()
                peer = "unix" if local else f"{addr[0]}:{addr[1]}"
                self._shed_unauthenticated(MAX_UNAUTHENTICATED - 1)
                try:
                    self.spawn(self._serve, sock, peer, local, name=f"mooncakefs-conn-{peer}")
                except RuntimeError as exc:  # no more threads
                    sock.close()
                    raise OSError(errno.EAGAIN, str(exc)) from None
            except OSError as exc:
                if self._stopping.is_set():
                    return
                failures += 1
                if failures == 1 or failures % 1000 == 0:
                    self.log.warning(
                        "accept failed: shedding connections still in their handshake and retrying",
                        extra={
                            "why": exc.strerror or str(exc),
                            "failures": failures,
                            "listener": "unix" if local else "tcp",
                        },
                    )
                self._shed_unauthenticated(MAX_UNAUTHENTICATED // 2)
                backoff = min(ACCEPT_BACKOFF_MAX, backoff * 2 or 0.01)
                self._stopping.wait(backoff)
                continue
            if failures:
                self.log.info("accepting again", extra={"failures": failures})
            backoff, failures = 0.0, 0

    def _shed_unauthenticated(self, keep: int) -> None:
        """Drop the oldest connections still in their handshake until at most ``keep`` remain."""
        with self._lock:
            waiting = sorted((c for c in self._connections if not c.authenticated), key=lambda c: c.opened)
        for conn in waiting[: max(0, len(waiting) - keep)]:
            conn.shed()

    # -- one connection ---------------------------------------------------------------------------------

    def connection(self, channel: Channel, local: bool) -> Connection:
        """A new connection's record (a subclass keeps more per connection)."""
        return Connection(channel, local)

    def check(self, conn: Any, op: int) -> None:
        """Refuse a request before its handler runs (a node checks the placement epoch here)."""

    def end(self, conn: Any) -> None:
        """Give back what a connection held, however it ended."""

    def _serve(self, sock: socket.socket, peer: str, local: bool) -> None:
        conn = self.connection(Channel(sock, peer, timeout=self.timeouts.handshake), local)
        with self._lock:
            self._connections.add(conn)
        try:
            self._handshake(conn)
            self._loop(conn)
        except (Unavailable, ProtocolError, AuthenticationError) as exc:
            if not self._stopping.is_set():
                level = logging.DEBUG if isinstance(exc, Unavailable) else logging.WARNING
                self.log.log(level, "client dropped", extra={"peer": peer, "why": str(exc)})
        except Exception:
            self.log.exception("connection failed", extra={"peer": peer})
        finally:
            conn.channel.close()
            with self._lock:
                self._connections.discard(conn)
            self.end(conn)

    def _handshake(self, conn: Connection) -> None:
        """HELLO (version, instance, and a nonce when a secret guards TCP), then the client's AUTH: at
        most 1 KiB of meta, no payload, begun within the handshake timeout and whole within as much again."""
        ch = conn.channel
        nonce = secrets.token_bytes(16) if self.secret and not conn.local else None
        ch.send(Op.HELLO, [VERSION, self.instance, nonce])
        wait = self.timeouts.handshake
        op, _flags, meta, _n = ch.read_frame(max_meta=PREAUTH_MAX_META, max_payload=0, idle=wait, within=wait)
        if op != Op.AUTH or not isinstance(meta, list) or len(meta) != 2 or meta[0] != VERSION:
            raise ProtocolError(f"{ch.peer}: bad handshake (opcode {op}, {meta!r:.100})")
        if nonce is not None:
            assert self.secret is not None
            proof = meta[1]
            if not isinstance(proof, bytes) or not secrets.compare_digest(proof, auth_proof(self.secret, nonce)):
                ch.send(Op.ERROR, error_meta(AuthenticationError(self.refusal)))
                raise AuthenticationError(f"{ch.peer}: wrong or missing cluster secret")
        ch.send(Op.OK, [])
        ch.set_timeout(self.timeouts.io)
        conn.authenticated = True

    def _loop(self, conn: Connection) -> None:
        """Requests until the connection ends: each waited for at most the idle timeout, its bytes
        received within the io timeout (plus a second per MiB), answered by its handler.  A bad request
        gets an ERROR reply and the connection goes on; a broken frame ends the connection."""
        ch, handlers, names = conn.channel, self.handlers, self._names
        idle, io = self.timeouts.idle, self.timeouts.io
        while True:
            op, _flags, meta, payload_len = ch.read_frame(idle=idle, within=io)
            if payload_len:
                ch.deadline += payload_len / MIN_PAYLOAD_RATE
            handler = handlers.get(op)
            self.requests[names.get(op, "unknown")] += 1
            if handler is None:
                raise ProtocolError(f"{ch.peer}: unknown opcode {op}")
            try:
                if not isinstance(meta, list):
                    raise TypeError(f"request meta must be an array, got {type(meta).__name__}")
                self.check(conn, op)
                handler(conn, meta, payload_len)
            except (MooncakeError, ValueError, TypeError, KeyError, IndexError) as exc:
                if isinstance(exc, ProtocolError) or (isinstance(exc, Unavailable) and not isinstance(exc, NotServing)):
                    raise  # the connection itself failed; a server refusing to serve answers, and stays connected
                self.errors[type(exc).__name__] += 1
                ch.skip_payload()
                if op not in self.no_reply:
                    ch.send(
                        Op.ERROR,
                        error_meta(
                            exc
                            if isinstance(exc, MooncakeError | ValueError | TypeError)
                            else ValueError(f"malformed request: {exc!r:.100}")
                        ),
                    )


def _raise_fd_limit() -> None:
    """Take the whole hard limit of open files: every client connection costs a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
