"""Where the SSD tier's segments live.  The tier (ssd.py) owns what a segment holds: values at aligned
offsets and a journal of checksummed records.  A segment store only says where those bytes are: files
in a directory (``SegmentFiles``, here), or fixed-size regions of a raw block device (``ssd_device.py``).
Keeping the layout in one place is what lets one load, one rebuild and one fsck serve both."""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mooncakefs import _engine
from mooncakefs.datadir import private_dir, private_file, tighten
from mooncakefs.errors import OutOfSpace

DIRECT_ALIGN = 4096  # O_DIRECT needs page-aligned memory, offsets and lengths
DIRECT_MIN = 1 << 20  # below this the page cache is cheaper than a device round trip


def direct_aligned(data: memoryview) -> bool:
    """Whether ``data`` is large enough for O_DIRECT and whole pages at a page-aligned address."""
    return data.nbytes >= DIRECT_MIN and not data.nbytes % DIRECT_ALIGN and not _engine.address(data) % DIRECT_ALIGN


_SEGMENT_FILE = re.compile(r"^seg-(\d{8})\.dat$")
_JOURNAL_FILE = re.compile(r"^seg-(\d{8})\.keys$")


class SegmentPlace(Protocol):
    """Where one segment's value bytes and journal bytes are."""

    name: str  # for messages: a file name, or a device and region
    sync_key: object  # places with equal keys share one sync (a device's regions: its one descriptor)

    def can_direct(self, data: memoryview) -> bool:
        """Whether ``data`` can be written without a copy (the tier then starts it page-aligned)."""

    def write(self, data: memoryview, off: int, direct: bool) -> None:
        """Write value bytes at ``off``; OSError as the system call raised it."""

    def read_into(self, dst: memoryview, off: int) -> int:
        """Read up to ``len(dst)`` value bytes at ``off`` into ``dst``; 0 past the end."""

    def pread(self, size: int, off: int) -> bytes:
        """Up to ``size`` value bytes at ``off`` (fewer past the end)."""

    def gpu_source(self) -> tuple[str, int, int]:
        """(name, descriptor or -1 to open the name with O_DIRECT, offset of the values in it): what
        GPUDirect Storage reads the segment's values from (tiers/gds.py)."""

    def sync(self) -> None:
        """Make the value bytes written so far survive power loss."""

    def journal_append(self, buf: bytes | bytearray, at: int) -> None:
        """Write journal bytes at ``at`` (the journal's end)."""

    def journal_sync(self) -> bool:
        """Make the journal bytes written so far survive power loss; False where this process has not
        written to it (then the index must be synced instead)."""

    def journal_extent(self) -> int | None:
        """How long the journal is without reading it (None: only a full read tells)."""

    def journal_pread(self, size: int, off: int) -> bytes:
        """Up to ``size`` journal bytes at ``off``."""

    def journal_read(self) -> tuple[bytes, int]:
        """The journal's bytes, and where its written part ends (bytes past the last record there are a
        torn tail)."""

    def journal_truncate(self, end: int, extent: int) -> None:
        """Cut a torn tail: the journal ends at ``end`` (it had written bytes up to ``extent``)."""

    def journal_drop(self) -> None:
        """Forget the journal (it could not be written): the segment is unjournaled from now on."""

    def remove(self, journaled: bool) -> None:
        """Delete the segment from where it lives (readers still holding it keep reading)."""

    def release(self) -> None:
        """Close what the segment holds open; after ``remove``, its space is free now."""

    def orphan(self) -> str:
        """Set aside a segment a rebuild cannot read (no journal); says where it went."""


@dataclass
class Found:
    """One segment a store found at open: its place, its size (bytes of values and garbage; a device
    region's whole value area), and whether it has a journal."""

    seg_id: int
    place: SegmentPlace
    size: int
    journaled: bool


class SegmentStore(Protocol):
    """The segments of one SSD tier."""

    label: str  # for messages: the directory or the device
    capacity: int | None  # bytes the store itself limits the tier to (None: as the caller says)
    segment_limit: int | None  # the most value bytes one segment can hold (None: as the tier says)
    journal_limit: int | None  # the most journal bytes one segment can hold (None: unbounded)
    # What the index records to know it was made for these segments: a device's superblock uuid and the
    # size formatted (None for files, whose index lives beside them)
    device_uuid: str | None
    formatted_size: int | None

    def has_segments(self) -> bool: ...

    def scan(self, *, writable: bool = True) -> list[Found]:
        """Every segment, oldest id first, opened for reading (and writing, with ``writable``)."""

    def create(self, seg_id: int, journal_head: bytes) -> SegmentPlace:
        """A new empty segment whose journal starts with ``journal_head``; OutOfSpace if no room."""

    def can_create(self, size: int) -> bool:
        """Whether a new segment for a value of ``size`` bytes can be made now."""

    def orphans(self) -> list[str]:
        """Segments set aside by an earlier rebuild (only the old index can read them)."""

    def close(self) -> None: ...


def is_block_device(path: str | Path | None) -> bool:
    """Whether ``path`` names a block device (the SSD tier then uses the device itself)."""
    if path is None:
        return False
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_disk(exc: OSError, label: str) -> OutOfSpace | OSError:
    """The error a failed write raises: OutOfSpace for a full disk, else the OSError itself."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(f"the disk under the SSD tier ({label}) is full: {exc.strerror}")
    return exc


class SegmentFile:
    """A segment as two files: ``seg-N.dat`` (values) and ``seg-N.keys`` (its journal)."""

    def __init__(self, directory: Path, path: Path, fd: int, journal_fd: int = -1) -> None:
        self.dir = directory
        self.path = path
        self.name = str(path)
        self.sync_key: object = path
        self.fd = fd
        self.direct_fd = -1  # an O_DIRECT descriptor for large aligned appends (-1: none yet, -2: refused)
        self.journal_path = path.with_suffix(".keys")
        self.journal_fd = journal_fd  # opened on the first write (older segments only get tombstones)
        self.dir_synced = journal_fd < 0  # a segment found at open is in its directory already

    def can_direct(self, data: memoryview) -> bool:
        if self.direct_fd == -2 or not direct_aligned(data):
            return False
        if self.direct_fd == -1:
            try:
                self.direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # a filesystem without O_DIRECT: use the page cache
                self.direct_fd = -2
                return False
        return True

    def write(self, data: memoryview, off: int, direct: bool) -> None:
        fd = self.direct_fd if direct else self.fd
        written, size = 0, data.nbytes
        while written < size:
            written += os.pwrite(fd, data[written:], off + written)

    def read_into(self, dst: memoryview, off: int) -> int:
        return os.preadv(self.fd, [dst], off)

    def pread(self, size: int, off: int) -> bytes:
        return os.pread(self.fd, size, off)

    def gpu_source(self) -> tuple[str, int, int]:
        """What GPUDirect Storage reads from (tiers/gds.py): a name, a descriptor to register (-1: open
        the name with O_DIRECT), and where the segment's values start in it."""
        return str(self.path), -1, 0

    def sync(self) -> None:
        os.fdatasync(self.fd)
        if not self.dir_synced:
            fsync_path(self.dir)
            self.dir_synced = True

    def journal_append(self, buf: bytes | bytearray, at: int) -> None:
        if self.journal_fd < 0:  # an older segment getting a tombstone
            self.journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CLOEXEC)
        done = 0
        while done < len(buf):
            done += os.pwrite(self.journal_fd, memoryview(buf)[done:], at + done)

    def journal_sync(self) -> bool:
        if self.journal_fd < 0:
            return False
        os.fdatasync(self.journal_fd)
        return True

    def journal_extent(self) -> int | None:
        return self.journal_path.stat().st_size

    def journal_pread(self, size: int, off: int) -> bytes:
        with open(self.journal_path, "rb") as f:
            f.seek(off)
            return f.read(size)

    def journal_read(self) -> tuple[bytes, int]:
        buf = self.journal_path.read_bytes()
        return buf, len(buf)

    def journal_truncate(self, end: int, extent: int) -> None:
        os.truncate(self.journal_path, end)

    def journal_drop(self) -> None:
        if self.journal_fd >= 0:
            os.close(self.journal_fd)
            self.journal_fd = -1
        self.journal_path.unlink(missing_ok=True)

    def remove(self, journaled: bool) -> None:
        self.path.unlink(missing_ok=True)  # before its journal: a journal with no segment is removed at open
        if journaled:
            self.journal_path.unlink(missing_ok=True)
        if self.journal_fd >= 0:
            os.close(self.journal_fd)
            self.journal_fd = -1

    def release(self) -> None:
        os.close(self.fd)
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        if self.journal_fd >= 0:
            os.close(self.journal_fd)
            self.journal_fd = -1

    def orphan(self) -> str:
        target = self.path.with_name(self.path.name + ".orphan")
        os.rename(self.path, target)
        self.release()
        return str(target)


class SegmentFiles:
    """Segments as files in a directory of a filesystem (made mode 0700)."""

    capacity = None
    segment_limit = None
    journal_limit = None
    device_uuid = None
    formatted_size = None

    def __init__(self, directory: Path, *, make: bool = True) -> None:
        """``make``: create the directory (mode 0700) if need be; else only look at it (fsck)."""
        self.dir = private_dir(Path(directory)) if make else Path(directory)
        self.label = str(self.dir)

    def has_segments(self) -> bool:
        return any(_SEGMENT_FILE.match(p.name) for p in self.dir.iterdir())

    def scan(self, *, writable: bool = True) -> list[Found]:
        """The segment files; journals whose segment is gone (and their values with it) are deleted."""
        segments: dict[int, Path] = {}
        journals: set[int] = set()
        for path in sorted(self.dir.iterdir()):
            if match := _SEGMENT_FILE.match(path.name):
                segments[int(match.group(1))] = path
            elif match := _JOURNAL_FILE.match(path.name):
                journals.add(int(match.group(1)))
        if writable:
            for seg_id in journals - segments.keys():
                (self.dir / f"seg-{seg_id:08d}.keys").unlink(missing_ok=True)
        found = []
        for seg_id, path in segments.items():
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            if writable:
                tighten(path, path.with_suffix(".keys"))
            found.append(Found(seg_id, SegmentFile(self.dir, path, fd), os.fstat(fd).st_size, seg_id in journals))
        return found

    def create(self, seg_id: int, journal_head: bytes) -> SegmentPlace:
        path = self.dir / f"seg-{seg_id:08d}.dat"
        journal = path.with_suffix(".keys")
        fd = private_file(path, os.O_RDWR | os.O_TRUNC)
        try:
            journal_fd = private_file(journal, os.O_WRONLY | os.O_TRUNC)
            try:
                os.pwrite(journal_fd, journal_head, 0)
            except BaseException:
                os.close(journal_fd)
                raise
        except BaseException as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise full_disk(exc, self.label) from None
            raise
        return SegmentFile(self.dir, path, fd, journal_fd)

    def can_create(self, size: int) -> bool:
        return True

    def orphans(self) -> list[str]:
        return [str(p) for p in sorted(self.dir.iterdir()) if p.name.endswith(".dat.orphan")]

    def close(self) -> None:
        pass
