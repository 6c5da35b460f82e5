"""The SSD tier: values packed into large append-only segment files, indexed in SQLite.

Layout under the tier's directory: ``seg-00000001.dat``, ``seg-00000002.dat``, ... each holding raw value
bytes at 512-byte aligned offsets.  The index (key -> segment, offset, size, CRC-32C, expiry, pin,
version, tag) is a SQLite table beside them, so a restart reads one table instead of scanning
segments.  A value is written to its segment before its index row is committed, so after any crash a
row points at complete bytes; bytes with no row are garbage that reclamation removes with their segment.

Space comes back a whole segment at a time: when a segment's last live value goes, its file is
deleted; when the tier is full, the store empties the segment with the fewest live bytes (relocating
what must stay, evicting the rest) and deletes it.  Not thread-safe: the store serialises calls, and
readers pin a segment so its file descriptor outlives a concurrent delete.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from mooncakefs import _engine
from mooncakefs.errors import MooncakeError, OutOfSpace

ALIGN = 512
DIRECT_ALIGN = 4096  # O_DIRECT needs page-aligned memory, offsets and lengths
DIRECT_MIN = 1 << 20  # below this the page cache is cheaper than a device round trip
_SEGMENT_FILE = re.compile(r"^seg-(\d{8})\.dat$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key BLOB PRIMARY KEY,
    seg INTEGER NOT NULL,
    off INTEGER NOT NULL,
    size INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    expires REAL NOT NULL DEFAULT 0,
    flags INTEGER NOT NULL DEFAULT 0,
    version_hi INTEGER NOT NULL DEFAULT 0,
    version_lo INTEGER NOT NULL DEFAULT 0,
    tag INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_seg ON objects(seg);
"""
# Columns added since the first release: an older index gains them (their default) when opened.
_ADDED_COLUMNS = {column: "INTEGER NOT NULL DEFAULT 0" for column in ("version_hi", "version_lo", "tag")}


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close(seg: Segment) -> None:
    os.close(seg.fd)
    if seg.direct_fd >= 0:
        os.close(seg.direct_fd)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN if n else ALIGN


@dataclass
class Segment:
    id: int
    path: Path
    fd: int
    size: int = 0       # bytes written (the next record goes here)
    live: int = 0       # aligned bytes of values still indexed
    readers: int = 0    # reads in flight: the fd stays open until they finish
    doomed: bool = False
    dir_synced: bool = False  # its directory entry is known to be on disk
    direct_fd: int = -1  # an O_DIRECT descriptor for large aligned appends (-1: none yet, -2: refused)


PINNED, STICKY = 1, 2  # bits of the index's flags column


@dataclass(frozen=True)
class Record:
    """One index row, as loaded at open."""

    key: bytes
    seg: int
    off: int
    size: int
    crc: int
    expires: float
    flags: int
    version: int
    tag: int


class SsdTier:
    name = "ssd"

    def __init__(self, directory: Path, capacity: int, *, segment_size: int, index_path: Path) -> None:
        if capacity < ALIGN:
            raise ValueError(f"ssd must be at least {ALIGN} bytes, got {capacity}")
        if segment_size < ALIGN:
            raise ValueError(f"segment_size must be at least {ALIGN} bytes, got {segment_size}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.segment_size = segment_size
        self.segments: dict[int, Segment] = {}
        self.active: Segment | None = None
        self.used = 0
        self._dirty = False
        self.db = sqlite3.connect(index_path, check_same_thread=False, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            have = {row[1] for row in self.db.execute("PRAGMA table_info(objects)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    self.db.execute(f"ALTER TABLE objects ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise MooncakeError(
                f"the SSD tier's index {index_path} is unreadable ({exc}); the segments in {self.dir} cannot be "
                "used without it: move both aside to start with an empty SSD tier"
            ) from None
        self._next_id = 1
        self._wal_path = Path(f"{index_path}-wal")

    # -- start-up --------------------------------------------------------------------------------------

    def load(self, now: float) -> list[Record]:
        """Open the segments and return every index row that points at intact bytes.

        Rows for missing or truncated segments, or expired values, are deleted; segments no row uses are
        deleted too (what a crash between writing bytes and committing their row leaves behind)."""
        for path in sorted(self.dir.iterdir()):
            match = _SEGMENT_FILE.match(path.name)
            if match:
                seg_id = int(match.group(1))
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self.segments[seg_id] = Segment(seg_id, path, fd, size=os.fstat(fd).st_size, dir_synced=True)
                self._next_id = max(self._next_id, seg_id + 1)
        records, stale = [], []
        for key, seg_id, off, size, crc, expires, flags, version_hi, version_lo, tag in self.db.execute(
            "SELECT key, seg, off, size, crc, expires, flags, version_hi, version_lo, tag FROM objects"
        ):
            seg = self.segments.get(seg_id)
            if seg is None or off + size > max(seg.size, off) or (expires and expires <= now):
                stale.append((key,))
                continue
            seg.live += aligned(size)
            version = version_hi << 63 | version_lo
            records.append(Record(bytes(key), seg_id, off, size, crc, expires, flags, version, tag))
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM objects WHERE key = ?", stale)
        self.db.execute("COMMIT")
        for seg in list(self.segments.values()):
            if seg.live == 0:
                self._delete(seg)
        self.used = sum(seg.size for seg in self.segments.values())
        return records

    # -- writing ---------------------------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Bytes of values still indexed (``used`` also counts garbage not yet reclaimed)."""
        return sum(seg.live for seg in self.segments.values())

    def fits(self, size: int) -> bool:
        return self.used + aligned(size) <= self.capacity

    def append(self, key: bytes, data: memoryview, crc: int, expires: float, flags: int,
               version: int = 0, tag: int = 0) -> tuple[int, int]:
        """Write one value and index it (uncommitted); returns (segment id, offset).  The caller checked
        ``fits``.  A value larger than a segment gets a segment of its own.  Large page-aligned values
        bypass the page cache (O_DIRECT): filling fresh page-cache pages is slow, and they would only
        push out what readers use."""
        size = data.nbytes
        seg = self.active
        if seg is None or (seg.size and seg.size + size + DIRECT_ALIGN > self.segment_size):
            seg = self._new_segment()
        fd = self._direct_fd(seg, data)
        if fd >= 0:
            gap = -seg.size % DIRECT_ALIGN
            seg.size += gap  # padding: garbage, like the end of any record
            self.used += gap
        else:
            fd = seg.fd
        off = seg.size
        written = 0
        try:
            while written < size:
                written += os.pwrite(fd, data[written:], off + written)
        except OSError as exc:  # nothing was indexed: the bytes written so far are garbage to overwrite
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"the disk under the SSD tier ({self.dir}) is full: {exc.strerror}") from None
            raise
        seg.size += aligned(size)
        seg.live += aligned(size)
        self.used += aligned(size)
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO objects (key, seg, off, size, crc, expires, flags, version_hi, version_lo, tag) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, seg.id, off, size, crc, expires, flags, version >> 63, version & _engine.VERSION_LOW_MASK, tag),
        )
        return seg.id, off

    @staticmethod
    def _direct_fd(seg: Segment, data: memoryview) -> int:
        """The segment's O_DIRECT descriptor if ``data`` can be written through it, else -1."""
        size = data.nbytes
        if size < DIRECT_MIN or size % DIRECT_ALIGN or _engine.address(data) % DIRECT_ALIGN or seg.direct_fd == -2:
            return -1
        if seg.direct_fd == -1:
            try:
                seg.direct_fd = os.open(seg.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # a filesystem without O_DIRECT: use the page cache
                seg.direct_fd = -2
                return -1
        return seg.direct_fd

    def _new_segment(self) -> Segment:
        seg_id = self._next_id
        self._next_id += 1
        path = self.dir / f"seg-{seg_id:08d}.dat"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        seg = self.segments[seg_id] = Segment(seg_id, path, fd)
        self.active = seg
        return seg

    def drop(self, key: bytes, seg_id: int, off: int, size: int) -> None:
        """Forget one stored value: its bytes become garbage, and an emptied sealed segment goes."""
        seg = self.segments[seg_id]
        seg.live -= aligned(size)
        self._begin()
        self.db.execute("DELETE FROM objects WHERE key = ? AND seg = ? AND off = ?", (key, seg_id, off))
        if seg.live == 0:  # nothing left in it (the active one too: the next value starts a new one)
            self._delete(seg)

    def _begin(self) -> None:
        if not self._dirty:
            self.db.execute("BEGIN")
            self._dirty = True

    def commit(self, *, durable_segments: set[int] | None = None) -> None:
        """Commit index changes.  With ``durable_segments``, also flush those segments' bytes, their
        directory entries and the committed index to the disk, so the values survive power loss, not
        only a crash of this process."""
        if durable_segments:
            for seg_id in durable_segments:
                seg = self.segments[seg_id]
                os.fdatasync(seg.fd)
                if not seg.dir_synced:
                    _fsync_path(self.dir)
                    seg.dir_synced = True
        if self._dirty:
            self._dirty = False
            self.db.execute("COMMIT")
        if durable_segments:
            # In WAL mode a commit is an append to the -wal file; syncing it is what synchronous=FULL
            # would do on every commit.  Doing it only here keeps other commits free of fsyncs.
            _fsync_path(self._wal_path)

    # -- reading ---------------------------------------------------------------------------------------

    def pin(self, seg_id: int) -> Segment:
        seg = self.segments[seg_id]
        seg.readers += 1
        return seg

    def unpin(self, seg: Segment) -> None:
        seg.readers -= 1
        if seg.doomed and seg.readers == 0:
            _close(seg)

    @staticmethod
    def read_into(seg: Segment, off: int, size: int, dst: memoryview) -> None:
        """Read ``size`` bytes straight into ``dst`` (no GIL or store lock held during the I/O)."""
        done = 0
        while done < size:
            n = os.preadv(seg.fd, [dst[done:size]], off + done)
            if n == 0:
                raise OSError(f"segment {seg.path} ends before offset {off + size}")
            done += n

    @staticmethod
    def read(seg: Segment, off: int, size: int) -> bytes:
        data = os.pread(seg.fd, size, off)
        if len(data) != size:
            raise OSError(f"segment {seg.path} ends before offset {off + size}")
        return data

    # -- reclaiming ------------------------------------------------------------------------------------

    def victim(self, skip: set[int]) -> Segment | None:
        """The segment whose removal frees the most for the least loss: fewest live bytes, oldest
        first, leaving out ``skip``.  The active segment qualifies too (it is sealed first) so a tier
        of one segment works."""
        candidates = [seg for seg in self.segments.values() if seg.size and seg.id not in skip]
        if not candidates:
            return None
        seg = min(candidates, key=lambda s: (s.live, s.id))
        if seg is self.active:
            self.active = None
        return seg

    def keys_in(self, seg_id: int) -> list[bytes]:
        return [bytes(k) for (k,) in self.db.execute("SELECT key FROM objects WHERE seg = ?", (seg_id,))]

    def remove_segment(self, seg: Segment) -> None:
        """Delete a segment once the store has moved or dropped every value in it."""
        self._begin()
        self.db.execute("DELETE FROM objects WHERE seg = ?", (seg.id,))
        self._delete(seg)

    def _delete(self, seg: Segment) -> None:
        self.segments.pop(seg.id, None)
        self.used -= seg.size
        if self.active is seg:
            self.active = None
        seg.path.unlink(missing_ok=True)
        if seg.readers:
            seg.doomed = True
        else:
            _close(seg)

    def close(self) -> None:
        self.commit()
        self.db.close()
        for seg in self.segments.values():
            if not seg.readers:
                _close(seg)
            else:
                seg.doomed = True
        self.segments.clear()
        self.active = None
