"""The filesystem namespace: inodes, directory entries, extended attributes and chunk maps in SQLite.

File bytes are not here: they are chunk objects in the store, keyed by (inode, chunk index).  The
``chunks`` table records which chunks were written, so a hole (never written: reads as zeros) can be
told apart from a lost chunk (recorded but gone from the store: reads fail with EIO).  Small files
are the exception: their bytes live ``inline`` here, committed with the file's size in one
transaction (see ``MooncakeFS._take_inline``).  Where a file has an inline row, it is the truth
for chunk 0, whatever the store holds under that chunk's key.

Every method is one atomic change.  By default each is committed before it returns; a serving mount
groups them (``group_commits``): changes go into one open transaction, each in a savepoint, until the
mount commits the group (on a timer, at fsync, fsyncdir, statfs and unmount, before store objects
that depend on the namespace are written or removed, and after ``GROUP_MAX`` changes).  A commit costs
as much as the rest of a create (a WAL append of every page it touched), so a group of them costs about
one.  A crash of this process loses the open group only: the namespace comes back as it was at some
commit, never with half a change (WAL mode: a commit survives a crash of this process; ``sync()``
also makes it survive power loss).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3

from mooncakefs.datadir import private_dir, private_file, tighten
from mooncakefs.errors import MooncakeError

ROOT = pyfuse3.ROOT_INODE
CACHED_INODES = 1 << 16  # rows kept in memory: every request reads one or two (a SELECT costs 30-90 us)
# The WAL is checkpointed into the database every this many pages (64 MiB).  A checkpoint syncs both
# files; SQLite's default (1000 pages) made it every few hundred file creates, 40% of a commit's cost.
WAL_CHECKPOINT_PAGES = 16384
GROUP_MAX = 1024  # changes in one group commit at most (a group's pages stay in SQLite's cache until then)

FORMAT = 2  # 1: inodes, dentries, xattrs, settings; 2: small files' bytes inline
_SCHEMA = """
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    atime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    target BLOB
);
CREATE TABLE IF NOT EXISTS dentries (
    id INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    ino INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inline (ino INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def may_unlink(node: Inode, rmdir: bool, is_empty: Callable[[int], bool]) -> None:
    """Raise the errno an unlink (or, ``rmdir``, an rmdir) of ``node`` gets, if it is refused."""
    if rmdir and not node.is_dir:
        raise fail(errno.ENOTDIR)
    if not rmdir and node.is_dir:
        raise fail(errno.EISDIR)
    if rmdir and not is_empty(node.ino):
        raise fail(errno.ENOTEMPTY)


def count_unlink(parent: Inode, node: Inode) -> None:
    """Link counts and times after ``node``'s entry in ``parent`` goes."""
    now = time.time_ns()
    parent.mtime = parent.ctime = node.ctime = now
    if node.is_dir:
        parent.nlink -= 1
        node.nlink = 0
    else:
        node.nlink -= 1


def may_replace(node: Inode, target: Inode, flags: int, is_empty: Callable[[int], bool]) -> bool:
    """Whether a rename of ``node`` may replace ``target`` (POSIX); False when both names are one file,
    so there is nothing to do.  Raises the errno a refused rename gets."""
    if flags & pyfuse3.RENAME_NOREPLACE:
        raise fail(errno.EEXIST)
    if target.ino == node.ino:
        return False
    if target.is_dir and not node.is_dir:
        raise fail(errno.EISDIR)
    if node.is_dir and not target.is_dir:
        raise fail(errno.ENOTDIR)
    if target.is_dir and not is_empty(target.ino):
        raise fail(errno.ENOTEMPTY)
    return True


def _batches(values: list[int], size: int = 500) -> Iterator[tuple[list[int], str]]:
    """``values`` in slices of at most ``size``, each with the "?,?,..." of its ``IN (...)``."""
    for start in range(0, len(values), size):
        batch = values[start : start + size]
        yield batch, ",".join("?" * len(batch))


@dataclass
class Inode:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime: int
    mtime: int
    ctime: int
    target: bytes | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Namespace:
    shared = False  # only this mount changes it (EtcdNamespace: every mount of a cluster does)

    def __init__(self, path: Path, *, chunk_size: int, fresh: bool = False) -> None:
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        self.path = path
        # Names, sizes and xattrs are private: SQLite gives -wal and -shm the mode of the db file, so
        # making that 0600 (and its directory 0700) ourselves keeps all of it private whatever the umask.
        private_dir(path.parent)
        tighten(Path(f"{path}-wal"), Path(f"{path}-shm"))
        os.close(private_file(path))
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        # Debian's SQLite zeroes every freed page (SECURE_DELETE): an unlinked small file's inline page was
        # written to the WAL once more, as zeros, at its deletion and at the commit, 40% of an unlink's
        # CPU in a profile of an unlink loop.  FAST zeroes only what a change writes anyway; a freed page
        # keeps its old bytes until reused, as a disk filesystem's freed blocks do (the file is 0600).
        self.db.execute("PRAGMA secure_delete=FAST")
        self.db.executescript(_SCHEMA)
        # Inode rows as the database has them: only this mount changes them, so reads need not ask it.
        self._rows: dict[int, tuple[Any, ...]] = {}
        self._grouped = 0  # changes in the open group, not committed yet
        self._nested = False  # inside a change: methods it calls join it
        self._on_group: Callable[[], None] | None = None  # group commits: told when a change opens a group
        self._check_format()
        stored = self.db.execute("SELECT value FROM settings WHERE name = 'chunk_size'").fetchone()
        if stored is None:
            self.db.execute("INSERT INTO settings VALUES ('chunk_size', ?)", (str(chunk_size),))
        self.chunk_size = int(stored[0]) if stored else chunk_size  # files keep the size they were made with
        if self.get(ROOT) is None:
            now = time.time_ns()
            self.db.execute(
                "INSERT INTO inodes (ino, mode, nlink, uid, gid, atime, mtime, ctime) VALUES (?,?,?,?,?,?,?,?)",
                (ROOT, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), now, now, now),
            )

    def _check_format(self) -> None:
        """Refuse a namespace written by a newer mooncakefs (it may keep bytes where this one would not
        look, e.g. inline small files read as zeros before format 2), and stamp older ones as current:
        every change so far only added tables."""
        stored = self.db.execute("SELECT value FROM settings WHERE name = 'format'").fetchone()
        found = int(stored[0]) if stored else 1
        if found > FORMAT:
            self.db.close()
            raise MooncakeError(
                f"{self.path} is namespace format {found}, written by a newer mooncakefs; this one reads up to "
                f"format {FORMAT}: upgrade mooncakefs to mount it"
            )
        if found < FORMAT or stored is None:
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('format', ?)", (str(FORMAT),))

    # -- sessions ----------------------------------------------------------------------------------------

    def open_session(self) -> bool:
        """Mark the namespace in use until ``close_session`` (committed at once), and say whether the
        last mount of it ended with one: if not (a crash, or a namespace older than the mark), the store
        may hold chunks recorded only in a group the crash lost."""
        row = self.db.execute("SELECT value FROM settings WHERE name = 'clean'").fetchone()
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('clean', '0')")
        self.commit()
        return row is not None and row[0] == "1"

    def close_session(self) -> None:
        """Mark a clean end (in the open group: the caller commits it after everything else)."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('clean', '1')")

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.db.close()

    def group_commits(self, on_open: Callable[[], None] | None) -> None:
        """Leave changes uncommitted until ``commit()`` (or ``GROUP_MAX`` of them): ``on_open`` is called
        when a change opens a new group, so that the caller commits it soon.  None: each change commits
        before it returns (the default; it commits the open group first)."""
        self.commit()
        self._on_group = on_open

    @property
    def uncommitted(self) -> int:
        """How many changes a crash of this process would lose now."""
        return self._grouped

    def commit(self) -> None:
        """Commit the open group, if any: every change made so far survives a crash of this process.  On
        failure (a full disk) SQLite has rolled the whole group back: the error is raised, and the group's
        changes are gone."""
        if not self.db.in_transaction:
            return
        try:
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._rows.clear()  # rows changed in the group are no longer what they say
            raise
        finally:
            self._grouped = 0

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic change: a transaction of its own, or a savepoint inside the open group (or inside
        the change that calls this one, which alone counts and commits)."""
        if self._nested:
            yield
            return
        opened = not self.db.in_transaction
        self.db.execute("BEGIN IMMEDIATE" if opened else "SAVEPOINT change")
        self._nested = True
        try:
            yield
        except BaseException:
            if opened:
                self.db.execute("ROLLBACK")
            else:
                self.db.execute("ROLLBACK TO change")
                self.db.execute("RELEASE change")
            self._rows.clear()  # rows changed inside the transaction are no longer what they say
            raise
        finally:
            self._nested = False
        if not opened:
            self.db.execute("RELEASE change")
        self._grouped += 1
        if self._on_group is None or self._grouped >= GROUP_MAX:
            self.commit()
        elif opened:
            self._on_group()

    def sync(self) -> None:
        """Commit, and make every committed change survive power loss (a WAL commit is an append to -wal)."""
        self.commit()
        fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- inodes ----------------------------------------------------------------------------------------

    def get(self, ino: int) -> Inode | None:
        row = self._rows.get(ino)
        if row is None:
            row = self.db.execute("SELECT * FROM inodes WHERE ino = ?", (ino,)).fetchone()
            if row is None:
                return None
            self._cache(row)
        return Inode(*row)

    def _cache(self, row: tuple[Any, ...]) -> None:
        if len(self._rows) >= CACHED_INODES:
            self._rows.clear()
        self._rows[row[0]] = row

    def get_many(self, inos: list[int]) -> list[Inode | None]:
        return [self.get(ino) for ino in inos]

    def inode(self, ino: int) -> Inode:
        node = self.get(ino)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def update(self, node: Inode) -> None:
        row = (
            node.ino,
            node.mode,
            node.nlink,
            node.uid,
            node.gid,
            node.rdev,
            node.size,
            node.atime,
            node.mtime,
            node.ctime,
            node.target,
        )
        with self._transaction():
            self.db.execute(
                "UPDATE inodes SET mode=?, nlink=?, uid=?, gid=?, rdev=?, size=?, atime=?, mtime=?, ctime=?, target=? "
                "WHERE ino=?",
                (*row[1:], node.ino),
            )
            self._cache(row)

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name)).fetchone()
        return row[0] if row else None

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
    ) -> Inode:
        """A new inode linked at parent/name (EEXIST if the name is taken).  (``opened``: the caller
        opens it at once; it matters only where other mounts share the namespace.)"""
        parent_node = self._directory(parent)
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        with self._transaction():
            values = (mode, 2 if is_dir else 1, uid, gid, rdev, len(target or b""), now, now, now, target)
            ino = self.db.execute(
                "INSERT INTO inodes (mode, nlink, uid, gid, rdev, size, atime, mtime, ctime, target) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                values,
            ).lastrowid
            try:  # (UNIQUE (parent, name) checks the name: cheaper than a lookup first)
                self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?,?,?)", (parent, name, ino))
            except sqlite3.IntegrityError:
                raise fail(errno.EEXIST) from None
            parent_node.mtime = parent_node.ctime = now
            parent_node.nlink += is_dir
            self.update(parent_node)
            self._cache((ino, *values))
        return self.inode(ino)

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        node = self.inode(ino)
        if node.is_dir:
            raise fail(errno.EPERM)
        parent_node = self._directory(parent)
        with self._transaction():
            if self.lookup(parent, name) is not None:
                raise fail(errno.EEXIST)
            self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?,?,?)", (parent, name, ino))
            node.nlink += 1
            node.ctime = parent_node.mtime = parent_node.ctime = time.time_ns()
            self.update(node)
            self.update(parent_node)
        return node

    def unlink(self, parent: int, name: bytes, *, rmdir: bool) -> Inode:
        """Remove a directory entry; returns the inode with its new link count (0: no names left)."""
        ino = self.lookup(parent, name)
        if ino is None:
            raise fail(errno.ENOENT)
        node = self.inode(ino)
        may_unlink(node, rmdir, self._is_empty)
        with self._transaction():
            self._drop_entry(parent, name, node)
        return node

    def _drop_entry(self, parent: int, name: bytes, node: Inode) -> None:
        """Unlink ``name`` (inside a transaction)."""
        self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        parent_node = self.inode(parent)
        count_unlink(parent_node, node)
        self.update(parent_node)
        self.update(node)

    def _is_empty(self, ino: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)).fetchone() is None

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> Inode | None:
        """Move an entry; returns the inode a plain rename replaced (its link count already dropped)."""
        ino = self.lookup(old_parent, old_name)
        if ino is None:
            raise fail(errno.ENOENT)
        self._directory(new_parent)
        node = self.inode(ino)
        target_ino = self.lookup(new_parent, new_name)
        target = self.inode(target_ino) if target_ino is not None else None
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise fail(errno.ENOENT)
            with self._transaction():
                self._set_entry(old_parent, old_name, target.ino)
                self._set_entry(new_parent, new_name, node.ino)
                if node.is_dir != target.is_dir and old_parent != new_parent:
                    moved_dir = 1 if node.is_dir else -1
                    self._adjust_nlink(old_parent, -moved_dir)
                    self._adjust_nlink(new_parent, moved_dir)
                self._touch(old_parent, new_parent, node, target)
            return None
        if target is not None and not may_replace(node, target, flags, self._is_empty):
            return None
        with self._transaction():
            if target is not None:
                self._drop_entry(new_parent, new_name, target)
            self.db.execute(
                "UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
                (new_parent, new_name, old_parent, old_name),
            )
            if node.is_dir and old_parent != new_parent:
                self._adjust_nlink(old_parent, -1)
                self._adjust_nlink(new_parent, 1)
            self._touch(old_parent, new_parent, node)
        return target

    def _set_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", (ino, parent, name))

    def _adjust_nlink(self, ino: int, delta: int) -> None:
        self.db.execute("UPDATE inodes SET nlink = nlink + ? WHERE ino = ?", (delta, ino))
        self._rows.pop(ino, None)

    def _touch(self, old_parent: int, new_parent: int, *nodes: Inode) -> None:
        now = time.time_ns()
        self.db.execute(
            "UPDATE inodes SET mtime = ?, ctime = ? WHERE ino IN (?, ?)", (now, now, old_parent, new_parent)
        )
        for node in nodes:
            self.db.execute("UPDATE inodes SET ctime = ? WHERE ino = ?", (now, node.ino))
        for ino in (old_parent, new_parent, *(node.ino for node in nodes)):
            self._rows.pop(ino, None)

    def chunks_of(self, inos: list[int]) -> list[tuple[int, int]]:
        """The stored chunks of these inodes, as (inode, index)."""
        found: list[tuple[int, int]] = []
        for batch, marks in _batches(inos):
            found += self.db.execute(f"SELECT ino, idx FROM chunks WHERE ino IN ({marks})", batch).fetchall()
        return found

    def remove_inodes(self, inos: list[int]) -> None:
        """Delete inodes that have no names and no open handles, in one change (a commit costs more than
        the deletes; a statement per table, not per inode).  Their chunks must have left the store
        already: a crash before this commits leaves the inodes nameless, for the next mount to collect."""
        with self._transaction():
            for batch, marks in _batches(inos):
                for table in ("chunks", "inline", "xattrs", "inodes"):
                    self.db.execute(f"DELETE FROM {table} WHERE ino IN ({marks})", batch)
            for ino in inos:
                self._rows.pop(ino, None)

    def orphans(self) -> list[int]:
        """Inodes left with no names (unlinked while open when the last mount ended)."""
        return [ino for (ino,) in self.db.execute("SELECT ino FROM inodes WHERE nlink = 0 AND ino != ?", (ROOT,))]

    # Open files matter only where other mounts share the namespace (they must not delete a file
    # that this mount has open): here, the filesystem's own count of open files is enough.

    def opened(self, ino: int) -> None:
        pass

    def closing(self, ino: int) -> None:
        pass

    def closed(self, ino: int) -> None:
        pass

    def _directory(self, ino: int) -> Inode:
        node = self.inode(ino)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        return node

    # -- directories -----------------------------------------------------------------------------------

    def entries(self, parent: int, after: int, limit: int = 1024) -> list[tuple[int, bytes, int]]:
        """(cookie, name, ino) of a directory's entries after cookie ``after``, in a stable order."""
        return self.db.execute(
            "SELECT id, name, ino FROM dentries WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
            (parent, after, limit),
        ).fetchall()

    # -- chunks ----------------------------------------------------------------------------------------

    def has_chunk(self, ino: int, idx: int) -> bool:
        return self.db.execute("SELECT 1 FROM chunks WHERE ino = ? AND idx = ?", (ino, idx)).fetchone() is not None

    def add_chunks(
        self, ino: int, indexes: list[int], sums: dict[int, int] | None = None, *, grouped: bool = False
    ) -> None:
        """Record stored chunks (``sums``, their CRC-32Cs, matter only to a shared namespace).  A stored
        chunk 0 replaces the file's inline bytes.  The chunk is in the store already, and a crash must
        not leave it there unrecorded, a leak: so this commits at once, with the group before it, unless
        ``grouped``, where the caller removes what a crash left unrecorded at the next mount
        (``open_session``, ``chunk_records``); a commit per chunk was ~5% of a sequential write's
        request-loop time."""
        with self._transaction():
            self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?)", [(ino, i) for i in indexes])
            if 0 in indexes:
                self.db.execute("DELETE FROM inline WHERE ino = ?", (ino,))
        if not grouped:
            self.commit()

    def chunk_records(self) -> set[tuple[int, int]]:
        """Every recorded chunk, as (inode, index)."""
        return set(self.db.execute("SELECT ino, idx FROM chunks"))

    def drop_chunks_from(self, ino: int, first: int) -> list[int]:
        """Forget chunks ``first`` and beyond (truncation), inline bytes too from 0; returns the indexes
        of the stored ones."""
        with self._transaction():
            dropped = [i for (i,) in self.db.execute("SELECT idx FROM chunks WHERE ino = ? AND idx >= ?", (ino, first))]
            self.db.execute("DELETE FROM chunks WHERE ino = ? AND idx >= ?", (ino, first))
            if first == 0:
                self.db.execute("DELETE FROM inline WHERE ino = ?", (ino,))
        return dropped

    # -- inline data -----------------------------------------------------------------------------------

    def get_inline(self, ino: int) -> bytes | None:
        row = self.db.execute("SELECT data FROM inline WHERE ino = ?", (ino,)).fetchone()
        return row[0] if row else None

    def set_inline(self, ino: int, data: bytes, node: Inode | None = None) -> bool:
        """Keep a small file's bytes here, and (``node``) its new attributes, in one transaction.
        Returns whether a stored chunk 0 was forgotten: the caller removes it from the store."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO inline VALUES (?, ?)", (ino, data))
            dropped = self.db.execute("DELETE FROM chunks WHERE ino = ? AND idx = 0", (ino,)).rowcount > 0
            if node is not None:
                self.update(node)
        return dropped

    # -- extended attributes ---------------------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.db.execute("SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name)).fetchone()
        return row[0] if row else None

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO xattrs VALUES (?, ?, ?)", (ino, name, value))
            self.db.execute("UPDATE inodes SET ctime = ? WHERE ino = ?", (time.time_ns(), ino))
            self._rows.pop(ino, None)

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for (name,) in self.db.execute("SELECT name FROM xattrs WHERE ino = ?", (ino,))]

    def removexattr(self, ino: int, name: bytes) -> bool:
        with self._transaction():
            return self.db.execute("DELETE FROM xattrs WHERE ino = ? AND name = ?", (ino, name)).rowcount > 0

    def inode_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM inodes").fetchone()[0]

    def counts(self) -> tuple[int, int]:
        """(inodes, chunks) in the namespace."""
        inodes = self.db.execute("SELECT count(*) FROM inodes").fetchone()[0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return inodes, chunks
