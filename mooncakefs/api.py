"""The API every store shares: ``KVStore`` (what the embedded ``Store``, a node's ``RemoteStore`` and the
cluster's ``ClusterStore`` offer, and what the FUSE layer and the Mooncake drop-in are written against),
``ObjectInfo``, ``PutOptions`` (``put``'s keywords, checked in one place) and the argument checks.

Every store checks its arguments here, before anything is stored or sent, so that the same mistake
gives the same error everywhere.  The hot paths test the common case inline (``type(x) is``,
``x is False``) and call these only to raise or to normalise.
"""

from __future__ import annotations

import enum
import math
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mooncakefs.errors import InvalidArgument, KeyNotFound, MooncakeError, given
from mooncakefs.keys import Key

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only

MAX_VERSION = 1 << 126
MAX_TAG = 1 << 32
SINGLE_KEY_TYPES = (str, bytes, bytearray, memoryview)  # a key (or a buffer), where a list of keys is due
BUFFER_KINDS = "bytes, bytearray, memoryview, numpy array"
WRITABLE_KINDS = "bytearray, writable memoryview, numpy array"
BATCH_ERRORS = (MooncakeError, TypeError, ValueError)  # what fails one item of a batch, not the batch


def check_flag(name: str, value: object) -> bool:
    """A put flag (pin, if_absent, durable, if_newer) must be a bool: ``pin="no"`` would pin."""
    if value is not True and value is not False:
        raise InvalidArgument(f"{name} must be True or False, got {given(value)}")
    return value


def check_ttl(ttl: object) -> float | None:
    """A ttl is None (never expires) or a positive, finite number of seconds; ``ttl="30"`` and
    ``ttl=True`` are mistakes, not 30 s and 1 s."""
    if ttl is None:
        return None
    if type(ttl) is float and 0 < ttl < math.inf:  # the common case, without the ABC check below
        return ttl
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise InvalidArgument(f"ttl must be a number of seconds (int or float) or None, got {given(ttl)}")
    try:
        seconds = float(ttl)
    except OverflowError:
        seconds = math.inf
    if not 0 < seconds < math.inf:  # also refuses nan
        raise InvalidArgument(f"ttl must be a positive, finite number of seconds, got {ttl!r:.60}")
    return seconds


def check_version(version: object) -> int:
    """A version is an int from 0 to 2**126 - 1 (it travels in 16 bytes; a bool is not one)."""
    if type(version) is not int or not 0 <= version < MAX_VERSION:
        raise InvalidArgument(f"version must be an int from 0 to 2**126 - 1, got {given(version)}")
    return version


def check_tag(tag: object) -> int:
    """A tag is a 32-bit unsigned int, kept with the value for its writer (a cluster node's placement)."""
    if type(tag) is not int or not 0 <= tag < MAX_TAG:
        raise InvalidArgument(f"tag must be an int from 0 to 2**32 - 1, got {given(tag)}")
    return tag


TIER_HINTS = (None, "vram", "dram")  # what put(..., tier=) takes: where a value goes first


def check_tier(tier: object) -> str | None:
    """A put's tier hint names a tier it may go to first (None: the store decides).  Only the name is
    checked here; whether the store has that tier is the store's to say (``tiers.vram.choose_tier``)."""
    if tier not in TIER_HINTS:
        raise InvalidArgument(f"tier must be one of {TIER_HINTS}, got {tier!r:.40}")
    return tier  # type: ignore[return-value]


class Replace(enum.IntEnum):
    """When a put may take the place of the value a key already holds."""

    ALWAYS = 0
    NEVER = 1  # if_absent: KeyExists instead
    IF_OLDER = 2  # if_newer: only a value of a lower version; NotNewer instead


@dataclass(frozen=True, slots=True)
class PutOptions:
    """``put``'s keywords, checked once when made: how the stores carry them from the public call to where
    they act.  Users keep calling ``put(key, value, ttl=..., durable=...)``; ``put_options`` makes one.

    ``pin`` keeps the value in DRAM; ``ttl`` (seconds) expires it; ``if_absent`` / ``if_newer`` say when
    it may replace what the key holds (``replace``); ``durable`` returns once it is on the SSD tier;
    ``version`` (below 2**126) and ``tag`` (32 bits) are kept with it for its writer; ``replicas`` and
    ``placement`` ("local") are the cluster's."""

    pin: bool = False
    ttl: float | None = None
    if_absent: bool = False
    durable: bool = False
    version: int = 0
    if_newer: bool = False
    tag: int = 0
    replicas: int | None = None
    placement: str | None = None
    replace: Replace = field(init=False, default=Replace.ALWAYS, compare=False)

    def __post_init__(self) -> None:
        pin, if_absent, durable, if_newer = self.pin, self.if_absent, self.durable, self.if_newer
        if not (pin is False or pin is True) or not (if_absent is False or if_absent is True):
            check_flag("pin", pin)
            check_flag("if_absent", if_absent)
        if not (durable is False or durable is True) or not (if_newer is False or if_newer is True):
            check_flag("durable", durable)
            check_flag("if_newer", if_newer)
        if if_absent and if_newer:
            raise InvalidArgument("put takes if_absent or if_newer, not both")
        check_version(self.version)
        check_tag(self.tag)
        if self.ttl is not None:
            object.__setattr__(self, "ttl", check_ttl(self.ttl))
        if if_absent or if_newer:
            object.__setattr__(self, "replace", Replace.NEVER if if_absent else Replace.IF_OLDER)

    def stamped(self, version: int) -> PutOptions:
        """These options with ``version`` (checked): what a cluster client sends with each value it puts.
        A copy of fields checked when these were made, without ``dataclasses.replace``'s checking them
        again, which was a tenth of a cluster put's Python."""
        copy = object.__new__(PutOptions)
        for name in _PUT_FIELDS:
            object.__setattr__(copy, name, getattr(self, name))
        object.__setattr__(copy, "version", check_version(version))
        return copy

    def single_store(self, call: str, kind: str, place: object) -> None:
        """``replicas`` and ``placement`` mean something only in a cluster: a single store (embedded, or
        one node) keeps one copy of each value, so it takes replicas=1 and no placement, and says so,
        naming the store as "the ``kind`` at ``place``" (made only then: every put with options calls this)."""
        replicas, placement = self.replicas, self.placement
        if (replicas is None or (type(replicas) is int and replicas == 1)) and placement is None:
            return
        option = f"replicas={replicas!r:.40}" if placement is None else f"placement={placement!r:.40}"
        raise InvalidArgument(
            f"{call}({option}): replicas and placement need a cluster, and the {kind} at {place} is a single store "
            "that keeps one copy of each value; connect to a cluster with mooncakefs.connect('etcd://HOST:2379/CLUSTER')"
        )


PLAIN_PUT = PutOptions()  # every keyword at its default: what nearly every put is
_PUT_FIELDS = PutOptions.__slots__
# A cluster put names only its replica count, nearly always a small one: made once each.
_REPLICA_PUTS = {replicas: PutOptions(replicas=replicas) for replicas in range(1, 9)}


def put_options(
    pin: object = False,
    ttl: object = None,
    if_absent: object = False,
    durable: object = False,
    version: object = 0,
    if_newer: object = False,
    tag: object = 0,
    replicas: object = None,
    placement: object = None,
) -> PutOptions:
    """``put``'s keywords as checked ``PutOptions``; the defaults (the common case, alone or with a small
    replica count) cost no check."""
    if (
        pin is False
        and ttl is None
        and if_absent is False
        and durable is False
        and version == 0
        and type(version) is int
        and if_newer is False
        and tag == 0
        and type(tag) is int
        and placement is None
    ):
        if replicas is None:
            return PLAIN_PUT
        if type(replicas) is int and replicas in _REPLICA_PUTS:
            return _REPLICA_PUTS[replicas]
    return PutOptions(pin, ttl, if_absent, durable, version, if_newer, tag, replicas, placement)  # type: ignore[arg-type]


def holds_objects(fmt: str | None) -> bool:
    """Whether a buffer of this struct format holds Python objects (a numpy array of dtype object, or a
    record with such a field): its bytes are pointers, which no store may copy as data."""
    # field names (":name:") aside; a format with no "O" at all (nearly every one) needs no regex
    return fmt is not None and "O" in fmt and "O" in re.sub(r":[^:]*:", "", fmt)


def objects_error(what: str, value: object) -> InvalidArgument:
    return InvalidArgument(
        f"{what} holds Python objects ({type(value).__name__} of dtype object): its bytes are pointers, "
        "not data; store bytes instead (pickle.dumps, or a numeric dtype)"
    )


MAX_SECONDS = 1e6  # a timeout's bound (11.6 days): a socket's is finite


def check_seconds(value: object, what: str) -> float:
    """A timeout as a float: a number of seconds above 0 and below MAX_SECONDS, else InvalidArgument
    naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < MAX_SECONDS:
        raise InvalidArgument(
            f"{what} must be a number of seconds above 0 and below {MAX_SECONDS:g}, got {value!r:.40}"
        )
    return float(value)


def value_error(value: object, what: str = "value") -> InvalidArgument:
    """Why ``value`` is not a value to put (call only once taking its buffer has failed)."""
    if isinstance(value, str):
        return InvalidArgument(
            f"{what} must be a bytes-like object ({BUFFER_KINDS}), not str: encode it first ({what}.encode())"
        )
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        return InvalidArgument(f"{what} must be a bytes-like object ({BUFFER_KINDS}), not {type(value).__name__}")
    if not view.c_contiguous:
        return InvalidArgument(
            f"{what} must be a C-contiguous buffer ({type(value).__name__} is not; numpy: np.ascontiguousarray(a))"
        )
    if holds_objects(view.format):
        return objects_error(what, value)
    return InvalidArgument(
        f"{what} must be a C-contiguous bytes-like object ({BUFFER_KINDS}), not {type(value).__name__}"
    )


def buffer_error(buffer: object) -> InvalidArgument | None:
    """Why ``buffer`` cannot receive a value (``get_into``), or None if it can: a bytes-like object that
    is writable and C-contiguous."""
    if isinstance(buffer, str):
        return InvalidArgument(f"buffer must be a writable bytes-like object ({WRITABLE_KINDS}), not str")
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        return InvalidArgument(
            f"buffer must be a writable bytes-like object ({WRITABLE_KINDS}), not {type(buffer).__name__}"
        )
    if view.readonly:
        return InvalidArgument(
            f"buffer must be writable, and this {type(buffer).__name__} is read-only: "
            f"pass a {WRITABLE_KINDS.replace(', numpy', ' or numpy')}"
        )
    if not view.c_contiguous:
        return InvalidArgument(
            f"buffer must be a C-contiguous buffer ({type(buffer).__name__} is not; numpy: np.ascontiguousarray(a))"
        )
    if holds_objects(view.format):
        return objects_error("buffer", buffer)
    return None


def raise_buffer_error(buffer: object) -> None:
    """Raise why ``buffer`` cannot receive a value, if it cannot.  Called where a copy raised TypeError:
    when the buffer is fine the error had another cause, and the caller raises it again."""
    error = buffer_error(buffer)
    if error is not None:
        raise error from None


def key_list(keys: object, call: str, what: str = "keys") -> Iterable[Any]:
    """``keys`` itself, if it is a collection of keys: a call that takes many keys and got one
    (``match_prefix("a/b")`` would look up "a", "/" and "b") or something else says so."""
    if isinstance(keys, SINGLE_KEY_TYPES):
        example = f"{keys!r:.60}" if what == "keys" else "buffer"
        raise InvalidArgument(
            f"{call} takes a list of {what}, not a single {type(keys).__name__} "
            f"({keys!r:.60}): pass [{example}] for one"
        )
    try:
        iter(keys)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(f"{call} takes a list of {what}, got {given(keys)}") from None
    return keys  # type: ignore[return-value]


def put_pairs(items: object, call: str = "batch_put") -> list[tuple[Any, Any]]:
    """A batch put's items, as a list of (key, value) pairs: from a mapping, or an iterable of pairs.
    Anything else is refused as a whole, before any item is stored."""
    if isinstance(items, Mapping):
        return list(items.items())
    if isinstance(items, SINGLE_KEY_TYPES):
        raise InvalidArgument(
            f"{call} takes a mapping or a list of (key, value) pairs, not a single "
            f"{type(items).__name__} ({items!r:.60})"
        )
    try:
        pairs = list(items)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(f"{call} takes a mapping or a list of (key, value) pairs, got {given(items)}") from None
    for i, pair in enumerate(pairs):
        if type(pair) is not tuple or len(pair) != 2:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise InvalidArgument(f"{call} takes (key, value) pairs, but item {i} is {given(pair)}")
            pairs[i] = tuple(pair)
    return pairs


def batch_targets(keys: object, buffers: object) -> tuple[list[Any], list[Any]]:
    """``batch_get_into``'s keys and buffers, as lists of the same length."""
    keys = list(key_list(keys, "batch_get_into"))
    buffers = list(key_list(buffers, "batch_get_into", "buffers"))
    if len(keys) != len(buffers):
        raise InvalidArgument(
            f"batch_get_into takes one buffer per key, got {len(keys)} keys and {len(buffers)} buffers"
        )
    return keys, buffers


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What ``Store.stat`` reports about one object."""

    key: Key
    size: int
    checksum: int  # CRC-32C of the value
    tier: str  # "vram", "dram" or "ssd": the fastest tier holding it
    pinned: bool
    expires: float | None  # unix time, or None
    version: int = 0  # what its writer put it with


class KVMapping:
    """What ``Store``, ``RemoteStore`` and ``ClusterStore`` share on top of their own
    get/put/remove/keys/close: the mapping protocol, the context manager, and running one item of a
    batch call (``_each``)."""

    _fatal: type[BaseException]  # the error that fails a whole batch call rather than one item
    _closed: bool

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]

    def __contains__(self, key: object) -> bool:
        try:
            return self.exists(key)  # type: ignore[attr-defined]
        except MooncakeError:  # an invalid key, or an unreachable node: not known to be there
            return False

    def _each(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return op(*args, **kwargs)
        except self._fatal:
            raise
        except BATCH_ERRORS as exc:
            return exc

    def __getitem__(self, key: Key) -> bytes:
        return self.get(key)  # type: ignore[attr-defined]

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)  # type: ignore[attr-defined]

    def __delitem__(self, key: Key) -> None:
        if not self.remove(key):  # type: ignore[attr-defined]
            raise KeyNotFound(key)

    def __iter__(self) -> Iterator[Key]:
        return self.keys()  # type: ignore[attr-defined]


class KVStore(Protocol):
    """What every store offers, embedded (``mooncakefs.open``), one node's (``RemoteStore``) or a
    cluster's (``ClusterStore``): code written against this (the FUSE layer, the Mooncake drop-in)
    works on all three.  Each store's own docstrings say what it adds (``version``, ``if_newer``...).
    ``tier`` names the tier a value goes to first on every store: a cluster's, on each node it writes."""

    @property
    def closed(self) -> bool: ...

    def put(
        self,
        key: Key,
        value: Any,
        *,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        replicas: int | None = None,
        placement: str | None = None,
        tier: str | None = None,
    ) -> None: ...

    def batch_put(
        self,
        items: Mapping[Key, Any] | Iterable[tuple[Key, Any]],
        *,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        replicas: int | None = None,
    ) -> list[Any]: ...

    def get(self, key: Key) -> bytes: ...

    def get_into(self, key: Key, buffer: Any) -> int: ...

    def view(self, key: Key) -> AbstractContextManager[memoryview]: ...

    def exists(self, key: Key) -> bool: ...

    def remove(self, key: Key) -> bool: ...

    def remove_prefix(self, prefix: Key) -> int: ...

    def stat(self, key: Key) -> ObjectInfo: ...

    def keys(self, prefix: Key = "") -> Iterator[Key]: ...

    def match_prefix(self, keys: Iterable[Key]) -> int: ...

    def batch_get(self, keys: Iterable[Key]) -> list[bytes | None]: ...

    def batch_get_into(self, keys: Iterable[Key], buffers: Iterable[Any]) -> list[Any]: ...

    def batch_exists(self, keys: Iterable[Key]) -> list[bool]: ...

    def stats(self) -> dict[str, Any]: ...

    def persist(self, keys: Iterable[Key] | None = None) -> int: ...

    def close(self) -> None: ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
