"""Mooncake's P2P Store API on mooncakefs's nodes: a payload registered once is pulled by many, and every
instance that pulled it serves it to the next ones.

    store = P2PStore("etcd://10.0.0.1:2379/prod", "10.0.0.2:12345")
    store.register("ckpt/step-9000/shard-0", [buf0, buf1])    # seed
    store.list("ckpt/")                                       # [PayloadInfo(name, max_shard_size, ...)]
    store.get_replica("ckpt/step-9000/shard-0", [out0, out1]) # pull from any holders, then serve it
    store.delete_replica(name); store.unregister(name)
    store.put(name, data); store.get(name)

The names and their meaning follow Mooncake's P2P Store (Register / Unregister / List / GetReplica /
DeleteReplica, ``max_shard_size`` 64 MiB).  Differences, because the bytes live in this host's node
rather than in the caller's registered memory: ``register`` copies the buffers into the node's pool (a
memcpy, on this host; nothing crosses the network, and the caller may reuse its buffers at once), and a
payload outlives the process that registered it until ``unregister``/``delete_replica`` or the node stops.

In etcd, under ``/mooncakefs/<cluster>/p2p-store/``: ``m/<hex name>`` the payload (its sizes, each
shard's size and CRC-32C, made once with a create-if-absent transaction) and ``h/<hex name>/<instance>``
one record per instance holding it, under that instance's lease: a dead instance stops being asked on
its own.  Shards move between nodes as the mount's chunks do, each checked against the CRC-32C its
registrar published: a holder with a bad or missing copy is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mooncakefs._engine import crc32c
from mooncakefs.client import _bytes_of, _writable_bytes_of
from mooncakefs.cluster import etcd
from mooncakefs.cluster.client import ClusterStore
from mooncakefs.cluster.membership import cluster_prefix
from mooncakefs.errors import (
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    MooncakeError,
    StaleEpoch,
    Unavailable,
)
from mooncakefs.keys import CachedKey

log = logging.getLogger("mooncakefs.p2p")

MAX_SHARD_SIZE = 64 << 20  # Mooncake's recommended (and default) maxShardSize
LEASE_TTL = 10
PULLERS = 4  # shards fetched at once


@dataclass(frozen=True)
class PayloadInfo:
    """What ``list`` tells of a payload (Mooncake's PayloadInfo)."""

    name: str
    max_shard_size: int
    total_size: int
    size_list: list[int]


class P2PStore:
    """Mooncake's P2P Store over the nodes of a mooncakefs cluster.  ``metadata_uri``: the cluster
    (``etcd://host:2379/CLUSTER``); ``local_server_name``: this instance's name (Mooncake's local segment
    name, host:port), shown to other instances.  This host must run a node of the cluster."""

    def __init__(
        self, metadata_uri: str, local_server_name: str, *, secret: bytes | str | None = None, timeout: float = 10.0
    ) -> None:
        if not isinstance(local_server_name, str) or not local_server_name:
            raise InvalidArgument("local_server_name must be a non-empty str, such as '10.0.0.2:12345'")
        self.cluster = ClusterStore(metadata_uri, secret=secret, timeout=timeout)
        try:
            node = self.cluster.local_node()
            if node is None:
                raise Unavailable(
                    f"P2PStore needs a node of cluster {self.cluster.cluster!r} on this host "
                    f"({self.cluster.host!r}; $MOONCAKEFS_HOST): it keeps and serves the payloads"
                )
            self.node: str = node
            self.local_server_name = local_server_name
            self.instance = uuid.uuid4().hex[:12]
            self.etcd = self.cluster._etcd
            self.prefix = cluster_prefix(self.cluster.cluster) + "p2p-store/"
            self.lease = self.etcd.lease(LEASE_TTL)
        except BaseException:
            self.cluster.close()
            raise
        self._held: dict[str, list[Any]] = {}  # name -> the keys of the shards this instance serves
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(PULLERS, thread_name_prefix="mooncakefs-p2p-store")
        self._keeper = threading.Thread(target=self._keep_alive, daemon=True, name="mooncakefs-p2p-lease")
        self._keeper.start()

    # -- etcd layout --------------------------------------------------------------------------------------

    def _meta_key(self, name: str) -> str:
        return f"{self.prefix}m/{name.encode().hex()}"

    def _holder_prefix(self, name: str) -> str:
        return f"{self.prefix}h/{name.encode().hex()}/"

    @staticmethod
    def _shard_key(meta: dict[str, Any], i: int) -> CachedKey:
        digest = hashlib.blake2b(meta["id"].encode(), digest_size=16).digest()
        return CachedKey(b"p2p/s/" + digest + i.to_bytes(4, "big") + meta["shards"][i][1].to_bytes(4, "big"))

    def _keep_alive(self) -> None:
        while not self._stop.wait(LEASE_TTL / 3):
            try:
                if self.lease.refresh() <= 0:
                    log.warning("p2p store: the instance's lease expired: taking a new one")
                    self.lease = self.etcd.lease(LEASE_TTL)
                    with self._lock:
                        names = list(self._held)
                    for name in names:
                        self._announce(name, gold=False)
            except Exception as exc:
                log.warning("p2p store: lease refresh failed: %s", exc)

    def _announce(self, name: str, *, gold: bool) -> None:
        record = {"node": self.node, "peer": self.local_server_name, "gold": gold}
        self.etcd.put(self._holder_prefix(name) + self.instance, json.dumps(record), lease=self.lease)

    def _meta(self, name: str) -> dict[str, Any]:
        kv = self.etcd.get(self._meta_key(_name(name)))
        if kv is None:
            raise KeyNotFound(name)
        return json.loads(kv.value)

    # -- the API ------------------------------------------------------------------------------------------

    def register(self, name: str, buffers: Sequence[Any], max_shard_size: int = MAX_SHARD_SIZE) -> None:
        """Publish ``buffers`` under ``name``, this instance their first holder (Mooncake's Register:
        seeding).  KeyExists if the name is registered already."""
        name = _name(name)
        if type(max_shard_size) is not int or max_shard_size <= 0:
            raise InvalidArgument(f"max_shard_size must be a positive int, got {max_shard_size!r:.40}")
        views = [_bytes_of(b) for b in _buffers(buffers)]
        shards: list[tuple[memoryview, int]] = []
        for view in views:
            for start in range(0, len(view), max_shard_size):
                piece = view[start : start + max_shard_size]
                shards.append((piece, crc32c(piece)))
        meta = {
            "name": name,
            "id": uuid.uuid4().hex,
            "max_shard_size": max_shard_size,
            "total_size": sum(len(v) for v in views),
            "size_list": [len(v) for v in views],
            "shards": [[len(p), c] for p, c in shards],
        }
        keys = [self._shard_key(meta, i) for i in range(len(shards))]
        link = self.cluster.link(self.node)
        try:
            for key, (piece, _crc) in zip(keys, shards, strict=True):
                link.put(key, piece, local=True, pin=True)  # served until unregistered: never evicted
            key = self._meta_key(name)
            if not self.etcd.txn([etcd.version(key) == 0], [etcd.put_op(key, json.dumps(meta))]).succeeded:
                raise KeyExists(f"{name!r} is registered already: unregister it first")
            with self._lock:
                self._held[name] = keys
            self._announce(name, gold=True)
        except BaseException:
            self._drop_keys(keys)
            raise

    def unregister(self, name: str) -> None:
        """Withdraw ``name`` (its record goes: no one can list or pull it any more) and stop serving it."""
        name = _name(name)
        self.etcd.delete(self._meta_key(name))
        self.etcd.delete(self._holder_prefix(name) + self.instance)
        self._forget(name)

    def delete_replica(self, name: str) -> None:
        """Stop serving a payload this instance pulled (or registered); the name stays for the others."""
        name = _name(name)
        self.etcd.delete(self._holder_prefix(name) + self.instance)
        self._forget(name)

    def list(self, prefix: str = "") -> list[PayloadInfo]:
        """The payloads whose name starts with ``prefix``, by name."""
        out = []
        for kv in self.etcd.get_prefix(f"{self.prefix}m/"):
            meta = json.loads(kv.value)
            if meta["name"].startswith(prefix):
                out.append(PayloadInfo(meta["name"], meta["max_shard_size"], meta["total_size"], meta["size_list"]))
        return sorted(out, key=lambda p: p.name)

    def holders(self, name: str) -> list[dict[str, Any]]:
        """Who serves ``name`` now: one record per instance (node, peer name, whether it registered it)."""
        return [json.loads(kv.value) for kv in self.etcd.get_prefix(self._holder_prefix(_name(name)))]

    def get_replica(self, name: str, buffers: Sequence[Any]) -> None:
        """Pull ``name`` into ``buffers`` (one per registered buffer, each exactly as large), shards in
        parallel from any holders, each checked against its published CRC-32C; then serve it too.
        KeyNotFound if no such name; InvalidArgument if the buffers do not fit; Unavailable if some
        shard could be had from no holder."""
        name = _name(name)
        meta = self._meta(name)
        outs = [_writable_bytes_of(b) for b in _buffers(buffers)]
        if [len(o) for o in outs] != meta["size_list"]:
            raise InvalidArgument(f"{name!r} has buffers of {meta['size_list']} bytes, got {[len(o) for o in outs]}")
        pieces: list[memoryview] = []
        for out in outs:
            for start in range(0, len(out), meta["max_shard_size"]):
                pieces.append(out[start : start + meta["max_shard_size"]])
        holders = self.holders(name)
        keys = [self._shard_key(meta, i) for i in range(len(pieces))]
        futures = [self._pool.submit(self._pull, meta, i, keys[i], pieces[i], holders) for i in range(len(pieces))]
        errors = [exc for f in futures if (exc := f.exception()) is not None]
        if errors:
            raise errors[0]
        link = self.cluster.link(self.node)
        kept = []
        try:
            for key, piece in zip(keys, pieces, strict=True):
                link.put(key, piece, local=True, pin=True)
                kept.append(key)
        except MooncakeError as exc:  # the caller has its bytes; this instance just cannot serve them
            log.warning("p2p store: cannot keep %r to serve it: %s", name, exc)
            self._drop_keys(kept)
            return
        with self._lock:
            self._held[name] = keys
        self._announce(name, gold=False)

    def _pull(
        self, meta: dict[str, Any], i: int, key: CachedKey, out: memoryview, holders: list[dict[str, Any]]
    ) -> None:
        """Shard ``i`` into ``out``: this host's node first, then a random replica, then the registrar
        (as Mooncake: replicas first, so the seed's link carries as little as it can)."""
        crc = meta["shards"][i][1]
        others = [h for h in holders if h["node"] != self.node]
        random.shuffle(others)
        others.sort(key=lambda h: (bool(h.get("gold")), self.cluster.is_down(h["node"])))
        nodes = [self.node, *dict.fromkeys(h["node"] for h in others)]
        for node in nodes:
            try:
                n = self.cluster.link(node).get_into(key, out)
            except (KeyNotFound, StaleEpoch):
                continue
            except Unavailable:
                self.cluster.mark_down(node)
                continue
            except MooncakeError as exc:
                log.warning("p2p store: node %s: %s", node, str(exc)[:200])
                continue
            if n == len(out) and crc32c(out) == crc:
                return
            log.warning("p2p store: node %s served a bad copy of shard %d of %r: skipping it", node, i, meta["name"])
        raise Unavailable(
            f"no holder of {meta['name']!r} could supply shard {i} (holders: {sorted({h['peer'] for h in holders})})"
        )

    def put(self, name: str, data: Any, max_shard_size: int = MAX_SHARD_SIZE) -> None:
        """``register(name, [data])``: the simple form."""
        self.register(name, [data], max_shard_size)

    def get(self, name: str) -> bytes:
        """The whole payload (its buffers joined), pulled as ``get_replica`` pulls it."""
        meta = self._meta(_name(name))
        out = bytearray(meta["total_size"])
        views, at = [], 0
        for size in meta["size_list"]:
            views.append(memoryview(out)[at : at + size])
            at += size
        self.get_replica(name, views)
        return bytes(out)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _forget(self, name: str) -> None:
        with self._lock:
            keys = self._held.pop(name, [])
        self._drop_keys(keys)

    def _drop_keys(self, keys: list[Any]) -> None:
        link = self.cluster.link(self.node)
        for key in keys:
            try:
                link.remove(key)
            except MooncakeError as exc:
                log.warning("p2p store: could not drop a shard: %s", exc)

    def close(self) -> None:
        """Stop serving everything this instance holds (its records go with its lease)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            names = list(self._held)
        for name in names:
            self._forget(name)
        try:
            self.lease.revoke()
        except Exception as exc:
            log.warning("p2p store: could not revoke the lease: %s", exc)
        self._pool.shutdown(wait=False)
        self.cluster.close()

    def __enter__(self) -> P2PStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"a payload name is a non-empty str, got {name!r:.60}")
    return name


def _buffers(buffers: Any) -> list[Any]:
    if isinstance(buffers, bytes | bytearray | memoryview) or not isinstance(buffers, Sequence):
        raise InvalidArgument("buffers is a list of buffers (one per registered piece), e.g. [bytearray(n)]")
    return list(buffers)
