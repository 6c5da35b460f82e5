"""The SSD tier on a raw block device: a local NVMe namespace, one attached over NVMe-oF with
``nvme connect``, or (in tests) a loop device.  No filesystem: every read and write is O_DIRECT and
aligned to the device's logical block size, so nothing goes through the page cache.

Layout.  The first MiB holds the superblock (magic, version, region size, journal size, region count,
the size formatted, a uuid, a CRC-32C) and nothing else, so formatting wipes the signatures other tools
look for there.  Then fixed-size regions, one segment each::

    [ header 4 KiB: magic, the device's uuid, segment id, CRC ][ journal area ][ value area ]

The journal area holds the same journal the file-backed tier keeps in ``seg-N.keys`` (ssd.py owns its
layout), zeroed when the region is handed to a new segment, so it ends where the zeros start.  A region
whose header is zeros, or names another uuid (a device formatted again), is free.  The device is opened
with O_EXCL, which the kernel honours for block devices: a second node, a mount, or ``mkfs`` cannot
have it at the same time."""

from __future__ import annotations

import errno
import fcntl
import heapq
import logging
import os
import struct
import uuid
from pathlib import Path

from mooncakefs import _engine
from mooncakefs.errors import DeviceRefused, OutOfSpace, StoreLocked
from mooncakefs.tiers.segments import DIRECT_ALIGN, Found, SegmentPlace, direct_aligned
from mooncakefs.units import format_size

log = logging.getLogger("mooncakefs.ssd")

_BLKSSZGET = 0x1268  # the logical block size: the unit of O_DIRECT offsets and lengths
_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F
_SUPER = struct.Struct("<8sIIQQQQ16s")  # magic, version, block, region size, journal size, regions, size, uuid
_SUPER_MAGIC = b"MCFSBDEV"
_SUPER_VERSION = 1
_REGION = struct.Struct("<8s16sQ")  # magic, the device's uuid, segment id
_REGION_MAGIC = b"MCFSREGN"
_CRC = struct.Struct("<I")
FIRST_REGION = 1 << 20  # the superblock's MiB
HEADER = DIRECT_ALIGN  # a region's header block
MIN_JOURNAL = 64 << 10
_PROBE = 128 << 10  # bytes at each end of a device looked at for other tools' signatures
_JOURNAL_CHUNK = 256 << 10
# Where other tools put their signatures (offset, bytes, what): enough to name what a refusal protects.
_SIGNATURES = (
    (0, b"XFSB", "an XFS filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (0x52, b"FAT32   ", "a FAT filesystem"),
    (0x200, b"EFI PART", "a GPT partition table"),
    (0x218, b"LVM2 001", "an LVM physical volume"),
    (0x438, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0xFF6, b"SWAPSPACE2", "a swap area"),
    (0x8001, b"CD001", "an ISO 9660 image"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (0x1FE, b"\x55\xaa", "an MBR partition table or boot sector"),
)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _aligned_buffer(size: int) -> memoryview:
    """``size`` zeroed bytes at a page-aligned address (what O_DIRECT wants of memory)."""
    raw = bytearray(size + DIRECT_ALIGN)
    pad = -_engine.address(raw) % DIRECT_ALIGN
    return memoryview(raw)[pad : pad + size]


def _with_crc(body: bytes) -> bytes:
    return body + _CRC.pack(_engine.crc32c(body))


class DirectIO:
    """Reads and writes of any offset and length on an O_DIRECT descriptor: aligned ones go straight
    through, others through an aligned bounce buffer (a write keeps the bytes before it in its first
    block, and leaves zeros after it in its last)."""

    def __init__(self, fd: int, block: int) -> None:
        self.fd = fd
        self.block = block

    def _read_aligned(self, dst: memoryview, off: int) -> int:
        done = 0
        while done < dst.nbytes:
            got = os.preadv(self.fd, [dst[done:]], off + done)
            if not got:
                break
            done += got
        return done

    def _bounce_read(self, size: int, off: int) -> memoryview:
        start = off - off % self.block
        buf = _aligned_buffer(_round_up(off + size, self.block) - start)
        got = self._read_aligned(buf, start)
        return buf[off - start : max(off - start, min(off - start + size, got))]

    def read_into(self, dst: memoryview, off: int) -> int:
        """Read ``dst.nbytes`` bytes at ``off`` (fewer at the device's end); returns how many."""
        size, done = dst.nbytes, 0
        if not off % self.block and not _engine.address(dst) % DIRECT_ALIGN:
            whole = size - size % self.block
            done = self._read_aligned(dst[:whole], off) if whole else 0
            if done < whole or done == size:
                return done
        rest = self._bounce_read(size - done, off + done)
        dst[done : done + rest.nbytes] = rest
        return done + rest.nbytes

    def pread(self, size: int, off: int) -> bytes:
        return bytes(self._bounce_read(size, off))

    def write(self, data: bytes | bytearray | memoryview, off: int) -> None:
        view = memoryview(data).cast("B")
        size, block = view.nbytes, self.block
        if off % block or size % block or _engine.address(view) % DIRECT_ALIGN:
            start = off - off % block
            buf = _aligned_buffer(_round_up(off + size, block) - start)
            if start < off:  # the bytes before ``off`` in its block stay as they are
                head = self._bounce_read(block, start)
                buf[: head.nbytes] = head
            buf[off - start : off - start + size] = view
            view, off = buf, start
        done = 0
        while done < view.nbytes:
            done += os.pwrite(self.fd, view[done:], off + done)

    def zero(self, off: int, size: int) -> None:
        """Zero ``size`` bytes at ``off`` (both block-aligned): the device does it where it can."""
        try:
            fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("QQ", off, size))
            return
        except OSError:
            pass
        chunk = _aligned_buffer(min(size, 1 << 20))
        for at in range(off, off + size, chunk.nbytes):
            self.write(chunk[: min(chunk.nbytes, off + size - at)], at)


class DeviceRegion:
    """One segment in one region of a block device."""

    def __init__(self, device: BlockDevice, index: int, seg_id: int) -> None:
        self.device = device
        self.io = device.io
        self.index = index
        self.name = f"{device.label} region {index} (segment {seg_id})"
        self.sync_key: object = device  # one fdatasync of the device covers all its regions
        start = FIRST_REGION + index * device.region_size
        self.header_at = start
        self.journal_at = start + HEADER
        self.data_at = self.journal_at + device.journal_size
        self.data_size = device.data_size
        self.removed = False
        # The journal's last partial block as written (so an append need not read it back first).
        self._tail = b""
        self._tail_end = -1  # the journal offset the cached tail ends at (-1: not cached)

    def can_direct(self, data: memoryview) -> bool:
        return direct_aligned(data)

    def write(self, data: memoryview, off: int, direct: bool) -> None:
        if off + data.nbytes > self.data_size:
            raise OSError(errno.ENOSPC, f"a value does not fit in {self.name}")
        self.io.write(data, self.data_at + off)

    def read_into(self, dst: memoryview, off: int) -> int:
        size = max(0, min(dst.nbytes, self.data_size - off))
        return self.io.read_into(dst[:size], self.data_at + off) if size else 0

    def pread(self, size: int, off: int) -> bytes:
        size = max(0, min(size, self.data_size - off))
        return self.io.pread(size, self.data_at + off) if size else b""

    def gpu_source(self) -> tuple[str, int, int]:
        """GPUDirect Storage reads the device's own O_DIRECT descriptor, registered once for all regions."""
        return self.device.label, self.io.fd, self.data_at

    def sync(self) -> None:
        os.fdatasync(self.io.fd)

    def journal_append(self, buf: bytes | bytearray, at: int) -> None:
        end = at + len(buf)
        if end > self.device.journal_size:
            raise OSError(errno.ENOSPC, f"the journal area of {self.name} is full")
        block = self.io.block
        start = at - at % block  # write from the start of the block: the records before stay
        head = self._tail if self._tail_end == at else self.io.pread(at - start, self.journal_at + start)
        payload = head + bytes(buf)
        self.io.write(payload, self.journal_at + start)
        keep = end - end % block
        self._tail, self._tail_end = payload[keep - start :], end

    def journal_sync(self) -> bool:
        os.fdatasync(self.io.fd)
        return True

    def journal_extent(self) -> int | None:
        return None  # only reading the journal finds where it ends

    def journal_pread(self, size: int, off: int) -> bytes:
        size = max(0, min(size, self.device.journal_size - off))
        return self.io.pread(size, self.journal_at + off) if size else b""

    def journal_read(self) -> tuple[bytes, int]:
        """Chunks of the journal area until one is all zeros: the area was zeroed when the region was
        given to this segment, and the journal only grows."""
        buf = bytearray()
        while len(buf) < self.device.journal_size:
            chunk = self.journal_pread(_JOURNAL_CHUNK, len(buf))
            buf += chunk
            if not chunk.strip(b"\0"):
                break
        # The zeros after the last record are not a torn tail (the 2-byte length that ends a record may
        # itself end in a zero byte: the parser finds the record's end).
        return bytes(buf), len(buf.rstrip(b"\0"))

    def journal_truncate(self, end: int, extent: int) -> None:
        if extent > end:
            self.io.write(bytes(extent - end), self.journal_at + end)
        self._tail_end = -1

    def journal_drop(self) -> None:
        self.io.write(bytes(HEADER), self.journal_at)
        self._tail_end = -1

    def remove(self, journaled: bool) -> None:
        self.io.write(bytes(HEADER), self.header_at)  # free from the next scan on
        self.removed = True

    def release(self) -> None:
        if self.removed:  # no reader holds it any more: it may take a new segment
            self.device.free_region(self.index)

    def orphan(self) -> str:
        log.warning("%s has no journal: freed it (only the old index could read its values)", self.name)
        self.remove(False)
        self.release()
        return self.name


class BlockDevice:
    """The segments of an SSD tier as regions of a raw block device (see the module's docstring)."""

    segment_limit: int
    journal_limit: int
    device_uuid: str
    formatted_size: int

    def __init__(
        self,
        path: str | Path,
        size: int | None,
        segment_size: int,
        *,
        format: bool = False,
        writable: bool = True,
    ) -> None:
        self.label = str(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_DIRECT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise StoreLocked(
                    f"block device {path} is in use: mounted, or held by another process (another node's SSD "
                    "tier?); a device serves one SSD tier at a time"
                ) from None
            raise DeviceRefused(f"cannot open block device {path}: {exc.strerror}") from None
        try:
            block = max(512, int.from_bytes(fcntl.ioctl(fd, _BLKSSZGET, bytes(4)), "little"))
            self.io = DirectIO(fd, block)
            self.device_size = int.from_bytes(fcntl.ioctl(fd, _BLKGETSIZE64, bytes(8)), "little")
            self._attach(size, segment_size, format=format, writable=writable)
        except BaseException:
            os.close(fd)
            raise
        self._free: list[int] = []
        self._found: list[Found] | None = None

    def _refuse(self, why: str) -> DeviceRefused:
        return DeviceRefused(f"block device {self.label}: {why}")

    def _attach(self, size: int | None, segment_size: int, *, format: bool, writable: bool) -> None:
        unit = max(DIRECT_ALIGN, self.io.block)
        if size is not None:
            if size > self.device_size:
                raise self._refuse(
                    f"SSD size {format_size(size)} is larger than the device ({format_size(self.device_size)})"
                )
            if size % unit:
                raise self._refuse(f"SSD size {size} is not a multiple of {unit} bytes")
        sb = self.io.pread(_SUPER.size + _CRC.size, 0)
        ours = sb[:8] == _SUPER_MAGIC
        if ours and not format:
            if _engine.crc32c(sb[: _SUPER.size]) != _CRC.unpack_from(sb, _SUPER.size)[0]:
                raise self._refuse(
                    "its mooncakefs superblock is damaged; formatting (--format-ssd, ssd_format=True) starts it "
                    "over, erasing what it held"
                )
            _magic, version, _block, region, journal, count, formatted, raw_uuid = _SUPER.unpack_from(sb)
            if version != _SUPER_VERSION:
                raise self._refuse(
                    f"it holds a mooncakefs SSD tier of format version {version}; this version reads "
                    f"{_SUPER_VERSION}.  Formatting (--format-ssd, ssd_format=True) erases it"
                )
            if size is not None and size != formatted:
                raise self._refuse(
                    f"it was formatted for {format_size(formatted)} ({formatted} bytes), not "
                    f"{format_size(size)}: give that size or none, or format it again (erases it)"
                )
            if formatted > self.device_size:
                raise self._refuse(f"it was formatted for {format_size(formatted)} but is smaller now")
            self._layout(region - HEADER - journal, count, formatted, uuid.UUID(bytes=raw_uuid))
            return
        if not writable:
            raise self._refuse("it holds no mooncakefs SSD tier")
        if not format and (found := self._foreign()):
            raise self._refuse(
                f"it holds {found}; mooncakefs will not overwrite it.  To use the device anyway, erasing "
                "everything on it: `mooncakefs node --format-ssd`, or mooncakefs.open(..., ssd_format=True)"
            )
        self._format(size if size is not None else self.device_size - self.device_size % unit, segment_size)

    def _foreign(self) -> str | None:
        """What other tools would find on the device, or None if its ends are all zeros."""
        head = self.io.pread(min(_PROBE, self.device_size), 0)
        tail_at = max(0, self.device_size - _PROBE)
        tail = self.io.pread(self.device_size - tail_at, tail_at)
        names = [what for at, magic, what in _SIGNATURES if head[at : at + len(magic)] == magic]
        if names:
            return " and ".join(dict.fromkeys(names))
        for data, base in ((head, 0), (tail, tail_at)):
            if stripped := data.lstrip(b"\0"):
                return f"data (a non-zero byte at offset {base + len(data) - len(stripped)})"
        return None

    def _format(self, size: int, segment_size: int) -> None:
        data_size = _round_up(max(segment_size, DIRECT_ALIGN), DIRECT_ALIGN)
        journal_size = _round_up(max(MIN_JOURNAL, data_size // 16), DIRECT_ALIGN)
        region_size = HEADER + journal_size + data_size
        count = (size - FIRST_REGION) // region_size if size > FIRST_REGION else 0
        if count < 2:
            need = FIRST_REGION + 2 * region_size
            raise self._refuse(
                f"{format_size(size)} is too small: the SSD tier takes at least {format_size(need)} (a superblock "
                f"and two regions of {format_size(region_size)}: a {format_size(data_size)} segment, its journal "
                "and header); give a smaller segment_size or a bigger device"
            )
        self._layout(data_size, count, size, uuid.uuid4())
        self.io.zero(0, FIRST_REGION)  # other tools' signatures go with the old contents
        body = _SUPER.pack(
            _SUPER_MAGIC,
            _SUPER_VERSION,
            self.io.block,
            self.region_size,
            self.journal_size,
            count,
            size,
            self.uuid.bytes,
        )
        self.io.write(_with_crc(body).ljust(DIRECT_ALIGN, b"\0"), 0)
        os.fdatasync(self.io.fd)
        log.info(
            "formatted block device %s for the SSD tier: %d regions of %s (%s of values each), uuid %s",
            self.label,
            count,
            format_size(self.region_size),
            format_size(data_size),
            self.uuid,
        )

    def _layout(self, data_size: int, count: int, size: int, device_uuid: uuid.UUID) -> None:
        self.data_size = self.segment_limit = data_size
        self.journal_size = self.journal_limit = _round_up(max(MIN_JOURNAL, data_size // 16), DIRECT_ALIGN)
        self.region_size = HEADER + self.journal_size + data_size
        self.region_count = count
        self.formatted_size = size
        # One region is kept free: compacting a region that a reader still holds (so it is not free yet)
        # must still find a region to move that region's live values to.
        self.capacity = (count - 1) * data_size
        self.uuid = device_uuid
        self.device_uuid = str(device_uuid)

    # -- segments --------------------------------------------------------------------------------------

    def _region_header(self, seg_id: int) -> bytes:
        return _with_crc(_REGION.pack(_REGION_MAGIC, self.uuid.bytes, seg_id)).ljust(HEADER, b"\0")

    def scan(self, *, writable: bool = True) -> list[Found]:
        """Read every region's header: those naming this device's uuid hold segments, the rest are free."""
        if self._found is not None:
            return self._found
        found: dict[int, Found] = {}
        free: list[int] = []
        for index in range(self.region_count):
            start = FIRST_REGION + index * self.region_size
            head = self.io.pread(HEADER + 16, start)
            magic, device_uuid, seg_id = _REGION.unpack_from(head)
            crc = _CRC.unpack_from(head, _REGION.size)[0]
            valid = (
                magic == _REGION_MAGIC
                and device_uuid == self.uuid.bytes
                and crc == _engine.crc32c(head[: _REGION.size])
                and seg_id not in found
            )
            if not valid:
                free.append(index)
                continue
            journaled = bool(head[HEADER:].strip(b"\0"))
            # a segment found is sealed: its whole region is its size, the unused end garbage
            found[seg_id] = Found(seg_id, DeviceRegion(self, index, seg_id), self.data_size, journaled)
        self._free = free  # ascending: already a heap
        self._found = [found[seg_id] for seg_id in sorted(found)]
        return self._found

    def has_segments(self) -> bool:
        return bool(self.scan())

    def create(self, seg_id: int, journal_head: bytes) -> SegmentPlace:
        self.scan()
        if not self._free:
            raise OutOfSpace(f"the SSD tier on {self.label} has no free region for a new segment")
        index = heapq.heappop(self._free)
        region = DeviceRegion(self, index, seg_id)
        try:
            self.io.zero(region.journal_at, self.journal_size)  # the journal ends where the zeros start
            region.journal_append(journal_head, 0)
            self.io.write(self._region_header(seg_id), region.header_at)  # last: now the segment exists
        except BaseException:
            heapq.heappush(self._free, index)
            raise
        return region

    def can_create(self, size: int) -> bool:
        """A new segment for a put leaves one region free (only compaction's relocations take it)."""
        self.scan()
        return len(self._free) > 1 and size <= self.data_size

    def free_region(self, index: int) -> None:
        heapq.heappush(self._free, index)

    def orphans(self) -> list[str]:
        return []

    def close(self) -> None:
        if self.io.fd >= 0:
            os.close(self.io.fd)
            self.io.fd = -1
