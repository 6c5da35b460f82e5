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
keep-alive and revoke, the maintenance status.  Errors are ``EtcdError``; etcd out of reach or too slow is
``EtcdUnavailable`` (also an ``Unavailable``); both live in ``mooncakefs.errors`` with the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

from mooncakefs.errors import EtcdError, EtcdUnavailable

__all__ = [
    "KV",
    "Compare",
    "Etcd",
    "EtcdError",
    "EtcdUnavailable",
    "Lease",
    "RangeResult",
    "TxnResult",
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


_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def parse_etcd_url(url: str) -> list[tuple[str, int]]:
    """[(host, port)] of "http://host:2379", or of each member in "http://a:2379,http://b:2379"."""
    endpoints = []
    for one in url.split(","):
        parts = urlsplit(one if "//" in one else f"http://{one}")
        if parts.scheme not in ("http", "etcd") or not parts.hostname:
            raise ValueError(f"etcd URL must look like http://127.0.0.1:2379 (comma-separate members), got {url!r}")
        endpoints.append((parts.hostname, parts.port or 2379))
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
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
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

    def _keep_alive(self, ident: int) -> int:
        call = self._methods.get("keepalive")
        if call is None:
            call = self._methods["keepalive"] = self._channel.stream_stream("/etcdserverpb.Lease/LeaseKeepAlive")
        try:
            for answer in call(iter([_int(1, ident)]), timeout=self.timeout):
                return _one(_fields(answer), 3)
        except grpc.RpcError as exc:
            raise self._error("LeaseKeepAlive", exc) from None
        raise EtcdUnavailable(f"etcd at {self.url} closed the keep-alive of lease {ident:x} without an answer")

    def status(self) -> int:
        """The revision etcd is at (a cheap check that it answers)."""
        return _revision(_one(_fields(self._call("/etcdserverpb.Maintenance/Status", b"")), 1, None))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
