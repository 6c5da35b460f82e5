"""A node's part in the cluster: stay a member, follow the placement map, maybe be the controller,
fence itself when cut off, and repair what the map says it should share.

- **Controller.**  Every node is a candidate; the one that creates ``<cluster>/controller`` under its
  membership lease is the controller until that lease ends.  It compares the members in etcd with the
  map's whenever they change and, when they differ, writes a new map with the next epoch in a
  transaction that also checks it is still the controller and that nobody wrote the map since it read
  it.  So at most one map per epoch ever exists.
- **Following.**  Nodes read the map when it changes, and at once whenever a client names a newer epoch
  than theirs.  Requests routed by another epoch are refused (``StaleEpoch``): the client reloads.
- **Watching, not polling.**  Each node watches the member records, the controller key and the map
  (``etcd.Watch``) and takes a step when one changes; it also steps every ``ttl / 3`` whatever happens (a
  safety net), and ``RETRY_S`` after a step that failed (etcd away).  An idle cluster costs etcd one
  small transaction per node every ``ttl / 3``, not a read of every member record twice a second.
- **Fencing.**  A node whose lease etcd has not confirmed for ``2/3 ttl`` refuses writes (``Fenced``):
  by the time the controller could give its groups to others (the lease's ttl), it has stopped
  acknowledging.  Reads of what it holds go on, so with etcd down the cluster still serves.
- **Versions.**  Every value carries the version its writer gave it: the map's epoch, then the writer's
  clock.  Where two copies of a key differ, the higher version is the one to keep.
- **Rejoining.**  A node that comes back after an absence (a restart, a partition long enough to
  lose its lease) may hold values that were overwritten while it was away.  So a map that takes it
  back under a new membership stint is not served at once: the node first asks every other node which
  of its keys they hold in a newer version, and fetches those.  Until then it answers ``Rejoining``.
- **Repair.**  After each map change the node walks its keys: a key whose first R owners lack it, or
  hold an older version, is pushed to them (R is the count its writer asked for; a push never replaces
  a newer version), and a key the node no longer owns is removed once its owners hold it.  A pass
  that fails is retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from mooncakefs import _engine
from mooncakefs.cluster import etcd
from mooncakefs.cluster.client import NodeLink
from mooncakefs.cluster.membership import Membership, cluster_prefix, nodes_prefix
from mooncakefs.cluster.placement import DEFAULT_GROUPS, DEFAULT_WIDTH, PlacementMap, pointer_key
from mooncakefs.errors import (
    ChecksumError,
    Fenced,
    KeyNotFound,
    MooncakeError,
    NotNewer,
    Rejoining,
    StaleEpoch,
    Unavailable,
)
from mooncakefs.keys import wire_key
from mooncakefs.progress import progress
from mooncakefs.store import Store
from mooncakefs.wire import LOCAL, REPLICAS_SHIFT

log = logging.getLogger("mooncakefs.cluster")

RETRY_S = 0.5  # after a step that failed (etcd out of reach)
REPAIR_RETRY_S = 2.0
REPAIR_BATCH = 512


class NodeAgent:
    """Run alongside a ``Node``: ``start()`` after the node listens, ``stop()`` before it stops."""

    def __init__(
        self,
        store: Store,
        etcd_url: str,
        cluster: str,
        ident: str,
        record: dict[str, Any],
        *,
        ttl: int = 10,
        groups: int = DEFAULT_GROUPS,
        width: int = DEFAULT_WIDTH,
        secret: bytes | None = None,
    ) -> None:
        self.store = store
        self.ident = ident
        self.ttl = ttl
        self.groups, self.width = groups, width
        self.secret = secret
        self.member = Membership(etcd_url, cluster, ident, record, ttl=ttl)
        prefix = cluster_prefix(cluster)
        self.nodes_prefix = nodes_prefix(cluster)
        self.controller_key, self.map_key = prefix + "controller", prefix + "placement"
        self.map: PlacementMap | None = None  # the map this node serves by
        self._map_revision = 0  # etcd's mod revision of the newest map read: it is fetched again only when it moves
        self._joining: PlacementMap | None = None  # a newer map that takes this node back, served once caught up
        self._stint: int | None = None  # this node's membership stint in the map it serves by
        self.is_controller = False
        self._links: dict[str, NodeLink] = {}
        self._map_lock = threading.Lock()
        self._stop = threading.Event()
        self._repair_due = threading.Event()
        self._poke = threading.Event()  # something the controller or a follower acts on changed in etcd
        self._watches: list[etcd.Watch] = []
        self._threads: list[threading.Thread] = []
        self.repairs = 0  # values pushed to another node by repair
        self.pulls = 0  # newer values fetched from another node on rejoining
        self.repair_passes = 0

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        self.member.start()
        self.etcd = self.member.client
        self._watches = [  # from now: the first step below reads what came before
            self.etcd.watch(key, self._changed, prefix=prefix, on_compacted=self._changed_while_away)
            for key, prefix in ((self.nodes_prefix, True), (self.controller_key, False), (self.map_key, False))
        ]
        with contextlib.suppress(Exception):
            self._step()
        for target, name in ((self._follow, "mooncakefs-follow"), (self._repair_loop, "mooncakefs-repair")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._repair_due.set()
        self._poke.set()
        for watch in self._watches:
            watch.close()
        for t in self._threads:
            t.join(timeout=10)
        if self.is_controller:
            with contextlib.suppress(Exception):
                self.etcd.txn([etcd.value(self.controller_key) == self.ident], [etcd.delete_op(self.controller_key)])
        self.member.stop()
        for link in self._links.values():
            link.close()

    # -- the epoch a request names ------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.map.epoch if self.map is not None else 0

    @property
    def fenced(self) -> bool:
        return time.monotonic() - self.member.confirmed > self.ttl * 2 / 3

    @property
    def rejoining(self) -> bool:
        return self._joining is not None

    @property
    def latest(self) -> PlacementMap | None:
        """The newest map read: the one being joined, else the one served."""
        return self._joining or self.map

    def check(self, epoch: int, write: bool) -> None:
        """Refuse a request routed by another epoch, or a write while cut off from etcd, or anything
        routed by a map this node is still catching up to."""
        joining = self._joining
        if joining is not None and epoch >= joining.epoch:
            raise Rejoining(
                f"node {self.ident} is back in the cluster and checking what it holds against the "
                "other nodes: retry shortly"
            )
        if epoch != self.epoch:
            raise StaleEpoch(
                f"node {self.ident} is at placement epoch {self.epoch}, the request at {epoch}: "
                "reload the placement map"
            )
        if write and self.fenced:
            raise Fenced(
                f"node {self.ident} has not reached etcd for "
                f"{time.monotonic() - self.member.confirmed:.1f} s: it refuses writes until it does"
            )

    def catch_up(self, epoch: int) -> None:
        """A client has seen a newer map than ours: read it now rather than at the next poll."""
        latest = self.latest
        if latest is None or epoch > latest.epoch:
            with contextlib.suppress(Exception):
                self._read_map()

    def pointer(self, raw: bytes) -> str | None:
        """The node holding a value put elsewhere with placement="local", if this node was told."""
        try:
            return self.store.get(pointer_key(raw)).decode()
        except KeyNotFound:
            return None

    # -- following the map, and controlling it -------------------------------------------------------

    def _changed(self, events: list[etcd.Event]) -> None:
        self._poke.set()

    def _changed_while_away(self, compact_revision: int) -> int:
        """A watch missed changes etcd no longer keeps: step anyway, and watch on from now."""
        self._poke.set()
        return self.etcd.status()

    def _follow(self) -> None:
        wait = self.ttl / 3
        while True:
            self._poke.wait(wait)
            self._poke.clear()  # before the step: a change during it makes another
            if self._stop.is_set():
                return
            try:
                self._step()
                wait = self.ttl / 3
            except Exception as exc:  # etcd down: fencing takes over; try again soon
                log.warning("cannot reach etcd", extra={"why": str(exc)[:200]})
                wait = RETRY_S

    def _step(self) -> None:
        """One round: read the controller, and the map only if it changed (one request); stand for
        controller if nobody is; as controller, bring the map in step with membership."""
        get_controller = etcd.get_op(self.controller_key)
        answer = self.etcd.txn(
            [etcd.mod(self.map_key) == self._map_revision],
            [get_controller],
            [get_controller, etcd.get_op(self.map_key)],
        )
        ctrl = answer.responses[0]
        if not answer.succeeded and answer.responses[1]:
            placement = answer.responses[1][0]
            self._adopt(PlacementMap.from_json(placement.value), placement.mod_revision)
        if not ctrl:
            won = self.etcd.txn(
                [etcd.version(self.controller_key) == 0],
                [etcd.put_op(self.controller_key, self.ident, lease=self.member.lease)],
            ).succeeded
            if won:
                log.info("controller", extra={"node": self.ident})
            self.is_controller = won
        else:
            self.is_controller = ctrl[0].value.decode() == self.ident
        if self.is_controller:
            self._control()

    def _read_map(self) -> None:
        kv = self.etcd.get(self.map_key)
        if kv is not None:
            self._adopt(PlacementMap.from_json(kv.value), kv.mod_revision)

    def _adopt(self, new: PlacementMap, revision: int) -> None:
        """Serve by a newer map; or, if it takes this node back under a new stint, catch up first."""
        with self._map_lock:
            latest = self.latest
            if latest is not None and new.epoch <= latest.epoch:
                return
            self._map_revision = revision
            mine = new.nodes.get(self.ident)
            if mine is not None and mine.get("stint") != self._stint and len(self.store):
                self._joining = new
                log.info("rejoining", extra={"epoch": new.epoch})
                self._repair_due.set()  # the repair thread catches up (_rejoin), then serves it
                return
            self._joining = None
            self._serve(new)

    def _serve(self, new: PlacementMap) -> None:
        self.map = new
        if (mine := new.nodes.get(self.ident)) is not None:
            self._stint = mine.get("stint")
        log.info("placement", extra={"epoch": new.epoch, "nodes": len(new.nodes)})
        for link in self._links.values():
            link.epoch = new.epoch
        self._repair_due.set()

    def _control(self) -> None:
        nodes = {}
        for kv in self.etcd.get_prefix(self.nodes_prefix):
            record = json.loads(kv.value)
            nodes[record["id"]] = record
        current = self.latest
        if current is not None and current.nodes == nodes:
            return
        epoch = current.epoch + 1 if current is not None else 1
        groups, width = (current.groups, current.width) if current is not None else (self.groups, self.width)
        new = PlacementMap.compute(epoch, nodes, groups=groups, width=width)
        written = self.etcd.txn(
            [etcd.value(self.controller_key) == self.ident, etcd.mod(self.map_key) == self._map_revision],
            [etcd.put_op(self.map_key, new.to_json())],
        )
        if written.succeeded:
            log.info("placement written", extra={"epoch": epoch, "nodes": sorted(nodes)})
            self._adopt(new, written.revision)

    # -- repair ---------------------------------------------------------------------------------------

    def _link(self, node: str, pmap: PlacementMap) -> NodeLink:
        link = self._links.get(node)
        if link is None or link.closed:
            record = pmap.nodes[node]
            link = NodeLink(record, epoch=pmap.epoch, secret=self.secret, timeout=max(2.0, self.ttl / 2))
            self._links[node] = link
        return link

    def _repair_loop(self) -> None:
        while not self._stop.is_set():
            self._repair_due.wait()
            if self._stop.is_set():
                return
            self._repair_due.clear()
            try:
                if self._joining is not None:
                    self._rejoin(self._joining)
                    if self._joining is not None:
                        continue  # a newer map came meanwhile
                pmap = self.map
                if pmap is None or self.ident not in pmap.nodes:
                    continue  # a map from before this node (re)joined: it would hand everything away
                self.repair(pmap)
            except (MooncakeError, OSError) as exc:
                log.warning("repair incomplete, retrying", extra={"why": str(exc)[:200]})
                self._stop.wait(REPAIR_RETRY_S)
                self._repair_due.set()

    def _rejoin(self, pmap: PlacementMap) -> None:
        """Catch up before serving a map that takes this node back: any key another node of ``pmap``
        holds in a newer version than ours is fetched from it.  Nodes that cannot be reached are
        skipped (they catch up in turn when they come back)."""
        held = self.store.raw_index()
        raws = list(held)
        for node in sorted(pmap.nodes):
            if node == self.ident or not raws:
                continue
            try:
                # No epoch named: the other node answers even if it is catching up itself.
                with NodeLink(pmap.nodes[node], epoch=None, secret=self.secret, timeout=max(2.0, self.ttl / 2)) as link:
                    for raw, theirs in _versions_at(link, raws):
                        version, tag = held[raw]
                        if theirs is not None and theirs > version:
                            self._pull(link, raw, theirs, tag)
                            held[raw] = theirs, tag
            except Unavailable as exc:
                log.warning("rejoining without a node", extra={"node": node, "why": str(exc)[:200]})
        with self._map_lock:
            if self._joining is not pmap:
                self._repair_due.set()  # a newer map came meanwhile: catch up to it in turn
                return
            self._joining = None
            self._serve(pmap)

    def _pull(self, link: NodeLink, raw: bytes, version: int, tag: int) -> None:
        """Replace our copy of a key with another node's newer one (placed as ours was)."""
        key = wire_key(raw)
        try:
            try:
                value = link.get(key)  # checked against the CRC the other node keeps with it
            except ChecksumError:
                value = link.get(key)  # corrupted in transit: once more (a bad copy there fails again)
            self.store.put(key, value, version=version, if_newer=True, tag=tag)
        except (NotNewer, KeyNotFound):
            return  # a newer value arrived here, or it was removed there, meanwhile: repair settles it
        except MooncakeError as exc:  # no room for the newer value: ours must not be served instead
            if isinstance(exc, Unavailable):
                raise
            log.warning("dropping an out-of-date value", extra={"key": repr(raw)[:100], "why": str(exc)[:200]})
            self.store.remove(key)
            return
        self.pulls += 1

    def repair(self, pmap: PlacementMap) -> None:
        """Give each key this node holds its R owners under ``pmap``; drop the ones it no longer owns."""
        held = self.store.raw_index()
        wanted: dict[str, list[bytes]] = defaultdict(list)
        leaving: list[bytes] = []
        for raw, (_version, tag) in held.items():
            if tag & LOCAL:
                continue  # placement="local": it lives and dies with this host
            owners = pmap.owners(raw)[: tag >> REPLICAS_SHIFT or 1]
            for node in owners:
                if node != self.ident:
                    wanted[node].append(raw)
            if self.ident not in owners:
                leaving.append(raw)
        checked: set[bytes] = set()
        behind: set[bytes] = set()  # an owner may still lack these: not ours to drop yet
        started, pushed_before, dropped = time.monotonic(), self.repairs, 0
        with progress(sum(map(len, wanted.values())), f"repair (epoch {pmap.epoch})") as advance:
            for node, raws in wanted.items():
                if self.map is not pmap:
                    raise StaleEpoch("the map changed during repair")
                link = self._link(node, pmap)
                for raw, theirs in _versions_at(link, raws):
                    if (theirs is None or theirs < held[raw][0]) and not self._push(link, raw, held[raw][1]):
                        behind.add(raw)
                    checked.add(raw)
                    advance(1)
        for raw in leaving:
            if raw in checked and raw not in behind and self.map is pmap:
                self.store.remove(wire_key(raw))
                dropped += 1
        self.repair_passes += 1
        # The bar is drawn only on a terminal and is gone once done: the log keeps what the pass did
        # (in the message for text logs, as fields for JSON ones).
        summary = {
            "epoch": pmap.epoch,
            "keys": len(held),
            "checked": len(checked),
            "pushed": self.repairs - pushed_before,
            "dropped": dropped,
            "behind": len(behind),
            "seconds": round(time.monotonic() - started, 3),
        }
        log.info(
            "repair pass (epoch %(epoch)d): %(keys)d keys held, %(checked)d checked with their owners, "
            "%(pushed)d pushed, %(dropped)d dropped, %(behind)d still behind, in %(seconds).1f s",
            summary,
            extra=summary,
        )

    def _push(self, link: NodeLink, raw: bytes, tag: int) -> bool:
        """Copy one value (placed as ``tag`` says) to another node unless it holds a newer one; False
        if it went away here.  The copy travels with the CRC-32C kept with the value here, so the other
        node refuses bytes corrupted on the way or in this node's memory; a value that fails its own
        CRC here is dropped, never copied (ChecksumError, corrupted on the way, fails the pass, which
        is retried)."""
        key = wire_key(raw)
        try:
            view = self.store.view(key)
            with view as data:
                crc = view.checksum()
                try:
                    link.put(key, data, cluster_flags=tag, version=view.version, if_newer=True, crc=crc)
                except ChecksumError:
                    if _engine.crc32c(data) == crc:
                        raise
                    corrupt = True
                else:
                    corrupt = False
        except KeyNotFound:
            return False
        except NotNewer:
            return True
        if corrupt:
            log.error(
                "dropping a value that fails its CRC-32C check here (corrupted in memory)",
                extra={"key": repr(raw)[:100]},
            )
            self.store.remove(key)
            return False
        self.repairs += 1
        return True


def _versions_at(link: NodeLink, raws: list[bytes]) -> Iterator[tuple[bytes, int | None]]:
    """Each key with its version on the node behind ``link`` (None: absent), asked REPAIR_BATCH keys a
    request."""
    for i in range(0, len(raws), REPAIR_BATCH):
        chunk = raws[i : i + REPAIR_BATCH]
        yield from zip(chunk, link.versions(map(wire_key, chunk)), strict=True)
