"""Mooncake's ``mooncake.store``: ``MooncakeDistributedStore`` and ``ReplicateConfig`` over mooncakefs.

Methods, arguments, return values and error codes follow Mooncake's Python binding
(``mooncake-integration/store/store_py.cpp``): 0 or a count on success, Mooncake's negative codes on
failure (``-704`` not found, ``-600`` bad arguments, ``-200`` out of space…), ``get`` returns ``b""`` on
a miss or an error.  What a call failed on is kept in ``last_error`` (the mooncakefs exception), because
a bare code says little.

``setup`` points at a mooncakefs endpoint instead of a master: ``host:port`` is a node's TCP address;
``tcp://…``, ``unix://…`` and ``etcd://host:port/cluster`` work as in ``mooncakefs.connect``.  The node
owns the memory pool, so the sizes Mooncake's clients contribute are accepted and recorded, not
allocated.  Raw pointers are accepted only inside buffers given to ``register_buffer``, and every range
is checked against them before a byte moves.  docs/mooncake-compat.md lists each deliberate difference.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import enum
import logging
import mmap
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import mooncakefs
from mooncakefs import _engine
from mooncakefs.api import SINGLE_KEY_TYPES, KVStore
from mooncakefs.compat import ENDPOINT_ENV, is_mapped
from mooncakefs.errors import (
    BufferTooSmall,
    ChecksumError,
    CodeTable,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    MooncakeError,
    OutOfSpace,
    StoreClosed,
    Unavailable,
    code_in,
)
from mooncakefs.keys import encode_key

log = logging.getLogger("mooncakefs.compat")

# Mooncake's ErrorCode values (mooncake-store/include/types.h).
OK = 0
INTERNAL_ERROR = -1
NO_AVAILABLE_HANDLE = -200
INVALID_KEY = -400
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
TRANSFER_FAIL = -800
CHECKSUM_MISMATCH = -801
RPC_FAIL = -900

DEFAULT_SEGMENT = 16 << 20  # Mooncake's defaults for the config-dict form of setup
DEFAULT_BUFFER = 16 << 20
DEFAULT_MASTER = "127.0.0.1:50051"
_U64 = 1 << 64


#: Each mooncakefs exception's closest Mooncake error code (``code_in``: first match wins).
CODES: CodeTable = (
    (KeyNotFound, OBJECT_NOT_FOUND),
    (KeyExists, OBJECT_ALREADY_EXISTS),
    (OutOfSpace, NO_AVAILABLE_HANDLE),
    (ChecksumError, CHECKSUM_MISMATCH),
    (Unavailable, RPC_FAIL),
    (InvalidArgument | BufferTooSmall | StoreClosed | TypeError | ValueError, INVALID_PARAMS),
)


def code_of(exc: BaseException) -> int:
    """The Mooncake error code closest in meaning to a mooncakefs exception."""
    return code_in(CODES, exc, INTERNAL_ERROR)


def parse_size(value: object) -> int:
    """Bytes from Mooncake's size strings ("16MB", "16 MB", "1.5 GB", "4096"; K/M/G/T are powers of
    1024 as in Mooncake's ``string_to_byte_size``, "MiB" is accepted too).  ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"a size, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (bytes, or e.g. '16MB', '1.5 GB')")
    unit = match.group(2).upper().replace("IB", "B")
    scale = {
        "": 1,
        "B": 1,
        "K": 1 << 10,
        "KB": 1 << 10,
        "M": 1 << 20,
        "MB": 1 << 20,
        "G": 1 << 30,
        "GB": 1 << 30,
        "T": 1 << 40,
        "TB": 1 << 40,
    }.get(unit)
    if scale is None:
        raise ValueError(f"{value!r}: unknown unit {match.group(2)!r} (B, KB, MB, GB or TB)")
    return int(float(match.group(1)) * scale)


def endpoint_of(master_server_addr: str, metadata_server: str = "") -> str:
    """The mooncakefs URL that Mooncake's ``master_server_addr`` names: "host:port" is a node's TCP
    address; tcp://, unix:// and etcd://host:port/cluster URLs (and socket paths) pass through.  An
    empty address falls back to an etcd:// ``metadata_server`` that names a cluster."""
    addr = (master_server_addr or "").strip()
    if not addr and metadata_server.startswith("etcd://") and metadata_server.rstrip("/").count("/") >= 3:
        return metadata_server
    if addr.startswith(("tcp://", "unix://", "etcd://", "/", "./")):
        return addr
    host, sep, port = addr.rpartition(":")
    if sep and host and port.isdigit():
        return f"tcp://{host}:{port}"
    raise InvalidArgument(
        f"master_server_addr must be host:port (a mooncakefs node's TCP address), tcp://…, "
        f"unix://… or etcd://host:port/cluster; got {master_server_addr!r:.80}"
    )


def _refuse_one_key(keys: object, call: str) -> None:
    """TypeError for one key where a list of keys is due, as Mooncake's binding (pybind11) raises:
    iterating a str would act on each of its characters as a key (``batch_remove("abc")`` removing
    "a", "b" and "c")."""
    if isinstance(keys, SINGLE_KEY_TYPES):
        raise TypeError(
            f"{call}(): keys must be a list of str, not a single {type(keys).__name__} ({keys!r:.60}); "
            f"pass [{keys!r:.60}] for one"
        )


class SoftPinAction(enum.IntEnum):
    """What a write does to the object's soft pin (Mooncake's ``SoftPinAction``)."""

    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2

    def __str__(self) -> str:  # as pybind11's enums print
        return f"{type(self).__name__}.{self.name}"


class ObjectDataType(enum.IntEnum):
    """Mooncake's tag for what an object holds; recorded by Mooncake, ignored by mooncakefs."""

    UNKNOWN = 0
    KVCACHE = 1
    TENSOR = 2
    WEIGHT = 3
    SAMPLE = 4
    ACTIVATION = 5
    GRADIENT = 6
    OPTIMIZER_STATE = 7
    METADATA = 8
    GENERAL = 9

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


def _uint(name: str, value: object, bits: int = 64) -> int:
    """Mooncake's fields are C unsigned ints: anything else is a TypeError, as pybind11 says it."""
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise TypeError(f"ReplicateConfig.{name} must be an unsigned {bits}-bit int, got {value!r:.40}")
    return value


class ReplicateConfig:
    """How a write is placed (Mooncake's ``ReplicateConfig``).  On mooncakefs: ``replica_num`` is the
    cluster's replica count (best effort, as in Mooncake: at most the cluster's nodes), ``with_hard_pin``
    and a soft pin (``soft_pin_action=ENABLE``) pin the object, ``preferred_segment`` equal to
    ``get_hostname()`` keeps it on this host's node; the other fields are accepted and recorded."""

    __slots__ = (
        "_replica_num",
        "_soft_pin_ttl_ms",
        "data_type",
        "dfs_replica_num",
        "group_ids",
        "nof_replica_num",
        "prefer_alloc_in_same_node",
        "preferred_nof_segments",
        "preferred_segment",
        "preferred_segments",
        "soft_pin_action",
        "with_hard_pin",
    )

    def __init__(self) -> None:
        self._replica_num = 1
        self.nof_replica_num = 0
        self.dfs_replica_num = 0
        self.soft_pin_action = SoftPinAction.PRESERVE
        self._soft_pin_ttl_ms: int | None = None
        self.with_hard_pin = False
        self.preferred_segments: list[str] = []
        self.preferred_nof_segments: list[str] = []
        self.preferred_segment = ""
        self.prefer_alloc_in_same_node = False
        self.data_type = ObjectDataType.UNKNOWN
        self.group_ids: list[str] | None = None

    @property
    def replica_num(self) -> int:
        return self._replica_num

    @replica_num.setter
    def replica_num(self, value: int) -> None:
        self._replica_num = _uint("replica_num", value)

    @property
    def soft_pin_ttl_ms(self) -> int | None:
        return self._soft_pin_ttl_ms

    @soft_pin_ttl_ms.setter
    def soft_pin_ttl_ms(self, value: int | None) -> None:
        self._soft_pin_ttl_ms = None if value is None else _uint("soft_pin_ttl_ms", value)

    def __str__(self) -> str:
        ttl = "default" if self._soft_pin_ttl_ms is None else self._soft_pin_ttl_ms
        return (
            f"ReplicateConfig: {{ replica_num: {self._replica_num}, nof_replica_num: {self.nof_replica_num}, "
            f"dfs_replica_num: {self.dfs_replica_num}, "
            f"soft_pin_action: {SoftPinAction(self.soft_pin_action).name}, "
            f"soft_pin_ttl_ms: {ttl}, with_hard_pin: {int(self.with_hard_pin)}, "
            f"preferred_segments: {self.preferred_segments}, "
            f"preferred_nof_segments: {self.preferred_nof_segments}, "
            f"prefer_alloc_in_same_node: {int(self.prefer_alloc_in_same_node)}, "
            f"data_type: {ObjectDataType(self.data_type).name} }}"
        )

    __repr__ = __str__


_DEFAULT_CONFIG = ReplicateConfig()


class BufferHandle(bytearray):
    """``get_buffer``'s result: the value's bytes with Mooncake's ``ptr()``, ``size()`` and ``len()``."""

    def ptr(self) -> int:
        return ctypes.addressof((ctypes.c_char * max(len(self), 1)).from_buffer(self)) if len(self) else 0

    def size(self) -> int:
        return len(self)


class MooncakeHostMemAllocator:
    """Page-aligned host memory by address (Mooncake's helper for SGLang's host KV pool)."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}

    def alloc(self, size: int) -> int:
        region = mmap.mmap(-1, max(int(size), 1))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
        self._maps[addr] = region
        return addr

    def free(self, ptr: int) -> int:
        region = self._maps.pop(ptr, None)
        if region is None:
            return INVALID_PARAMS
        with contextlib.suppress(BufferError):  # a ctypes/torch view still exports it: freed with it
            region.close()
        return OK


class _Registered:
    """One ``register_buffer`` range and a writable byte view of it."""

    __slots__ = ("base", "size", "view")

    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        self.view = memoryview((ctypes.c_char * size).from_address(base)).cast("B")


def _check_mapped(ptr: int, size: int) -> None:
    """Registered memory must still be mapped: a range freed without ``unregister_buffer`` is refused,
    where a copy through it would kill the process (one system call: ~2.4 us a call on the dev VMs, as
    docs/mooncake-compat.md measured)."""
    if not _engine.pages_mapped(ptr, size):
        raise InvalidArgument(
            f"[{ptr:#x}, +{size}) was registered but is no longer mapped memory of this process "
            "(freed without unregister_buffer?)"
        )


class MooncakeDistributedStore:
    """Mooncake's store client on a mooncakefs node or cluster (see the module docstring)."""

    def __init__(self) -> None:
        self._store: KVStore | None = None
        self._cluster = False
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._regions: list[_Registered] = []
        self.local_hostname = ""
        self.metadata_server = ""
        self.global_segment_size = 0
        self.local_buffer_size = 0
        self.protocol = "tcp"
        self.endpoint = ""
        self.last_error: BaseException | None = None

    # -- plumbing --------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException, code: int | None = None) -> int:
        self.last_error = exc
        log.debug("mooncake.store call failed: %s", exc)
        return code_of(exc) if code is None else code

    def _need(self, copy: bool = False) -> KVStore:
        """The open store; with ``copy``, refuse as Mooncake does when no local buffer was set up."""
        if self._store is None:
            raise StoreClosed("the store is not set up: call setup() first (or it was closed)")
        if copy and self.local_buffer_size == 0:
            raise InvalidArgument(
                "local_buffer_size is 0 (a serving-only client, as in Mooncake): "
                "the copying put/get calls are refused; use put_from/get_into"
            )
        return self._store

    def _key(self, key: object) -> str:
        if not isinstance(key, str):
            raise TypeError(f"keys are str, not {type(key).__name__}")
        if not key:
            raise InvalidArgument("the key is empty")
        return key

    def _view(self, ptr: object, size: object, spans: dict[int, list[int]] | None = None) -> memoryview:
        """The registered bytes at [ptr, ptr+size): InvalidArgument unless they lie inside one
        ``register_buffer`` range (a raw pointer is never dereferenced otherwise) and are still mapped.
        ``spans``: leave the mapping check to the caller, adding the bytes to their range's span in it."""
        if type(ptr) is not int or type(size) is not int or ptr <= 0 or size < 0:
            raise InvalidArgument(f"buffer_ptr and size must be positive ints, got {ptr!r:.30} and {size!r:.30}")
        i = bisect.bisect_right(self._bases, ptr) - 1
        if i >= 0:
            region = self._regions[i]
            offset = ptr - region.base
            if offset + size <= region.size:
                if spans is None:
                    _check_mapped(ptr, size)
                elif (span := spans.get(i)) is None:
                    spans[i] = [ptr, ptr + size]
                else:  # [lo, hi) of the region's bytes the batch touches
                    if ptr < span[0]:
                        span[0] = ptr
                    if ptr + size > span[1]:
                        span[1] = ptr + size
                return region.view[offset : offset + size]
        raise InvalidArgument(f"[{ptr:#x}, +{size}) is not inside a registered buffer: call register_buffer first")

    def _put_options(self, config: ReplicateConfig | None, key: str | None = None) -> dict[str, Any]:
        config = _DEFAULT_CONFIG if config is None else config
        if not isinstance(config, ReplicateConfig):
            raise TypeError(f"config must be a ReplicateConfig, not {type(config).__name__}")
        if config.soft_pin_ttl_ms is not None and config.soft_pin_action != SoftPinAction.ENABLE:
            raise InvalidArgument("soft_pin_ttl_ms is only valid with soft_pin_action=ENABLE (as in Mooncake)")
        options: dict[str, Any] = {}
        if config.with_hard_pin or config.soft_pin_action == SoftPinAction.ENABLE:
            options["pin"] = True
        if self._cluster:
            replicas = max(1, config.replica_num)
            if replicas > 1 and key is not None:  # best effort, as Mooncake: as many as the nodes allow
                replicas = min(replicas, max(1, len(self._store.map.owners(encode_key(key)))))
            if replicas > 1:
                options["replicas"] = replicas
            if config.preferred_segment and config.preferred_segment == self.get_hostname():
                options["placement"] = "local"
        return options

    # -- lifecycle -------------------------------------------------------------------------------------

    def setup(
        self,
        local_hostname: Any,
        metadata_server: Any = None,
        global_segment_size: Any = None,
        local_buffer_size: Any = None,
        protocol: Any = None,
        rdma_devices: Any = None,
        master_server_addr: Any = None,
        engine: Any = None,
        enable_ssd_offload: bool = False,
        ssd_offload_path: str = "",
        tenant_id: str = "default",
        enable_client_http_server: bool = False,
        client_http_port: int = 9300,
    ) -> int:
        """Connect: ``setup(local_hostname, metadata_server, global_segment_size, local_buffer_size,
        protocol, rdma_devices, master_server_addr, ...)`` or ``setup({...})`` (sizes may be strings
        such as "16MB").  0, or a negative code with the reason in ``last_error``."""
        if isinstance(local_hostname, dict) and metadata_server is None:
            return self._setup_dict(local_hostname)
        given = (metadata_server, global_segment_size, local_buffer_size, protocol, rdma_devices, master_server_addr)
        if any(a is None for a in given):
            raise TypeError(
                "setup() takes local_hostname, metadata_server, global_segment_size, "
                "local_buffer_size, protocol, rdma_devices and master_server_addr, or one config dict"
            )
        for name, value in (("global_segment_size", global_segment_size), ("local_buffer_size", local_buffer_size)):
            if type(value) is not int or not 0 <= value < _U64:
                raise TypeError(f"setup(): {name} must be an unsigned int, got {value!r:.40}")
        for name, value in (
            ("local_hostname", local_hostname),
            ("metadata_server", metadata_server),
            ("protocol", protocol),
            ("rdma_devices", rdma_devices),
            ("master_server_addr", master_server_addr),
            ("tenant_id", tenant_id),
        ):
            if not isinstance(value, str):
                raise TypeError(f"setup(): {name} must be a str, got {type(value).__name__}")
        return self._connect(
            local_hostname,
            metadata_server,
            global_segment_size,
            local_buffer_size,
            protocol,
            master_server_addr,
            tenant_id,
        )

    def _setup_dict(self, config: dict[str, Any]) -> int:
        try:
            text = {str(k): str(v) for k, v in config.items()}
            for required in ("local_hostname", "metadata_server"):
                if not text.get(required):
                    raise InvalidArgument(f"setup(config): {required!r} is required")
            segment = parse_size(text.get("global_segment_size", DEFAULT_SEGMENT))
            buffer = parse_size(text.get("local_buffer_size", DEFAULT_BUFFER))
        except (MooncakeError, ValueError) as exc:
            return self._fail(exc, INVALID_PARAMS)
        master = text.get("master_server_addr", text.get("master_server_address", DEFAULT_MASTER))
        return self._connect(
            text["local_hostname"],
            text["metadata_server"],
            segment,
            buffer,
            text.get("protocol", "tcp"),
            master,
            text.get("tenant_id", "default"),
        )

    def _connect(
        self,
        local_hostname: str,
        metadata_server: str,
        segment: int,
        buffer: int,
        protocol: str,
        master: str,
        tenant_id: str,
    ) -> int:
        try:
            if self._store is not None:
                raise InvalidArgument("setup() was called already: close() first")
            if tenant_id not in ("", "default"):
                raise InvalidArgument(
                    f"tenant_id {tenant_id!r}: mooncakefs has one namespace per cluster; "
                    "use a cluster (etcd://…/NAME) per tenant"
                )
            url = endpoint_of(os.environ.get(ENDPOINT_ENV) or master, metadata_server)
            store = mooncakefs.connect(url)
        except (MooncakeError, ValueError, OSError) as exc:
            return self._fail(exc, INVALID_PARAMS if isinstance(exc, InvalidArgument | ValueError) else None)
        self._store, self.endpoint = store, url
        self._cluster = url.startswith("etcd://")
        self.local_hostname, self.metadata_server, self.protocol = local_hostname, metadata_server, protocol
        self.global_segment_size, self.local_buffer_size = segment, buffer
        return OK

    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int, server_address: str) -> int:
        """Mooncake's thin client of a per-host owner: here ``server_address`` names the node."""
        return self._connect(
            "localhost", "P2PHANDSHAKE", mem_pool_size, local_buffer_size, "tcp", server_address, "default"
        )

    def close(self) -> int:
        """Disconnect; the objects stay in the node (Mooncake drops those in this client's segment)."""
        store, self._store = self._store, None
        with self._lock:
            self._bases, self._regions = [], []
        if store is not None:
            store.close()
        return OK

    def health_check(self) -> int:
        """0 healthy, 1 not set up or closed, 2 the node or cluster cannot be reached."""
        if self._store is None:
            return 1
        try:
            self._store.ping() if hasattr(self._store, "ping") else self._store.stats()
        except MooncakeError as exc:
            self._fail(exc)
            return 2
        return 0

    def get_hostname(self) -> str:
        """This client's segment name, "host:port" (the node's TCP port when reached over TCP)."""
        if ":" in self.local_hostname:
            return self.local_hostname
        port = self.endpoint.rsplit(":", 1)[1] if self.endpoint.startswith("tcp://") else "0"
        return f"{self.local_hostname}:{port}"

    # -- registered memory -----------------------------------------------------------------------------

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        """Allow put_from/get_into on [buffer_ptr, buffer_ptr+size); -600 if it overlaps one already."""
        try:
            self._need()
            if type(buffer_ptr) is not int or type(size) is not int or buffer_ptr <= 0 or size <= 0:
                raise InvalidArgument(
                    f"register_buffer needs a positive pointer and size, got {buffer_ptr!r:.30}, {size!r:.30}"
                )
            if buffer_ptr + size > _U64 or size > sys.maxsize:
                raise InvalidArgument(f"[{buffer_ptr:#x}, +{size}) runs past the end of the address space")
            if not is_mapped(buffer_ptr, size, write=True):  # put_from reads it, get_into writes it
                raise InvalidArgument(f"[{buffer_ptr:#x}, +{size}) is not readable and writable memory of this process")
            region = _Registered(buffer_ptr, size)  # before the lists change: they stay in step whatever fails
            with self._lock:
                i = bisect.bisect_right(self._bases, buffer_ptr)
                before = self._regions[i - 1] if i else None
                after = self._regions[i] if i < len(self._regions) else None
                if (before and before.base + before.size > buffer_ptr) or (after and buffer_ptr + size > after.base):
                    raise InvalidArgument(f"[{buffer_ptr:#x}, +{size}) overlaps a registered buffer")
                self._bases.insert(i, buffer_ptr)
                self._regions.insert(i, region)
        except (MooncakeError, TypeError, ValueError) as exc:
            return self._fail(exc, INVALID_PARAMS)
        return OK

    def unregister_buffer(self, buffer_ptr: int) -> int:
        with self._lock:
            i = bisect.bisect_left(self._bases, buffer_ptr) if type(buffer_ptr) is int else -1
            if i < 0 or i >= len(self._bases) or self._bases[i] != buffer_ptr:
                return self._fail(InvalidArgument(f"{buffer_ptr!r:.30} is not a registered buffer"), INVALID_PARAMS)
            del self._bases[i], self._regions[i]
        return OK

    # -- writing ---------------------------------------------------------------------------------------

    def _put(self, key: str, value: Any, config: ReplicateConfig | None, overwrite: bool, copy: bool) -> int:
        try:
            store = self._need(copy)
            key = self._key(key)
            options = self._put_options(config, key)
            if len(memoryview(value)) == 0:
                raise InvalidArgument(f"key {key!r:.60}: the value is empty (Mooncake refuses 0-byte objects)")
            store.put(key, value, if_absent=not overwrite, **options)
        except KeyExists:
            return OK  # Mooncake's put is write-once: a second put of a key succeeds and changes nothing
        except (MooncakeError, TypeError, ValueError) as exc:
            return self._fail(exc)
        return OK

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        """Store ``value`` unless ``key`` exists (then 0, nothing changed, as in Mooncake)."""
        return self._put(key, value, config, False, True)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        """Insert or replace."""
        return self._put(key, value, config, True, True)

    def put_from(self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None) -> int:
        """``put`` from registered memory."""
        try:
            view = self._view(buffer_ptr, size)
        except MooncakeError as exc:
            return self._fail(exc)
        return self._put(key, view, config, False, False)

    def upsert_from(self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None) -> int:
        try:
            view = self._view(buffer_ptr, size)
        except MooncakeError as exc:
            return self._fail(exc)
        return self._put(key, view, config, True, False)

    def put_from_with_metadata(
        self,
        key: str,
        buffer_ptr: int,
        metadata_buffer_ptr: int,
        size: int,
        metadata_size: int,
        config: ReplicateConfig | None = None,
    ) -> int:
        """The metadata bytes then the data bytes, as one object."""
        try:
            value = bytes(self._view(metadata_buffer_ptr, metadata_size)) + bytes(self._view(buffer_ptr, size))
        except MooncakeError as exc:
            return self._fail(exc)
        return self._put(key, value, config, False, False)

    def _parts(self, parts: tuple[Any, ...]) -> bytes:
        views = [memoryview(p) for p in parts]
        if any(v.ndim != 1 or v.itemsize != 1 for v in views):
            raise RuntimeError("parts must be 1-D bytes-like")
        return b"".join(views)

    def put_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        """The parts concatenated, as one object."""
        return self._put(key, self._parts(parts), config, False, True)

    def upsert_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        return self._put(key, self._parts(parts), config, True, True)

    def _batch_put(
        self, keys: Sequence[str], values: Sequence[Any], config: ReplicateConfig | None, overwrite: bool, copy: bool
    ) -> list[int]:
        try:
            store = self._need(copy)
            if len(keys) != len(values):
                raise InvalidArgument(f"{len(keys)} keys but {len(values)} values")
            keys = [self._key(k) for k in keys]
            options = self._put_options(config, keys[0] if keys else None)
            if any(len(memoryview(v)) == 0 for v in values):
                raise InvalidArgument("a value is empty (Mooncake refuses 0-byte objects)")
            results = store.batch_put(list(zip(keys, values, strict=True)), if_absent=not overwrite, **options)
        except (MooncakeError, TypeError, ValueError) as exc:
            return [self._fail(exc)] * len(keys)
        codes = []
        for res in results:
            if res is None or isinstance(res, KeyExists):
                codes.append(OK)
            else:
                codes.append(self._fail(res))
        return codes

    def put_batch(self, keys: Sequence[str], values: Sequence[Any], config: ReplicateConfig | None = None) -> int:
        """Write-once ``put`` of many: one code for all (the first failure's, else 0)."""
        _refuse_one_key(keys, "put_batch")
        return next((c for c in self._batch_put(keys, values, config, False, True) if c), OK)

    def upsert_batch(self, keys: Sequence[str], values: Sequence[Any], config: ReplicateConfig | None = None) -> int:
        _refuse_one_key(keys, "upsert_batch")
        return next((c for c in self._batch_put(keys, values, config, True, True) if c), OK)

    def _views(self, buffer_ptrs: Sequence[int], sizes: Sequence[int], n: int) -> list[memoryview]:
        if len(buffer_ptrs) != n or len(sizes) != n:
            raise InvalidArgument(f"{n} keys but {len(buffer_ptrs)} pointers and {len(sizes)} sizes")
        spans: dict[int, list[int]] = {}  # one mapping check for each range the batch touches
        views = [self._view(p, s, spans) for p, s in zip(buffer_ptrs, sizes, strict=True)]
        for lo, hi in spans.values():
            _check_mapped(lo, hi - lo)
        return views

    def batch_put_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        config: ReplicateConfig | None = None,
    ) -> list[int]:
        """``put_from`` of many: a code per key (all -600 if the lists differ in length)."""
        _refuse_one_key(keys, "batch_put_from")
        return self._batch_put_from(keys, buffer_ptrs, sizes, config, upsert=False)

    def batch_upsert_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        config: ReplicateConfig | None = None,
    ) -> list[int]:
        _refuse_one_key(keys, "batch_upsert_from")
        return self._batch_put_from(keys, buffer_ptrs, sizes, config, upsert=True)

    def _batch_put_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        config: ReplicateConfig | None,
        *,
        upsert: bool,
    ) -> list[int]:
        try:
            views = self._views(buffer_ptrs, sizes, len(keys))
        except MooncakeError as exc:
            return [self._fail(exc)] * len(keys)
        return self._batch_put(keys, views, config, upsert, False)

    def batch_put_from_multi_buffers(
        self,
        keys: Sequence[str],
        all_buffer_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        config: ReplicateConfig | None = None,
    ) -> list[int]:
        """Each object gathered from several registered ranges, in order."""
        _refuse_one_key(keys, "batch_put_from_multi_buffers")
        try:
            if len(all_buffer_ptrs) != len(keys) or len(all_sizes) != len(keys):
                raise InvalidArgument(f"{len(keys)} keys but {len(all_buffer_ptrs)} pointer lists")
            values = [b"".join(self._views(p, s, len(p))) for p, s in zip(all_buffer_ptrs, all_sizes, strict=True)]
        except MooncakeError as exc:
            return [self._fail(exc)] * len(keys)
        return self._batch_put(keys, values, config, False, False)

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The value, or b"" on a miss or any error (as in Mooncake; ``last_error`` says which)."""
        try:
            return self._need(True).get(self._key(key))
        except (MooncakeError, TypeError, ValueError) as exc:
            self._fail(exc)
            return b""

    def get_batch(self, keys: Sequence[str]) -> list[bytes]:
        """A value per key, b"" for each miss."""
        _refuse_one_key(keys, "get_batch")
        try:
            values = self._need(True).batch_get([self._key(k) for k in keys])
        except (MooncakeError, TypeError, ValueError) as exc:
            self._fail(exc)
            return [b""]  # Mooncake's answer when the whole batch fails
        return [b"" if v is None else v for v in values]

    def get_buffer(self, key: str) -> BufferHandle | None:
        """The value in a buffer object (``ptr()``, ``size()``, buffer protocol), None on a miss."""
        value = self.get(key)
        return BufferHandle(value) if value else None

    def batch_get_buffer(self, keys: Sequence[str]) -> list[BufferHandle | None]:
        _refuse_one_key(keys, "batch_get_buffer")
        return [BufferHandle(v) if v else None for v in self.get_batch(keys)] if keys else []

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        """Copy the value into registered memory: bytes written, -704 on a miss, -600 if it does not fit."""
        try:
            return self._need().get_into(self._key(key), self._view(buffer_ptr, size))
        except (MooncakeError, TypeError, ValueError) as exc:
            return self._fail(exc)

    def batch_get_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int]) -> list[int]:
        """``get_into`` of many: bytes or a negative code per key."""
        _refuse_one_key(keys, "batch_get_into")
        try:
            store = self._need()
            views = self._views(buffer_ptrs, sizes, len(keys))
            results = store.batch_get_into([self._key(k) for k in keys], views)
        except (MooncakeError, TypeError, ValueError) as exc:
            return [self._fail(exc)] * len(keys)
        return [r if type(r) is int else self._fail(r) for r in results]

    def batch_get_into_multi_buffers(
        self,
        keys: Sequence[str],
        all_buffer_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        prefer_alloc_in_same_node: bool = False,
    ) -> list[int]:
        """Each object scattered over several registered ranges, in order: bytes or a code per key."""
        _refuse_one_key(keys, "batch_get_into_multi_buffers")
        out = []
        for key, ptrs, sizes in zip(keys, all_buffer_ptrs, all_sizes, strict=False):
            try:
                views = self._views(ptrs, sizes, len(ptrs))
                value = self._need().get(self._key(key))
                if len(value) > sum(sizes):
                    raise BufferTooSmall(key, len(value), sum(sizes))
                at = 0
                for view in views:
                    chunk = value[at : at + len(view)]
                    view[: len(chunk)] = chunk
                    at += len(chunk)
                out.append(len(value))
            except (MooncakeError, TypeError, ValueError) as exc:
                out.append(self._fail(exc))
        if len(all_buffer_ptrs) != len(keys) or len(all_sizes) != len(keys):
            return [self._fail(InvalidArgument("one pointer list and one size list per key"))] * len(keys)
        return out

    def get_into_ranges(
        self,
        buffer_ptrs: Sequence[int],
        all_keys: Sequence[Sequence[str]],
        all_dst_offsets: Sequence[Sequence[Sequence[int]]],
        all_src_offsets: Sequence[Sequence[Sequence[int]]],
        all_sizes: Sequence[Sequence[Sequence[int]]],
    ) -> list[list[list[int]]]:
        """Byte ranges of objects into registered buffers: for buffer i, key j, fragment k, copy
        ``sizes[i][j][k]`` bytes from the object's ``src_offsets`` to the buffer's ``dst_offsets``.
        Each fragment gets its byte count or a negative code (missing key, a range past the object or
        the buffer, lists of different lengths); the others still succeed."""
        shape = [[list(d) for d in dsts] for dsts in all_dst_offsets]
        out = [[[INVALID_PARAMS] * len(d) for d in dsts] for dsts in shape]
        n = len(buffer_ptrs)
        if not (len(all_keys) == len(all_dst_offsets) == len(all_src_offsets) == len(all_sizes) == n):
            self._fail(InvalidArgument("get_into_ranges: one list of keys, offsets and sizes per buffer"))
            return out
        try:
            store = self._need()
        except MooncakeError as exc:
            self._fail(exc)
            return out
        values: dict[str, bytes | BaseException] = {}
        for i, ptr in enumerate(buffer_ptrs):
            try:
                self._view(ptr, 1)  # inside a registered range: the buffer runs to that range's end
                region = self._regions[bisect.bisect_right(self._bases, ptr) - 1]
                buffer = region.view[ptr - region.base :]
            except MooncakeError as exc:
                self._fail(exc)
                continue
            keys = all_keys[i]
            if not len(keys) == len(all_dst_offsets[i]) == len(all_src_offsets[i]) == len(all_sizes[i]):
                self._fail(InvalidArgument(f"get_into_ranges: buffer {i}: the key and range lists differ in length"))
                continue
            for j, key in enumerate(keys):
                dsts, srcs, sizes = all_dst_offsets[i][j], all_src_offsets[i][j], all_sizes[i][j]
                if not len(dsts) == len(srcs) == len(sizes):
                    self._fail(InvalidArgument(f"get_into_ranges: key {key!r:.60}: offsets and sizes differ"))
                    continue
                if key not in values:
                    try:
                        values[key] = store.get(self._key(key))
                    except (MooncakeError, TypeError, ValueError) as exc:
                        values[key] = exc
                value = values[key]
                for k, (dst, src, size) in enumerate(zip(dsts, srcs, sizes, strict=True)):
                    if isinstance(value, BaseException):
                        out[i][j][k] = self._fail(value)
                    elif min(dst, src, size) < 0 or src + size > len(value) or dst + size > len(buffer):
                        out[i][j][k] = self._fail(
                            InvalidArgument(
                                f"key {key!r:.60}: range src {src}+{size} / dst {dst}+{size} overflows the object "
                                f"({len(value)} bytes) or the buffer ({len(buffer)} bytes)"
                            )
                        )
                    else:
                        buffer[dst : dst + size] = value[src : src + size]
                        out[i][j][k] = size
        return out

    # -- queries and removal ---------------------------------------------------------------------------

    def is_exist(self, key: str) -> int:
        """1 present, 0 absent, -1 on an error."""
        try:
            return int(self._need().exists(self._key(key)))
        except (MooncakeError, TypeError, ValueError) as exc:
            self._fail(exc)
            return -1

    def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        _refuse_one_key(keys, "batch_is_exist")
        if not keys:
            return []
        try:
            return [int(x) for x in self._need().batch_exists([self._key(k) for k in keys])]
        except (MooncakeError, TypeError, ValueError) as exc:
            self._fail(exc)
            return [-1] * len(keys)

    def get_size(self, key: str) -> int:
        """The value's size, or a negative code (-704 absent)."""
        try:
            return self._need().stat(self._key(key)).size
        except (MooncakeError, TypeError, ValueError) as exc:
            return self._fail(exc)

    def remove(self, key: str, force: bool = False) -> int:
        """0, or -704 if absent.  mooncakefs has no read leases to wait out, so never -706."""
        try:
            return OK if self._need().remove(self._key(key)) else OBJECT_NOT_FOUND
        except (MooncakeError, TypeError, ValueError) as exc:
            return self._fail(exc)

    def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        _refuse_one_key(keys, "batch_remove")
        return [self.remove(k, force) for k in keys]

    def _remove_matching(self, match: Callable[[str], bool]) -> int:
        store = self._need()
        removed = 0
        for key in list(store.keys()):
            if isinstance(key, str) and match(key) and store.remove(key):
                removed += 1
        return removed

    def remove_by_regex(self, regex_pattern: str, force: bool = False) -> int:
        """Remove every key the pattern matches anywhere (``re.search``, as Mooncake's regex_search):
        the count, or a negative code (-600 for a bad pattern)."""
        try:
            pattern = re.compile(regex_pattern)
            return self._remove_matching(lambda key: pattern.search(key) is not None)
        except re.error as exc:
            return self._fail(InvalidArgument(f"bad regex {regex_pattern!r:.60}: {exc}"))
        except (MooncakeError, TypeError, ValueError) as exc:
            return self._fail(exc)

    def remove_all(self, force: bool = False) -> int:
        """Remove every object: the count, or -1."""
        try:
            return self._need().remove_prefix("")
        except (MooncakeError, TypeError, ValueError) as exc:
            self._fail(exc)
            return INTERNAL_ERROR

    def __enter__(self) -> MooncakeDistributedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: a store left open until the interpreter exits is collected after
        # the modules are torn down, and every program that did so printed an AttributeError.
        try:
            if self._store is not None:
                self._store.close()
        except Exception:  # at interpreter shutdown there is nothing useful to say
            pass


def bind_to_numa_node(node: int) -> None:
    """Accepted for compatibility: mooncakefs leaves NUMA placement to the node daemon."""


__all__ = [
    "BufferHandle",
    "MooncakeDistributedStore",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "ReplicateConfig",
    "SoftPinAction",
    "bind_to_numa_node",
]
