"""The SSD tier: values packed into large append-only segments, indexed in SQLite.

Segments live either as files in a directory (``seg-00000001.dat``, ``seg-00000002.dat``, ...) or in
fixed-size regions of a raw block device (``ssd_device.py``); ``segments.py`` is the seam between the two,
and everything below (what a segment holds, its journal, load, rebuild, fsck) is the same for both.  A
segment holds raw value bytes at 512-byte aligned offsets.  The index (key -> segment, offset, size,
CRC-32C, expiry, pin, version, tag) is a SQLite table in the data dir, so a restart reads one table
instead of scanning segments.  A value is written to its segment before its index row is committed, so after any crash a
row points at complete bytes; bytes with no row are garbage that reclamation removes with their segment.

Each segment also has a journal (beside a segment file, ``seg-00000001.keys``; in a device region, its
journal area): one checksummed record per value appended
(key, offset, size, CRC-32C, expiry, flags, version, tag, sequence number) and a tombstone per value
dropped from it, buffered and written just before each index commit (and synced with the segment for
durable puts).  The index records the highest sequence number it has taken in, so an index that is
behind its journals (a lost ``-wal``) is rolled forward at open, and a damaged one is moved aside and
rebuilt from the journals alone.  Segments written before journals existed can be rebuilt only from
their old index.

Space comes back a whole segment at a time: when a segment's last live value goes, it is deleted (its
files, or its region's header); when the tier is full, the store empties the segment with the fewest
live bytes (relocating what must stay, evicting the rest) and deletes it.  Not thread-safe: the store
serialises calls, and readers pin a segment so its file descriptor (or its region) outlives a
concurrent delete.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mooncakefs import _engine
from mooncakefs._engine import Entry
from mooncakefs.datadir import private_file, tighten
from mooncakefs.errors import InvalidArgument, MooncakeError
from mooncakefs.tiers.base import Placement
from mooncakefs.tiers.segments import (
    DIRECT_ALIGN,
    SegmentFiles,
    SegmentPlace,
    SegmentStore,
    direct_aligned,
    fsync_path,
    full_disk,
    is_block_device,
)
from mooncakefs.units import format_size, parse_size, parse_ssd

log = logging.getLogger("mooncakefs.ssd")

ALIGN = _engine.SSD_ALIGN  # 512: records start on it (entries keep SSD offsets in these units)
__all__ = ["DIRECT_ALIGN", "Reservation", "SsdTier", "fsck", "open_segments", "resolve_ssd"]
# Journal: a header (magic, format, segment id), then records.  A record is _RECORD (its CRC-32C over
# everything after the CRC field; kind, flags, key length, sequence number, offset, size, value CRC,
# tag, expiry, version halves), the key, and its own length again, so the last one can be read from
# the end of the file without scanning.
_JOURNAL_HEAD = struct.Struct("<8sII")
_JOURNAL_MAGIC = b"MCFSKEYS"
_JOURNAL_FORMAT = 1
_RECORD = struct.Struct("<IBBHQQQIIdQQ")
_RECORD_BODY = struct.Struct("<BBHQQQIIdQQ")  # _RECORD without its CRC
_CRC = struct.Struct("<I")
_TRAILER = struct.Struct("<H")
_MAX_KEY = 1024
_MAX_RECORD = _RECORD.size + _MAX_KEY + _TRAILER.size
PUT, TOMBSTONE = 1, 2
_VERIFY_CHUNK = 8 << 20
SYNC_THREADS = 8  # segments a durable commit syncs at once
_DEVICE_UUID, _DEVICE_SIZE = "device_uuid", "device_size"  # the meta rows naming the device an index is for
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
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
# Columns added since the first release: an older index gains them (their default) when opened.
_ADDED_COLUMNS = {column: "INTEGER NOT NULL DEFAULT 0" for column in ("version_hi", "version_lo", "tag")}


def _pack_record(
    kind: int,
    key: bytes,
    seq: int,
    off: int,
    size: int,
    crc: int = 0,
    expires: float = 0.0,
    flags: int = 0,
    version: int = 0,
    tag: int = 0,
) -> bytes:
    """One journal record (on the put path: one pack, one CRC, no slicing)."""
    body = (
        _RECORD_BODY.pack(
            kind,
            flags,
            len(key),
            seq,
            off,
            size,
            crc,
            tag,
            expires or 0.0,
            version >> 63,
            version & _engine.VERSION_LOW_MASK,
        )
        + key
        + _TRAILER.pack(_RECORD.size + len(key) + 2)
    )
    return _CRC.pack(_engine.crc32c(body)) + body


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


@dataclass(frozen=True)
class JournalRecord(Record):
    """One journal record: a value appended to segment ``seg`` (PUT) or dropped from it (TOMBSTONE),
    with its place in the tier's sequence."""

    kind: int
    seq: int


def _unpack_record(buf: bytes | memoryview, pos: int, seg_id: int) -> tuple[JournalRecord | None, int]:
    """The record at ``pos`` and where the next one starts; (None, next) for a damaged record whose
    extent is still plain, (None, -1) where the journal stops making sense (a torn or zeroed tail)."""
    if pos + _RECORD.size + _TRAILER.size > len(buf):
        return None, -1
    crc, kind, flags, klen, seq, off, size, vcrc, tag, expires, v_hi, v_lo = _RECORD.unpack_from(buf, pos)
    end = pos + _RECORD.size + klen + _TRAILER.size
    if kind not in (PUT, TOMBSTONE) or not 0 < klen <= _MAX_KEY or end > len(buf):
        return None, -1
    if _TRAILER.unpack_from(buf, end - _TRAILER.size)[0] != end - pos:
        return None, -1
    if _engine.crc32c(memoryview(buf)[pos + 4 : end]) != crc:
        return None, end
    key = bytes(buf[pos + _RECORD.size : end - _TRAILER.size])
    return JournalRecord(key, seg_id, off, size, vcrc, expires, flags, v_hi << 63 | v_lo, tag, kind, seq), end


@dataclass
class Journal:
    """What reading one journal found."""

    records: list[JournalRecord]
    damaged: int  # records dropped: their checksum failed
    end: int  # where the last whole record ends; bytes past it are a torn tail
    size: int  # the file's size


def read_journal(place: SegmentPlace, seg_id: int) -> Journal:
    """Parse a segment's journal, dropping damaged records and stopping at a torn tail."""
    buf, extent = place.journal_read()
    head = _JOURNAL_HEAD.size
    if len(buf) < head or _JOURNAL_HEAD.unpack_from(buf)[0] != _JOURNAL_MAGIC:
        return Journal([], 1 if extent else 0, 0, extent)
    records, damaged, pos = [], 0, head
    while True:
        rec, end = _unpack_record(buf, pos, seg_id)
        if end < 0:
            break
        if rec is None:
            damaged += 1
        else:
            records.append(rec)
        pos = end
    return Journal(records, damaged + (pos < extent), pos, extent)


def _tail_seq(place: SegmentPlace, seg_id: int) -> int | None:
    """The sequence number of the journal's last record (0: none), read from its end without a scan;
    None if the tail is not a whole record, or where the journal ends is not known without reading it
    (then the journal must be read in full)."""
    size = place.journal_extent()
    if size is None:
        return None
    head = place.journal_pread(_JOURNAL_HEAD.size, 0)
    if len(head) < _JOURNAL_HEAD.size or _JOURNAL_HEAD.unpack(head)[0] != _JOURNAL_MAGIC:
        return None
    if size == _JOURNAL_HEAD.size:
        return 0
    if size < _JOURNAL_HEAD.size + _RECORD.size + _TRAILER.size:
        return None
    length = _TRAILER.unpack(place.journal_pread(_TRAILER.size, size - _TRAILER.size))[0]
    if length > size - _JOURNAL_HEAD.size:
        return None
    rec, end = _unpack_record(place.journal_pread(length, size - length), 0, seg_id)
    return rec.seq if rec is not None and end == length else None


@dataclass
class Recovery:
    """What opening the tier took from its journals that its index did not have."""

    reason: str  # why: the index was damaged, missing, behind its journals, or a rebuild was asked for
    rebuilt: bool  # the index was replaced (else rolled forward)
    moved_to: Path | None = None  # where the damaged index went
    recovered: int = 0  # values taken from the journals
    recovered_bytes: int = 0
    removed: int = 0  # index rows that journal tombstones removed
    lost: int = 0  # journal values whose bytes were missing or failed their checksum
    lost_bytes: int = 0
    expired: int = 0
    damaged_records: int = 0  # journal records dropped: torn or failing their own checksum
    unjournaled: list[str] = field(default_factory=list)  # older segments a rebuild could not read
    unjournaled_bytes: int = 0

    def message(self, index_path: Path, directory: Path | str) -> str:
        if self.rebuilt:
            text = f"the SSD tier's index {index_path} was {self.reason}; "
            if self.moved_to is not None:
                text += f"moved it to {self.moved_to.name} and "
            text += f"rebuilt it from the segment journals in {directory}: "
        else:
            text = f"the SSD tier's index {index_path} was {self.reason}; rolled it forward from the journals: "
        text += f"{_plural(self.recovered, 'value')} ({format_size(self.recovered_bytes)}) recovered"
        if self.removed:
            text += f", {_plural(self.removed, 'removal')} applied"
        text += (
            f"; {_plural(self.lost, 'value')} ({format_size(self.lost_bytes)}) lost (bytes missing or "
            "failing their CRC)"
        )
        if self.expired:
            text += f", {self.expired} expired"
        if self.damaged_records:
            text += f", {_plural(self.damaged_records, 'damaged journal record')} dropped"
        if self.unjournaled:
            text += (
                f"; {_plural(len(self.unjournaled), 'segment')} ({format_size(self.unjournaled_bytes)}) written before "
                "segments had journals (or whose journal could not be written) cannot be rebuilt: set aside "
                f"({', '.join(self.unjournaled[:3])}), their values are recoverable only with the old index"
            )
        return text


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _connect(index_path: Path) -> sqlite3.Connection:
    """Open (creating) the index mode 0600 and check it; sqlite3.DatabaseError if it is damaged.

    SQLite gives ``-wal`` and ``-shm`` the mode of the database file, so creating that file 0600
    ourselves keeps all three private whatever the umask."""
    tighten(Path(f"{index_path}-wal"), Path(f"{index_path}-shm"))
    os.close(private_file(index_path))
    db = sqlite3.connect(index_path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        have = {row[1] for row in db.execute("PRAGMA table_info(objects)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE objects ADD COLUMN {column} {kind}")
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
    except BaseException:
        db.close()
        raise
    return db


def _move_aside(index_path: Path, why: str = "broken") -> Path:
    """Rename an index that cannot be used (and its -wal and -shm, so it can still be opened) out of the
    way, as ``index.sqlite.WHY-TIME``."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = index_path.with_name(f"{index_path.name}.{why}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = index_path.with_name(f"{index_path.name}.{why}-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{index_path}{suffix}")
        if source.exists():
            os.rename(source, f"{target}{suffix}")
    fsync_path(index_path.parent)
    return target


def other_device(db: sqlite3.Connection, segments: SegmentStore) -> str | None:
    """Why the index in ``db`` was not made for ``segments`` (None: it was, or it holds no rows to
    mistake).  Its rows name segment ids and offsets, which on another device, or on this one formatted
    again, hold other bytes: such an index must never be read."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    meta: dict[str, Any] = {}
    if "meta" in tables:
        meta = dict(db.execute("SELECT name, value FROM meta WHERE name IN (?, ?)", (_DEVICE_UUID, _DEVICE_SIZE)))
    recorded, current = meta.get(_DEVICE_UUID), segments.device_uuid
    if recorded == current:
        return None
    if recorded is None:
        if "objects" not in tables or not db.execute("SELECT 1 FROM objects LIMIT 1").fetchone():
            return None
        return f"made before indexes recorded their device, so nothing shows it is {segments.label}'s (uuid {current})"
    made_for = f"made for the SSD tier on the device with uuid {recorded}"
    if isinstance(meta.get(_DEVICE_SIZE), int):
        made_for += f" ({format_size(meta[_DEVICE_SIZE])})"
    if current is None:
        return f"{made_for}, but the SSD tier is now the directory {segments.label}"
    size = f" ({format_size(segments.formatted_size)})" if segments.formatted_size else ""
    return f"{made_for}, but {segments.label} holds uuid {current}{size}: another device, or this one formatted again"


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN if n else ALIGN


@dataclass
class Segment:
    id: int
    place: SegmentPlace  # where its bytes live: files, or a region of a block device
    size: int = 0  # bytes written (the next record goes here)
    live: int = 0  # aligned bytes of values still indexed
    readers: int = 0  # reads in flight: its place stays open until they finish
    doomed: bool = False
    journaled: bool = False  # it has a journal (segments from before journals have none)
    journal_size: int = 0  # bytes of the journal on disk
    journal_buf: bytearray = field(default_factory=bytearray)  # records not yet written
    journal_reserved: int = 0  # journal bytes its values' records and their tombstones may take
    writing: int = 0  # reservations being written without the store's lock: never compacted or deleted meanwhile


@dataclass
class Reservation:
    """Room in a segment for one value that is written without the store's lock (``SsdTier.reserve``)
    and indexed under it afterwards (``publish``) or given back (``cancel``)."""

    seg: Segment
    off: int
    size: int
    direct: bool  # written with O_DIRECT (its start padded to a page)


def open_segments(
    where: Path, capacity: int | None, segment_size: int, *, format: bool = False, writable: bool = True
) -> SegmentStore:
    """The segment store at ``where``: a block device's regions, or files in a directory."""
    if is_block_device(where):
        from mooncakefs.tiers.ssd_device import BlockDevice

        return BlockDevice(where, capacity, segment_size, format=format, writable=writable)
    if format:
        raise InvalidArgument(f"formatting is for a block device, and {where} is not one")
    return SegmentFiles(where)


def resolve_ssd(ssd: int | str | None, ssd_dir: str | Path | None) -> tuple[int | None, Path | None] | None:
    """Where the SSD tier of a store opened with ``ssd=`` and ``ssd_dir=`` is, and its size: None for no
    SSD tier; a size of None for all of a block device, a place of None for the data dir's ``ssd/``.
    ``ssd`` may also be the CLI's form, "/dev/nvme1n1" or "PATH:SIZE"."""
    if isinstance(ssd, str) and "/" in ssd:
        if ssd_dir is not None:
            raise InvalidArgument(f"give the SSD tier's place in ssd= ({ssd!r}) or in ssd_dir=, not both")
        size, ssd_dir = parse_ssd(ssd)
    else:
        size = None if ssd is None else parse_size(ssd, what="ssd") or None
    if ssd_dir is not None and is_block_device(ssd_dir):
        return size, Path(ssd_dir)
    if not size:
        return None
    return size, Path(ssd_dir) if ssd_dir is not None else None


PINNED, STICKY, DURABLE = 1, 2, 4  # bits of the index's flags column


def entry_flags(entry: Entry) -> int:
    """An entry's pin, sticky and durable marks as the index's flags column keeps them."""
    return (PINNED if entry.pinned else 0) | (STICKY if entry.sticky else 0) | (DURABLE if entry.durable else 0)


class SsdTier:
    name = "ssd"

    def __init__(
        self,
        directory: Path,
        capacity: int | None,
        *,
        segment_size: int,
        index_path: Path,
        rebuild: bool | str = False,
        format: bool = False,
    ) -> None:
        """``directory`` is where the segment files go, or a block device (then ``capacity`` is how
        much of it to use, None for all, and ``format`` lets it overwrite what the device holds)."""
        if capacity is not None and capacity < ALIGN:
            raise InvalidArgument(f"ssd must be at least {ALIGN} bytes, got {capacity}")
        if segment_size < ALIGN:
            raise InvalidArgument(f"segment_size must be at least {ALIGN} bytes, got {segment_size}")
        self.backend = open_segments(Path(directory), capacity, segment_size, format=format)
        self.dir = self.backend.label
        capacity = self.backend.capacity or capacity
        if capacity is None:
            self.backend.close()
            raise InvalidArgument(f"the SSD tier in {directory} needs a size")
        self.capacity = capacity
        self.segment_size = self.backend.segment_limit or segment_size
        self.segments: dict[int, Segment] = {}
        self.active: Segment | None = None
        self.used = 0
        self._live = 0  # the sum of the segments' live bytes, kept as they change
        self._dirty = False
        self._seq = 1  # the next journal record's sequence number (set by load)
        self._committed = -1  # the sequence number the index last recorded taking in
        self._journal_dirty: dict[int, Segment] = {}
        self._syncer: ThreadPoolExecutor | None = None  # syncs the segments of a durable commit at once
        self.on_release: Callable[[Segment], None] | None = None  # GPUDirect's: a segment is let go
        self.index_path = Path(index_path)
        self.recovery: Recovery | None = None
        # Why the index is to be rebuilt (``rebuild`` may say); None: only if it turns out damaged.
        self._rebuild: str | None = None
        if rebuild:
            self._rebuild = rebuild if isinstance(rebuild, str) else "asked to be rebuilt"
        self._moved_to: Path | None = None
        try:
            self.db = self._open_index()
        except BaseException:
            self.backend.close()
            raise
        self._next_id = 1
        self._wal_path = Path(f"{index_path}-wal")

    def _open_index(self) -> sqlite3.Connection:
        """Connect to the index; a damaged one is moved aside (and rebuilt by ``load``), and a missing or
        empty one while segments exist is rebuilt too, rather than letting load delete their values."""
        path = self.index_path
        aside = "broken"
        had_index = path.exists() and path.stat().st_size > 0
        has_segments = self.backend.has_segments()
        if self._rebuild is None:
            try:
                db = _connect(path)
            except sqlite3.DatabaseError as exc:
                self._rebuild = f"unreadable ({exc})"
            else:
                if had_index and (mismatch := other_device(db, self.backend)) is not None:
                    # Rebuilt from the device's own journals, which hold every value committed to it: that
                    # loses nothing, where refusing would only make the operator ask for the same rebuild.
                    db.close()
                    self._rebuild, aside = mismatch, "other-device"
                elif had_index or not has_segments:
                    return db
                else:
                    db.close()
                    self._rebuild = "missing or empty"
                    for suffix in ("", "-wal", "-shm"):  # nothing worth keeping: what _connect just made
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
        if path.exists() or Path(f"{path}-wal").exists():
            self._moved_to = _move_aside(path, aside)
        try:
            return _connect(path)
        except sqlite3.DatabaseError as exc:
            raise MooncakeError(
                f"the SSD tier's index {path} was {self._rebuild} and a fresh one cannot be made ({exc})"
            ) from None

    # -- start-up --------------------------------------------------------------------------------------

    def load(self, now: float) -> list[Record]:
        """Open the segments and return every live value, taking in what the journals hold that the index
        does not (all of it when the index is being rebuilt).

        Rows for missing or truncated segments, or expired values, are deleted; segments no row uses are
        deleted too (what a crash between writing bytes and committing their row leaves behind)."""
        for found in self.backend.scan():
            seg = self.segments[found.seg_id] = Segment(found.seg_id, found.place, size=found.size)
            seg.journaled = found.journaled
            self._next_id = max(self._next_id, found.seg_id + 1)
        rebuilding = self._rebuild is not None
        committed = 0 if rebuilding else self._committed_seq()
        recovery = Recovery(
            self._rebuild or "behind its journals (its last commits were lost)", rebuilding, self._moved_to
        )
        pending: list[JournalRecord] = []
        high = committed
        for seg_id, seg in self.segments.items():
            if not seg.journaled:
                continue
            last = None if rebuilding else _tail_seq(seg.place, seg_id)
            if last is not None and last <= committed:
                seg.journal_size = seg.place.journal_extent() or 0
                continue
            journal = read_journal(seg.place, seg_id)
            recovery.damaged_records += journal.damaged
            if journal.end < _JOURNAL_HEAD.size:  # not a journal at all: start it again
                journal.end = 0
                seg.journal_buf += _JOURNAL_HEAD.pack(_JOURNAL_MAGIC, _JOURNAL_FORMAT, seg_id)
                self._journal_dirty[seg_id] = seg
            if journal.end < journal.size:  # a torn tail: later records must not land after it
                seg.place.journal_truncate(journal.end, journal.size)
            seg.journal_size = seg.journal_reserved = journal.end
            pending += (r for r in journal.records if r.seq > committed)
            high = max([high, *(r.seq for r in journal.records)])
        self._seq = high + 1

        rows: dict[bytes, Record] = {}
        stale: list[bytes] = []
        for key, seg_id, off, size, crc, expires, flags, version_hi, version_lo, tag in self.db.execute(
            "SELECT key, seg, off, size, crc, expires, flags, version_hi, version_lo, tag FROM objects"
        ):
            seg = self.segments.get(seg_id)
            if seg is None or off + size > max(seg.size, off) or (expires and expires <= now):
                stale.append(bytes(key))
                if seg is not None and not (expires and expires <= now):  # a truncated segment
                    self._tombstone(bytes(key), seg_id, off, size)  # so its journal agrees: the value is gone
                continue
            version = version_hi << 63 | version_lo
            rows[bytes(key)] = Record(bytes(key), seg_id, off, size, crc, expires, flags, version, tag)
        upserts, removed = self._roll_forward(rows, pending, now, recovery) if pending else ([], [])
        stale += removed
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM objects WHERE key = ?", [(key,) for key in dict.fromkeys(stale)])
        self.db.executemany(
            "INSERT OR REPLACE INTO objects (key, seg, off, size, crc, expires, flags, version_hi, version_lo, tag) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.key,
                    r.seg,
                    r.off,
                    r.size,
                    r.crc,
                    r.expires,
                    r.flags,
                    r.version >> 63,
                    r.version & _engine.VERSION_LOW_MASK,
                    r.tag,
                )
                for r in upserts
            ],
        )
        self._flush_journals()  # tombstones for values found lost
        self._set_committed_seq(self._seq - 1)
        self._record_device()
        self.db.execute("COMMIT")
        for rec in rows.values():
            self.segments[rec.seg].live += aligned(rec.size)
            self._live += aligned(rec.size)
        for seg in list(self.segments.values()):
            if seg.live == 0:
                if rebuilding and not seg.journaled:  # not ours to judge: only the old index knew it
                    recovery.unjournaled.append(seg.place.name)
                    recovery.unjournaled_bytes += seg.size
                    self._orphan(seg)
                else:
                    self._delete(seg)
        self.used = sum(seg.size for seg in self.segments.values())
        if rebuilding or pending:
            fsync_path(self._wal_path)
            self.recovery = recovery
            log.warning("%s", recovery.message(self.index_path, self.dir))
        self._rebuild = None
        return list(rows.values())

    def _roll_forward(
        self, rows: dict[bytes, Record], pending: list[JournalRecord], now: float, recovery: Recovery
    ) -> tuple[list[Record], list[bytes]]:
        """Apply journal records newer than the index to ``rows``; returns the rows to write and the keys
        to delete.  A tombstone kills the one value it names; of a key's other values the newest (highest
        sequence number) whose bytes pass their CRC wins."""
        tombstones = {(r.key, r.seg, r.off) for r in pending if r.kind == TOMBSTONE}
        removed: list[bytes] = []
        for key, seg_id, off in tombstones:
            row = rows.get(key)
            if row is not None and row.seg == seg_id and row.off == off:
                del rows[key]
                removed.append(key)
                recovery.removed += 1
        puts: dict[bytes, list[JournalRecord]] = {}
        for r in pending:
            if r.kind == PUT and (r.key, r.seg, r.off) not in tombstones:
                puts.setdefault(r.key, []).append(r)
        upserts: list[Record] = []
        for key, candidates in puts.items():
            for r in sorted(candidates, key=lambda r: r.seq, reverse=True):
                row = rows.get(key)
                if row is not None and row.seg == r.seg and row.off == r.off:
                    break  # the index has it already
                if r.expires and r.expires <= now:  # its newest value has expired: the key is gone
                    recovery.expired += 1
                    if rows.pop(key, None) is not None:
                        removed.append(key)
                    break
                if self.verify(r.seg, r.off, r.size, r.crc):
                    rows[key] = rec = Record(key, r.seg, r.off, r.size, r.crc, r.expires, r.flags, r.version, r.tag)
                    upserts.append(rec)
                    recovery.recovered += 1
                    recovery.recovered_bytes += r.size
                    break
                recovery.lost += 1
                recovery.lost_bytes += r.size
                self._tombstone(r.key, r.seg, r.off, r.size)  # gone for good: no later rebuild retries it
        return upserts, removed

    def verify(self, seg_id: int, off: int, size: int, crc: int) -> bool:
        """Whether a value's bytes are all in its segment and match their CRC-32C."""
        seg = self.segments.get(seg_id)
        if seg is None or off + size > seg.size:
            return False
        return _crc_of(seg.place, off, size) == crc

    def _committed_seq(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE name = 'journal_seq'").fetchone()
        return int(row[0]) if row else 0

    def _set_committed_seq(self, seq: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('journal_seq', ?)", (seq,))
        self._committed = seq

    def _record_device(self) -> None:
        """Bind the index to its segments' device (see ``other_device``); files record nothing."""
        self.db.execute("DELETE FROM meta WHERE name IN (?, ?)", (_DEVICE_UUID, _DEVICE_SIZE))
        if self.backend.device_uuid is not None:
            self.db.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?)",
                [(_DEVICE_UUID, self.backend.device_uuid), (_DEVICE_SIZE, self.backend.formatted_size)],
            )

    def _orphan(self, seg: Segment) -> None:
        """Set aside a segment a rebuild cannot read (no journal), keeping its bytes for the old index."""
        self.segments.pop(seg.id, None)
        seg.place.orphan()

    # -- writing ---------------------------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Bytes of values still indexed (``used`` also counts garbage not yet reclaimed)."""
        return self._live

    def fits(self, size: int) -> bool:
        if self.used + aligned(size) > self.capacity:
            return False
        seg = self.active
        return (seg is not None and self._has_room(seg, size)) or self.backend.can_create(aligned(size))

    def too_large(self, size: int) -> str | None:
        """Why a value of ``size`` bytes can never go to this tier however much is free (None: it can).
        A device region holds one segment, so a value must fit in a region's value area."""
        if self.backend.journal_limit is None or aligned(size) <= self.segment_size:
            return None
        return (
            f"a value on the SSD tier's device {self.dir} must fit in one region, which holds "
            f"{format_size(self.segment_size)} of values; a larger segment_size (mooncakefs.open(..., "
            "segment_size=...)) raises that limit, but only for a device formatted with it (ssd_format=True, "
            "a node: --format-ssd; erases the device)"
        )

    def _has_room(self, seg: Segment, size: int) -> bool:
        """Whether a value of ``size`` bytes goes into ``seg`` rather than starting a new segment.  Where
        segments have a fixed size (device regions) the value and its journal records must fit too: a
        put reserves room for its record and the tombstone that may follow it, so a tombstone always
        finds room."""
        limit = self.backend.journal_limit
        if limit is None:  # files: a value larger than a segment gets a segment of its own
            return not seg.size or seg.size + size + DIRECT_ALIGN <= self.segment_size
        gap = -seg.size % DIRECT_ALIGN  # at most: the padding before a value written straight through
        return seg.size + gap + aligned(size) <= self.segment_size and seg.journal_reserved + 2 * _MAX_RECORD <= limit

    def _seal(self, seg: Segment) -> None:
        """Stop appending to ``seg``.  A fixed-size segment's unused end becomes garbage, so that
        reclaiming counts it (it is free only once the whole segment is)."""
        if self.backend.journal_limit is not None and seg.size < self.segment_size:
            self.used += self.segment_size - seg.size
            seg.size = self.segment_size

    def append(
        self, key: bytes, data: memoryview, crc: int, expires: float, flags: int, version: int = 0, tag: int = 0
    ) -> tuple[int, int]:
        """Write one value and index it (uncommitted); returns (segment id, offset).  The caller checked
        ``fits``.  A value larger than a segment gets a segment of its own.  Large page-aligned values
        bypass the page cache (O_DIRECT): filling fresh page-cache pages is slow, and they would only
        push out what readers use."""
        size = data.nbytes
        seg, direct = self._target(data)
        off = seg.size
        try:
            seg.place.write(data, off, direct)
        except OSError as exc:  # nothing was indexed: the bytes written so far are garbage to overwrite
            raise full_disk(exc, self.dir) from None
        self._take(seg, size)
        self._record(key, seg, off, size, crc, expires, flags, version, tag)
        return seg.id, off

    @staticmethod
    def unlocked(data: memoryview) -> bool:
        """Whether a value may be written without the store's lock (``reserve``): only page-aligned
        whole pages, which share no device block with their neighbours (a device region rewrites the
        blocks around an unaligned value, so those are written in order, under the lock)."""
        return direct_aligned(data)

    def reserve(self, data: memoryview) -> Reservation:
        """Set aside room for ``data`` (``unlocked``; the caller checked ``room``), so that its bytes can
        be written while the store serves other calls, several values at once.  The room counts as used
        and live from now on, and its segment is neither compacted nor deleted until the reservation is
        published or cancelled.  Nothing is indexed or journaled yet: a crash before ``publish`` leaves
        garbage, never a value whose bytes are missing."""
        size = data.nbytes
        seg, direct = self._target(data)
        res = Reservation(seg, seg.size, size, direct)
        self._take(seg, size)
        seg.writing += 1
        seg.journal_reserved += 2 * _MAX_RECORD  # its record and tombstone must find room in a region's journal
        return res

    def write_reserved(self, res: Reservation, data: memoryview) -> None:
        """Write a reserved value's bytes; needs no lock (nothing else writes there, and the segment
        stays).  OutOfSpace for a full disk: then ``cancel``."""
        try:
            res.seg.place.write(data, res.off, res.direct)
        except OSError as exc:
            raise full_disk(exc, self.dir) from None

    def publish(self, res: Reservation, key: bytes, entry: Entry) -> None:
        """Index a value written into its reservation (uncommitted) and note where it went, as ``write``
        does for a value written under the lock."""
        seg = res.seg
        seg.writing -= 1
        seg.journal_reserved -= 2 * _MAX_RECORD
        self._record(
            key, seg, res.off, res.size, entry.crc, entry.expires, entry_flags(entry), entry.version, entry.tag
        )
        entry.seg, entry.seg_off = seg.id, res.off
        self._enlist(key, entry)

    def cancel(self, res: Reservation) -> None:
        """Give back a reservation whose value is not indexed (its write failed, or the put was refused):
        its room becomes garbage, and a segment left with nothing live goes."""
        seg = res.seg
        seg.writing -= 1
        seg.journal_reserved -= 2 * _MAX_RECORD
        seg.live -= aligned(res.size)
        self._live -= aligned(res.size)
        if seg.live == 0 and seg.id in self.segments:
            self._delete(seg)

    def _target(self, data: memoryview) -> tuple[Segment, bool]:
        """The segment the next value goes to (a new one if the active one has no room), and whether it
        is written straight through (O_DIRECT; its start is then padded to a page, the padding garbage
        like the end of any record)."""
        size = data.nbytes
        seg = self.active
        if seg is None or not self._has_room(seg, size):
            if seg is not None:
                self._seal(seg)
            seg = self._new_segment()
        direct = seg.place.can_direct(data)
        if direct:
            gap = -seg.size % DIRECT_ALIGN
            seg.size += gap
            self.used += gap
        return seg, direct

    def _take(self, seg: Segment, size: int) -> None:
        """Count a value of ``size`` bytes at the segment's end as written and live."""
        seg.size += aligned(size)
        seg.live += aligned(size)
        self._live += aligned(size)
        self.used += aligned(size)

    def _record(
        self,
        key: bytes,
        seg: Segment,
        off: int,
        size: int,
        crc: int,
        expires: float,
        flags: int,
        version: int,
        tag: int,
    ) -> None:
        """Journal (buffered until the commit: no system call here) and index a value whose bytes are in
        its segment."""
        if seg.journaled:
            record = _pack_record(PUT, key, self._seq, off, size, crc, expires, flags, version, tag)
            seg.journal_buf += record
            seg.journal_reserved += 2 * len(record)
            self._seq += 1
            self._journal_dirty[seg.id] = seg
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO objects (key, seg, off, size, crc, expires, flags, version_hi, version_lo, tag) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, seg.id, off, size, crc, expires, flags, version >> 63, version & _engine.VERSION_LOW_MASK, tag),
        )

    def _new_segment(self) -> Segment:
        seg_id = self._next_id
        self._next_id += 1
        head = _JOURNAL_HEAD.pack(_JOURNAL_MAGIC, _JOURNAL_FORMAT, seg_id)
        place = self.backend.create(seg_id, head)
        seg = self.segments[seg_id] = Segment(
            seg_id, place, journaled=True, journal_size=len(head), journal_reserved=len(head)
        )
        self.active = seg
        return seg

    def drop(self, key: bytes, seg_id: int, off: int, size: int) -> None:
        """Forget one stored value: its bytes become garbage, and an emptied sealed segment goes."""
        seg = self.segments[seg_id]
        seg.live -= aligned(size)
        self._live -= aligned(size)
        self._begin()
        self.db.execute("DELETE FROM objects WHERE key = ? AND seg = ? AND off = ?", (key, seg_id, off))
        if seg.live == 0:  # nothing left in it (the active one too: the next value starts a new one)
            self._delete(seg)
        else:
            self._tombstone(key, seg_id, off, size)

    def _tombstone(self, key: bytes, seg_id: int, off: int, size: int) -> None:
        """Journal that a value left its segment (written with the next commit)."""
        seg = self.segments.get(seg_id)
        if seg is not None and seg.journaled:
            seg.journal_buf += _pack_record(TOMBSTONE, key, self._seq, off, size)
            self._seq += 1
            self._journal_dirty[seg.id] = seg

    def _begin(self) -> None:
        if not self._dirty:
            self.db.execute("BEGIN")
            self._dirty = True

    def commit(self, *, durable_segments: set[int] | None = None) -> None:
        """Commit index changes, after writing the journal records they go with.  With
        ``durable_segments``, also flush those segments' bytes and journal records, and their directory
        entries, so the values survive power loss, not only a crash of this process.  The index commit
        itself needs no sync then: an index that loses it is rolled forward from the journal at open."""
        sync_wal = False
        places = [self.segments[seg_id].place for seg_id in durable_segments or ()]
        self._at_once(lambda place: place.sync(), places)
        self._flush_journals()
        if durable_segments:
            journaled = [seg.place for seg in map(self.segments.__getitem__, durable_segments) if seg.journaled]
            # no journal to roll forward from (unjournaled, or one that could not be written): sync the index
            sync_wal = len(journaled) < len(durable_segments)
            sync_wal |= not all(self._at_once(lambda place: place.journal_sync(), journaled))
        if self._dirty:
            self._dirty = False
            if self._committed != self._seq - 1:
                self._set_committed_seq(self._seq - 1)
            self.db.execute("COMMIT")
        if sync_wal:
            # In WAL mode a commit is an append to the -wal file; syncing it is what synchronous=FULL
            # would do on every commit.  Doing it only here keeps other commits free of fsyncs.
            fsync_path(self._wal_path)

    def _at_once(self, call: Callable[[SegmentPlace], Any], places: list[SegmentPlace]) -> list[Any]:
        """``call`` on one place of each ``sync_key``, on threads where there are several: a sync waits
        on the disk, and the filesystem joins syncs that wait together into one journal commit."""
        places = list({place.sync_key: place for place in places}.values())
        if len(places) < 2:
            return [call(place) for place in places]
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="mooncakefs-ssd-sync")
        return list(self._syncer.map(call, places))

    def _flush_journals(self) -> None:
        """Write the buffered journal records: one pwrite per segment that has any."""
        while self._journal_dirty:
            seg_id, seg = next(iter(self._journal_dirty.items()))
            buf = seg.journal_buf
            try:
                seg.place.journal_append(buf, seg.journal_size)
            except OSError as exc:
                self._unjournal(seg, exc)
            else:
                seg.journal_size += len(buf)
            buf.clear()
            del self._journal_dirty[seg_id]

    def _unjournal(self, seg: Segment, exc: OSError) -> None:
        """A journal that cannot be written (a full disk) is dropped rather than failing the commit: the
        index still has the values; only a rebuild could not, and it says so for a segment without one."""
        log.warning(
            "cannot write the journal of %s (%s): dropped it; an index rebuild could not recover this segment's values",
            seg.place.name,
            exc.strerror,
        )
        seg.journaled = False
        seg.place.journal_drop()

    # -- reading ---------------------------------------------------------------------------------------
    # The Tier protocol's leased read (tiers/base.py) is the only read: the store's hot path holds the
    # segment (under its lock), copies without the lock, and lets go; compaction uses it under the lock.

    def lease(self, entry: Entry) -> Segment:
        """Pin the entry's segment: its place stays open (a region is not reused) until ``end_lease``,
        even if the segment is deleted meanwhile."""
        seg = self.segments[entry.seg]
        seg.readers += 1
        return seg

    def end_lease(self, seg: Segment) -> None:
        seg.readers -= 1
        if seg.doomed and seg.readers == 0:
            self._release(seg)

    @staticmethod
    def read_value(entry: Entry, dst: Any, seg: Segment) -> Any:
        """Read the value straight into ``dst`` (returns its length) or into new bytes (``dst`` None);
        needs no lock, GIL released during the I/O."""
        off, size = entry.seg_off, entry.size
        if dst is None:
            data = seg.place.pread(size, off)
            if len(data) != size:
                raise OSError(f"segment {seg.place.name} ends before offset {off + size}")
            return data
        done = 0
        while done < size:
            n = seg.place.read_into(dst[done:size], off + done)
            if n == 0:
                raise OSError(f"segment {seg.place.name} ends before offset {off + size}")
            done += n
        return size

    # -- reclaiming ------------------------------------------------------------------------------------

    def keys_in(self, seg_id: int) -> list[bytes]:
        return [bytes(k) for (k,) in self.db.execute("SELECT key FROM objects WHERE seg = ?", (seg_id,))]

    def remove_segment(self, seg: Segment) -> None:
        """Delete a segment once the store has moved or dropped every value in it."""
        self._begin()
        self.db.execute("DELETE FROM objects WHERE seg = ?", (seg.id,))
        self._delete(seg)

    def _delete(self, seg: Segment) -> None:
        self.segments.pop(seg.id, None)
        self._journal_dirty.pop(seg.id, None)
        self.used -= seg.size
        self._live -= seg.live  # values the store moved elsewhere or dropped with the segment
        seg.live = 0
        if self.active is seg:
            self.active = None
        seg.place.remove(seg.journaled)
        if seg.readers:
            seg.doomed = True
        else:
            self._release(seg)

    def _release(self, seg: Segment) -> None:
        """A deleted segment's last reader is gone: whoever registered it (GPUDirect) lets go first."""
        if self.on_release is not None:
            self.on_release(seg)
        seg.place.release()

    def close(self) -> None:
        self.commit()
        self.db.close()
        for seg in self.segments.values():
            if not seg.readers:
                seg.place.release()
            else:
                seg.doomed = True
        self.segments.clear()
        self.active = None
        self.backend.close()
        if self._syncer is not None:
            self._syncer.shutdown()

    # -- the Tier protocol (tiers/base.py) and the SSD cache policy --------------------------------------
    # The store calls these under its lock, after ``attach``.  Eviction keeps the live bytes within the
    # high watermark, and nothing is evicted below it: copies leave in the order they were written
    # (``order``), except that a value read since it was written (an SSD hit, or found by match_prefix) or
    # durable gets a second chance, as in CacheLib's flash cache with reinsertion: it goes to the back of
    # the order, its hits cleared.  A copy whose value is also in DRAM just goes; a value that lived only
    # on SSD leaves the store.  When every value has had its second chance, the oldest goes all the same.
    # Pinned and sticky values are never evicted, and may fill the tier to its capacity.  Compaction then
    # frees file space: the segment with the most garbage (removed, replaced and evicted values) has its
    # live values copied forward and is deleted.  Eviction order is kept apart from where values sit in
    # the files, so compaction does not make old values young.

    def attach(self, index: dict[bytes, Entry], place: Placement, high_watermark: float) -> None:
        """Start serving a store: its index (compaction moves the values it names) and its placement."""
        self.index, self.place = index, place
        self.high = int(self.capacity * high_watermark)
        self.order: OrderedDict[bytes, Entry] = OrderedDict()  # evictable copies, oldest first
        self.counters = dict.fromkeys(("hits", "misses", "evictions", "promotions"), 0)

    def allocate(self, raw: bytes, entry: Entry) -> bool:
        return self.room(entry.size, keep=entry.pinned or entry.sticky)

    def write(self, raw: bytes, entry: Entry, data: Any) -> None:
        """Append the entry's value (its ``crc`` already taken) and note where it went."""
        entry.seg, entry.seg_off = self.append(
            raw, data, entry.crc, entry.expires, entry_flags(entry), entry.version, entry.tag
        )
        self._enlist(raw, entry)

    def _enlist(self, raw: bytes, entry: Entry) -> None:
        """Put a new SSD copy at the back of the eviction order (pinned and sticky values stay out)."""
        if not entry.pinned and not entry.sticky:
            self.order.pop(raw, None)  # a replaced value's place, if it is still there
            self.order[raw] = entry

    def free(self, raw: bytes, entry: Entry) -> None:
        self.drop(raw, entry.seg, entry.seg_off, entry.size)
        entry.seg = entry.seg_off = -1
        if self.order.get(raw) is entry:
            del self.order[raw]

    def victims(self) -> Iterator[tuple[bytes, Entry]]:
        return iter(self.order.items())

    def has_room(self, size: int) -> bool:
        """Whether ``size`` bytes fit in free space under the high watermark, evicting nothing."""
        return self.fits(size) and self.live + size <= self.high

    def room(self, size: int, keep: bool = False) -> bool:
        """Make room for ``size`` bytes (``keep``: a pinned or sticky value, which may fill the tier to
        its capacity); False if impossible."""
        if size > self.capacity:
            return False
        need = aligned(size)
        high = self.capacity if keep else self.high
        if self.live + need > high and not self._evict(self.live + need - high):
            return False
        tried: set[int] = set()
        while not self.fits(size):
            candidates = [g for g in self.segments.values() if g.size > g.live and g.id not in tried and not g.writing]
            if not candidates:
                return False
            seg = max(candidates, key=lambda g: (g.size - g.live, -g.id))
            tried.add(seg.id)
            if seg is self.active:
                self.active = None
            residents = [(raw, self.index.get(raw)) for raw in self.keys_in(seg.id)]
            moved = [
                (raw, e, self.read_value(e, None, seg)) for raw, e in residents if e is not None and e.seg == seg.id
            ]
            self.remove_segment(seg)
            for raw, entry, data in moved:
                entry.seg, entry.seg_off = self.append(
                    raw, memoryview(data), entry.crc, entry.expires, entry_flags(entry), entry.version, entry.tag
                )
        return True

    def _evict(self, excess: int) -> bool:
        """Evict copies, oldest first with second chances, until ``excess`` live bytes are gone; False if
        only pinned and sticky values are left."""
        order = self.order
        chances = len(order)  # after one lap, values get no more second chances
        while excess > 0 and order:
            raw, entry = next(iter(order.items()))
            if chances > 0 and (entry.hits > 0 or entry.durable):
                chances -= 1
                entry.hits = 0
                order.move_to_end(raw)
                continue
            del order[raw]
            excess -= aligned(entry.size)
            self.drop(raw, entry.seg, entry.seg_off, entry.size)
            entry.seg = entry.seg_off = -1
            if entry.dram < 0 and entry.vram < 0:  # its only copy: it leaves the store
                self.counters["evictions"] += 1
                self.place.lost(raw, entry)
        return excess <= 0


# -- checking ----------------------------------------------------------------------------------------------


@dataclass
class FsckReport:
    """What ``fsck`` found: the index's health, each row against its segment, the journals against the index."""

    index_error: str | None = None  # why the index cannot be used (then nothing else was checked)
    rows: int = 0
    row_bytes: int = 0
    bad_rows: list[tuple[bytes, str]] = field(default_factory=list)  # key, what is wrong with its value
    journal_records: int = 0
    damaged_records: int = 0  # journal records that are torn or fail their checksum
    pending: int = 0  # journal records newer than the index: the next open rolls them forward
    disagree: list[bytes] = field(default_factory=list)  # keys whose newest journal value is not the index's
    unjournaled: list[str] = field(default_factory=list)  # segments from before journals existed
    orphans: list[str] = field(default_factory=list)  # set aside by an earlier rebuild

    @property
    def ok(self) -> bool:
        return self.index_error is None and not self.bad_rows and not self.disagree and not self.damaged_records

    def lines(self) -> list[str]:
        if self.index_error is not None:
            return [f"index: {self.index_error}: `mooncakefs fsck --rebuild` rebuilds it from the segment journals"]
        out = [f"index: {self.rows} values ({format_size(self.row_bytes)}), {len(self.bad_rows)} bad"]
        out += [f"  {key!r:.100}: {why}" for key, why in self.bad_rows[:20]]
        if len(self.bad_rows) > 20:
            out.append(f"  ... and {len(self.bad_rows) - 20} more")
        out.append(
            f"journals: {self.journal_records} records, {self.damaged_records} damaged, "
            f"{self.pending} not yet in the index (the next open takes them in)"
        )
        if self.disagree:
            out.append(
                f"  {len(self.disagree)} keys whose newest journal value is not the index's, e.g. "
                f"{self.disagree[0]!r:.100}"
            )
        if self.unjournaled:
            out.append(
                f"{len(self.unjournaled)} segments were written before segments had journals: their values "
                "can be recovered only while this index is readable"
            )
        if self.orphans:
            out.append(
                f"{len(self.orphans)} segments set aside by an earlier rebuild (*.dat.orphan): only the "
                "old index can read them; delete them to reclaim the space"
            )
        return out


def _crc_of(place: SegmentPlace, off: int, size: int) -> int | None:
    """The CRC-32C of ``size`` bytes at ``off``, or None if the segment ends first."""
    value, done = 0, 0
    while done < size:
        chunk = place.pread(min(size - done, _VERIFY_CHUNK), off + done)
        if not chunk:
            return None
        value = _engine.crc32c(chunk, value)
        done += len(chunk)
    return value


def fsck(segments: SegmentStore, index_path: Path, now: float | None = None) -> FsckReport:
    """Check an SSD tier that no store has open (hold its data dir's lock): every index row's bytes
    against their CRC, and the journals against the index.  Changes nothing."""
    now = time.time() if now is None else now
    report = FsckReport(orphans=segments.orphans())
    index_path = Path(index_path)
    found = {f.seg_id: f for f in segments.scan(writable=False)}
    report.unjournaled = [f.place.name for f in found.values() if not f.journaled]
    try:
        if not index_path.exists() or index_path.stat().st_size == 0:
            report.index_error = "missing or empty" if found else None
            return report
        try:
            db = sqlite3.connect(index_path, isolation_level=None)
            try:
                check = db.execute("PRAGMA quick_check").fetchone()
                if check is None or check[0] != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
                if (mismatch := other_device(db, segments)) is not None:
                    report.index_error = mismatch
                    return report
                rows = db.execute("SELECT key, seg, off, size, crc, expires FROM objects").fetchall()
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                committed = (
                    db.execute("SELECT value FROM meta WHERE name = 'journal_seq'").fetchone()
                    if "meta" in tables
                    else None
                )
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            report.index_error = f"unreadable ({exc})"
            return report
        index: dict[bytes, tuple[int, int]] = {}
        for key, seg_id, off, size, crc, _expires in rows:
            key = bytes(key)
            index[key] = (seg_id, off)
            report.rows += 1
            report.row_bytes += size
            if seg_id not in found:
                report.bad_rows.append((key, f"segment {seg_id} is missing"))
                continue
            actual = _crc_of(found[seg_id].place, off, size)
            if actual is None:
                report.bad_rows.append((key, f"segment {seg_id} ends before offset {off + size}"))
            elif actual != crc:
                report.bad_rows.append((key, f"CRC-32C {actual:#010x} in segment {seg_id}, index says {crc:#010x}"))
        journals = {seg_id: read_journal(f.place, seg_id) for seg_id, f in found.items() if f.journaled}
    finally:
        for f in found.values():
            f.place.release()
    committed_seq = int(committed[0]) if committed else 0
    taken: list[JournalRecord] = []
    for journal in journals.values():
        report.journal_records += len(journal.records)
        report.damaged_records += journal.damaged
        for r in journal.records:
            if r.seq > committed_seq:
                report.pending += 1
            else:
                taken.append(r)
    tombstones = {(r.key, r.seg, r.off) for r in taken if r.kind == TOMBSTONE}
    newest: dict[bytes, JournalRecord] = {}
    for r in taken:
        if (
            r.kind == PUT
            and (r.key, r.seg, r.off) not in tombstones
            and (r.key not in newest or r.seq > newest[r.key].seq)
        ):
            newest[r.key] = r
    journaled = set(journals)
    for key, r in newest.items():
        if not (r.expires and r.expires <= now) and index.get(key) != (r.seg, r.off):
            report.disagree.append(key)
    for key, (seg_id, _off) in index.items():
        if seg_id in journaled and key not in newest:
            report.disagree.append(key)
    return report
