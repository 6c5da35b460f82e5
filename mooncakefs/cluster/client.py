"""The cluster client: ``mooncakefs.connect("etcd://host:2379/prod")``.

It reads the placement map from etcd once and then talks to the nodes directly: a key goes to the
first R nodes of its placement group (``put(..., replicas=R)``), and is read from the nearest of its
group's nodes (this host's first, over the Unix socket and shared memory), falling over to the next
on an error.  Nothing per object touches etcd.  The client keeps no watch: every request names the
map's epoch, a node on a newer map refuses it (``StaleEpoch``), and the client reloads the map then.
A node that cannot be reached makes the client reload too and retry, for up to ``failover`` seconds,
the time the controller needs to notice a dead node (its lease ttl) and publish a map without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mooncakefs._engine import crc32c
from mooncakefs.api import (
    BATCH_ERRORS,
    PLAIN_PUT,
    KVMapping,
    ObjectInfo,
    PutOptions,
    batch_targets,
    check_tier,
    key_list,
    put_options,
    put_pairs,
)
from mooncakefs.client import RemoteStore, _bytes_of, _writable_bytes_of, batch_values
from mooncakefs.cluster.etcd import parse_etcd_url
from mooncakefs.cluster.membership import cluster_prefix, connect_etcd, host_id
from mooncakefs.cluster.placement import PlacementMap, pointer_key
from mooncakefs.errors import InvalidArgument, KeyNotFound, MooncakeError, Moved, StaleEpoch, Unavailable
from mooncakefs.keys import Key, encode_key, encode_prefix
from mooncakefs.wire import LOCAL, REPLICAS_SHIFT, Channel, Op

T = TypeVar("T")
DOWN_S = 1.0  # a node that failed is tried last for this long


class NodeLink(RemoteStore):
    """A client of one cluster node that names its placement epoch on each connection (or, with
    ``epoch=None``, names none: its requests are served whatever the node's map)."""

    def __init__(self, record: dict[str, Any], *, epoch: int | None, prefer_unix: bool = False, **options: Any) -> None:
        self.node: str = record["id"]
        self.epoch = epoch
        if prefer_unix and record.get("unix"):
            url = f"unix://{record['unix']}"
        elif record.get("tcp"):
            url = f"tcp://{record['tcp']}"
        else:
            raise Unavailable(f"node {self.node} has no TCP endpoint and is not on this host")
        super().__init__(url, **options)

    def _connect(self) -> Channel:
        ch = super()._connect()
        try:
            self._announce(ch)
        except BaseException:
            ch.close()
            raise
        return ch

    def _take(self) -> tuple[Channel, bool]:
        ch, reused = super()._take()
        if ch.epoch == self.epoch:
            return ch, reused
        try:
            self._announce(ch)
        except Unavailable:
            ch.close()
            return self._connect(), False  # the node restarted since this connection was pooled
        except BaseException:
            self._give_back(ch)
            raise
        return ch, reused

    def _announce(self, ch: Channel) -> None:
        if self.epoch is None:
            return
        ch.send(Op.EPOCH, [self.epoch])
        ch.read_reply()
        ch.epoch = self.epoch

    def put(
        self,
        key: Key,
        value: Any,
        *,
        replicas: int = 1,
        local: bool = False,  # type: ignore[override]
        cluster_flags: int | None = None,
        **options: Any,
    ) -> None:
        flags = cluster_flags if cluster_flags is not None else placement_flags(replicas, local)
        super().put(key, value, cluster_flags=flags, **options)


def placement_flags(replicas: int, local: bool) -> int:
    return (LOCAL if local else 0) | (replicas << REPLICAS_SHIFT)


def parse_cluster_url(url: str) -> tuple[str, str]:
    """(etcd endpoints, cluster) of "etcd://host:port/cluster" or "etcd://host1:port1,host2:port2/cluster"."""
    parts = urlsplit(url)
    cluster = parts.path.strip("/")
    if parts.scheme != "etcd" or not parts.netloc or not cluster or "/" in cluster:
        raise InvalidArgument(f"cluster URL must look like etcd://127.0.0.1:2379/prod, got {url!r}")
    endpoints = ",".join(f"http://{member}" for member in parts.netloc.split(","))
    try:
        parse_etcd_url(endpoints)  # each member must be host:port
    except InvalidArgument:  # said of the URL given, not of the http:// one made from it
        raise InvalidArgument(f"cluster URL must look like etcd://127.0.0.1:2379/prod, got {url!r}") from None
    return endpoints, cluster


class ClusterStore(KVMapping):
    """The Store API over a whole cluster.  Thread-safe."""

    _fatal = Unavailable

    def __init__(
        self,
        url: str,
        *,
        secret: bytes | str | None = None,
        timeout: float = 10.0,
        failover: float | None = None,
        replicas: int = 1,
        **link_options: Any,
    ) -> None:
        self.etcd_url, self.cluster = parse_cluster_url(url)
        self.replicas = replicas  # what put and batch_put use when not told
        self.url = self.path = url
        self._etcd = connect_etcd(self.etcd_url, timeout=min(timeout, 5.0))
        self._map_key = cluster_prefix(self.cluster) + "placement"
        self._link_options = {"secret": secret, "timeout": timeout, **link_options}
        self._links: dict[str, NodeLink] = {}
        self._down: dict[str, float] = {}
        self._stamp = 0  # the last version's clock part
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mooncakefs-replica")
        self.host = host_id()
        self._closed = False
        try:
            self.map = self._load()
        except BaseException:
            self._etcd.close()
            raise
        ttl = max((r.get("ttl", 10) for r in self.map.nodes.values()), default=10)
        self.failover = failover if failover is not None else 2 * ttl + 5

    # -- the map and the links to nodes ---------------------------------------------------------------

    def _load(self) -> PlacementMap:
        try:
            kv = self._etcd.get(self._map_key)
        except Exception as exc:
            raise Unavailable(f"cannot read the placement map of {self.cluster!r}: {exc}") from None
        if kv is None:
            raise Unavailable(
                f"cluster {self.cluster!r} has no placement map yet: start a node with "
                f"--etcd {self.etcd_url} --cluster {self.cluster}"
            )
        return PlacementMap.from_json(kv.value)

    def _refresh(self, seen: PlacementMap) -> None:
        """Reload the map unless another thread did since ``seen`` (etcd down: keep the one we have)."""
        with self._lock:
            if self.map is not seen:
                return
        with contextlib.suppress(Unavailable):
            new = self._load()
            with self._lock:
                if new.epoch > self.map.epoch:
                    self.map = new
                    for node, link in list(self._links.items()):
                        if node in new.nodes:
                            link.epoch = new.epoch
                        else:
                            del self._links[node]
                            link.close()

    def _link(self, node: str, pmap: PlacementMap) -> NodeLink:
        with self._lock:
            link = self._links.get(node)
        if link is not None and not link.closed:
            return link
        record = pmap.nodes.get(node)
        if record is None:
            raise Unavailable(f"node {node} is not in the cluster's placement map")
        link = NodeLink(record, epoch=pmap.epoch, prefer_unix=self._on_this_host(record), **self._link_options)
        with self._lock:
            if self._closed:
                link.close()
                raise Unavailable(f"client of {self.url} is closed")
            old = self._links.setdefault(node, link)
        if old is not link:
            link.close()
        return old

    def _on_this_host(self, record: dict[str, Any]) -> bool:
        return record.get("host") == self.host and bool(record.get("unix")) and os.path.exists(record["unix"])

    def _read_order(self, pmap: PlacementMap, raw: bytes) -> list[str]:
        """A key's group nodes, nearest first: this host's, then the map's order; recently failed last."""
        now = time.monotonic()
        return sorted(
            pmap.owners(raw), key=lambda n: (self._down.get(n, 0) > now, not self._on_this_host(pmap.nodes[n]))
        )

    def _retrying(self, attempt: Callable[[PlacementMap], T]) -> T:
        """Run ``attempt`` with the current map; on a stale epoch reload it, and on an unreachable node
        reload it and retry until the map routes around the node or ``failover`` passes."""
        deadline = time.monotonic() + self.failover
        while True:
            pmap = self.map
            try:
                return attempt(pmap)
            except StaleEpoch:
                self._refresh(pmap)
            except Unavailable:
                if self._closed or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                self._refresh(pmap)

    def _call(self, node: str, pmap: PlacementMap, fn: Callable[[NodeLink], T]) -> T:
        try:
            return fn(self._link(node, pmap))
        except Unavailable:
            self._down[node] = time.monotonic() + DOWN_S
            raise

    # -- writing ----------------------------------------------------------------------------------------

    def put(
        self,
        key: Key,
        value: Any,
        *,
        replicas: int | None = None,
        placement: str | None = None,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        tier: str | None = None,
    ) -> None:
        """Store ``value`` on the first ``replicas`` nodes of the key's group; returns once all hold it.
        ``placement="local"`` keeps it on this host's node instead (the group's nodes note where).
        ``tier`` ("vram" or "dram") is where each node puts its copy first, as ``RemoteStore.put`` says;
        a copy that repair makes later goes where that node's store places it.  Arguments are checked as
        every store checks them, before any node is asked."""
        options = put_options(pin, ttl, if_absent, durable, 0, False, 0, replicas, placement)
        self._put(key, value, self._options(options), check_tier(tier))

    def _put(self, key: Key, value: Any, options: PutOptions, tier: str | None = None) -> None:
        """``put`` with its options checked.  Several copies sent over TCP carry one CRC-32C of the value,
        computed once here rather than once per copy as each is sent."""
        raw, view = encode_key(key), _bytes_of(value)
        replicas: int = options.replicas  # type: ignore[assignment]
        spread = placement_flags(replicas, False)
        crc: int | None = None

        def attempt(pmap: PlacementMap) -> None:
            nonlocal crc
            owners = self._owners(pmap, raw, replicas)
            stamped = options.stamped(self._version(pmap))
            if options.placement == "local":
                here = self._local_node(pmap)
                self._call(here, pmap, lambda link: link._put(key, view, stamped, placement_flags(1, True), None, tier))
                pointer = PutOptions(version=stamped.version)
                self._on_all(pmap, owners, lambda link: link._put(pointer_key(raw), here.encode(), pointer, spread))
                return
            if crc is None and len(owners) > 1 and sum(not self._on_this_host(pmap.nodes[n]) for n in owners) > 1:
                crc = crc32c(view)

            def send(link: NodeLink) -> None:
                link._put(key, view, stamped, spread, crc if link.kind == "tcp" else None, tier)

            self._on_all(pmap, owners, send)

        self._retrying(attempt)

    def _options(self, options: PutOptions) -> PutOptions:
        """``options`` with their replica count (the client's default if not given, checked against this
        cluster's placement width) and a placement this client knows."""
        if options.placement is not None and options.placement != "local":
            raise InvalidArgument(f"placement must be None or 'local', got {options.placement!r:.60}")
        if options is PLAIN_PUT:
            options = put_options(replicas=self.replicas)
        elif options.replicas is None:
            options = replace(options, replicas=self.replicas)
        self._check_replicas(options.replicas)  # type: ignore[arg-type]
        return options

    def _version(self, pmap: PlacementMap) -> int:
        """A new value's version: the map's epoch, then this client's clock (never repeating).  Repair
        keeps the higher version where copies differ, so a value written under a later map wins over one
        a node kept from before it was cut off, whatever the clocks say."""
        with self._lock:
            self._stamp = max(time.time_ns(), self._stamp + 1)
            return pmap.epoch << 63 | self._stamp

    def _check_replicas(self, replicas: int) -> None:
        width = self.map.width
        if type(replicas) is not int or not 1 <= replicas <= width:
            raise InvalidArgument(
                f"replicas must be an int from 1 to {width} (this cluster's placement width), got {replicas!r:.40}"
            )

    def _owners(self, pmap: PlacementMap, raw: bytes, replicas: int) -> list[str]:
        owners = pmap.owners(raw)[:replicas]
        if len(owners) < replicas:
            raise Unavailable(f"replicas={replicas} but cluster {self.cluster!r} has {len(owners)} node(s)")
        return owners

    def local_node(self) -> str | None:
        """This host's node (where a reader keeps what it fetched), or None if the host has none."""
        try:
            return self._local_node(self.map)
        except Unavailable:
            return None

    def link(self, node: str) -> NodeLink:
        """The link to one node of the current map (``Unavailable`` if it is not in it)."""
        return self._link(node, self.map)

    def mark_down(self, node: str) -> None:
        """A node failed a request made outside this client's routing: try it last for a while."""
        self._down[node] = time.monotonic() + DOWN_S

    def is_down(self, node: str) -> bool:
        return self._down.get(node, 0) > time.monotonic()

    def _local_node(self, pmap: PlacementMap) -> str:
        for node, record in sorted(pmap.nodes.items()):
            if self._on_this_host(record):
                return node
        raise Unavailable(f"placement='local' needs a node on this host ({self.host!r}, $MOONCAKEFS_HOST)")

    def _on_all(
        self, pmap: PlacementMap, nodes: list[str], fn: Callable[[Any], Any], *, direct: bool = False
    ) -> list[Any]:
        """Run ``fn`` on each node's link (or, ``direct``, on the node id), in parallel when there are
        several, the first in this thread; the first error is raised."""
        run = fn if direct else lambda node: self._call(node, pmap, fn)
        futures = [self._pool.submit(run, node) for node in nodes[1:]]
        try:
            first = run(nodes[0])
        finally:
            rest = [f.result() for f in futures]
        return [first, *rest]

    def _per_node(
        self, pmap: PlacementMap, work: dict[str, list[int]], fn: Callable[[NodeLink, list[int]], T]
    ) -> dict[str, T | Unavailable | StaleEpoch]:
        """``fn(link, items)`` for each node's share of a batch, the nodes in parallel; a node that is
        unreachable or on another epoch gives its exception instead of a result."""

        def one(node: str) -> T | Unavailable | StaleEpoch:
            try:
                return self._call(node, pmap, lambda link: fn(link, work[node]))
            except (Unavailable, StaleEpoch) as exc:
                return exc

        nodes = list(work)
        return dict(zip(nodes, self._on_all(pmap, nodes, one, direct=True), strict=True)) if nodes else {}

    def batch_put(
        self,
        items: Mapping[Key, Any] | Iterable[tuple[Key, Any]],
        *,
        replicas: int | None = None,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
    ) -> list[Any]:
        """As ``Store.batch_put``, each item on its ``replicas`` nodes: one batch per node.  Bad options
        or items that are not (key, value) pairs fail the call before any node is asked."""
        options = self._options(put_options(pin, ttl, if_absent, durable, 0, False, 0, replicas))
        pairs = put_pairs(items)
        replicas = options.replicas
        results: list[Any] = [None] * len(pairs)
        pmap = self.map
        by_node: dict[str, list[int]] = defaultdict(list)
        for i, (key, _value) in enumerate(pairs):
            try:
                for node in self._owners(pmap, encode_key(key), replicas):
                    by_node[node].append(i)
            except BATCH_ERRORS as exc:
                results[i] = exc
        retry: set[int] = set()
        flags = placement_flags(replicas, False)
        stamped = options.stamped(self._version(pmap))
        answers = self._per_node(
            pmap, by_node, lambda link, where: link._batch_put([pairs[i] for i in where], stamped, flags)
        )
        for node, where in by_node.items():
            out = answers[node]
            if isinstance(out, BaseException):
                retry.update(where)
                continue
            for i, r in zip(where, out, strict=True):
                if isinstance(r, StaleEpoch | Unavailable):
                    retry.add(i)
                elif r is not None and results[i] is None:
                    results[i] = r
        for i in sorted(retry):  # one by one, through the map's changes
            results[i] = self._each(self._put, *pairs[i], options)
        return results

    def remove(self, key: Key) -> bool:
        """Remove a key from every node of its group (and from the node it was placed on locally)."""
        raw = encode_key(key)

        def attempt(pmap: PlacementMap) -> bool:
            owners = pmap.owners(raw)
            where = self._placed_at(pmap, owners, raw)
            removed = any(self._on_all(pmap, owners, lambda link: link.remove(key)))
            if where is not None:
                if where in pmap.nodes and where not in owners:
                    removed = self._call(where, pmap, lambda link: link.remove(key)) or removed
                self._on_all(pmap, owners, lambda link: link.remove(pointer_key(raw)))
            return removed

        return self._retrying(attempt)

    def _placed_at(self, pmap: PlacementMap, owners: list[str], raw: bytes) -> str | None:
        """The node a key was put on with placement="local", as its group's owners noted it."""
        for node in owners:
            with contextlib.suppress(KeyNotFound):
                return self._call(node, pmap, lambda link: link.get(pointer_key(raw))).decode()
        return None

    def remove_prefix(self, prefix: Key) -> int:
        encode_prefix(prefix)  # refused here, not by every node
        return sum(self._on_every_node(lambda link: link.remove_prefix(prefix)).values())

    def persist(self, keys: Iterable[Key] | None = None) -> int:
        keys = None if keys is None else list(key_list(keys, "persist"))
        return sum(self._on_every_node(lambda link: link.persist(keys)).values())

    # -- reading ----------------------------------------------------------------------------------------

    def _read(self, key: Key, fn: Callable[[NodeLink], T]) -> T:
        """Run a read on the nearest node of the key's group that has the key."""
        raw = encode_key(key)

        def attempt(pmap: PlacementMap) -> T:
            down: Unavailable | None = None
            for node in self._read_order(pmap, raw):
                try:
                    return self._call(node, pmap, fn)
                except Moved as moved:
                    return self._call(moved.node, pmap, fn)
                except KeyNotFound:
                    continue
                except StaleEpoch:
                    raise
                except Unavailable as exc:
                    down = exc
            if down is not None:
                raise down  # the key may be on the node that is down: wait for the map to change
            raise KeyNotFound(key)

        return self._retrying(attempt)

    def get(self, key: Key) -> bytes:
        return self._read(key, lambda link: link.get(key))

    def get_into(self, key: Key, buffer: Any) -> int:
        _writable_bytes_of(buffer)  # refused here, before any node is asked
        return self._read(key, lambda link: link.get_into(key, buffer))

    def stat(self, key: Key) -> ObjectInfo:
        return self._read(key, lambda link: link.stat(key))

    @contextlib.contextmanager
    def view(self, key: Key) -> Iterator[memoryview]:
        """As ``Store.view``, from the nearest node holding the key (in place when it is this host's)."""

        def opened(link: NodeLink) -> tuple[Any, memoryview]:
            view = link.view(key)
            return view, view.__enter__()  # one GET: a node without the key says so, and the next is asked

        view, data = self._read(key, opened)
        try:
            yield data
        finally:
            view.__exit__(None, None, None)

    def exists(self, key: Key) -> bool:
        try:
            return self._read(key, lambda link: link.exists(key) or _absent(key))
        except KeyNotFound:
            return False

    def batch_get(self, keys: Iterable[Key]) -> list[bytes | None]:
        """As ``Store.batch_get``: the values, None where a key is missing."""
        keys = list(key_list(keys, "batch_get"))
        return batch_values(
            self._batch(keys, lambda link, idx: link._batch_read([keys[i] for i in idx], [None] * len(idx)))
        )

    def batch_get_into(self, keys: Iterable[Key], buffers: Iterable[Any]) -> list[Any]:
        """As ``Store.batch_get_into``: one result per key, the byte count or the exception."""
        keys, buffers = batch_targets(keys, buffers)
        return self._batch(
            keys, lambda link, idx: link.batch_get_into([keys[i] for i in idx], [buffers[i] for i in idx])
        )

    def batch_exists(self, keys: Iterable[Key]) -> list[bool]:
        keys = list(key_list(keys, "batch_exists"))
        out = self._batch(
            keys,
            lambda link, idx: [
                v or KeyNotFound(keys[i]) for i, v in zip(idx, link.batch_exists([keys[i] for i in idx]), strict=True)
            ],
        )
        return [v is True for v in out]

    def _batch(self, keys: list[Key], call: Callable[[NodeLink, list[int]], list[Any]]) -> list[Any]:
        """A batched read: each key asked of its nearest group node, then, where that node lacks it, of
        the next; one request per node per round.  ``call(link, indexes)`` gives one result per index, a
        value or an exception; a missing key is a ``KeyNotFound``, a moved one a ``Moved``."""
        results: list[Any] = [None] * len(keys)
        pmap = self.map
        todo: dict[int, list[str]] = {}
        for i, key in enumerate(keys):
            try:
                todo[i] = self._read_order(pmap, encode_key(key))
            except (MooncakeError, TypeError) as exc:
                results[i] = exc
        unsure: set[int] = set()  # keys whose node was unreachable: settle them one by one
        while todo:
            by_node: dict[str, list[int]] = defaultdict(list)
            for i, nodes in todo.items():
                by_node[nodes.pop(0)].append(i)
            answers = self._per_node(pmap, by_node, call)
            for node, idx in by_node.items():
                out = answers[node]
                if isinstance(out, BaseException):
                    unsure.update(idx)
                    out = [KeyNotFound(keys[i]) for i in idx]
                for i, r in zip(idx, out, strict=True):
                    if isinstance(r, Moved):
                        unsure.add(i)
                    if not isinstance(r, KeyNotFound | Moved) or not todo[i]:
                        results[i] = r
                        del todo[i]
        for i in sorted(unsure):
            if isinstance(results[i], KeyNotFound | Moved):
                results[i] = self._each(self._read, keys[i], lambda link, i=i: _value(call(link, [i])[0]))
        return results

    def match_prefix(self, keys: Iterable[Key]) -> int:
        """How many leading keys are present anywhere in the cluster."""
        hits = 0
        for present in self.batch_exists(key_list(keys, "match_prefix")):
            if not present:
                break
            hits += 1
        return hits

    def keys(self, prefix: Key = "") -> Iterator[Key]:
        """Every key in the cluster (each once), as the nodes see them now."""
        encode_prefix(prefix)  # refused here, not by every node
        seen: set[Key] = set()
        for found in self._on_every_node(lambda link: list(link.keys(prefix))).values():
            seen.update(found)
        return iter(sorted(seen, key=encode_key))

    def stats(self) -> dict[str, Any]:
        """Per node, its store's statistics; and the map's epoch."""
        return {"epoch": self.map.epoch, "nodes": self._on_every_node(lambda link: link.stats())}

    def ping(self) -> dict[str, str]:
        return self._on_every_node(lambda link: link.ping())

    def _on_every_node(self, fn: Callable[[NodeLink], T]) -> dict[str, T]:
        def attempt(pmap: PlacementMap) -> dict[str, T]:
            nodes = sorted(pmap.nodes)
            return dict(zip(nodes, self._on_all(pmap, nodes, fn), strict=True))

        return self._retrying(attempt)

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # -- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        self._pool.shutdown(wait=False)
        self._etcd.close()

    def __repr__(self) -> str:
        return f"<mooncakefs.ClusterStore {self.url} epoch {self.map.epoch}{' closed' if self._closed else ''}>"


def _absent(key: Key) -> bool:
    raise KeyNotFound(key)


def _value(result: Any) -> Any:
    """A batch result as a single call's: the value, or its exception raised."""
    if isinstance(result, BaseException):
        raise result
    return result
