"""Readers of a cluster mount as a swarm: each host's node keeps the chunks its mount fetched and serves
them to the other readers, so N hosts copying one file do not all pull it from the writer's nodes.

Per file and per reading mount one record in etcd, under the mount's lease (a dead reader's record goes
with it), ``fs/p2p/<ino>/<mount>``: ``{"node", "gen", "have", "reading", "from"}``, written when the mount
starts reading the file, when what it holds has grown by a tenth (at least 8 chunks, at most once a
second), and when it closes the file; never per chunk.  A reader learns the others' records from an etcd
watch of the file's prefix (``mooncakefs.cluster.etcd.Mirror``: one read, then each record as it is
written), not by reading them again every second; a full read every 30 s is only a safety net.
A chunk's source is chosen in this order:

1. this host's node: an owner of the chunk (read as any other read), or a copy kept earlier;
2. the readers whose record says they hold it, readers whose node owns a replica, and (where some reader
   holds it, while all readers together have taken less than one copy of the file from them) the
   chunk's replicas themselves: the one with the fewest requests of this mount in flight first, a
   reader before a replica at equal load, then by a hash of (file, chunk, node, this node), so every
   uplink, the writer's included, stays busy and readers that want the same chunk ask different
   holders (``rank_sources``);
3. the chunk's *seed*: of the readers reading this version of the file now, the one a rendezvous hash
   picks.  The seed fetches the chunk from its replicas (its prefetcher runs ahead of its reader), and
   every other reader waits a little for it there: so the replicas' hosts send about one copy of the
   file however many readers there are;
4. the replicas, through the cluster client's routing (and its failover).

A file's prefetchers fetch the chunks this reader seeds first, then the rarest of their window (the
fewest readers hold it), so that what the replicas send is what the readers can trade (``rarest_first``).

Every copy taken from another reader is checked against the CRC-32C the file's writer published with
the file (``sums`` in its inode): a bad copy is dropped and its node not asked again for that file; a
stale one (the file was overwritten) cannot match, and its key names the CRC too.  A node that fails
(killed, cut off) is skipped for a second, and the next source asked: it costs time, not data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from mooncakefs._engine import crc32c
from mooncakefs.cluster.client import placement_flags
from mooncakefs.cluster.etcd import KV, Mirror
from mooncakefs.errors import ChecksumError, KeyNotFound, MooncakeError, StaleEpoch, Unavailable
from mooncakefs.keys import CachedKey, InternalKey, encode_key
from mooncakefs.ranges import in_ranges, to_ranges

if TYPE_CHECKING:
    from mooncakefs.cluster.client import ClusterStore

log = logging.getLogger("mooncakefs.p2p")
T = TypeVar("T")

SEED_WAIT_S = 8.0  # how long a reader waits for a chunk's seed to have it before asking the replicas
POLL_S = 0.02  # between asking a seed again
PEERS_RESYNC_S = 30.0  # a full read of a file's reader records besides the watch's changes (a safety net)
ANNOUNCE_MIN_S = 1.0  # between two records of one file by one mount (except the last)
ANNOUNCE_MIN_CHUNKS = 8  # ... and what must have been added since the last one (or a tenth of it)
AHEAD = 16  # chunks a file's prefetchers fetch ahead of its reader
PREFETCHERS = 3  # threads per file being read
HEDGE_FACTOR = 3.0  # a fetch the reader waits on is overdue after this many times a typical fetch of the file
HEDGE_MIN_S = 0.5  # ... and never before this (nor, with no fetch done yet, before HEDGE_FIRST_S)
HEDGE_FIRST_S = 1.0
HEDGE_SAMPLES = 16  # recent fetch times a file's typical one is the median of
RECORD_SOURCES = 8  # sources a reader's record names (the rest summed)
TRACE_ENV = "MOONCAKEFS_P2P_TRACE"  # a folder: each mount writes there a line per chunk fetched or waited for


class Trace:
    """Per-chunk timeline of one mount (off unless MOONCAKEFS_P2P_TRACE names a folder): when each fetch
    started and ended, from which source, and how long the reader itself waited on a chunk; for finding
    where a distribution's time goes (``tools/bench/p2p_timeline.py`` reads it)."""

    def __init__(self, node: str) -> None:
        folder = os.environ.get(TRACE_ENV)
        path = os.path.join(folder, f"{node}-{os.getpid()}.jsonl") if folder else None
        self.out = open(path, "a") if path else None  # noqa: SIM115 (open for the mount's life)
        self.lock = threading.Lock()

    def __call__(self, event: str, **fields: object) -> None:
        if self.out is None:
            return
        line = json.dumps({"ev": event, "t": time.time(), "thread": threading.current_thread().name, **fields})
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()


def cache_key(ino: int, idx: int, crc: int) -> CachedKey:
    """Where a reader's node keeps its copy of a chunk: named by the chunk's CRC, so a copy of an older
    version of the file is a different key (and never mistaken for the current one)."""
    return CachedKey(b"p2p/c/" + ino.to_bytes(8, "big") + idx.to_bytes(8, "big") + crc.to_bytes(4, "big"))


def chunk_name(ino: int, idx: int) -> InternalKey:
    """The chunk's own key (as ``mooncakefs.fuse.filesystem.chunk_key``)."""
    return InternalKey(b"fs/" + ino.to_bytes(8, "big") + idx.to_bytes(8, "big"))


def score(*parts: object) -> int:
    """Rendezvous hashing: every reader ranks the candidates for a chunk the same way."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def top_sources(sources: dict[str, int], keep: int = RECORD_SOURCES) -> dict[str, int]:
    """The ``keep`` sources that gave the most bytes, the rest summed as "others": a record stays small
    however many readers a reader took chunks from (every record change goes to every reader)."""
    ranked = sorted(sources.items(), key=lambda item: -item[1])
    out = dict(ranked[:keep])
    if len(ranked) > keep:
        out["others"] = sum(n for _, n in ranked[keep:])
    return out


def rank_sources(
    candidates: Iterable[str],
    inflight: Mapping[str, int],
    tiebreak: Callable[[str], int],
    down: Callable[[str], bool],
    replicas: Container[str] = (),
) -> list[str]:
    """The candidates for one chunk, best first: nodes up before nodes marked down, then the fewest of
    this mount's requests in flight to the node (a busy uplink makes a slow source, and a hash alone sends
    every reader of a chunk to the same one), then readers before ``replicas`` (nodes that are not
    reading: they take the load the readers' uplinks cannot), then the highest ``tiebreak`` (a hash that
    differs per chunk and per reader, so equal candidates share the load)."""
    return sorted(candidates, key=lambda n: (down(n), inflight.get(n, 0), n in replicas, -tiebreak(n)))


def rarest_first(todo: Iterable[int], holders: Callable[[int], int]) -> list[int]:
    """Chunks to fetch, the rarest among the other readers first (BitTorrent's rarest first: the replicas'
    and holders' uplinks then carry what few others can serve, so every reader soon has something to
    trade); chunks nobody holds yet last (they come from their seed); ties in file order."""
    counted = [(holders(i), pos, i) for pos, i in enumerate(todo)]
    return [i for n, _, i in sorted(counted, key=lambda c: (c[0] == 0, c[0], c[1]))]


class _Opened:
    """A context manager over bytes the mount holds itself (a copy it could not keep in its node)."""

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class Pending:
    """A chunk being fetched: ``done`` is set by whichever answer comes first, the fetch's own or (if the
    reader waited on it too long) a second holder's; ``data`` holds the bytes where they were not kept in
    this host's node (the second holder's copy is never kept: the first fetch keeps its own)."""

    started: float = field(default_factory=time.monotonic)
    source: str | None = None  # the node asked now (a second request goes elsewhere)
    seeded: bool = False  # ... is the chunk's seed, waited for (then no second request to the replicas)
    data: bytes | None = None
    hedged: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Peer:
    mount: str
    node: str
    have: list[list[int]]
    reading: bool
    took: dict[str, int] = field(default_factory=dict)  # bytes it took from each source (its "from")


@dataclass
class FileState:
    """One file being read through this mount."""

    ino: int
    gen: tuple[int, int]
    sums: dict[int, int]
    chunks: int
    size: int = 0  # the file's bytes (its last chunk may be short)
    have: set[int] = field(default_factory=set)
    inflight: dict[int, Pending] = field(default_factory=dict)
    fetch_s: deque[float] = field(default_factory=lambda: deque(maxlen=HEDGE_SAMPLES))  # recent fetches' times
    pos: int = 0
    peers: list[Peer] = field(default_factory=list)
    mirror: Mirror | None = None  # the file's reader records, kept current by a watch
    peers_stale: bool = True  # the mirror changed since ``peers`` was made from it
    parsed: dict[bytes, tuple[int, Peer | None]] = field(default_factory=dict)  # key -> (its revision, record)
    announced: int = -1
    announced_at: float = 0.0
    bad: set[str] = field(default_factory=set)  # nodes that served a bad copy of this file's chunks
    closed: bool = False
    sources: dict[str, int] = field(default_factory=dict)  # bytes fetched per node (for the record)
    from_replicas: int = 0  # bytes fetched from nodes that are not readers of the file (its replicas)
    # Worked out once, not on every wake of every prefetcher (each costs hashing, and the count of chunks
    # to fetch a pass over every chunk of the file): the chunks' owners and that count under one
    # placement map, each chunk's seed among one set of readers.  Each cache is replaced whole, with
    # what it is valid for, so threads never mix entries of two maps or two sets of readers.
    owners: tuple[object, dict[int, list[str]], list[int]] = (None, {}, [])  # (map, owners, [count])
    seeds: tuple[frozenset[str], dict[int, str]] = (frozenset(), {})
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Condition = field(init=False)
    # Held from making a record to its put: two threads' puts land in the order their records were made,
    # so a prefetcher's "reading" record can never land after the record of the file's close.
    announcing: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.wake = threading.Condition(self.lock)


class Swarm:
    """The fan-out of one cluster mount (``MooncakeFS.swarm``); off with MOONCAKEFS_P2P=off."""

    def __init__(self, store: ClusterStore, namespace: Any, node: str) -> None:
        self.store, self.ns, self.node = store, namespace, node
        self.etcd = namespace.client
        self.prefix = namespace.prefix + "p2p/"
        self.files: dict[int, FileState] = {}
        self.lock = threading.Lock()
        self.inflight: dict[str, int] = {}  # this mount's requests in flight, per node (``rank_sources``)
        self.stopped = False
        self.trace = Trace(node)

    @classmethod
    def for_mount(cls, store: Any, namespace: Any) -> Swarm | None:
        """A swarm for a cluster mount whose host runs a node (where fetched chunks are kept); else None."""
        if os.environ.get("MOONCAKEFS_P2P", "on").lower() in ("0", "off", "no"):
            return None  # (for measuring without it)
        local = getattr(store, "local_node", None)
        node = local() if local is not None and getattr(namespace, "shared", False) else None
        if node is None:
            return None
        log.info("readers of this mount serve what they fetch from node %s", node)
        return cls(store, namespace, node)

    # -- the mount's side ---------------------------------------------------------------------------------

    def open_chunk(self, ino: int, state: Any, idx: int) -> tuple[Any, memoryview] | None:
        """Chunk ``idx`` of an open file, entered as a view; None where the plain read path should serve
        it (this host's node owns it, or its writer published no CRC for it)."""
        crc = state.sums.get(idx)
        if crc is None or self.stopped:
            return None
        if self.node in self._owners(ino, idx):
            return None
        f = self._file(ino, state)
        f.pos = idx
        with f.lock:
            f.wake.notify_all()
        opened = self._local(ino, idx, crc)
        if opened is not None:
            return opened
        waited = time.time()
        data = self._obtain(f, idx, reader=True)
        self.trace("read_wait", ino=ino, idx=idx, t0=waited)
        opened = self._local(ino, idx, crc)
        if opened is not None:
            return opened
        if data is None:
            return None  # no source answered: the plain path (routing, failover) reports what is wrong
        return _Opened(), memoryview(data)

    def closed(self, ino: int, state: Any) -> None:
        """The mount's last handle of the file closed: say what this node holds, stop prefetching."""
        with self.lock:
            f = self.files.pop(ino, None)
        if f is None:
            return
        with f.lock:
            f.closed = True
            f.wake.notify_all()
        self.trace("closed", ino=ino, have=len(f.have), chunks=f.chunks)
        self._announce(f, force=True)
        self._forget(f)

    def close(self) -> None:
        self.stopped = True
        with self.lock:
            files, self.files = list(self.files.values()), {}
        for f in files:
            with f.lock:
                f.closed = True
                f.wake.notify_all()
            self._forget(f)

    @staticmethod
    def _forget(f: FileState) -> None:
        """Stop watching the file's records (without waiting for etcd's answer: the mount's loop calls it)."""
        if f.mirror is not None:
            f.mirror.close(timeout=0)

    # -- files --------------------------------------------------------------------------------------------

    def _file(self, ino: int, state: Any) -> FileState:
        with self.lock:
            f = self.files.get(ino)
            if f is not None and f.gen == tuple(state.gen):
                return f
            old = f
            chunks = -(-state.size // self.ns.chunk_size)
            f = self.files[ino] = FileState(ino, tuple(state.gen), dict(state.sums), chunks, state.size)
        if old is not None:
            old.closed = True
            self._forget(old)
        self.trace("opened", ino=ino, chunks=chunks, wanted=self._wanted(f))
        self._announce(f, force=True)
        f.mirror = Mirror(
            self.etcd, f"{self.prefix}{ino}/", on_change=lambda: self._records_changed(f), resync_s=PEERS_RESYNC_S
        )
        self._refresh(f)
        if chunks > 1:
            for i in range(PREFETCHERS):  # the first fetches only what this reader seeds: never waits on others
                threading.Thread(
                    target=self._prefetch, args=(f, i == 0), daemon=True, name=f"mooncakefs-p2p-{ino}-{i}"
                ).start()
        return f

    def _record_key(self, ino: int) -> str:
        return f"{self.prefix}{ino}/{self.ns.mount_id}"

    def _announce(self, f: FileState, *, force: bool = False) -> None:
        """Publish what this node holds of the file, if it grew enough since the last record."""
        with f.announcing:
            with f.lock:
                count, now = len(f.have), time.monotonic()
                grown = count - max(f.announced, 0)
                enough = grown >= max(ANNOUNCE_MIN_CHUNKS, f.announced // 10) and now - f.announced_at >= ANNOUNCE_MIN_S
                if not force and not enough:
                    return
                f.announced, f.announced_at = count, now
                record = {
                    "node": self.node,
                    "gen": list(f.gen),
                    "have": to_ranges(f.have),
                    "reading": not f.closed,
                    "from": top_sources(f.sources),  # who served this reader how much (`mooncakefs watch`)
                }
            try:
                self.etcd.put(self._record_key(f.ino), json.dumps(record, separators=(",", ":")), lease=self.ns._lease)
            except Exception as exc:  # etcd out of reach: readers fall back to seeds and replicas
                log.warning("cannot announce the chunks held of inode %d: %s", f.ino, exc)

    def _records_changed(self, f: FileState) -> None:
        """The watch saw a reader's record change: the prefetchers look again at what to fetch."""
        f.peers_stale = True
        with f.lock:
            f.wake.notify_all()

    def _refresh(self, f: FileState) -> None:
        """Make ``f.peers`` from the file's reader records as the watch last left them (each record parsed
        once per revision of it)."""
        if f.mirror is None:
            return
        f.mirror.refresh()  # the safety net: a full read when one is due
        if not f.peers_stale:
            return
        f.peers_stale = False
        parsed: dict[bytes, tuple[int, Peer | None]] = {}
        for key, kv in f.mirror.snapshot().items():
            old = f.parsed.get(key)
            parsed[key] = old if old is not None and old[0] == kv.mod_revision else (kv.mod_revision, self._peer(f, kv))
        f.parsed = parsed
        f.peers = [peer for _, peer in parsed.values() if peer is not None]

    def _peer(self, f: FileState, kv: KV) -> Peer | None:
        """Another reader of this version of the file, from its record (None: this mount, another
        version, or a record that does not parse)."""
        try:
            record = json.loads(kv.value)
            mount = kv.key.decode().rsplit("/", 1)[1]
            if mount == self.ns.mount_id or tuple(record["gen"]) != f.gen:
                return None
            took = {str(source): int(n) for source, n in record.get("from", {}).items()}
            return Peer(mount, record["node"], record["have"], bool(record["reading"]), took)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def _owners(self, ino: int, idx: int) -> list[str]:
        return self.store.map.owners(encode_key(chunk_name(ino, idx)))[: self.store.replicas]

    def _owners_cache(self, f: FileState) -> tuple[object, dict[int, list[str]], list[int]]:
        cache = f.owners
        if cache[0] is not self.store.map:
            cache = f.owners = (self.store.map, {}, [])
        return cache

    def _file_owners(self, f: FileState, idx: int) -> list[str]:
        """``_owners`` of one of ``f``'s chunks, kept while the placement map stays the same."""
        pmap, owners, _ = self._owners_cache(f)
        found = owners.get(idx)
        if found is None:
            found = owners[idx] = self._owners(f.ino, idx)
            if pmap is not self.store.map:  # the map changed meanwhile: do not keep it in the old one's cache
                owners.pop(idx, None)
        return found

    # -- where a chunk comes from ---------------------------------------------------------------------------

    def _local(self, ino: int, idx: int, crc: int) -> tuple[Any, memoryview] | None:
        """This node's copy of the chunk, in place in its pool."""
        try:
            view = self.store.link(self.node).view(cache_key(ino, idx, crc))
            return view, view.__enter__()
        except KeyNotFound:
            return None
        except MooncakeError as exc:
            log.warning("this host's node did not answer: %s", exc)
            return None

    def _sources(self, f: FileState, idx: int) -> list[tuple[str, Any, float]]:
        """(node, key, seconds to wait for it there) to try for chunk ``idx``, best first."""
        self._refresh(f)
        crc = f.sums[idx]
        owners = self._file_owners(f, idx)
        usable = [p for p in f.peers if p.node != self.node and p.node not in f.bad]
        readers = {p.node for p in usable}
        holders: dict[str, Any] = {}
        for p in usable:
            if in_ranges(p.have, idx):
                holders.setdefault(p.node, cache_key(f.ino, idx, crc))
        for node in owners:
            if node in readers:
                holders[node] = chunk_name(f.ino, idx)  # a reader whose node holds a replica
        candidates = dict(holders)
        replicas = set()
        if holders and self._replica_budget(f) > 0:
            for node in owners:  # the replicas too (the writer's uplink), while the budget lasts
                if node != self.node and node not in f.bad and node not in holders:
                    candidates[node] = chunk_name(f.ino, idx)
                    replicas.add(node)
        with self.lock:
            inflight = dict(self.inflight)
        ranked = rank_sources(
            candidates, inflight, lambda n: score(f.ino, idx, n, self.node), self.store.is_down, replicas
        )
        out = [(n, candidates[n], 0.0) for n in ranked]
        seed = self._seed(f, idx, usable)
        if seed != self.node and seed not in holders and not self.store.is_down(seed):
            out.append((seed, cache_key(f.ino, idx, crc), SEED_WAIT_S))
        return out

    def _replica_budget(self, f: FileState) -> int:
        """The bytes readers may still take straight from the replicas where a reader holds the chunk too:
        one copy of the file, less what all readers of this version took from nodes that read no copy
        (the records' ``from``, and this reader's own count), so the replicas' hosts send about one copy
        however many readers there are, concurrent or one after another."""
        readers = {p.node for p in f.peers} | {self.node}
        taken = sum(n for p in f.peers for source, n in p.took.items() if source not in readers)
        with f.lock:
            taken += f.from_replicas
        return f.size - taken

    def _seed(self, f: FileState, idx: int, usable: list[Peer]) -> str:
        """The reader that fetches chunk ``idx`` from the replicas for all (rendezvous over the readers
        reading this version now, this one included)."""
        readers = frozenset({p.node for p in usable if p.reading} | {self.node})
        cache = f.seeds
        if cache[0] != readers:
            cache = f.seeds = (readers, {})
        seed = cache[1].get(idx)
        if seed is None:
            seed = cache[1][idx] = max(readers, key=lambda n: score(f.ino, idx, n))
        return seed

    def _obtain(self, f: FileState, idx: int, *, reader: bool = False) -> bytes | None:
        """Chunk ``idx``, fetched once however many threads want it: kept in this node (None: the caller
        views it there) or its bytes.  The ``reader`` (the thread a read waits on) does not fetch itself:
        it waits, and asks a second holder once the fetch is overdue (``_hedge``), so one slow holder or
        lost packet stalls neither the read nor, behind it, the prefetchers' window."""
        with f.lock:
            pending = f.inflight.get(idx)
            mine = pending is None
            if mine:
                pending = f.inflight[idx] = Pending()
        if mine and not reader:
            self._complete(f, idx, pending)
        elif mine:
            threading.Thread(
                target=self._complete, args=(f, idx, pending), daemon=True, name=f"mooncakefs-p2p-{f.ino}-read"
            ).start()
        if reader and not pending.done.wait(self._hedge_after(f, pending)):
            self._hedge(f, idx, pending)
        pending.done.wait()
        return pending.data

    def _complete(self, f: FileState, idx: int, pending: Pending) -> None:
        """Fetch ``pending``'s chunk, then let its waiters go (whatever happened)."""
        try:
            data = self._fetch(f, idx, pending)
            if data is not None and pending.data is None:
                pending.data = data
        finally:
            with f.lock:
                if f.inflight.get(idx) is pending:
                    del f.inflight[idx]
                f.wake.notify_all()
            pending.done.set()

    def _hedge_after(self, f: FileState, pending: Pending) -> float:
        """Seconds from now until ``pending`` is overdue: HEDGE_FACTOR times the median of the file's recent
        fetches (each from its source's first byte asked to its last), counted from when this fetch began;
        at least HEDGE_MIN_S."""
        with f.lock:
            recent = sorted(f.fetch_s)
        typical = HEDGE_FACTOR * recent[len(recent) // 2] if recent else HEDGE_FIRST_S
        return max(typical, HEDGE_MIN_S) - (time.monotonic() - pending.started)

    def _hedge(self, f: FileState, idx: int, pending: Pending) -> None:
        """The end-game request: ask a second holder for an overdue chunk, in another thread, and take
        whichever answer arrives first (the second copy checked against the writer's CRC, as every copy).
        At most one per fetch; no etcd write."""
        with f.lock:
            if pending.hedged or pending.done.is_set():
                return
            pending.hedged = True
        log.info("chunk %d of inode %d is overdue from %s: asking a second holder", idx, f.ino, pending.source)
        threading.Thread(
            target=self._second_copy, args=(f, idx, pending), daemon=True, name=f"mooncakefs-p2p-{f.ino}-hedge"
        ).start()

    def _second_copy(self, f: FileState, idx: int, pending: Pending) -> None:
        """The second request: the sources the fetch would pick now that have the chunk (not a seed that
        may not have it yet), then its replicas, unless the fetch waits on its seed (which is fetching it
        from them: the replicas' hosts send each chunk about once)."""
        crc, slow = f.sums[idx], pending.source
        sources = self._sources(f, idx)
        candidates = [(node, key) for node, key, wait in sources if wait == 0]
        if not pending.seeded:
            owners = [n for n in self._file_owners(f, idx) if n != self.node and n not in f.bad]
            candidates += [(n, chunk_name(f.ino, idx)) for n in owners if all(n != s for s, _, _ in sources)]
        for node, key in candidates:
            if node == slow or pending.done.is_set():
                continue
            started = time.time()
            data = self._pull(f, node, 0.0, lambda link, key=key: link.get(key, crc=crc))
            self.trace("hedge", ino=f.ino, idx=idx, src=node, t0=started, ok=data is not None, slow=slow)
            if data is not None:
                if pending.data is None:
                    pending.data = data
                pending.done.set()
                return

    def _fetch(self, f: FileState, idx: int, pending: Pending) -> bytes | None:
        """Chunk ``idx`` from the first source that has it, checked against the writer's CRC as it arrives
        and received straight into this host's node, where it is kept: None, the caller views it there.
        The bytes themselves only where this host's node could not take them (or the replicas answered
        with another version: the file changed since it was opened here)."""
        crc = f.sums[idx]
        sources = self._sources(f, idx)
        for node, key, wait in sources:
            started = time.time()
            pending.source, pending.seeded = node, wait > 0

            def from_holder(out: memoryview, node: str = node, key: Any = key, wait: float = wait) -> bool:
                return self._pull(f, node, wait, lambda link: link.get_into(key, out, crc=crc)) == len(out)

            kept = self._keep_in_place(f, idx, crc, from_holder)
            if kept is None:  # this host's node cannot take it: the copy itself, not kept
                data = self._pull(f, node, wait, lambda link, key=key: link.get(key, crc=crc))
                kept = data is not None
            else:
                data = None
            self.trace(
                "fetch",
                ino=f.ino,
                idx=idx,
                src=node,
                t0=started,
                ok=bool(kept),
                seed_wait=wait,
                ranked=[s[0] for s in sources],
            )
            if kept:
                self._count(f, node, self._length(f, idx), replica=all(p.node != node for p in f.peers))
                with f.lock:
                    f.fetch_s.append(time.time() - started)
                return data

        def from_replicas(out: memoryview) -> bool:  # by the cluster client's routing
            try:
                return self.store.get_into(chunk_name(f.ino, idx), out) == len(out) and crc32c(out) == crc
            except MooncakeError:
                return False

        started = time.time()
        pending.source, pending.seeded = None, False
        if self._keep_in_place(f, idx, crc, from_replicas):
            self.trace("fetch", ino=f.ino, idx=idx, src="replicas", t0=started, ok=True, seed_wait=0)
            self._count(f, "replicas", self._length(f, idx), replica=True)
            return None
        try:  # not kept (this host's node cannot take it, or a chunk shorter than its place in the file)
            data = self.store.get(chunk_name(f.ino, idx))
        except MooncakeError as exc:
            log.warning("chunk %d of inode %d: %s", idx, f.ino, exc)
            return None
        if crc32c(data) == crc:
            self._count(f, "replicas", len(data), replica=True)
            self._keep(f, idx, crc, data)
        return data  # (one that does not match: the file changed since it was opened here)

    def _length(self, f: FileState, idx: int) -> int:
        """The bytes of chunk ``idx`` (the last one of the file may be short)."""
        return max(min(self.ns.chunk_size, f.size - idx * self.ns.chunk_size), 0)

    @staticmethod
    def _count(f: FileState, source: str, size: int, *, replica: bool = False) -> None:
        with f.lock:  # (the record is made from it on another thread)
            f.sources[source] = f.sources.get(source, 0) + size
            if replica:
                f.from_replicas += size

    def _pull(self, f: FileState, node: str, wait: float, read: Callable[[Any], T]) -> T | None:
        """``read(link to node)``: a value there, waiting up to ``wait`` seconds for it to appear; None if
        it does not, if the node fails, or if the copy is bad or stale (its bytes do not match the
        writer's CRC, which ``read`` checks in the one pass that also checks the wire)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with self._in_flight(node):
                    return read(self.store.link(node))
            except ChecksumError:
                log.warning("node %s served a bad or stale copy of a chunk of inode %d: skipping it", node, f.ino)
                f.bad.add(node)
                return None
            except KeyNotFound:
                if time.monotonic() >= deadline or f.closed or self.stopped:
                    return None
                time.sleep(POLL_S)
            except StaleEpoch:
                return None
            except Unavailable as exc:
                log.info("node %s did not answer (%s): asking another", node, str(exc)[:120])
                self.store.mark_down(node)
                return None
            except MooncakeError as exc:
                log.warning("node %s: %s", node, str(exc)[:200])
                return None

    @contextmanager
    def _in_flight(self, node: str) -> Iterator[None]:
        """Count a request to ``node`` as in flight while it runs (the load ``rank_sources`` weighs)."""
        with self.lock:
            self.inflight[node] = self.inflight.get(node, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.inflight[node] -= 1

    def _keep_in_place(self, f: FileState, idx: int, crc: int, fill: Callable[[memoryview], bool]) -> bool | None:
        """Keep chunk ``idx`` in this host's node, ``fill`` writing it straight into its place in the pool
        (evictable, never repaired): True if kept, False if ``fill`` found no copy, None if this host's
        node could not take it."""
        try:
            kept = self.store.link(self.node).put_in_place(
                cache_key(f.ino, idx, crc), self._length(f, idx), fill, cluster_flags=placement_flags(1, True)
            )
        except MooncakeError as exc:
            log.warning("cannot keep chunk %d of inode %d in this host's node: %s", idx, f.ino, exc)
            return None
        if kept:
            self._held(f, idx)
        return kept

    def _keep(self, f: FileState, idx: int, crc: int, data: bytes) -> None:
        """Keep a copy in this host's node (evictable, never repaired) and count it as held."""
        try:
            self.store.link(self.node).put(cache_key(f.ino, idx, crc), data, local=True)
        except MooncakeError as exc:
            log.warning("cannot keep chunk %d of inode %d in this host's node: %s", idx, f.ino, exc)
            return
        self._held(f, idx)

    def _held(self, f: FileState, idx: int) -> None:
        with f.lock:
            f.have.add(idx)
        self._announce(f)

    # -- prefetching ----------------------------------------------------------------------------------------

    def _prefetch(self, f: FileState, seeds_only: bool) -> None:
        """Fetch ahead of the reader: first the chunks this reader is the seed of (the others wait for
        them), then the rest of the window.  ``seeds_only``: only those (a thread that never waits on
        another reader, so two readers can never both stall waiting for each other's seeds)."""
        while not f.closed and not self.stopped:
            idx = self._next(f, seeds_only)
            if idx is None:
                with f.lock:
                    if f.closed or len(f.have) >= self._wanted(f):
                        return
                    f.wake.wait(0.05)
                continue
            try:
                self._obtain(f, idx)
            except MooncakeError as exc:  # expected (a holder or node away): one line, no traceback
                log.warning("prefetching chunk %d of inode %d: %s", idx, f.ino, exc)
                time.sleep(0.1)
            except Exception:
                log.exception("prefetching chunk %d of inode %d", idx, f.ino)
                time.sleep(0.1)

    def _wanted(self, f: FileState) -> int:
        """How many of the file's chunks this node must fetch (those it owns it reads in place)."""
        count = self._owners_cache(f)[2]
        if not count:
            count.append(sum(1 for i in range(f.chunks) if i in f.sums and self.node not in self._file_owners(f, i)))
        return count[0]

    def _next(self, f: FileState, seeds_only: bool) -> int | None:
        self._refresh(f)
        usable = [p for p in f.peers if p.node != self.node and p.node not in f.bad]
        window = range(f.pos, min(f.pos + (2 * AHEAD if seeds_only else AHEAD), f.chunks))
        with f.lock:
            busy = set(f.have) | set(f.inflight)
        todo = [i for i in window if i in f.sums and i not in busy and self.node not in self._file_owners(f, i)]
        for i in todo:
            if self._seed(f, i, usable) == self.node and not any(in_ranges(p.have, i) for p in usable):
                return i
        if seeds_only or not todo:
            return None
        readers = {p.node for p in usable}
        return rarest_first(todo, lambda i: self._holders(f, i, usable, readers))[0]

    def _holders(self, f: FileState, idx: int, usable: list[Peer], readers: set[str]) -> int:
        """How many other readers can serve chunk ``idx``: those whose record lists it, and those whose
        node owns a replica of it."""
        nodes = {p.node for p in usable if in_ranges(p.have, idx)}
        nodes.update(n for n in self._file_owners(f, idx) if n in readers)
        return len(nodes)

    @staticmethod
    def _sources_of(f: FileState) -> dict[str, int]:
        with f.lock:
            return dict(f.sources)

    def describe(self) -> dict[str, Any]:
        """What this mount is reading and from whom (for the stats file)."""
        with self.lock:
            files = list(self.files.values())
        return {
            str(f.ino): {
                "chunks": f.chunks,
                "have": len(f.have),
                "peers": len(f.peers),
                "bytes_from": self._sources_of(f),
            }
            for f in files
        }
