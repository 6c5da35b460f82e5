"""The filesystem namespace in etcd, shared by every mount of a cluster (``mooncakefs mount etcd://…``).

The same interface as the SQLite ``Namespace``; the keys live under ``/mooncakefs/<cluster>/fs/``::

    settings             {"chunk_size": N}: written by the first mount, kept by every later one
    next-ino             the next unallocated inode number (a mount takes INO_BLOCK at a time)
    i/<ino>              an inode: its attributes, and the ranges of its chunks that were written (JSON)
    d/<parent>/<hex>     a directory entry (the name in hex): the child's inode number
    x/<ino>/<hex>        an extended attribute's value
    orphan/<ino>         an inode with no names left: deleted once no mount has it open
    m/<mount>            a live mount (under the mount's lease)
    o/<ino>/<mount>      mount <mount> has inode <ino> open (under the mount's lease, so a dead mount's go)

Every change is one etcd transaction that compares the mod revisions of everything it read and is
retried on a conflict: two mounts creating one name at once get exactly one winner (EEXIST for the
other), an unlink or rename acts on the entries as they are, a directory is removed only if it is
empty at that revision, and concurrent attribute changes to one inode merge field by field.

File data is not here.  Which chunks a file's writes stored is kept in memory until the file is
flushed (every close), and then published with the file's size and times in one transaction: a mount
that opens the file after that sees both (close-to-open consistency).  Nothing per chunk touches etcd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import random
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from mooncakefs.cluster import etcd
from mooncakefs.cluster.etcd import Compare, Lease
from mooncakefs.cluster.membership import cluster_prefix, connect_etcd
from mooncakefs.errors import EtcdError, Unavailable, errno_of
from mooncakefs.fuse.namespace import ROOT, Inode, count_unlink, fail, may_replace, may_unlink
from mooncakefs.ranges import in_ranges, indexes_in, to_ranges

log = logging.getLogger("mooncakefs.fuse")

T = TypeVar("T")
INO_BLOCK = 1024  # inode numbers a mount takes at a time: one etcd transaction per 1024 creates
GET_BATCH = 100  # reads in one transaction (etcd allows 128 operations in one)
MAX_ATTEMPTS = 100  # of a transaction that keeps conflicting with other mounts' changes
MAX_DEPTH = 4096  # directories followed up from a rename's destination (looking for a loop)
LEASE_TTL = 10  # seconds after which a dead mount's open files count as closed
FIELDS = ("mode", "nlink", "uid", "gid", "rdev", "size", "atime", "mtime", "ctime", "target", "parent")


@dataclass
class EtcdInode(Inode):
    """An inode as read from etcd: also its record's mod revision, its chunk ranges, and (for a
    directory) its parent; ``base`` holds the fields as read, so ``update`` writes only what changed."""

    parent: int = 0
    chunks: list[list[int]] = field(default_factory=list)  # [start, end) ranges of written chunks
    sums: dict[int, int] = field(default_factory=dict)  # chunk index -> CRC-32C its writer published
    rev: int = 0
    base: dict[str, Any] = field(default_factory=dict, repr=False)

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def encode(self) -> bytes:
        record = self.fields()
        record["target"] = None if self.target is None else self.target.hex()
        record["chunks"] = self.chunks
        if self.sums:
            record["sums"] = encode_sums(self.sums)
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, ino: int, value: bytes, rev: int) -> EtcdInode:
        record = json.loads(value)
        target = record.get("target")
        node = cls(
            ino,
            record["mode"],
            record["nlink"],
            record["uid"],
            record["gid"],
            record["rdev"],
            record["size"],
            record["atime"],
            record["mtime"],
            record["ctime"],
            None if target is None else bytes.fromhex(target),
            parent=record.get("parent", 0),
            chunks=record.get("chunks", []),
            sums=decode_sums(record.get("sums", "")),
            rev=rev,
        )
        node.base = node.fields()
        return node

    def copy(self) -> EtcdInode:
        return dataclasses.replace(
            self, chunks=[list(r) for r in self.chunks], sums=dict(self.sums), base=dict(self.base)
        )


def encode_sums(sums: dict[int, int]) -> str:
    """Chunk CRC-32Cs as one hex string, 8 digits per chunk index from 0 ("-" * 8 where none is known):
    4.4 bytes of etcd per MiB of file at 4 MiB chunks."""
    if not sums:
        return ""
    return "".join(f"{sums[i]:08x}" if i in sums else "--------" for i in range(max(sums) + 1))


def decode_sums(text: str) -> dict[int, int]:
    return {i // 8: int(text[i : i + 8], 16) for i in range(0, len(text) - 7, 8) if text[i] != "-"}


# -- chunk ranges --------------------------------------------------------------------------------------


def _merge(ranges: list[list[int]], cut: int | None, added: set[int]) -> list[list[int]]:
    """``ranges`` less every chunk from ``cut`` on, plus ``added``."""
    kept = [
        [start, end] if cut is None else [start, min(end, cut)] for start, end in ranges if cut is None or start < cut
    ]
    if not added:
        return kept
    return to_ranges([*indexes_in(kept), *added])


@dataclass
class _PendingChunks:
    """Chunk changes of one inode not yet published: dropped from ``cut`` on, then ``added``."""

    cut: int | None = None
    added: set[int] = field(default_factory=set)
    sums: dict[int, int] = field(default_factory=dict)  # of the added chunks, where known


def _etcd_errors(method: Callable[..., T]) -> Callable[..., T]:
    """etcd out of reach or refusing: the errors table's errno for the request (ETIMEDOUT for an etcd
    away), logged once, without a traceback."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except EtcdError as exc:
            log.warning("namespace %s: %s", method.__name__, exc)
            raise fail(errno_of(exc)) from None

    return wrapper


class _Change:
    """One transaction being put together: every read adds a comparison (the key is still as read),
    every write an operation; ``commit`` applies them all or, if anything changed, none."""

    def __init__(self, ns: EtcdNamespace) -> None:
        self.ns = ns
        self.compare: dict[tuple[str, str], Compare] = {}
        self.nodes: dict[int, EtcdInode] = {}
        self.dirty: set[int] = set()
        self.ops: dict[str, bytes] = {}  # by key: etcd refuses a transaction that writes a key twice
        self.revision = 0

    def node(self, ino: int) -> EtcdInode:
        """The inode (ENOENT if there is none), guarded: the transaction fails if it changes."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.ns._read(ino)
            key = self.ns._ikey(ino)
            if node is None:
                self.compare[("v", key)] = etcd.version(key) == 0
                raise fail(errno.ENOENT)
            self.adopt(node)
        return node

    def adopt(self, node: EtcdInode) -> None:
        """Use ``node`` as read (its revision) without reading it again."""
        self.nodes[node.ino] = node
        self.compare[("m", self.ns._ikey(node.ino))] = etcd.mod(self.ns._ikey(node.ino)) == node.rev

    def directory(self, ino: int) -> EtcdInode:
        node = self.node(ino)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        if node.nlink == 0:  # removed (by this mount or another) while something still referred to it
            raise fail(errno.ENOENT)
        return node

    def entry(self, parent: int, name: bytes) -> int | None:
        """The inode ``parent/name`` names, or None; guarded."""
        key = self.ns._dkey(parent, name)
        kv = self.ns.client.get(key)
        if kv is None:
            self.compare[("v", key)] = etcd.version(key) == 0
            return None
        self.compare[("m", key)] = etcd.mod(key) == kv.mod_revision
        return int(kv.value)

    def empty(self, directory: int) -> bool:
        """Whether a directory has no entries; guarded (by a comparison over its whole key range)."""
        prefix = self.ns._dprefix(directory)
        if self.ns._count(prefix, limit=1):
            return False
        self.compare[("e", prefix)] = etcd.version(prefix, prefix=True) == 0
        return True

    def new(self, node: EtcdInode) -> None:
        key = self.ns._ikey(node.ino)
        self.compare[("v", key)] = etcd.version(key) == 0
        self.nodes[node.ino] = node
        self.dirty.add(node.ino)

    def write(self, *nodes: EtcdInode) -> None:
        for node in nodes:
            assert self.nodes.get(node.ino) is node
            self.dirty.add(node.ino)

    def put(self, key: str, value: bytes | str, lease: Lease | None = None) -> None:
        self.ops[key] = etcd.put_op(key, value, lease=lease)

    def delete(self, key: str, *, prefix: bool = False) -> None:
        self.ops[key] = etcd.delete_op(key, prefix=prefix)

    def commit(self) -> bool:
        ops = dict(self.ops)
        for ino in self.dirty:
            ops[self.ns._ikey(ino)] = etcd.put_op(self.ns._ikey(ino), self.nodes[ino].encode())
        if not ops:
            return True
        succeeded, self.revision = self.ns._txn(list(self.compare.values()), list(ops.values()))
        if succeeded:
            for ino in self.dirty:
                node = self.nodes[ino]
                node.rev, node.base = self.revision, node.fields()
        return succeeded


class EtcdNamespace:
    """The namespace of a cluster's filesystem, in etcd; one per mount."""

    shared = True  # other mounts change it: the kernel must not cache names, nor attributes for long

    def __init__(self, etcd_url: str, cluster: str, *, chunk_size: int, lease_ttl: int = LEASE_TTL) -> None:
        self.prefix = cluster_prefix(cluster) + "fs/"
        self.cluster = cluster
        self.client = connect_etcd(etcd_url)
        self.mount_id = uuid.uuid4().hex[:12]
        self.lease_ttl = lease_ttl
        self._lease: Lease | None = None
        self._lock = threading.Lock()  # the open markers, also re-put by the lease thread
        self._marked: set[int] = set()  # inodes this mount has an open marker for in etcd
        self._unmark: set[int] = set()  # ... of which no longer open here: the next write of it drops it
        self._pending: dict[int, _PendingChunks] = {}
        self._next_ino = self._ino_end = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.chunk_size = self._settings(chunk_size)
            self._make_root()
            self._grant()
        except EtcdError as exc:
            self.client.close()
            raise Unavailable(f"cannot reach etcd at {etcd_url} for the namespace of {cluster!r}: {exc}") from None
        self._thread = threading.Thread(target=self._keep_alive, name="mooncakefs-fs-lease", daemon=True)
        self._thread.start()

    # -- keys and raw requests -------------------------------------------------------------------------

    def _ikey(self, ino: int) -> str:
        return f"{self.prefix}i/{ino}"

    def _dprefix(self, parent: int) -> str:
        return f"{self.prefix}d/{parent}/"

    def _dkey(self, parent: int, name: bytes) -> str:
        return self._dprefix(parent) + name.hex()

    def _xprefix(self, ino: int) -> str:
        return f"{self.prefix}x/{ino}/"

    def _oprefix(self, ino: int) -> str:
        return f"{self.prefix}o/{ino}/"

    def _orphan_key(self, ino: int) -> str:
        return f"{self.prefix}orphan/{ino}"

    def _count(self, prefix: str, limit: int = 0) -> int:
        if limit:
            return len(self.client.range(prefix, prefix=True, limit=limit, keys_only=True).kvs)
        return self.client.range(prefix, prefix=True, count_only=True).count

    def _txn(self, compare: list[Compare], ops: list[bytes]) -> tuple[bool, int]:
        """(succeeded, the revision it was applied at)."""
        answer = self.client.txn(compare, ops)
        return answer.succeeded, answer.revision

    def _atomically(self, change: Callable[[_Change], T], *, first: EtcdInode | None = None) -> T:
        """Run ``change`` on fresh reads and commit it, again while other mounts' changes get in between."""
        for attempt in range(MAX_ATTEMPTS):
            txn = _Change(self)
            if first is not None and attempt == 0:
                txn.adopt(first)
            result = change(txn)
            if txn.commit():
                return result
            time.sleep(random.uniform(0, min(0.002 * (attempt + 1), 0.05)))
        log.error("namespace: a change conflicted with others %d times in a row: giving up", MAX_ATTEMPTS)
        raise fail(errno.EIO)

    # -- setting up and shutting down -----------------------------------------------------------------

    def _settings(self, chunk_size: int) -> int:
        key = self.prefix + "settings"
        wanted = json.dumps({"chunk_size": chunk_size})
        created, _ = self._txn([etcd.version(key) == 0], [etcd.put_op(key, wanted)])
        if created:
            return chunk_size
        kv = self.client.get(key)
        if kv is None:  # removed between the two requests: the settings are this mount's after all
            return self._settings(chunk_size)
        return int(json.loads(kv.value)["chunk_size"])  # files keep the chunk size they were made with

    def _make_root(self) -> None:
        now = time.time_ns()
        root = EtcdInode(
            ROOT, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0, 0, now, now, now, None, parent=ROOT
        )
        key = self._ikey(ROOT)
        self._txn([etcd.version(key) == 0], [etcd.put_op(key, root.encode())])

    def _grant(self) -> None:
        """A lease for this mount; its record and open markers under it."""
        self._lease = self.client.lease(self.lease_ttl)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.client.put(f"{self.prefix}m/{self.mount_id}", json.dumps(record), lease=self._lease)
        with self._lock:
            marked = list(self._marked)
        for ino in marked:
            self.client.put(self._oprefix(ino) + self.mount_id, b"", lease=self._lease)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.lease_ttl / 3):
            try:
                if self._lease is None or self._lease.refresh() <= 0:  # it expired while etcd was out of reach
                    log.warning("namespace: the mount's lease in etcd expired: taking a new one")
                    self._grant()
            except Exception as exc:
                log.warning("namespace: lease refresh failed: %s", exc)

    def close(self) -> None:
        """Leave: revoking the lease drops this mount's record and open markers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self._lease is not None:
                self._lease.revoke()
        self.client.close()

    def sync(self) -> None:
        """Nothing to do: etcd has every committed change on a quorum's disks."""

    # -- inodes ----------------------------------------------------------------------------------------

    def _read(self, ino: int) -> EtcdInode | None:
        kv = self.client.get(self._ikey(ino))
        return None if kv is None else EtcdInode.decode(ino, kv.value, kv.mod_revision)

    @_etcd_errors
    def get(self, ino: int) -> EtcdInode | None:
        return self._read(ino)

    @_etcd_errors
    def get_many(self, inos: list[int]) -> list[EtcdInode | None]:
        """Several inodes in one request per GET_BATCH (a transaction of reads)."""
        out: list[EtcdInode | None] = []
        for i in range(0, len(inos), GET_BATCH):
            batch = inos[i : i + GET_BATCH]
            answer = self.client.txn([], [etcd.get_op(self._ikey(ino)) for ino in batch])
            for ino, kvs in zip(batch, answer.responses, strict=True):
                out.append(EtcdInode.decode(ino, kvs[0].value, kvs[0].mod_revision) if kvs else None)
        return out

    @_etcd_errors
    def inode(self, ino: int) -> EtcdInode:
        node = self._read(ino)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    @_etcd_errors
    def update(self, node: Inode) -> None:
        """Write the fields the caller changed since it read ``node`` onto the inode as it is now (so
        another mount's concurrent change to other fields stays), with this mount's chunk changes."""
        assert isinstance(node, EtcdInode)
        changed = {name: value for name, value in node.fields().items() if node.base.get(name) != value}
        pending = self._pending.get(node.ino)
        unmark = node.ino in self._unmark
        if not changed and pending is None and not unmark:
            return
        first = node.copy()
        for name, value in node.base.items():
            setattr(first, name, value)  # as read: the changes are applied to it like to a fresh read

        def change(txn: _Change) -> EtcdInode | None:
            try:
                current = txn.node(node.ino)
            except pyfuse3.FUSEError:
                return None  # deleted meanwhile (by another mount): nothing left to update
            for name, value in changed.items():
                setattr(current, name, value)
            if pending is not None:
                current.chunks = _merge(current.chunks, pending.cut, pending.added)
                current.sums = {i: c for i, c in current.sums.items() if pending.cut is None or i < pending.cut}
                for i in pending.added:  # a chunk rewritten without a known sum must not keep the old one
                    current.sums.pop(i, None)
                current.sums.update(pending.sums)
            txn.write(current)
            if unmark:
                txn.delete(self._oprefix(node.ino) + self.mount_id)
            return current

        written = self._atomically(change, first=first)
        if pending is not None and self._pending.get(node.ino) is pending:
            del self._pending[node.ino]
        if unmark:
            self._forget_marker(node.ino)
        if written is not None:
            node.chunks, node.sums, node.rev, node.base = written.chunks, written.sums, written.rev, written.fields()
            for name, value in node.base.items():
                setattr(node, name, value)

    @_etcd_errors
    def lookup(self, parent: int, name: bytes) -> int | None:
        kv = self.client.get(self._dkey(parent, name))
        return None if kv is None else int(kv.value)

    def _new_ino(self) -> int:
        if self._next_ino >= self._ino_end:
            key = self.prefix + "next-ino"

            def take(txn: _Change) -> int:
                kv = self.client.get(key)
                start = int(kv.value) if kv is not None else ROOT + 1
                if kv is None:
                    txn.compare[("v", key)] = etcd.version(key) == 0
                else:
                    txn.compare[("m", key)] = etcd.mod(key) == kv.mod_revision
                txn.put(key, str(start + INO_BLOCK))
                return start

            start = self._atomically(take)
            self._next_ino, self._ino_end = start, start + INO_BLOCK
        ino = self._next_ino
        self._next_ino += 1
        return ino

    @_etcd_errors
    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
        opened: bool = False,
    ) -> EtcdInode:
        """A new inode linked at parent/name (EEXIST if the name is taken, by any mount, even at the same
        moment).  ``opened``: the caller opens it at once (its open marker goes in the same transaction)."""
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        ino = self._new_ino()
        dkey = self._dkey(parent, name)

        def change(txn: _Change) -> EtcdInode:
            parent_node = txn.directory(parent)
            if txn.entry(parent, name) is not None:
                raise fail(errno.EEXIST)
            node = EtcdInode(
                ino,
                mode,
                2 if is_dir else 1,
                uid,
                gid,
                rdev,
                len(target or b""),
                now,
                now,
                now,
                target,
                parent=parent if is_dir else 0,
            )
            txn.new(node)
            txn.put(dkey, str(ino))
            parent_node.mtime = parent_node.ctime = now
            parent_node.nlink += is_dir
            txn.write(parent_node)
            if opened:
                txn.put(self._oprefix(ino) + self.mount_id, b"", lease=self._lease)
            return node

        node = self._atomically(change)
        if opened:
            with self._lock:
                self._marked.add(ino)
        return node

    @_etcd_errors
    def link(self, ino: int, parent: int, name: bytes) -> EtcdInode:
        def change(txn: _Change) -> EtcdInode:
            node = txn.node(ino)
            if node.is_dir:
                raise fail(errno.EPERM)
            if node.nlink == 0:
                raise fail(errno.ENOENT)
            parent_node = txn.directory(parent)
            if txn.entry(parent, name) is not None:
                raise fail(errno.EEXIST)
            txn.put(self._dkey(parent, name), str(ino))
            node.nlink += 1
            node.ctime = parent_node.mtime = parent_node.ctime = time.time_ns()
            txn.write(node, parent_node)
            return node

        return self._atomically(change)

    @_etcd_errors
    def unlink(self, parent: int, name: bytes, *, rmdir: bool) -> EtcdInode:
        """Remove a directory entry; returns the inode with its new link count (0: no names left)."""

        def change(txn: _Change) -> EtcdInode:
            txn.directory(parent)
            ino = txn.entry(parent, name)
            if ino is None:
                raise fail(errno.ENOENT)
            node = txn.node(ino)
            may_unlink(node, rmdir, txn.empty)
            self._drop_entry(txn, parent, name, node)
            return node

        return self._atomically(change)

    def _drop_entry(self, txn: _Change, parent: int, name: bytes, node: EtcdInode) -> None:
        txn.delete(self._dkey(parent, name))
        parent_node = txn.node(parent)
        count_unlink(parent_node, node)
        txn.write(parent_node, node)
        if node.nlink == 0:
            txn.put(self._orphan_key(node.ino), b"")

    @_etcd_errors
    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> EtcdInode | None:
        """Move an entry; returns the inode a plain rename replaced (its link count already dropped)."""

        def change(txn: _Change) -> EtcdInode | None:
            txn.directory(old_parent)
            ino = txn.entry(old_parent, old_name)
            if ino is None:
                raise fail(errno.ENOENT)
            txn.directory(new_parent)
            node = txn.node(ino)
            target_ino = txn.entry(new_parent, new_name)
            target = txn.node(target_ino) if target_ino is not None else None
            moved = old_parent != new_parent
            if flags & pyfuse3.RENAME_EXCHANGE:
                if target is None:
                    raise fail(errno.ENOENT)
                if target.ino == node.ino:
                    return None
                if moved and node.is_dir:
                    self._check_not_below(txn, node.ino, new_parent)
                    node.parent = new_parent
                if moved and target.is_dir:
                    self._check_not_below(txn, target.ino, old_parent)
                    target.parent = old_parent
                txn.put(self._dkey(old_parent, old_name), str(target.ino))
                txn.put(self._dkey(new_parent, new_name), str(node.ino))
                if node.is_dir != target.is_dir and moved:
                    moved_dir = 1 if node.is_dir else -1
                    txn.node(old_parent).nlink -= moved_dir
                    txn.node(new_parent).nlink += moved_dir
                self._touch(txn, old_parent, new_parent, node, target)
                return None
            if target is not None and not may_replace(node, target, flags, txn.empty):
                return None
            if node.is_dir and moved:
                self._check_not_below(txn, node.ino, new_parent)
            if target is not None:
                self._drop_entry(txn, new_parent, new_name, target)
            txn.delete(self._dkey(old_parent, old_name))
            txn.put(self._dkey(new_parent, new_name), str(node.ino))
            if node.is_dir and moved:
                node.parent = new_parent
                txn.node(old_parent).nlink -= 1
                txn.node(new_parent).nlink += 1
            self._touch(txn, old_parent, new_parent, node)
            return target

        return self._atomically(change)

    @staticmethod
    def _check_not_below(txn: _Change, directory: int, new_parent: int) -> None:
        """EINVAL if ``new_parent`` is ``directory`` or inside it (the move would cut a loop off the tree).
        The kernel checks this against its own cache; here it is checked against every mount's moves,
        the ancestors guarded so that a concurrent move of one of them makes the transaction retry."""
        ino = new_parent
        for _ in range(MAX_DEPTH):
            if ino == directory:
                raise fail(errno.EINVAL)
            if ino == ROOT:
                return
            ino = txn.node(ino).parent or ROOT
        raise fail(errno.ELOOP)

    @staticmethod
    def _touch(txn: _Change, old_parent: int, new_parent: int, *nodes: EtcdInode) -> None:
        now = time.time_ns()
        for parent in {old_parent, new_parent}:
            parent_node = txn.node(parent)
            parent_node.mtime = parent_node.ctime = now
            txn.write(parent_node)
        for node in nodes:
            node.ctime = now
            txn.write(node)

    @_etcd_errors
    def remove_inode(self, ino: int) -> list[int]:
        """Delete an inode that has no names and that no mount has open; returns its chunk indexes
        (none, and nothing is deleted, while another mount has it open: that one deletes it)."""
        pending = self._pending.pop(ino, None)
        if ino in self._marked:
            self.client.delete(self._oprefix(ino) + self.mount_id)
            self._forget_marker(ino)

        def change(txn: _Change) -> list[int]:
            try:
                node = txn.node(ino)
            except pyfuse3.FUSEError:
                txn.delete(self._orphan_key(ino))
                return []
            if node.nlink > 0:  # linked again meanwhile: not an orphan after all
                txn.delete(self._orphan_key(ino))
                return []
            prefix = self._oprefix(ino)
            if self._count(prefix, limit=1):
                return []
            txn.compare[("e", prefix)] = etcd.version(prefix, prefix=True) == 0
            txn.delete(self._ikey(ino))
            txn.delete(self._xprefix(ino), prefix=True)
            txn.delete(self._orphan_key(ino))
            return list(indexes_in(node.chunks))

        chunks = self._atomically(change)
        if pending is not None:
            chunks = sorted(set(chunks) | pending.added)
        return chunks

    @_etcd_errors
    def orphans(self) -> list[int]:
        """Inodes left with no names that no live mount has open (their last user ended)."""
        prefix = self.prefix + "orphan/"
        found = [int(kv.key[len(prefix) :]) for kv in self.client.range(prefix, prefix=True, keys_only=True).kvs]
        return [ino for ino in found if not self._count(self._oprefix(ino), limit=1)]

    # -- open files ------------------------------------------------------------------------------------

    @_etcd_errors
    def opened(self, ino: int) -> None:
        """This mount opened ``ino``: while it has it open, no other mount deletes it (unlinked or not)."""
        with self._lock:
            self._unmark.discard(ino)
            if ino in self._marked:
                return
        self.client.put(self._oprefix(ino) + self.mount_id, b"", lease=self._lease)
        with self._lock:
            self._marked.add(ino)

    def closing(self, ino: int) -> None:
        """This mount's last handle of ``ino`` is being closed: the flush that follows drops its marker."""
        with self._lock:
            if ino in self._marked:
                self._unmark.add(ino)

    @_etcd_errors
    def closed(self, ino: int) -> None:
        """Closed: drop the open marker if no update did."""
        if ino in self._unmark:
            self.client.delete(self._oprefix(ino) + self.mount_id)
            self._forget_marker(ino)

    def _forget_marker(self, ino: int) -> None:
        with self._lock:
            self._marked.discard(ino)
            self._unmark.discard(ino)

    # -- directories -----------------------------------------------------------------------------------

    @_etcd_errors
    def entries(self, parent: int, after: int, limit: int = 1024) -> list[tuple[int, bytes, int]]:
        """(cookie, name, ino) of a directory's entries after cookie ``after``, in a stable order: the
        cookie is the entry's creation revision in etcd."""
        prefix = self._dprefix(parent)
        response = self.client.range(prefix, prefix=True, limit=limit, by_creation=True, min_create_revision=after + 1)
        start = len(prefix.encode())
        return [(kv.create_revision, bytes.fromhex(kv.key[start:].decode()), int(kv.value)) for kv in response.kvs]

    # -- chunks ----------------------------------------------------------------------------------------

    @_etcd_errors
    def has_chunk(self, ino: int, idx: int) -> bool:
        pending = self._pending.get(ino)
        if pending is not None:
            if idx in pending.added:
                return True
            if pending.cut is not None and idx >= pending.cut:
                return False
        node = self._read(ino)
        return node is not None and in_ranges(node.chunks, idx)

    def add_chunks(self, ino: int, indexes: list[int], sums: dict[int, int] | None = None) -> None:
        """Record stored chunks (and their CRC-32Cs): published with the file's size by its next
        ``update`` (its flush)."""
        pending = self._pending.setdefault(ino, _PendingChunks())
        pending.added.update(indexes)
        for i in indexes:
            pending.sums.pop(i, None)
        pending.sums.update(sums or {})

    @_etcd_errors
    def drop_chunks_from(self, ino: int, first: int) -> list[int]:
        """Forget chunks ``first`` and beyond (truncation: published by the next ``update``); returns
        their indexes."""
        pending = self._pending.setdefault(ino, _PendingChunks())
        node = self._read(ino)
        recorded = node.chunks if node is not None else []
        dropped = {i for i in indexes_in(recorded) if i >= first and (pending.cut is None or i < pending.cut)}
        dropped |= {i for i in pending.added if i >= first}
        pending.added = {i for i in pending.added if i < first}
        pending.sums = {i: c for i, c in pending.sums.items() if i < first}
        pending.cut = first if pending.cut is None else min(pending.cut, first)
        return sorted(dropped)

    # -- extended attributes ---------------------------------------------------------------------------

    @_etcd_errors
    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        kv = self.client.get(self._xprefix(ino) + name.hex())
        return None if kv is None else kv.value

    @_etcd_errors
    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        def change(txn: _Change) -> None:
            node = txn.node(ino)
            txn.put(self._xprefix(ino) + name.hex(), value)
            node.ctime = time.time_ns()
            txn.write(node)

        self._atomically(change)

    @_etcd_errors
    def listxattr(self, ino: int) -> list[bytes]:
        prefix = self._xprefix(ino)
        start = len(prefix.encode())
        return [
            bytes.fromhex(kv.key[start:].decode()) for kv in self.client.range(prefix, prefix=True, keys_only=True).kvs
        ]

    @_etcd_errors
    def removexattr(self, ino: int, name: bytes) -> bool:
        return bool(self.client.delete(self._xprefix(ino) + name.hex()))

    @_etcd_errors
    def inode_count(self) -> int:
        return self._count(self.prefix + "i/")

    @_etcd_errors
    def counts(self) -> tuple[int, int]:
        """(inodes, chunks) in the namespace (reads every inode: for statistics, not for statfs)."""
        inodes = chunks = 0
        for kv in self.client.range(self.prefix + "i/", prefix=True).kvs:
            inodes += 1
            chunks += sum(end - start for start, end in json.loads(kv.value).get("chunks", []))
        return inodes, chunks
