"""A small client of etcd's v3 gRPC API: the calls mooncakefs makes, and nothing else.

Why not a package: ``etcd3`` (0.12, 2020) is unmaintained and pins ``protobuf<4``, which vLLM, SGLang and
LMCache cannot live with; its maintained forks need a particular protobuf major (``etcd-sdk-python``'s
generated code refuses protobuf < 5.27), and ``etcd3gw`` (maintained, HTTP JSON gateway, no protobuf) costs
~1.0 ms a request against ~0.3 ms over gRPC on etcd 3.4 here (the gateway re-encodes every call), which the
cluster filesystem pays on every metadata operation.  So this talks gRPC through ``grpcio`` and encodes the
~30 protobuf fields it uses itself (numbers from etcd's ``rpc.proto`` / ``kv.proto``, frozen since v3.0):
no protobuf dependency at all, so it never conflicts with the serving stack's.

Used: ranges (one key, a prefix; limit, keys/count only, sorted by creation, min create revision), puts
under a lease, deletes, transactions that compare version/mod/create revision or value, leases with
keep-alive and revoke, compaction, the maintenance status, and watches (``Watch``: the changes of a key or
prefix pushed as they happen, resumed after a broken stream; ``Mirror``: a prefix's keys kept current by
one), which replace re-reading etcd on a timer.  Errors are ``EtcdError``; etcd out of reach or too slow is
``EtcdUnavailable`` (also an ``Unavailable``); both live in ``mooncakefs.errors`` with the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

from mooncakefs.errors import EtcdCompacted, EtcdError, EtcdUnavailable, InvalidArgument

__all__ = [
    "DELETE",
    "KV",
    "PUT",
    "Compare",
    "Etcd",
    "EtcdCompacted",
    "EtcdError",
    "EtcdUnavailable",
    "Event",
    "Lease",
    "Mirror",
    "RangeResult",
    "TxnResult",
    "Watch",
    "create",
    "delete_op",
    "get_op",
    "lease_of",
    "mod",
    "parse_etcd_url",
    "prefix_end",
    "put_op",
    "value",
    "version",
]

log = logging.getLogger("mooncakefs.etcd")


_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def parse_etcd_url(url: str) -> list[tuple[str, int]]:
    """[(host, port)] of "http://host:2379", or of each member in "http://a:2379,http://b:2379"."""
    endpoints = []
    for one in url.split(","):
        parts = urlsplit(one if "//" in one else f"http://{one}")
        try:
            port = parts.port  # ValueError for one that is not a number from 0 to 65535
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "etcd") or not parts.hostname or port == -1:
            raise InvalidArgument(
                f"etcd URL must look like http://127.0.0.1:2379 (comma-separate members), got {url!r}"
            )
        endpoints.append((parts.hostname, port or 2379))
    return endpoints


# -- the protobuf wire format, for the fields used -------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(field: int, n: int, *, always: bool = False) -> bytes:
    """A varint field; proto3 leaves out zeros, except in a oneof (``always``)."""
    return _varint(field << 3) + _varint(n) if n or always else b""


def _bytes(field: int, data: bytes, *, always: bool = False) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data if data or always else b""


def _fields(buf: bytes) -> dict[int, list[Any]]:
    """Field number -> its values (ints for varints, bytes for length-delimited), in order."""
    out: dict[int, list[Any]] = {}
    view, pos, end = memoryview(buf), 0, len(buf)
    while pos < end:
        key = shift = 0
        while True:
            b = view[pos]
            pos += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        field, wire = key >> 3, key & 7
        if wire == 0 or wire == 2:
            n = shift = 0
            while True:
                b = view[pos]
                pos += 1
                n |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            if wire == 0:
                out.setdefault(field, []).append(n - (1 << 64) if n >= 1 << 63 else n)
            else:
                out.setdefault(field, []).append(bytes(view[pos : pos + n]))
                pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise EtcdError(f"etcd answered with a protobuf wire type {wire} this client does not read")
    return out


def _one(fields: dict[int, list[Any]], field: int, default: Any = 0) -> Any:
    values = fields.get(field)
    return values[-1] if values else default


def _revision(header: bytes | None) -> int:
    return _one(_fields(header), 3) if header else 0


def _key(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def prefix_end(prefix: str | bytes) -> bytes:
    """The range end that makes ``prefix`` a prefix: its last byte below 0xff plus one."""
    raw = bytearray(_key(prefix))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key from the start
    raw[-1] += 1
    return bytes(raw)


# -- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KV:
    """A key as etcd holds it (``mvccpb.KeyValue``)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def decode(cls, buf: bytes) -> KV:
        f = _fields(buf)
        return cls(_one(f, 1, b""), _one(f, 5, b""), _one(f, 2), _one(f, 3), _one(f, 4), _one(f, 6))


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KV]
    count: int
    revision: int

    @classmethod
    def decode(cls, buf: bytes) -> RangeResult:
        f = _fields(buf)
        return cls([KV.decode(kv) for kv in f.get(2, [])], _one(f, 4), _revision(_one(f, 1, None)))


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether the comparisons held; the revision after it; per operation run, the keys of a get, the
    number deleted by a delete, None for a put."""

    succeeded: bool
    revision: int
    responses: list[Any]

    @classmethod
    def decode(cls, buf: bytes) -> TxnResult:
        f = _fields(buf)
        responses: list[Any] = []
        for op in f.get(3, []):
            kind = _fields(op)
            if 1 in kind:
                responses.append(RangeResult.decode(kind[1][0]).kvs)
            elif 3 in kind:
                responses.append(_one(_fields(kind[3][0]), 2))
            else:
                responses.append(None)
        return cls(bool(_one(f, 2)), _revision(_one(f, 1, None)), responses)


# -- comparisons and operations of a transaction ---------------------------------------------------------

_EQUAL, _GREATER, _LESS, _NOT_EQUAL = 0, 1, 2, 3
_VERSION, _CREATE, _MOD, _VALUE = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Compare:
    """One comparison of a transaction (``etcdserverpb.Compare``), made by ``version(key) == 0`` and the like."""

    target: int
    result: int
    key: bytes
    operand: int | bytes
    range_end: bytes = b""

    def encode(self) -> bytes:
        field = {_VERSION: 4, _CREATE: 5, _MOD: 6, _VALUE: 7}[self.target]
        union = (
            _bytes(field, self.operand, always=True)
            if isinstance(self.operand, bytes)
            else _int(field, self.operand, always=True)
        )
        return _int(1, self.result) + _int(2, self.target) + _bytes(3, self.key) + union + _bytes(64, self.range_end)


class _Target:
    """What a comparison looks at; ``==``, ``!=``, ``<``, ``>`` make the ``Compare``."""

    __slots__ = ("key", "range_end", "target")
    __hash__ = None  # type: ignore[assignment]  # == builds a comparison: not a hashable value

    def __init__(self, target: int, key: str | bytes, range_end: bytes = b"") -> None:
        self.target, self.key, self.range_end = target, _key(key), range_end

    def _make(self, result: int, other: int | str | bytes) -> Compare:
        operand = _key(other) if self.target == _VALUE else int(other)  # type: ignore[arg-type]
        return Compare(self.target, result, self.key, operand, self.range_end)

    def __eq__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(_EQUAL, other)  # type: ignore[arg-type]

    def __ne__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(_NOT_EQUAL, other)  # type: ignore[arg-type]

    def __lt__(self, other: int) -> Compare:
        return self._make(_LESS, other)

    def __gt__(self, other: int) -> Compare:
        return self._make(_GREATER, other)


def version(key: str | bytes, *, prefix: bool = False) -> _Target:
    """The key's version (0: absent); with ``prefix``, of every key under it (== 0: none there)."""
    return _Target(_VERSION, key, prefix_end(key) if prefix else b"")


def mod(key: str | bytes) -> _Target:
    """The revision that last changed the key (0: absent)."""
    return _Target(_MOD, key)


def create(key: str | bytes) -> _Target:
    return _Target(_CREATE, key)


def value(key: str | bytes) -> _Target:
    return _Target(_VALUE, key)


def lease_of(lease: Lease | int | None) -> int:
    return 0 if lease is None else lease if isinstance(lease, int) else lease.id


def _range_request(
    key: str | bytes,
    *,
    prefix: bool = False,
    limit: int = 0,
    keys_only: bool = False,
    count_only: bool = False,
    by_creation: bool = False,
    min_create_revision: int = 0,
) -> bytes:
    raw = _key(key)
    return (
        _bytes(1, raw)
        + _bytes(2, prefix_end(raw) if prefix else b"")
        + _int(3, limit)
        + (_int(5, 1) + _int(6, 2) if by_creation else b"")  # ASCEND, by CREATE revision
        + _int(8, keys_only)
        + _int(9, count_only)
        + _int(12, min_create_revision)
    )


def _put_request(key: str | bytes, data: str | bytes, lease: Lease | int | None) -> bytes:
    return _bytes(1, _key(key)) + _bytes(2, _key(data)) + _int(3, lease_of(lease))


def _delete_request(key: str | bytes, prefix: bool) -> bytes:
    raw = _key(key)
    return _bytes(1, raw) + _bytes(2, prefix_end(raw) if prefix else b"")


def get_op(key: str | bytes, *, prefix: bool = False) -> bytes:
    """A transaction's read (its answer: a list of ``KV``)."""
    return _bytes(1, _range_request(key, prefix=prefix), always=True)


def put_op(key: str | bytes, data: str | bytes, *, lease: Lease | int | None = None) -> bytes:
    return _bytes(2, _put_request(key, data, lease), always=True)


def delete_op(key: str | bytes, *, prefix: bool = False) -> bytes:
    """A transaction's delete (its answer: how many keys went)."""
    return _bytes(3, _delete_request(key, prefix), always=True)


# -- the client ----------------------------------------------------------------------------------------


class Lease:
    """A lease: the keys put under it go when it is revoked or not refreshed within its ttl."""

    def __init__(self, client: Etcd, ident: int, ttl: int) -> None:
        self.client, self.id, self.ttl = client, ident, ttl

    def refresh(self) -> int:
        """Keep it alive: the seconds it has left now, <= 0 if it had already expired."""
        return self.client._keep_alive(self.id)

    def revoke(self) -> None:
        self.client._call("/etcdserverpb.Lease/LeaseRevoke", _int(1, self.id))


class Etcd:
    """A client of one etcd cluster (``http://a:2379,http://b:2379``: gRPC balances over the members it can
    reach, so losing one, but not the quorum, goes unnoticed).  Thread-safe."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        endpoints = parse_etcd_url(url)
        self.url, self.timeout = url, timeout
        target = ",".join(f"{h}:{p}" for h, p in endpoints)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 64 << 20),
            # A watch is a stream that may carry nothing for hours: pings find a silently dead link (etcd
            # refuses pings more often than every 5 s, its --grpc-keepalive-min-time).
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC backs off reconnecting up to 120 s by default: a mount or node cut off by a partition
            # would stay blind that long after the link healed.  Etcd is worth a try every second.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]
        if len(endpoints) > 1:
            target = "ipv4:" + target
            options.append(("grpc.lb_policy_name", "round_robin"))
        self._channel = grpc.insecure_channel(target, options=options)
        self._methods: dict[str, Any] = {}

    def _call(self, method: str, request: bytes) -> bytes:
        call = self._methods.get(method)
        if call is None:
            call = self._methods[method] = self._channel.unary_unary(method)  # bytes in, bytes out
        try:
            return call(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(method, exc) from None

    def _error(self, method: str, exc: grpc.RpcError) -> EtcdError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        kind = EtcdUnavailable if code in _UNREACHABLE else EtcdError
        name = code.name if code is not None else "error"
        return kind(f"etcd at {self.url}: {method.rsplit('/', 1)[-1]}: {name}: {details}")

    def get(self, key: str | bytes) -> KV | None:
        kvs = self.range(key).kvs
        return kvs[0] if kvs else None

    def range(
        self,
        key: str | bytes,
        *,
        prefix: bool = False,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        by_creation: bool = False,
        min_create_revision: int = 0,
    ) -> RangeResult:
        """The keys from ``key`` (just it, or every key it prefixes), sorted by key unless ``by_creation``."""
        request = _range_request(
            key,
            prefix=prefix,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            by_creation=by_creation,
            min_create_revision=min_create_revision,
        )
        return RangeResult.decode(self._call("/etcdserverpb.KV/Range", request))

    def get_prefix(self, prefix: str | bytes) -> list[KV]:
        return self.range(prefix, prefix=True).kvs

    def put(self, key: str | bytes, data: str | bytes, *, lease: Lease | int | None = None) -> int:
        """Write it; the revision it was written at."""
        return _revision(_one(_fields(self._call("/etcdserverpb.KV/Put", _put_request(key, data, lease))), 1, None))

    def delete(self, key: str | bytes, *, prefix: bool = False) -> int:
        """How many keys were deleted."""
        return _one(_fields(self._call("/etcdserverpb.KV/DeleteRange", _delete_request(key, prefix))), 2)

    def txn(self, compare: Iterable[Compare], success: Sequence[bytes], failure: Sequence[bytes] = ()) -> TxnResult:
        """If every comparison holds, run ``success``, else ``failure``: atomically, at one revision."""
        request = (
            b"".join(_bytes(1, c.encode(), always=True) for c in compare)
            + b"".join(_bytes(2, op, always=True) for op in success)
            + b"".join(_bytes(3, op, always=True) for op in failure)
        )
        return TxnResult.decode(self._call("/etcdserverpb.KV/Txn", request))

    def lease(self, ttl: int) -> Lease:
        f = _fields(self._call("/etcdserverpb.Lease/LeaseGrant", _int(1, ttl)))
        if _one(f, 4, b""):
            raise EtcdError(f"etcd at {self.url} granted no lease: {_one(f, 4).decode(errors='replace')}")
        return Lease(self, _one(f, 2), _one(f, 3))

    def _stream(self, method: str) -> Any:
        """A bidirectional stream method, bytes in and out (made once per method)."""
        call = self._methods.get(method)
        if call is None:
            call = self._methods[method] = self._channel.stream_stream(method)
        return call

    def _keep_alive(self, ident: int) -> int:
        call = self._stream("/etcdserverpb.Lease/LeaseKeepAlive")
        try:
            for answer in call(iter([_int(1, ident)]), timeout=self.timeout):
                return _one(_fields(answer), 3)
        except grpc.RpcError as exc:
            raise self._error("LeaseKeepAlive", exc) from None
        raise EtcdUnavailable(f"etcd at {self.url} closed the keep-alive of lease {ident:x} without an answer")

    def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (a watch from earlier then gets ``EtcdCompacted``)."""
        self._call("/etcdserverpb.KV/Compact", _int(1, revision) + _int(2, 1))  # physical: done when it answers

    def watch(
        self,
        key: str | bytes,
        on_events: Callable[[list[Event]], None],
        *,
        prefix: bool = False,
        start_revision: int = 0,
        on_compacted: Callable[[int], int] | None = None,
    ) -> Watch:
        """Follow the changes of ``key`` (every key under it with ``prefix``): see ``Watch``."""
        return Watch(self, key, on_events, prefix=prefix, start_revision=start_revision, on_compacted=on_compacted)

    def status(self) -> int:
        """The revision etcd is at (a cheap check that it answers)."""
        return _revision(_one(_fields(self._call("/etcdserverpb.Maintenance/Status", b"")), 1, None))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- watching ------------------------------------------------------------------------------------------

PUT, DELETE = "put", "delete"
_RECONNECT_MAX_S = 2.0  # the longest pause between two tries to open a broken watch again


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a watched key (``mvccpb.Event``): ``kind`` is ``PUT`` or ``DELETE``; a delete's ``kv``
    holds the key and, as ``mod_revision``, the revision it went at."""

    kind: str
    kv: KV

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @classmethod
    def decode(cls, buf: bytes) -> Event:
        f = _fields(buf)
        return cls(DELETE if _one(f, 1) == 1 else PUT, KV.decode(_one(f, 2, b"")))


def _watch_create(key: bytes, range_end: bytes, start_revision: int) -> bytes:
    """A ``WatchRequest`` holding a ``WatchCreateRequest`` (with progress notifications: each says every
    event up to its revision was sent, so a resumed watch need not replay them)."""
    create = _bytes(1, key) + _bytes(2, range_end) + _int(3, start_revision) + _int(4, 1)
    return _bytes(1, create, always=True)


def _watch_cancel(watch_id: int) -> bytes:
    return _bytes(2, _int(1, watch_id), always=True)


class Watch:
    """The changes of one key, or of every key under a prefix, from a revision on, handed to
    ``on_events`` (a list of ``Event``, in revision order) on the watch's own thread.

    The stream is etcd's ``Watch/Watch``.  When it breaks (etcd restarted, its member lost, the link
    down: keep-alive pings find a silent one) the watch opens it again from the revision after the last
    one delivered, so no event is lost and none repeated.  History etcd compacted away cannot be resumed:
    ``on_compacted(compact_revision)`` then re-reads whatever the caller keeps and returns the revision it
    read at, and the watch goes on after it; without it the watch ends and ``error`` is an
    ``EtcdCompacted``.  ``start_revision`` 0: from now.  ``close()`` cancels it and ends the thread."""

    def __init__(
        self,
        client: Etcd,
        key: str | bytes,
        on_events: Callable[[list[Event]], None],
        *,
        prefix: bool = False,
        start_revision: int = 0,
        on_compacted: Callable[[int], int] | None = None,
    ) -> None:
        self.client = client
        self.key = _key(key)
        self.range_end = prefix_end(self.key) if prefix else b""
        self.next_revision = start_revision  # where a reopened stream starts (0 until etcd says where now is)
        self.error: EtcdError | None = None  # what ended the watch, if anything but close()
        self.reconnects = 0
        self.created = threading.Event()  # etcd confirmed the watch (again, after a reconnect)
        self._on_events, self._on_compacted = on_events, on_compacted
        self._watch_id = 0
        self._backoff = 0.05
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._requests: queue.SimpleQueue[bytes | None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="mooncakefs-etcd-watch")
        self._thread.start()

    def __repr__(self) -> str:
        return f"Watch({self.key!r}{' prefix' if self.range_end else ''}, next revision {self.next_revision})"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel the watch in etcd, end the stream and its thread."""
        self._stop.set()
        with self._lock:
            call, requests = self._call, self._requests
        if requests is not None:
            requests.put(_watch_cancel(self._watch_id))
        if threading.current_thread() is not self._thread:
            self._thread.join(min(timeout, 1.0))  # etcd answers the cancel: the thread ends the stream itself
        if call is not None and self._thread.is_alive():
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._stream()
                return  # closed
            except EtcdCompacted as exc:
                if self._on_compacted is None:
                    self.error = exc
                    log.warning("%s", exc)
                    return
                try:
                    self.next_revision = self._on_compacted(exc.compact_revision) + 1
                    continue
                except Exception as err:  # the caller could not read the state again (etcd away): retry
                    log.warning("watch of %r: cannot resynchronise after a compaction: %s", self.key, err)
            except EtcdUnavailable as exc:
                if self._stop.is_set():
                    return
                self.reconnects += 1
                log.info("watch of %r broke (%s): resuming from revision %d", self.key, exc, self.next_revision)
            except EtcdError as exc:  # etcd refused the watch itself: retrying cannot help
                self.error = exc
                log.warning("%s", exc)
                return
            self._stop.wait(self._backoff)
            self._backoff = min(self._backoff * 2, _RECONNECT_MAX_S)

    def _stream(self) -> None:
        """One stream: open it, deliver what it brings until it breaks (raises) or ``close()`` (returns)."""
        requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        requests.put(_watch_create(self.key, self.range_end, self.next_revision))

        def sending() -> Iterator[bytes]:
            while (request := requests.get()) is not None:
                yield request

        try:
            call = self.client._stream("/etcdserverpb.Watch/Watch")(sending())  # no deadline: it lasts
        except ValueError:  # grpc: "Cannot invoke RPC on closed channel!"
            raise EtcdError(f"the client of etcd at {self.client.url} was closed under the watch") from None
        with self._lock:
            self._call, self._requests = call, requests
        try:
            if self._stop.is_set():
                return
            for answer in call:
                if self._answer(answer):
                    return
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return
            raise EtcdUnavailable(str(self.client._error("Watch", exc))) from None
        finally:
            with self._lock:
                self._call = self._requests = None
            requests.put(None)  # ends the request iterator: grpc closes our side
            call.cancel()
        if not self._stop.is_set():
            raise EtcdUnavailable(f"etcd at {self.client.url} ended the watch of {self.key!r}")

    def _answer(self, buf: bytes) -> bool:
        """Handle one ``WatchResponse``; True when the watch is over (cancelled at our request)."""
        f = _fields(buf)
        revision = _revision(_one(f, 1, None))
        compacted = _one(f, 5)
        if compacted:
            raise EtcdCompacted(
                f"etcd at {self.client.url}: the watch of {self.key!r} from revision {self.next_revision} asks "
                f"for history compacted away (etcd keeps revision {compacted} on): read the state again",
                compacted,
            )
        if _one(f, 4):  # cancelled
            if self._stop.is_set():
                return True
            reason = _one(f, 6, b"").decode(errors="replace") or "no reason given"
            raise EtcdError(f"etcd at {self.client.url} cancelled the watch of {self.key!r}: {reason}")
        if _one(f, 3):  # created
            self._watch_id = _one(f, 2)
            if self.next_revision == 0:
                self.next_revision = revision + 1
            self._backoff = 0.05
            self.created.set()
        events = [Event.decode(e) for e in f.get(11, [])]
        if events:
            self.next_revision = events[-1].revision + 1
            try:
                self._on_events(events)
            except Exception:
                log.exception("a follower of %r failed on %d events", self.key, len(events))
        elif not _one(f, 3) and revision >= self.next_revision:  # progress: every event up to it was sent
            self.next_revision = revision + 1
        return False


class Mirror:
    """The keys under a prefix as etcd holds them, kept current by a ``Watch`` instead of read again on a
    timer: one range, then only the changes, pushed as they happen.  Read again in full at most every
    ``resync_s`` when asked (a safety net), and whenever the watch lost history (compaction).
    ``on_change()`` runs after each change, on the thread that saw it.  Thread-safe."""

    def __init__(
        self,
        client: Etcd,
        prefix: str | bytes,
        *,
        on_change: Callable[[], None] | None = None,
        resync_s: float = 30.0,
    ) -> None:
        self.client, self.prefix = client, _key(prefix)
        self.resync_s = resync_s
        self.revision = 0  # the revision the keys are as of
        self.loads = 0  # full reads (the first, the resyncs)
        self._on_change = on_change
        self._kvs: dict[bytes, KV] = {}
        self._loaded_at = -1e9
        self._tried_at = -1e9
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        loaded = self._load()
        start = self.revision + 1 if loaded else 0  # etcd out of reach: changes from now, the rest when it is back
        self._watch = client.watch(
            self.prefix, self._apply, prefix=True, start_revision=start, on_compacted=self._recover
        )

    @property
    def watch(self) -> Watch:
        return self._watch

    def refresh(self) -> None:
        """Read every key again if the last full read is ``resync_s`` old (retried at most once a second
        while etcd does not answer)."""
        now = time.monotonic()
        if now - self._loaded_at >= self.resync_s and now - self._tried_at >= min(1.0, self.resync_s):
            self._load()

    def snapshot(self) -> dict[bytes, KV]:
        """The keys now (after a full read, if one is due)."""
        self.refresh()
        with self._lock:
            return dict(self._kvs)

    def wait(self, predicate: Callable[[dict[bytes, KV]], bool], timeout: float) -> bool:
        """Block until ``predicate(keys)`` holds (checked at each change) or ``timeout`` passes."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._kvs), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop following (``timeout`` 0: cancel the stream without waiting for the thread to end)."""
        self._watch.close(timeout)

    def _apply(self, events: list[Event]) -> None:
        with self._lock:
            floor, changed = self.revision, False
            for event in events:
                if event.revision <= floor:  # already in a full read made after it
                    continue
                if event.kind == PUT:
                    self._kvs[event.kv.key] = event.kv
                else:
                    self._kvs.pop(event.kv.key, None)
                self.revision, changed = max(self.revision, event.revision), True
            if changed:
                self._changed.notify_all()
        if changed and self._on_change is not None:
            self._on_change()

    def _load(self) -> bool:
        """Read every key again; False if etcd did not answer (the watch's events go on meanwhile)."""
        self._tried_at = time.monotonic()
        for _ in range(3):
            try:
                result = self.client.range(self.prefix, prefix=True)
            except EtcdError as exc:
                log.warning("cannot read %r from etcd: %s", self.prefix, exc)
                return False
            with self._lock:
                if result.revision < self.revision:  # an event newer than this read came in meanwhile: again
                    continue
                kvs = {kv.key: kv for kv in result.kvs}
                changed = kvs != self._kvs
                self._kvs, self.revision = kvs, result.revision
                self._loaded_at = time.monotonic()
                self.loads += 1
                self._changed.notify_all()
            if changed and self._on_change is not None:
                self._on_change()
            return True
        return False

    def _recover(self, compact_revision: int) -> int:
        if not self._load():
            raise EtcdUnavailable(f"etcd at {self.client.url} did not answer a read of {self.prefix!r}")
        return self.revision
