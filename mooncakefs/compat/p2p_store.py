"""``mooncake.p2p_store`` on mooncakefs: Mooncake's P2P Store API over ``mooncakefs.p2p.P2PStore``.

Mooncake ships its P2P Store as a Go package only (``mooncake-p2p-store``: ``NewP2PStore``, ``Register``,
``Unregister``, ``List``, ``GetReplica``, ``DeleteReplica``, ``GetLocalServerName``, ``Close``); there is
no Python binding to copy.  This is that API with Python's names and the Go arguments in the same order
(``ctx`` dropped, Go's returned ``error`` raised instead):

    store = P2PStore("10.0.0.1:2379", "10.0.0.2:12345")        # NewP2PStore(metadataUri, localServerName)
    store.register("ckpt/shard-0", [addr0, addr1], [n0, n1])   # Register(..., maxShardSize=64 MiB, location)
    store.list("ckpt/")                                        # [PayloadInfo(name, max_shard_size, ...)]
    store.get_replica("ckpt/shard-0", [dst0, dst1], [n0, n1])  # pull, then serve it to the others
    store.delete_replica("ckpt/shard-0"); store.unregister("ckpt/shard-0"); store.close()

Meanings kept from Mooncake: a name is registered once in the cluster (``force_create`` replaces it);
one instance opens a name once (``register`` or ``get_replica`` again: ``PayloadOpened``; a name
another instance registered: ``PayloadExists``);
``unregister`` withdraws only the registrar's copy, so the instances that pulled it keep serving it and
the name stays listed until the last holder lets go (then its record is deleted, as Mooncake's
``Update`` deletes an empty payload).  Differences, because the bytes live in this host's mooncakefs
node: ``register`` copies the memory into the node (a memcpy on this host, checked against the
process's mappings first), so the caller may reuse it at once instead of keeping it until
``unregister``; every shard pulled is checked against the CRC-32C its registrar published.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mooncakefs import _engine
from mooncakefs.compat import is_mapped
from mooncakefs.errors import InvalidArgument, KeyExists, KeyNotFound, MooncakeError
from mooncakefs.p2p.store import MAX_SHARD_SIZE, PayloadInfo
from mooncakefs.p2p.store import P2PStore as _Store

log = logging.getLogger("mooncakefs.compat")

DEFAULT_CLUSTER = "default"  # the cluster a mooncakefs node joins unless told (--cluster)


class PayloadOpened(KeyExists):
    """Mooncake's ErrPayloadOpened: this instance registered or replicated the name already."""

    def __init__(self, name: str) -> None:
        MooncakeError.__init__(self, f"error: payload has been replicated: {name!r} is open on this instance")
        self.key = name


class PayloadExists(KeyExists):
    """Another instance registered the name (Mooncake's Create: "key already exists")."""

    def __init__(self, name: str) -> None:
        MooncakeError.__init__(
            self, f"error: key {name!r} already exists: registered by another instance (force_create=True replaces it)"
        )
        self.key = name


class PayloadNotOpened(KeyNotFound):
    """Mooncake's ErrPayloadNotOpened: this instance neither registered nor replicated the name."""

    def __init__(self, name: str, how: str = "is not open here") -> None:
        MooncakeError.__init__(self, f"error: payload does not replicated: {name!r} {how}")
        self.key = name


class PayloadNotFound(KeyNotFound):
    """Mooncake's ErrPayloadNotFound: no payload of that name in the metadata."""

    def __init__(self, name: str) -> None:
        MooncakeError.__init__(self, f"error: payload not found in metadata: {name!r}")
        self.key = name


def metadata_url(metadata_uri: str) -> str:
    """The cluster URL that Mooncake's ``metadataUri`` names.  Mooncake gives an etcd endpoint
    (``10.0.0.1:2379``): that is etcd://10.0.0.1:2379/default, the cluster a node joins unless told;
    ``etcd://host:port/CLUSTER`` names another cluster."""
    if not isinstance(metadata_uri, str) or not metadata_uri.strip():
        raise InvalidArgument(
            f"metadata_uri must be an etcd endpoint such as '10.0.0.1:2379' or "
            f"'etcd://10.0.0.1:2379/cluster', got {metadata_uri!r:.60}"
        )
    uri = metadata_uri.strip()
    for scheme in ("etcd://", "http://"):
        uri = uri.removeprefix(scheme)
    endpoints, _, cluster = uri.partition("/")
    for endpoint in endpoints.split(","):
        host, sep, port = endpoint.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise InvalidArgument(f"metadata_uri {metadata_uri!r:.60}: {endpoint!r} is not an etcd host:port")
    return f"etcd://{endpoints}/{cluster.strip('/') or DEFAULT_CLUSTER}"


def _views(addr_list: Sequence[int], size_list: Sequence[int], write: bool) -> list[memoryview]:
    if isinstance(addr_list, int | bytes | str) or isinstance(size_list, int | bytes | str):
        raise InvalidArgument("addr_list and size_list are lists (one address and one size per buffer)")
    addrs, sizes = list(addr_list), list(size_list)
    if len(addrs) != len(sizes) or not addrs:
        raise InvalidArgument(
            f"error: invalid argument: {len(addrs)} addresses and {len(sizes)} sizes (as many of each, at least one)"
        )
    views = []
    for addr, size in zip(addrs, sizes, strict=True):
        if type(addr) is not int or type(size) is not int or addr <= 0 or size <= 0 or addr + size > 1 << 64:
            raise InvalidArgument(f"error: invalid argument: address {addr!r:.30}, size {size!r:.30}")
        if not is_mapped(addr, size, write):
            raise InvalidArgument(
                f"[{addr:#x}, +{size}) is not {'writable' if write else 'readable'} memory of this process"
            )
        views.append(_engine.view_at(addr, size, write))
    return views


class P2PStore:
    """Mooncake's ``P2PStore`` (``NewP2PStore(metadataUri, localServerName, nicPriorityMatrix)``) over
    a mooncakefs cluster whose node runs on this host.  ``nic_priority_matrix`` is accepted (Mooncake
    picks rdma with it, tcp without); bytes move between nodes over their own links here."""

    def __init__(self, metadata_uri: str, local_server_name: str, nic_priority_matrix: str = "") -> None:
        self.metadata_uri = metadata_uri
        self.nic_priority_matrix = nic_priority_matrix
        self._store = _Store(metadata_url(metadata_uri), local_server_name)
        self._opened: set[str] = set()  # Mooncake's catalog: names registered or replicated here
        self._registered: set[str] = set()

    def get_local_server_name(self) -> str:
        """The name other instances see this one by (Mooncake's GetLocalServerName)."""
        return self._store.local_server_name

    def register(
        self,
        name: str,
        addr_list: Sequence[int],
        size_list: Sequence[int],
        max_shard_size: int = MAX_SHARD_SIZE,
        location: str = "cpu:0",
        force_create: bool = False,
    ) -> None:
        """Publish the memory at ``addr_list``/``size_list`` under ``name`` (seeding).  PayloadOpened if
        this instance holds the name already; KeyExists if another registered it (``force_create``
        replaces that record, as Mooncake's)."""
        self._check_name(name)
        if name in self._opened:
            raise PayloadOpened(name)
        views = _views(addr_list, size_list, write=False)
        if force_create:
            self._store.etcd.delete(self._store._meta_key(name))
        try:
            self._store.register(name, views, max_shard_size)
        except KeyExists:
            raise PayloadExists(name) from None
        self._opened.add(name)
        self._registered.add(name)

    def unregister(self, name: str) -> None:
        """Withdraw this instance's registered copy of ``name``; instances that pulled it keep serving
        it (PayloadNotOpened unless this instance registered it here)."""
        self._check_name(name)
        if name not in self._registered:
            raise PayloadNotOpened(name, "was not registered here")
        self._let_go(name)

    def delete_replica(self, name: str) -> None:
        """Stop serving ``name`` from this instance (PayloadNotOpened unless it is open here)."""
        self._check_name(name)
        if name not in self._opened:
            raise PayloadNotOpened(name)
        self._let_go(name)

    def list(self, name_prefix: str = "") -> list[PayloadInfo]:
        """The payloads registered in the cluster whose name starts with ``name_prefix``, by name."""
        if not isinstance(name_prefix, str):
            raise InvalidArgument(f"name_prefix is a str, got {type(name_prefix).__name__}")
        return self._store.list(name_prefix)

    def get_replica(self, name: str, addr_list: Sequence[int], size_list: Sequence[int]) -> None:
        """Pull ``name`` into the memory at ``addr_list``/``size_list`` (its registered sizes, in
        order), then serve it to others.  PayloadOpened if it is open here already; PayloadNotFound if
        no such name; InvalidArgument if the sizes differ; Unavailable if some shard had no holder."""
        self._check_name(name)
        if name in self._opened:
            raise PayloadOpened(name)
        views = _views(addr_list, size_list, write=True)
        try:
            self._store.get_replica(name, views)
        except KeyNotFound:
            raise PayloadNotFound(name) from None
        self._opened.add(name)

    def close(self) -> None:
        """Stop serving everything this instance holds (Mooncake's Close)."""
        self._opened.clear()
        self._registered.clear()
        self._store.close()

    def __enter__(self) -> P2PStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _let_go(self, name: str) -> None:
        """Stop holding ``name``; the last holder to go deletes its record, as Mooncake deletes a payload
        left with no locations."""
        self._opened.discard(name)
        self._registered.discard(name)
        self._store.delete_replica(name)
        try:
            if not self._store.holders(name):
                self._store.etcd.delete(self._store._meta_key(name))
        except Exception as exc:  # etcd's own errors too: the caller let go; only the listing lags
            log.warning("p2p_store: %r has no holder left, but its record stays: %s", name, exc)

    @staticmethod
    def _check_name(name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"error: invalid argument: a payload name is a non-empty str, got {name!r:.60}")


__all__ = [
    "MAX_SHARD_SIZE",
    "P2PStore",
    "PayloadExists",
    "PayloadInfo",
    "PayloadNotFound",
    "PayloadNotOpened",
    "PayloadOpened",
    "metadata_url",
]
