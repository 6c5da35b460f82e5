"""The store as a POSIX filesystem: pyfuse3 request handlers over a Namespace and a Store.

File data lives in chunk objects (``InternalKey``s, so they are sticky: demoted to SSD under pressure,
never dropped), except that a small file's bytes (up to ``INLINE_MAX``) live inline in a local
namespace: one SQLite transaction stores them with the file's size, where a chunk would cost a store
put and its SSD index commit, and a store remove at unlink.  Writes collect in per-inode chunk
buffers; a buffer is stored as soon as a write fills it, and the rest when the file is flushed (every
close: close-to-open consistency) or fsync'd (durably).
Reads of stored chunks are served from the DRAM pool itself: the reply is a memoryview of a leased
block, so no copy is made before the kernel's.

Reserved names: ``/.kv/`` shows the KV API's objects read-only (keys escaped into file names) and
``/.mooncakefs/stats.json`` the live statistics.

Over a shared namespace (``EtcdNamespace``: every mount of a cluster changes it) the kernel caches no
names, and attributes for a second only: each open looks its path up again, and so gets the size (and
the chunks) that the file's last writer published when it closed (close-to-open consistency).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import inspect
import json
import logging
import mmap
import os
import stat
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from mooncakefs._engine import copy_many, crc32c
from mooncakefs.api import KVStore
from mooncakefs.errors import KeyNotFound, MooncakeError, OutOfSpace, Unavailable, errno_of
from mooncakefs.fuse.namespace import ROOT, Inode, Namespace, fail
from mooncakefs.keys import INTERNAL_PREFIX, InternalKey

if TYPE_CHECKING:
    from mooncakefs.fuse.etcd_namespace import EtcdNamespace

log = logging.getLogger("mooncakefs.fuse")
EXPECTED_WARNINGS = (OutOfSpace, Unavailable)  # conditions of the moment, not damage: logged as warnings

NAME_MAX = 255
ATTR_TIMEOUT = 10.0  # this daemon makes every change, and the kernel invalidates what it changes
SHARED_ENTRY_TIMEOUT = 0.0  # a shared namespace: every path walk asks (close-to-open: opens see new sizes)
SHARED_ATTR_TIMEOUT = 1.0  # ... and stat may show another mount's change up to a second late
KV_DIR = 1 << 62  # inode numbers above every real one: the reserved names
CONTROL_DIR = KV_DIR + 1
STATS_FILE = KV_DIR + 2
KV_FIRST = KV_DIR + 16
RESERVED = {b".kv": KV_DIR, b".mooncakefs": CONTROL_DIR}
DIRTY_LIMIT = 256 << 20  # unflushed bytes per file before its buffers are stored
# Full chunks stored (and written through to the SSD tier) by worker threads while the next writes are
# taken: four, not two, so that a stall of a shared disk is absorbed instead of stopping the writer.
STORES_IN_FLIGHT = 4
LEASES_HELD = 64  # zero-copy replies: a view is released this many reads later, long after the reply
INLINE_MAX = 64 << 10  # files up to this size keep their bytes in a local namespace, not in a chunk
REAP_DELAY = 0.02  # s: inodes forgotten meanwhile are deleted in one transaction (an rm -r: one per file)
# The data of a write-only handle: opened with direct_io, so the kernel hands each write() straight on,
# without copying it into the page cache first and, above all, without the getxattr(security.capability)
# that its buffered path (file_remove_privs) sends before every write call: one request per write, not
# two.  The buffered path would stop asking only with FUSE_HANDLE_KILLPRIV_V2, which libfuse 3.14 (and so
# pyfuse3 3.5) cannot ask for.  Readers need no page cache from such a handle, and the kernel keeps the
# pages other handles cached coherent with direct writes (tests/test_fuse_posix.py checks both).
DIRECT_WRITES = "direct writes"
SET_ID = stat.S_ISUID | stat.S_ISGID  # mode bits a write may clear: files with them keep the buffered path
# s: a local namespace's changes are committed in groups at most this much later (what kill -9 may lose),
# since a commit costs as much as the rest of a create; fsync, fsyncdir and statfs commit at once.
COMMIT_DELAY = 0.02


def chunk_key(ino: int, idx: int) -> InternalKey:
    return InternalKey(b"fs/" + ino.to_bytes(8, "big") + idx.to_bytes(8, "big"))


def kv_name(key: bytes) -> bytes:
    """A KV key as a file name: '/', '%', control bytes and invalid UTF-8 become %XX; a name longer
    than 255 bytes is cut to 200 bytes plus '~' and a 16-hex-digit hash of the key."""
    out = []
    for ch in key.decode(errors="surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"%{code - 0xDC00:02X}")
        elif ch in "/%" or code < 0x20 or code == 0x7F:
            out.append(f"%{code:02X}")
        else:
            out.append(ch)
    name = "".join(out).encode()
    if len(name) > NAME_MAX:
        digest = hashlib.blake2b(key, digest_size=8).hexdigest().encode()
        name = name[:200].decode(errors="ignore").encode() + b"~" + digest
    return name


def unescape_kv_name(name: bytes) -> bytes:
    raw, i = bytearray(), 0
    while i < len(name):
        if name[i : i + 1] == b"%" and i + 3 <= len(name):
            try:
                raw.append(int(name[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        raw.append(name[i])
        i += 1
    return bytes(raw)


@dataclass
class DirtyChunk:
    """A chunk's write buffer.  Bytes past ``filled`` are stale (buffers are reused unzeroed): a write
    that starts beyond it zeroes the gap first, and nothing past it is ever read or stored.

    The last ``pending_bytes`` before ``filled`` are not in ``buf`` yet: writes that appended them are
    kept as views of their requests' (immutable) bytes, and copied in by ``settle``, in one call that
    releases the GIL, on the worker thread that stores a full chunk: so a sequential write's copy is not
    made on the thread that serves the requests.  Whatever else looks at ``buf`` settles it first."""

    buf: mmap.mmap
    filled: int
    pending: list[memoryview] = field(default_factory=list)
    pending_bytes: int = 0

    def append(self, data: memoryview) -> None:
        """Add ``data`` at ``filled``, to be copied at the next ``settle``."""
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.filled += len(data)

    def settle(self) -> None:
        """Copy the pending writes into ``buf``."""
        if not self.pending:
            return
        start, whole = self.filled - self.pending_bytes, memoryview(self.buf)
        targets = []
        for piece in self.pending:
            targets.append(whole[start : start + len(piece)])
            start += len(piece)
        copy_many(targets, self.pending)
        self.pending.clear()
        self.pending_bytes = 0


@dataclass
class OpenInode:
    """What an open regular file has that its namespace row does not yet: buffered chunks, its
    current size, and chunks stored since the last fsync."""

    size: int
    opens: int = 0
    dirty: dict[int, DirtyChunk] = field(default_factory=dict)
    unsynced: set[int] = field(default_factory=set)
    mtime: int | None = None  # of the last write not yet recorded in the namespace
    storing: dict[int, tuple[DirtyChunk, trio.Event]] = field(default_factory=dict)  # chunks in flight
    error: Exception | None = None  # a background store failed: reported by the next write or flush
    # The stored chunk the last read fetched, kept for the reads that follow (the kernel asks for at
    # most 1 MiB at a time: without it every read of a remote chunk would fetch the whole chunk again).
    chunk: tuple[int, Any, memoryview] | None = None  # (index, its view, the bytes)
    sums: dict[int, int] = field(default_factory=dict)  # chunk CRC-32Cs the file's writer published
    gen: tuple[int, int] = (0, 0)  # (mtime, size) at the open that read ``sums``: readers of one version
    # Mode bits a direct write must clear (set by a chmod while the file is open): the kernel leaves
    # that to the filesystem on its direct path, and pyfuse3 does not pass on the write's kill flag.
    privs: int = 0


def _handler(method: Any) -> Any:
    """Answer a failed request with the errno of the errors table (``mooncakefs.errors.ERRORS``): a
    ``MooncakeError`` is expected (one log line: a node or etcd away, a full store, a bad checksum);
    anything else is a bug (EIO, logged with its traceback).  Either way the mount keeps serving."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except KeyNotFound as exc:  # under a file a missing key is a lost chunk (the .kv/ paths say ENOENT)
            log.error("%s: %s", method.__name__, exc)
            raise fail(errno.EIO) from None
        except MooncakeError as exc:
            log.log(
                logging.WARNING if isinstance(exc, EXPECTED_WARNINGS) else logging.ERROR, "%s: %s", method.__name__, exc
            )
            raise fail(errno_of(exc)) from None
        except Exception:
            log.exception("internal error in %s", method.__name__)
            raise fail(errno.EIO) from None

    return wrapper


class _GuardedHandlers(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
        for attr, value in namespace.items():
            if inspect.iscoroutinefunction(value) and hasattr(pyfuse3.Operations, attr):
                namespace[attr] = _handler(value)
        return super().__new__(mcs, name, bases, namespace)


class MooncakeFS(pyfuse3.Operations, metaclass=_GuardedHandlers):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, store: KVStore, namespace: Namespace | EtcdNamespace) -> None:
        super().__init__()
        self.store = store
        self.ns = namespace
        self.shared = namespace.shared
        self.entry_timeout = SHARED_ENTRY_TIMEOUT if self.shared else ATTR_TIMEOUT
        self.attr_timeout = SHARED_ATTR_TIMEOUT if self.shared else ATTR_TIMEOUT
        self.seen: dict[int, tuple[int, int]] = {}  # shared: (mtime, size) of each file at its last open
        self.chunk_size = namespace.chunk_size
        # A shared namespace keeps every byte in chunks: other mounts fetch them from the cluster's nodes.
        self.inline_max = 0 if self.shared else min(INLINE_MAX, self.chunk_size)
        self.zeros = memoryview(bytes(self.chunk_size))
        self.files: dict[int, OpenInode] = {}  # open regular files by inode
        self.handles: dict[int, tuple[int, Any]] = {}  # fh -> (inode, per-handle data)
        self.next_fh = 1
        self.leases: collections.deque[AbstractContextManager[memoryview]] = collections.deque()
        self.spare_buffers: list[mmap.mmap] = []
        self.nursery: trio.Nursery | None = None  # set by the mount: where background stores run
        self.store_slots = trio.Semaphore(STORES_IN_FLIGHT)
        self.changed_since_open: set[int] = set()
        self.lookups: collections.Counter[int] = collections.Counter()  # the kernel's references
        self.kv_inodes: dict[bytes, int] = {}
        self.kv_keys: dict[int, bytes] = {}
        self.started = time.time()
        self.swarm: Any = None  # a cluster mount: fetches chunks from other readers too (mooncakefs.p2p)
        self.doomed: list[int] = []  # nameless, closed and forgotten inodes waiting to be deleted
        self.commit_due = False  # a group commit of the namespace is scheduled
        # The errno of a failed group commit: its changes are lost, and the mount is read-only from then.
        self.lost: int | None = None
        # Chunk records join the namespace's group commits where the next mount can find the chunks a
        # crash left unrecorded (``collect_leaked_chunks``: a local namespace over an embedded store);
        # elsewhere each is committed before the next chunk is stored.
        self.grouped_chunks = not self.shared and callable(getattr(store, "raw_index", None))

    # -- start and stop --------------------------------------------------------------------------------

    def collect_orphans(self) -> int:
        """Delete inodes unlinked while open when the last mount ended; returns how many."""
        orphans = self.ns.orphans()
        for ino in orphans:
            self._delete_inode(ino)
        return len(orphans)

    def collect_leaked_chunks(self) -> int:
        """Start this mount's session of a local namespace; if the last one did not end cleanly, remove
        the chunks the store holds but the namespace does not record (stored just before a crash, their
        records in the group it lost, or of an inode that group created).  Returns how many.

        First each file's chunks are cut to its committed size, as ``_truncate`` cuts them: a crash
        between a truncation's commit and its cut of the last chunk left that chunk longer than its
        file, and chunks recorded before their file's size was may lie past it, whose bytes a file
        grown again would show where zeros belong."""
        if self.shared or self.ns.open_session():
            return 0
        self.ns.group_commits(lambda: None)  # one commit for the files' unchanged rows, not one each
        try:
            for ino in sorted({ino for ino, _ in self.ns.chunk_records()}):
                node = self.ns.get(ino)
                if node is not None and node.nlink:  # (nameless ones: collect_orphans; chunks may be gone)
                    with contextlib.suppress(KeyNotFound):  # a chunk lost otherwise: reads say so, not the mount
                        self._truncate(node, node.size)
        finally:
            self.ns.group_commits(None)
        if not self.grouped_chunks:
            return 0
        prefix = bytes(chunk_key(0, 0))[:-16]
        recorded = self.ns.chunk_records()
        leaked = []
        for raw in self.store.raw_index():  # type: ignore[attr-defined]
            if raw.startswith(prefix) and len(raw) == len(prefix) + 16:
                ino, idx = int.from_bytes(raw[-16:-8], "big"), int.from_bytes(raw[-8:], "big")
                if (ino, idx) not in recorded:
                    leaked.append(chunk_key(ino, idx))
        for key in leaked:
            self.store.remove(key)
        return len(leaked)

    def start_serving(self, nursery: trio.Nursery) -> None:
        """Run background work (chunk stores, deletions, group commits) in ``nursery`` from now on."""
        self.nursery = nursery
        if not self.shared:
            self.ns.group_commits(self._schedule_commit)

    def stop_serving(self) -> None:
        """Back to doing everything before answering: commits the namespace's open group."""
        self.nursery = None
        if not self.shared:
            with contextlib.suppress(pyfuse3.FUSEError):  # (logged; the unmount goes on)
                self._commit()
            self.ns.group_commits(None)

    def shutdown(self) -> None:
        """Store every buffered write and make all file data durable (a clean unmount)."""
        for ino in list(self.files):
            if self.lost is None:
                self._commit_file(ino)
            self._drop_cached_chunk(self.files[ino])
        self._reap()
        if self.swarm is not None:
            self.swarm.close()
        self._release_leases(0)
        self.store.persist()
        if not self.shared and self.lost is None:
            self.ns.close_session()
        with contextlib.suppress(pyfuse3.FUSEError):  # (logged: a lost group is not synced)
            self._commit()
            self.ns.sync()

    # -- group commits ---------------------------------------------------------------------------------

    def _schedule_commit(self) -> None:
        """A change opened a namespace group: commit it within COMMIT_DELAY."""
        if not self.commit_due and self.nursery is not None:
            self.commit_due = True
            self.nursery.start_soon(self._commit_soon)

    async def _commit_soon(self) -> None:
        await trio.sleep(COMMIT_DELAY)
        self.commit_due = False
        with contextlib.suppress(pyfuse3.FUSEError):  # logged: the mount is read-only from now on
            self._commit()

    def _commit(self) -> None:
        """Commit the namespace's open group: at the sync points, and before store objects whose names
        must be durable first are written or removed.  A failed commit lost the group (SQLite rolls it
        back): like a disk filesystem after a metadata write error, the mount turns read-only (what is
        in memory no longer matches the namespace), and every later fsync, fsyncdir and flush of written
        data answer the error (ENOSPC for a full disk, else EIO)."""
        if self.shared:  # (every change is its own etcd transaction)
            return
        if self.lost is not None:
            raise fail(self.lost)
        changes = self.ns.uncommitted
        try:
            self.ns.commit()
        except Exception as exc:
            self.lost = errno.ENOSPC if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" else errno.EIO
            log.error(
                "committing %d namespace changes failed (%s): they are lost, and the mount is read-only "
                "until it is mounted again",
                changes,
                exc,
            )
            raise fail(self.lost) from None

    # -- attributes ------------------------------------------------------------------------------------

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference (lookup, create, readdirplus...)."""
        self.lookups[node.ino] += 1
        return self._attrs(node)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.lookups[ino] -= count
            if self.lookups[ino] <= 0:
                del self.lookups[ino]
                self.seen.pop(ino, None)
                try:
                    node = self.ns.get(ino) if ino < KV_DIR else None
                    if node is not None:
                        self._maybe_delete(node)
                except (pyfuse3.FUSEError, MooncakeError) as exc:
                    # forget has no reply, so an error raised here would end the session: an unlinked
                    # inode whose deletion fails now (etcd away) is left to the next mount's sweep
                    log.warning("forget inode %d: %s; the next mount's sweep of nameless inodes deletes it", ino, exc)

    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.st_mode, attrs.st_nlink = node.mode, node.nlink
        attrs.st_uid, attrs.st_gid, attrs.st_rdev = node.uid, node.gid, node.rdev
        open_file = self.files.get(node.ino)
        attrs.st_size = open_file.size if open_file else node.size
        attrs.st_blksize = 1 << 20  # cp and friends size their buffers by this: ask for large requests
        attrs.st_blocks = -(-attrs.st_size // 512)
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = node.atime, node.mtime, node.ctime
        attrs.entry_timeout, attrs.attr_timeout = self.entry_timeout, self.attr_timeout
        return attrs

    def _synthetic(self, ino: int, mode: int, size: int = 0) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino, attrs.st_mode, attrs.st_size = ino, mode, size
        attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_blksize = 1 << 20
        attrs.st_blocks = -(-size // 512)
        started = int(self.started * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = started
        attrs.entry_timeout = attrs.attr_timeout = 1.0  # the KV namespace changes behind the kernel's back
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode < KV_DIR:
            return self._attrs(self.ns.inode(inode))
        if inode in (KV_DIR, CONTROL_DIR):
            return self._synthetic(inode, stat.S_IFDIR | 0o555)
        if inode == STATS_FILE:
            return self._synthetic(inode, stat.S_IFREG | 0o444, len(self._stats_json()))
        key = self.kv_keys.get(inode)
        if key is None:
            raise fail(errno.ENOENT)
        try:
            size = self.store.stat(key).size
        except KeyNotFound:
            raise fail(errno.ENOENT) from None
        attrs = self._synthetic(inode, stat.S_IFREG | 0o444, size)
        return attrs

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._writable(inode)
        if inode in self.files:  # record buffered writes first: what is set here outranks them
            await self._flush(inode)
        node = self.ns.inode(inode)
        now = time.time_ns()
        if fields.update_size:
            self._truncate(node, attr.st_size)
            node.size = attr.st_size
            node.mtime = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            if inode in self.files:
                self.files[inode].privs = node.mode & SET_ID
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        node.ctime = attr.st_ctime_ns if fields.update_ctime else now
        self.ns.update(node)
        return self._attrs(node)

    # -- names -----------------------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if parent_inode == ROOT and name in RESERVED:
            return await self.getattr(RESERVED[name])
        if parent_inode == CONTROL_DIR:
            if name != b"stats.json":
                raise fail(errno.ENOENT)
            return await self.getattr(STATS_FILE)
        if parent_inode == KV_DIR:
            return await self.getattr(self._kv_inode(self._kv_key(name)))
        ino = self.ns.lookup(parent_inode, name)
        if ino is None:
            raise fail(errno.ENOENT)
        return self._entry(self.ns.inode(ino))

    def _check_new_name(self, parent: int, name: bytes) -> None:
        self._writable(parent)
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if parent == ROOT and name in RESERVED:
            raise fail(errno.EEXIST)

    def _writable(self, inode: int) -> None:
        if inode >= KV_DIR or self.lost is not None:
            raise fail(errno.EROFS)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_new_name(parent_inode, name)
        return self._entry(self.ns.create(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_new_name(parent_inode, name)
        return self._entry(self.ns.create(parent_inode, name, mode, ctx.uid, ctx.gid, rdev=rdev))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_new_name(parent_inode, name)
        return self._entry(self.ns.create(parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, target=target))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.ns.inode(inode)
        if not stat.S_ISLNK(node.mode):
            raise fail(errno.EINVAL)
        return node.target or b""

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._writable(inode)
        self._check_new_name(new_parent_inode, new_name)
        return self._entry(self.ns.link(inode, new_parent_inode, new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_removable(parent_inode, name)
        self._maybe_delete(self.ns.unlink(parent_inode, name, rmdir=False))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_removable(parent_inode, name)
        self._maybe_delete(self.ns.unlink(parent_inode, name, rmdir=True))

    def _check_removable(self, parent: int, name: bytes) -> None:
        self._writable(parent)
        if parent == ROOT and name in RESERVED:
            raise fail(errno.EROFS)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._check_removable(parent_inode_old, name_old)
        self._check_removable(parent_inode_new, name_new)
        if len(name_new) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        replaced = self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        if replaced is not None:
            self._maybe_delete(replaced)

    def _maybe_delete(self, node: Inode, *, closed: bool = False) -> None:
        """Delete an inode with no names left once nothing uses it: no open file, and no reference the
        kernel still holds (a process may have looked the name up just before it went).  In a shared
        namespace, the last close here (``closed``) deletes it despite the kernel's references: when
        another mount removed the last name, this kernel need never learn it, nor forget the inode.
        (The namespace keeps it while another mount has it open.)"""
        if (
            node.nlink == 0
            and node.ino not in self.files
            and (node.ino not in self.lookups or (closed and self.shared))
        ):
            self._delete_inode(node.ino)

    def _delete_inode(self, ino: int) -> None:
        """Delete an inode and its chunks: at once in a shared namespace (or when not serving), else
        with those that follow within REAP_DELAY.  (A crash meanwhile leaves it nameless in the
        namespace: the next mount collects it.)"""
        if self.shared:
            for idx in self.ns.remove_inode(ino):
                self.store.remove(chunk_key(ino, idx))
            return
        self.doomed.append(ino)
        if self.nursery is None:
            self._reap()
        elif len(self.doomed) == 1:
            self.nursery.start_soon(self._reap_soon)

    async def _reap_soon(self) -> None:
        await trio.sleep(REAP_DELAY)
        try:
            self._reap()
        except Exception:  # never take the mount down: the inodes stay nameless until the next mount
            log.exception("deleting unlinked inodes failed")

    def _reap(self) -> None:
        """Delete the doomed inodes.  Their chunks leave the store once the unlinks that left them
        nameless are committed (a crash must not bring a name back without its bytes), and their rows
        after that, in the open group: a crash in between leaves them nameless, for the next mount to
        collect (removing a chunk twice is harmless).  After a lost group, nothing is deleted: the
        unlinks may be among what was lost."""
        doomed, self.doomed = self.doomed, []
        if not doomed or self.lost is not None:
            return
        chunks = self.ns.chunks_of(doomed)
        if chunks:
            self._commit()
            for ino, idx in chunks:
                self.store.remove(chunk_key(ino, idx))
        self.ns.remove_inodes(doomed)

    def _remove_chunks(self, ino: int, indexes: list[int]) -> None:
        """Remove chunks the namespace forgot (a truncation, a file shrunk into its inline row), once
        that is committed: a crash must not leave them recorded but gone (EIO)."""
        if indexes:
            self._commit()
            for idx in indexes:
                self.store.remove(chunk_key(ino, idx))

    # -- directories -----------------------------------------------------------------------------------

    def _new_handle(self, ino: int, data: Any = None) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (ino, data)
        return fh

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == KV_DIR:  # a snapshot of the keys, so the listing is stable while it is read
            keys = sorted(k.encode() if isinstance(k, str) else k for k in iter(self.store))
            return self._new_handle(inode, keys)
        if inode < KV_DIR and not self.ns.inode(inode).is_dir:
            raise fail(errno.ENOTDIR)
        return self._new_handle(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino, snapshot = self.handles[fh]
        if ino == KV_DIR:
            for i in range(start_id, len(snapshot)):
                key = snapshot[i]
                try:
                    attrs = await self.getattr(self._kv_inode(key))
                except pyfuse3.FUSEError:
                    continue  # removed since the snapshot
                if not pyfuse3.readdir_reply(token, kv_name(key), attrs, i + 1):
                    return
            return
        if ino == CONTROL_DIR:
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"stats.json", await self.getattr(STATS_FILE), 1)
            return
        # Cookies: 1 and 2 are the reserved names in the root; entry ids are shifted past them.
        if ino == ROOT:
            for cookie, (name, reserved) in enumerate(RESERVED.items(), start=1):
                if start_id < cookie and not pyfuse3.readdir_reply(token, name, await self.getattr(reserved), cookie):
                    return
        after = max(start_id - 2, 0)
        while True:
            rows = self.ns.entries(ino, after)
            if not rows:
                return
            for (entry_id, name, _child), node in zip(rows, self.ns.get_many([r[2] for r in rows]), strict=True):
                if node is not None:
                    if not pyfuse3.readdir_reply(token, name, self._attrs(node), entry_id + 2):
                        return
                    self.lookups[node.ino] += 1  # readdirplus: the kernel now holds a reference
                after = entry_id

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Make the namespace (every directory's entries, not only this one's) survive power loss."""
        self._commit()
        self.ns.sync()

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self._reap()  # space freed by an unlink shows at once
        with contextlib.suppress(pyfuse3.FUSEError):  # (a lost group: df still answers)
            self._commit()  # a cheap point to commit at: df, or a program that wants the namespace committed
        stats = self.store.stats()
        capacity = used = 0
        # A cluster's stats are per node; each chunk is stored on ``replicas`` of them.
        for node in stats["nodes"].values() if "nodes" in stats else [stats]:
            tier = node.get("ssd", node["dram"])  # where file data must fit
            capacity += tier["capacity"]
            used += tier.get("live", tier["used"])  # garbage in SSD segments is free space on demand
        copies = getattr(self.store, "replicas", 1) if "nodes" in stats else 1
        capacity, used = capacity // copies, used // copies
        inodes = self.ns.inode_count()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = capacity // 4096
        out.f_bfree = out.f_bavail = max(capacity - used, 0) // 4096
        out.f_files = 1 << 32
        out.f_ffree = out.f_favail = (1 << 32) - inodes
        out.f_namemax = NAME_MAX
        return out

    # -- extended attributes ---------------------------------------------------------------------------

    # Only the user.* namespace is kept.  The others are answered EOPNOTSUPP before anything is looked
    # up: ls -l asks every file for security.selinux and system.posix_acl_access, and ls (like
    # libselinux and libacl) takes EOPNOTSUPP, unlike ENODATA, as "none on this filesystem" and asks
    # no further file of the mount.  The kernel turns getxattr off for the whole mount only on ENOSYS
    # (fs/fuse/xattr.c), so user.* xattrs keep working.

    @staticmethod
    def _user_xattr(name: bytes) -> None:
        if not name.startswith(b"user."):
            raise fail(errno.EOPNOTSUPP)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable(inode)
        self._user_xattr(name)
        self.ns.inode(inode)
        self.ns.setxattr(inode, name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._user_xattr(name)
        value = self.ns.getxattr(inode, name) if inode < KV_DIR else None
        if value is None:
            raise fail(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.ns.listxattr(inode) if inode < KV_DIR else []

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable(inode)
        self._user_xattr(name)
        if not self.ns.removexattr(inode, name):
            raise fail(pyfuse3.ENOATTR)

    # -- the KV namespace (read-only) ------------------------------------------------------------------

    def _kv_key(self, name: bytes) -> bytes:
        if b"~" in name and len(name) > 200:  # a shortened long name: find the key it stands for
            for key in iter(self.store):
                raw = key.encode() if isinstance(key, str) else key
                if kv_name(raw) == name:
                    return raw
            raise fail(errno.ENOENT)
        key = unescape_kv_name(name)
        if key.startswith(INTERNAL_PREFIX) or not self.store.exists(key):
            raise fail(errno.ENOENT)
        return key

    def _kv_inode(self, key: bytes) -> int:
        ino = self.kv_inodes.get(key)
        if ino is None:
            ino = self.kv_inodes[key] = KV_FIRST + len(self.kv_inodes)
            self.kv_keys[ino] = key
        return ino

    def _stats_json(self) -> bytes:
        self._reap()
        stats = self.store.stats()
        inodes, chunks = self.ns.counts()
        stats["fs"] = {
            "inodes": inodes,
            "chunks": chunks,
            "chunk_size": self.chunk_size,
            "open_files": len(self.files),
            "uptime_s": round(time.time() - self.started, 3),
        }
        if self.swarm is not None:
            stats["fs"]["swarm"] = {"node": self.swarm.node, "files": self.swarm.describe()}
        return json.dumps(stats, indent=2).encode() + b"\n"

    # -- open, read, write -----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode >= KV_DIR:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                raise fail(errno.EROFS)
            if inode == STATS_FILE:
                return pyfuse3.FileInfo(fh=self._new_handle(inode, self._stats_json()), direct_io=True)
            if inode not in self.kv_keys:
                raise fail(errno.ENOENT)
            return pyfuse3.FileInfo(fh=self._new_handle(inode), keep_cache=True)
        node = self.ns.inode(inode)
        if node.is_dir:
            raise fail(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable(inode)
        if flags & os.O_TRUNC and inode in self.files:
            await self._drain(self.files[inode])
        return self._open_file(node, flags)

    def _open_file(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        state = self.files.get(node.ino)
        if state is None or not state.opens:
            self.ns.opened(node.ino)  # (a shared namespace: no other mount deletes it while open here)
        if state is None:
            state = self.files[node.ino] = OpenInode(size=node.size)
        state.opens += 1
        if self.shared and not state.dirty and not state.storing:
            state.sums = dict(getattr(node, "sums", None) or {})  # what the last writer published
            state.gen = (node.mtime, node.size)
            self._drop_cached_chunk(state)
        if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
            self._truncate(node, 0)
            node.size, node.mtime, node.ctime = 0, time.time_ns(), time.time_ns()
            self.ns.update(node)
        keep_cache = node.ino not in self.changed_since_open
        self.changed_since_open.discard(node.ino)
        if self.shared:  # another mount may have changed it since this one last cached its pages
            version = (node.mtime, node.size)
            keep_cache = keep_cache and self.seen.get(node.ino) == version
            self.seen[node.ino] = version
        # A set-ID file keeps the kernel's buffered path, which knows whether a write clears the bits
        # (not for callers with CAP_FSETID; set-group-ID without group execute only for non-members).
        direct = (flags & os.O_ACCMODE) == os.O_WRONLY and not node.mode & SET_ID
        fh = self._new_handle(node.ino, DIRECT_WRITES if direct else None)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=direct)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_new_name(parent_inode, name)
        node = self.ns.create(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx.uid, ctx.gid, opened=True)
        return self._open_file(node, flags & ~os.O_TRUNC), self._entry(node)

    async def read(self, fh: int, off: int, size: int) -> Any:
        ino, data = self.handles[fh]
        if ino >= KV_DIR:
            if ino == STATS_FILE:
                return data[off : off + size]
            return self._read_kv(self.kv_keys[ino], off, size)
        state = self.files[ino]
        cs = self.chunk_size
        while in_flight := [i for i in range(off // cs, -(-(off + size) // cs)) if i in state.storing]:
            await state.storing[in_flight[0]][1].wait()  # (its bytes are being copied into its buffer)
        end = min(off + size, state.size)
        if off >= end:
            return b""
        pieces = []
        while off < end:
            idx, within = divmod(off, cs)
            n = min(end - off, cs - within)
            pieces.append(self._chunk_slice(ino, state, idx, within, n))
            off += n
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _chunk_slice(self, ino: int, state: OpenInode, idx: int, within: int, n: int) -> Any:
        """``n`` bytes of chunk ``idx`` from ``within``: from its write buffer, from the pool without a
        copy, or zeros for a hole.  The chunk is not in flight (``read`` waits for it to land)."""
        dirty = state.dirty.get(idx)
        if dirty is not None:
            dirty.settle()
            have = max(min(dirty.filled - within, n), 0)
            if have == n:
                return memoryview(dirty.buf)[within : within + n]
            return bytes(memoryview(dirty.buf)[within : within + have]) + bytes(n - have)
        if state.chunk is not None and state.chunk[0] == idx:
            mv = state.chunk[2]
        else:
            try:
                view, mv = self._open_chunk(ino, state, idx)
            except KeyNotFound:
                if self.ns.has_chunk(ino, idx):
                    log.error("inode %d: chunk %d is recorded but missing from the store (lost)", ino, idx)
                    raise fail(errno.EIO) from None
                return self.zeros[:n]
            self._drop_cached_chunk(state)
            state.chunk = (idx, view, mv)
        have = max(min(len(mv) - within, n), 0)
        if have == n:
            return mv[within : within + n]
        return bytes(mv[within : within + have]) + bytes(n - have)  # a chunk shorter than the file here

    def _open_chunk(self, ino: int, state: OpenInode, idx: int) -> tuple[Any, memoryview]:
        """A stored chunk's view, entered: from the store, or (a cluster mount) from whichever other
        reader or replica holds it (``mooncakefs.p2p.Swarm``).  KeyNotFound if no one has it."""
        if idx == 0 and self.inline_max:
            inline = self.ns.get_inline(ino)
            if inline is not None:
                return contextlib.nullcontext(), memoryview(inline)
        if self.swarm is not None:
            opened = self.swarm.open_chunk(ino, state, idx)
            if opened is not None:
                return opened
        view = self.store.view(chunk_key(ino, idx))
        return view, view.__enter__()

    def _drop_cached_chunk(self, state: OpenInode, idx: int | None = None) -> None:
        """Forget the chunk kept for reads (all, or only if it is ``idx``).  Its view is held a while
        longer: replies made from it may not have been sent yet."""
        if state.chunk is not None and (idx is None or state.chunk[0] == idx):
            view, state.chunk = state.chunk[1], None
            self._hold(view)

    def _read_kv(self, key: bytes, off: int, size: int) -> Any:
        view = self.store.view(key)
        try:
            mv = view.__enter__()
        except KeyNotFound:
            raise fail(errno.ENOENT) from None
        self._hold(view)
        return mv[off : off + size]

    def _hold(self, view: AbstractContextManager[memoryview]) -> None:
        """Keep a view's lease until well after the reply pyfuse3 sends from it."""
        self.leases.append(view)
        self._release_leases(LEASES_HELD)

    def _release_leases(self, keep: int) -> None:
        while len(self.leases) > keep:
            self.leases.popleft().__exit__(None, None, None)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino, data = self.handles[fh]
        self._writable(ino)
        state = self.files[ino]
        self._raise_stored_error(state)
        if state.privs and data is DIRECT_WRITES:
            self._kill_privs(ino, state)
        cs = self.chunk_size
        end = off + len(buf)
        src = memoryview(buf)
        appendable = type(buf) is bytes  # immutable: a view of it may be kept until it is copied
        pos = off
        while pos < end:
            idx, within = divmod(pos, cs)
            n = min(end - pos, cs - within)
            if idx in state.storing:  # rewriting a chunk on its way to the store: let it land first
                await state.storing[idx][1].wait()
            chunk = self._dirty_chunk(ino, state, idx)
            if within == chunk.filled and appendable:  # a sequential write: copied later, off this thread
                chunk.append(src[pos - off : pos - off + n])
            else:
                chunk.settle()
                if within > chunk.filled:
                    chunk.buf[chunk.filled : within] = self.zeros[: within - chunk.filled]
                chunk.buf[within : within + n] = src[pos - off : pos - off + n]
                chunk.filled = max(chunk.filled, within + n)
            pos += n
            if end > state.size:
                state.size = end
            if within + n == cs:  # the chunk is complete: store it, keeping memory bounded
                await self._store_behind(ino, state, idx)
        state.mtime = time.time_ns()
        self.changed_since_open.add(ino)
        if len(state.dirty) * cs > DIRTY_LIMIT:
            self._store_chunks(ino, state)
        return len(buf)

    def _kill_privs(self, ino: int, state: OpenInode) -> None:
        """Clear the set-ID bits a chmod gave a file after a direct handle was opened on it, as the
        kernel's buffered path would before the write.  The writer's credentials are unknown here
        (pyfuse3 passes neither them nor the write's kill flag), so every writer clears both bits: in
        the rare case of a chmod u+s or g+s while a write-only handle is open, keeping a set-ID bit
        would be the unsafe mistake."""
        node = self.ns.inode(ino)
        node.mode &= ~state.privs
        node.ctime = time.time_ns()
        state.privs = 0
        self.ns.update(node)

    async def _store_behind(self, ino: int, state: OpenInode, idx: int) -> None:
        """Store a full chunk on a worker thread while this write is answered and the next one taken
        (a sequential writer sends one write at a time).  Flushes wait for it; reads see its buffer,
        and writes to it wait until it has landed."""
        chunk = state.dirty.pop(idx, None)
        if chunk is None:  # another writer completed it first
            return
        if self.nursery is None:  # not serving (tests driving the class directly): store inline
            state.dirty[idx] = chunk
            self._store_chunk(ino, state, idx)
            return
        landed = trio.Event()
        state.storing[idx] = (chunk, landed)  # before any await: no other request may take it
        try:
            await self.store_slots.acquire()  # backpressure: at most STORES_IN_FLIGHT chunks in flight
        except BaseException:
            del state.storing[idx]
            state.dirty[idx] = chunk
            landed.set()
            raise
        self.nursery.start_soon(self._store_task, ino, state, idx, chunk, landed)

    async def _store_task(self, ino: int, state: OpenInode, idx: int, chunk: DirtyChunk, landed: trio.Event) -> None:
        try:
            self._commit_before_chunk()
            data = await trio.to_thread.run_sync(self._settle_and_put, ino, idx, chunk)
            self._add_chunk(ino, idx, data)
            state.unsynced.add(idx)
            self.spare_buffers.append(chunk.buf)
        except Exception as exc:  # keep the bytes: the next flush retries, and reports the error
            log.warning("inode %d: storing chunk %d failed: %s", ino, idx, exc)
            state.error = exc
            state.dirty.setdefault(idx, chunk)
        finally:
            del state.storing[idx]
            landed.set()
            self.store_slots.release()

    def _settle_and_put(self, ino: int, idx: int, chunk: DirtyChunk) -> memoryview:
        """A full chunk's pending writes copied in and the chunk stored (on a worker thread)."""
        chunk.settle()
        data = memoryview(chunk.buf)[: chunk.filled]
        self.store.put(chunk_key(ino, idx), data)
        return data

    @staticmethod
    async def _drain(state: OpenInode) -> None:
        """Wait until none of a file's chunks are in flight."""
        while state.storing:
            await next(iter(state.storing.values()))[1].wait()

    @staticmethod
    def _raise_stored_error(state: OpenInode) -> None:
        if state.error is not None:
            exc, state.error = state.error, None
            raise exc

    def _dirty_chunk(self, ino: int, state: OpenInode, idx: int) -> DirtyChunk:
        """The write buffer of chunk ``idx``, filled with what the chunk holds now."""
        chunk = state.dirty.get(idx)
        if chunk is not None:
            return chunk
        self._drop_cached_chunk(state, idx)  # it is being rewritten
        # Page-aligned (mmap) buffers: the store can write them through to SSD with O_DIRECT.
        buf = self.spare_buffers.pop() if self.spare_buffers else mmap.mmap(-1, self.chunk_size)
        filled = 0
        if idx * self.chunk_size < state.size:
            inline = self.ns.get_inline(ino) if idx == 0 and self.inline_max else None
            if inline is not None:
                buf[: len(inline)] = inline
                filled = len(inline)
            elif self.ns.has_chunk(ino, idx):
                filled = self.store.get_into(chunk_key(ino, idx), buf)
        chunk = state.dirty[idx] = DirtyChunk(buf, filled)
        return chunk

    def _store_chunk(self, ino: int, state: OpenInode, idx: int, durable: bool = False) -> None:
        chunk = state.dirty[idx]
        chunk.settle()
        n = min(self.chunk_size, state.size - idx * self.chunk_size)
        if n > 0:
            if n > chunk.filled:  # the file was extended past what was written: zeros
                chunk.buf[chunk.filled : n] = self.zeros[: n - chunk.filled]
            self._commit_before_chunk()
            self.store.put(chunk_key(ino, idx), memoryview(chunk.buf)[:n], durable=durable)
            self._add_chunk(ino, idx, memoryview(chunk.buf)[:n])
            if not durable:
                state.unsynced.add(idx)
        del state.dirty[idx]
        self.spare_buffers.append(chunk.buf)

    def _commit_before_chunk(self) -> None:
        """Before a chunk is stored: the file's inode first, where a crash must not leave a chunk whose
        inode is lost (unless the next mount collects such chunks: ``grouped_chunks``)."""
        if not self.grouped_chunks:
            self._commit()

    def _add_chunk(self, ino: int, idx: int, data: memoryview) -> None:
        """Record a stored chunk; in a shared namespace with its CRC-32C, published with the file at its
        flush, so that readers can check a copy they take from another reader rather than trust it."""
        if self.shared:
            self.ns.add_chunks(ino, [idx], {idx: crc32c(data)})
        else:
            self.ns.add_chunks(ino, [idx], grouped=self.grouped_chunks)

    def _store_chunks(self, ino: int, state: OpenInode, durable: bool = False) -> None:
        for idx in sorted(state.dirty):
            self._store_chunk(ino, state, idx, durable)

    async def _flush(self, ino: int, durable: bool = False) -> None:
        """Store an open file's buffered chunks and its size and times (close-to-open consistency);
        with ``durable``, make all of its data survive power loss.  Reports a failed background store."""
        state = self.files[ino]
        await self._drain(state)
        state.error = None  # its chunk is back among the dirty ones: committing retries it
        if self.lost is not None and (state.dirty or state.mtime is not None):
            raise fail(self.lost)  # the namespace lost changes: nothing more is recorded in it
        self._commit_file(ino, durable)

    def _commit_file(self, ino: int, durable: bool = False) -> None:
        state = self.files[ino]
        inline = self._take_inline(ino, state)
        self._store_chunks(ino, state, durable)
        if durable and state.unsynced:
            self.store.persist([chunk_key(ino, idx) for idx in state.unsynced])
            state.unsynced.clear()
        node = self.ns.get(ino) if state.mtime is not None or inline is not None else None
        if node is not None and state.mtime is not None:
            node.size, node.mtime, node.ctime = state.size, state.mtime, max(state.mtime, node.ctime)
        if node is not None and inline is not None:
            if self.ns.set_inline(ino, inline, node if state.mtime is not None else None):
                self._remove_chunks(ino, [0])  # the file shrank into its inline row
        elif node is not None and state.mtime is not None:
            self.ns.update(node)
        state.mtime = None
        if durable:
            self._commit()
            self.ns.sync()

    def _take_inline(self, ino: int, state: OpenInode) -> bytes | None:
        """A small file's bytes, taken from its write buffer to be kept inline (None: not inline).  A
        file grown past ``inline_max`` from its inline bytes gets them back in a chunk buffer, so they
        are stored as its chunk 0."""
        if state.size > self.inline_max:
            grown = self.inline_max and state.mtime is not None and 0 not in state.dirty
            if grown and self.ns.get_inline(ino) is not None:
                self._dirty_chunk(ino, state, 0)
            return None
        chunk = state.dirty.pop(0, None)
        if chunk is None:
            return None
        chunk.settle()
        if state.size > chunk.filled:  # the file was extended past what was written: zeros
            chunk.buf[chunk.filled : state.size] = self.zeros[: state.size - chunk.filled]
        data = chunk.buf[: state.size]
        self.spare_buffers.append(chunk.buf)
        state.unsynced.discard(0)
        return data

    def _truncate(self, node: Inode, size: int) -> None:
        """Cut or extend a file to ``size``: chunks past the end go, the last one is trimmed.  The
        caller has drained the file's in-flight chunks."""
        cs = self.chunk_size
        state = self.files.get(node.ino)
        if state is not None:
            self._drop_cached_chunk(state)
        keep = -(-size // cs)  # chunks that still hold data
        for idx in [i for i in (state.dirty if state else {}) if i >= keep]:
            self.spare_buffers.append(state.dirty.pop(idx).buf)  # type: ignore[union-attr]
        old_size = state.size if state else node.size
        # The new size goes into the change that forgets the chunks, committed before they leave the
        # store: a crash must not keep the old size over chunks that are gone (zeros where data was).
        node.size = size
        self.ns.update(node)
        self._remove_chunks(node.ino, self.ns.drop_chunks_from(node.ino, keep))
        tail = size % cs
        if tail and size <= old_size:  # (the same size: collect_leaked_chunks cuts what a crash left long)
            last = size // cs
            if state is not None and last in state.dirty:
                state.dirty[last].settle()
                state.dirty[last].filled = min(state.dirty[last].filled, tail)
            elif self.ns.has_chunk(node.ino, last) and self.store.stat(chunk_key(node.ino, last)).size > tail:
                key = chunk_key(node.ino, last)
                data = self.store.get(key)
                self._commit()  # the new size first, as for the chunks dropped: not the old over a cut chunk
                self.store.put(key, data[:tail])
                self._add_chunk(node.ino, last, memoryview(data)[:tail])
            elif last == 0 and self.inline_max:
                inline = self.ns.get_inline(node.ino)
                if inline is not None and len(inline) > tail:
                    self.ns.set_inline(node.ino, inline[:tail])
        if state is not None:
            state.size = size
            state.unsynced = {i for i in state.unsynced if i < keep}
        self.changed_since_open.add(node.ino)

    async def flush(self, fh: int) -> None:
        ino, _ = self.handles[fh]
        if ino in self.files:
            await self._flush(ino)

    async def fsync(self, fh: int, datasync: bool) -> None:
        ino, _ = self.handles[fh]
        if ino in self.files:
            await self._flush(ino, durable=True)

    async def release(self, fh: int) -> None:
        ino, _ = self.handles.pop(fh)
        state = self.files.get(ino)
        if state is None:
            return
        state.opens -= 1
        if state.opens:
            return
        self.ns.closing(ino)  # (a shared namespace: the flush also drops this mount's open marker)
        try:
            await self._flush(ino)
        finally:
            if not state.opens:  # (unless it was opened again while the flush waited)
                self._drop_cached_chunk(state)
                if self.swarm is not None:
                    self.swarm.closed(ino, state)
                del self.files[ino]
                self.ns.closed(ino)
                node = self.ns.get(ino)
                if node is not None:
                    self._maybe_delete(node, closed=True)
