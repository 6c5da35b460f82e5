"""Pure-Python twins of the Cython hot paths in ``mooncakefs._engine``.

They run the same algorithms step for step (the allocator hands out the same handles and offsets for
the same calls), slowly and obviously, so the tests can check the fast versions against them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack

from mooncakefs.api import BATCH_ERRORS, PLAIN_PUT, holds_objects, objects_error, value_error
from mooncakefs.errors import MooncakeError, ProtocolError, Unavailable
from mooncakefs.frame import (
    CRC_CHUNK,
    CRC_TRAILER,
    FIRST_READ,
    FLAGS_MASK,
    HEADER,
    IOV_CHUNK,
    LINE,
    MAGIC,
    MAX_META,
    MAX_PAYLOAD,
    PAD_SHIFT,
    RECV_BUFFER,
    SMALL_SEND,
    WITH_CRC,
    check_crc,
    payload_phase,
)
from mooncakefs.keys import InternalKey, encode_key, key_digest  # the twin of _engine.encode_key: every key's rules

ALLOC_UNIT = 64
VERSION_LIMIT = 1 << 126  # two 63-bit halves: each fits a signed 64-bit SQLite column
VERSION_LOW_MASK = (1 << 63) - 1
_NONE = -1
_NUM_BINS = 256
_FREE, _USED, _SPARE = 0, 1, 2
_POLY = 0x82F63B78


def _read_view(obj: object, what: str) -> memoryview:
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise TypeError(f"{what} must be a C-contiguous bytes-like object")
    if holds_objects(view.format):
        raise objects_error(what, obj)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _write_view(obj: object, what: str) -> memoryview:
    view = _read_view(obj, what)
    if view.readonly:
        raise TypeError(f"{what} must be a writable buffer")
    return view


def nbytes(obj: object) -> int:
    return _read_view(obj, "value").nbytes


def pages_mapped(addr: int, size: int) -> bool:
    """``_engine.pages_mapped``: ``mincore`` through ctypes, one page vector for the whole range."""
    if size == 0 or addr + size > 1 << 64:
        return size == 0
    page = os.sysconf("SC_PAGESIZE")
    start = addr - addr % page
    length = addr + size - start
    vec = ctypes.create_string_buffer((length + page - 1) // page)
    return _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0


def address(obj: object) -> int:
    """Memory address of a buffer's first byte (to check alignment for O_DIRECT I/O), through numpy."""
    import numpy

    return int(numpy.frombuffer(_read_view(obj, "buffer"), dtype=numpy.uint8).ctypes.data)


def copy(dst: object, src: object) -> int:
    s = _read_view(src, "source")
    d = _write_view(dst, "destination")
    if d.nbytes < s.nbytes:
        raise ValueError(f"destination holds {d.nbytes} bytes, source has {s.nbytes}")
    d[: s.nbytes] = s
    return s.nbytes


def copy_many(dsts: Sequence[object], srcs: Sequence[object]) -> int:
    if len(dsts) != len(srcs):
        raise ValueError(f"{len(dsts)} destinations for {len(srcs)} sources")
    pairs = [(_write_view(d, "destination"), _read_view(s, "source")) for d, s in zip(dsts, srcs, strict=True)]
    for i, (d, s) in enumerate(pairs):
        if d.nbytes < s.nbytes:
            raise ValueError(f"destination {i} holds {d.nbytes} bytes, source has {s.nbytes}")
    for d, s in pairs:
        d[: s.nbytes] = s
    return sum(s.nbytes for _d, s in pairs)


def fill_bytes(n: int, fill: Callable[[memoryview], object]) -> bytes:
    buf = bytearray(n)
    fill(memoryview(buf))
    return bytes(buf)


def bytes_to_fill(n: int) -> tuple[bytearray, memoryview]:
    """A bytearray in place of the bytes (its caller turns it into bytes once filled) and its view."""
    buf = bytearray(n)
    return buf, memoryview(buf)


def view_at(addr: int, n: int, writable: bool = False) -> memoryview:
    """A memoryview of ``n`` bytes at ``addr`` in this process, through ctypes."""
    if addr == 0 or n < 0:
        raise ValueError(f"no memory at address {addr:#x} (+{n})")
    view = memoryview((ctypes.c_char * n).from_address(addr)).cast("B")
    return view if writable else view.toreadonly()


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)


def vm_copy(pid: int, locals_: Sequence[int], remotes: Sequence[int], lengths: Sequence[int], write: bool) -> int:
    """process_vm_readv/writev one range at a time, through ctypes."""
    if not len(locals_) == len(remotes) == len(lengths):
        raise ValueError("locals_, remotes and lengths must have the same length")
    call = _libc.process_vm_writev if write else _libc.process_vm_readv
    call.restype = ctypes.c_ssize_t
    total = 0
    for local, remote, n in zip(locals_, remotes, lengths, strict=True):
        done = 0
        while done < n:
            li, ri = _Iovec(local + done, n - done), _Iovec(remote + done, n - done)
            got = call(pid, ctypes.byref(li), 1, ctypes.byref(ri), 1, 0)
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else errno.EFAULT
                raise OSError(err, os.strerror(err))
            done += got
        total += n
    return total


def copy_at(
    dst_addrs: Sequence[int], src_addrs: Sequence[int], lengths: Sequence[int], pinned: Sequence[Any] = ()
) -> int:
    """``lengths[i]`` bytes from address ``src_addrs[i]`` to ``dst_addrs[i]``, through ctypes; ``pinned``
    held as memoryviews until the copies end."""
    if not len(dst_addrs) == len(src_addrs) == len(lengths):
        raise ValueError(f"{len(dst_addrs)} destinations and {len(src_addrs)} sources for {len(lengths)} lengths")
    for i, (d, s, n) in enumerate(zip(dst_addrs, src_addrs, lengths, strict=True)):
        if d < 0 or s < 0 or n < 0:
            raise OverflowError(f"copy {i}: negative address or length")
        if n and (d == 0 or s == 0):
            raise ValueError(f"copy {i}: no memory at address 0")
    views = [_read_view(p, "pinned buffer") for p in pinned]
    try:
        for d, s, n in zip(dst_addrs, src_addrs, lengths, strict=True):
            ctypes.memmove(d, s, n)
    finally:
        for v in views:
            v.release()
    return sum(lengths)


STREAM_COPY_MIN = 4 << 20
_STREAM_KINDS = ("memcpy", "sse2", "avx2")


def stream_copy_kind() -> str:
    """Always "memcpy": the twin copies with ctypes.memmove; same bytes, no streaming stores."""
    return "memcpy"


def force_stream_copy(kind: str) -> str:
    """Checks ``kind`` as the Cython engine does; the twin has only one path, "memcpy"."""
    if kind != "auto" and kind not in _STREAM_KINDS:
        raise ValueError(f"stream copy kind {kind!r}: expected auto, {', '.join(_STREAM_KINDS)}")
    return "memcpy"


def _crc32c_of_byte(byte: int) -> int:
    """The CRC-32C register after shifting one byte through it, bit by bit: the definition."""
    reg = byte
    for _ in range(8):
        reg = (reg >> 1) ^ (_POLY & -(reg & 1))
    return reg


_CRC_TABLE = tuple(_crc32c_of_byte(b) for b in range(256))


def _crc_bytes(reg: int, data: bytes) -> int:
    """Shift ``data`` through the (uninverted) CRC register, a byte at a time."""
    table = _CRC_TABLE
    for byte in data:
        reg = (reg >> 8) ^ table[(reg ^ byte) & 0xFF]
    return reg


_LANE = 1024  # bytes per lane when a long buffer is checksummed as many lanes at once


def _shift_tables(n: int) -> tuple[tuple[int, ...], ...]:
    """Shifting the register through ``n`` zero bytes is linear over GF(2): four 256-entry tables, one per
    byte of the register, give the image of every register as the XOR of four lookups."""
    basis = [_crc_bytes(1 << bit, bytes(n)) for bit in range(32)]
    return tuple(
        tuple(_xor_of(basis[8 * k + i] for i in range(8) if value >> i & 1) for value in range(256)) for k in range(4)
    )


def _xor_of(values: Iterator[int]) -> int:
    out = 0
    for value in values:
        out ^= value
    return out


_LANE_SHIFT = _shift_tables(_LANE)


def crc32c(data: object, crc: int = 0) -> int:
    """CRC-32C through a 256-entry table built from the definition above.

    Long buffers (the suite's pure-Python run checksums gigabytes) are cut into 1 KiB lanes whose
    registers numpy advances side by side; the lanes are then folded in order, shifting the running
    register past each lane with the linear tables of ``_shift_tables``.  Same result, ~100x sooner.
    """
    view = _read_view(data, "data")
    reg = crc ^ 0xFFFFFFFF
    lanes = view.nbytes // _LANE if view.nbytes >= 16 * _LANE else 0
    if lanes:
        import numpy

        table = numpy.array(_CRC_TABLE, dtype=numpy.uint32)
        columns = numpy.frombuffer(view, dtype=numpy.uint8, count=lanes * _LANE).reshape(lanes, _LANE).T.copy()
        regs = numpy.zeros(lanes, dtype=numpy.uint32)
        for column in columns:
            regs = (regs >> 8) ^ table[(regs ^ column) & 0xFF]
        t0, t1, t2, t3 = _LANE_SHIFT
        for lane in regs.tolist():
            reg = t0[reg & 0xFF] ^ t1[reg >> 8 & 0xFF] ^ t2[reg >> 16 & 0xFF] ^ t3[reg >> 24] ^ lane
    reg = _crc_bytes(reg, view[lanes * _LANE :].tobytes())
    return reg ^ 0xFFFFFFFF


crc32c_portable = crc32c


def crc32c_path() -> str:
    """The twin has one path (the Cython engine names the CPU instructions its crc32c uses)."""
    return "python"


def _bin_down(units: int) -> int:
    if units < 8:
        return units
    shift = units.bit_length() - 4
    return ((shift + 1) << 3) | ((units >> shift) & 7)


def _bin_up(units: int) -> int:
    b = _bin_down(units)
    if units >= 8 and units & ((1 << (units.bit_length() - 4)) - 1):
        b += 1
    return b


class OffsetAllocator:
    """Segregated-fit allocator over 64-byte units (see the Cython version for the design)."""

    def __init__(self, capacity: int) -> None:
        self.units = capacity // ALLOC_UNIT
        if self.units >= 0xFFFFFFFF:
            raise ValueError(f"pool of {capacity} bytes is too large for 32-bit units")
        self.capacity = self.units * ALLOC_UNIT
        self.used_units = 0
        self.off: list[int] = []
        self.size: list[int] = []
        self.bin_prev: list[int] = []
        self.bin_next: list[int] = []
        self.addr_prev: list[int] = []
        self.addr_next: list[int] = []
        self.state: list[int] = []
        self.spare: list[int] = []
        self.heads = [_NONE] * _NUM_BINS
        if self.units:
            n = self._new_node()
            self.off[n], self.size[n] = 0, self.units
            self._insert_free(n)

    def _new_node(self) -> int:
        if self.spare:
            return self.spare.pop()
        for column in (self.off, self.size, self.bin_prev, self.bin_next, self.addr_prev, self.addr_next, self.state):
            column.append(_NONE)
        return len(self.off) - 1

    def _insert_free(self, n: int) -> None:
        b = _bin_down(self.size[n])
        head = self.heads[b]
        self.state[n], self.bin_prev[n], self.bin_next[n] = _FREE, _NONE, head
        if head != _NONE:
            self.bin_prev[head] = n
        self.heads[b] = n

    def _remove_free(self, n: int) -> None:
        b = _bin_down(self.size[n])
        prev, nxt = self.bin_prev[n], self.bin_next[n]
        if prev != _NONE:
            self.bin_next[prev] = nxt
        else:
            self.heads[b] = nxt
        if nxt != _NONE:
            self.bin_prev[nxt] = prev

    def alloc(self, nbytes: int) -> int:
        units = max(1, -(-nbytes // ALLOC_UNIT))
        if units > self.units:
            return -1
        found = next((i for i in range(_bin_up(units), _NUM_BINS) if self.heads[i] != _NONE), None)
        if found is not None:
            n = self.heads[found]
        else:  # a block in the request's rounded-down bin may still be large enough
            n = self.heads[_bin_down(units)]
            while n != _NONE and self.size[n] < units:
                n = self.bin_next[n]
            if n == _NONE:
                return -1
        self._remove_free(n)
        if self.size[n] > units:
            rest = self._new_node()
            self.off[rest], self.size[rest] = self.off[n] + units, self.size[n] - units
            after = self.addr_next[n]
            self.addr_prev[rest], self.addr_next[rest] = n, after
            if after != _NONE:
                self.addr_prev[after] = rest
            self.addr_next[n] = rest
            self.size[n] = units
            self._insert_free(rest)
        self.state[n] = _USED
        self.used_units += units
        return n

    def reserve(self, nbytes: int) -> tuple[int, int]:
        handle = self.alloc(nbytes)
        return (handle, self.offset(handle)) if handle >= 0 else (-1, -1)

    def free(self, handle: int) -> None:
        if not 0 <= handle < len(self.state) or self.state[handle] != _USED:
            raise ValueError(f"handle {handle} is not allocated")
        n = handle
        self.used_units -= self.size[n]
        other = self.addr_prev[n]
        if other != _NONE and self.state[other] == _FREE:
            self._remove_free(other)
            self.off[n] = self.off[other]
            self.size[n] += self.size[other]
            self.addr_prev[n] = self.addr_prev[other]
            if self.addr_prev[other] != _NONE:
                self.addr_next[self.addr_prev[other]] = n
            self._retire(other)
        other = self.addr_next[n]
        if other != _NONE and self.state[other] == _FREE:
            self._remove_free(other)
            self.size[n] += self.size[other]
            self.addr_next[n] = self.addr_next[other]
            if self.addr_next[other] != _NONE:
                self.addr_prev[self.addr_next[other]] = n
            self._retire(other)
        self._insert_free(n)

    def _retire(self, n: int) -> None:
        self.state[n] = _SPARE
        self.spare.append(n)

    def offset(self, handle: int) -> int:
        return self.off[handle] * ALLOC_UNIT

    @property
    def used(self) -> int:
        return self.used_units * ALLOC_UNIT


class Arena:
    """The pool buffer, copied in and out through memoryview slices."""

    def __init__(self, pool: object) -> None:
        self._view: memoryview | None = _write_view(pool, "pool")
        self.size = self._view.nbytes

    def release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view, self.size = None, 0

    def _range(self, off: int, n: int) -> memoryview:
        if self._view is None:
            raise ValueError("arena is released")
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError(f"range [{off}, {off + n}) is outside the {self.size}-byte pool")
        return self._view[off : off + n]

    def write(self, off: int, src: object) -> int:
        s = _read_view(src, "value")
        self._range(off, s.nbytes)[:] = s
        return s.nbytes

    def read_into(self, off: int, n: int, dst: object) -> int:
        src = self._range(off, n)
        d = _write_view(dst, "buffer")
        if d.nbytes < n:
            raise ValueError(f"buffer holds {d.nbytes} bytes, {n} needed")
        d[:n] = src
        return n

    def read(self, off: int, n: int) -> bytes:
        return self._range(off, n).tobytes()

    def crc32c(self, off: int, n: int) -> int:
        return crc32c(self._range(off, n))

    def prefault(self, step: int = 64 << 20) -> bool:
        for off in range(0, self.size, 4096):  # touch every page
            view = self._range(off, 1)
            view[0] = view[0]
        return True


VALUE_SIZE_LIMIT = 1 << 48
SSD_ALIGN = 512


class Entry:
    """Same fields, same checks as the Cython entry (whose narrow fields make the checks)."""

    __slots__ = (
        "_crc",
        "_dram_off",
        "_seg_off",
        "_size",
        "_version",
        "dead",
        "dram",
        "durable",
        "expires",
        "hits",
        "key",
        "pinned",
        "queue",
        "readers",
        "seen",
        "seg",
        "sticky",
        "tag",
        "vram",
    )

    def __init__(self, size: int = 0) -> None:
        self.queue = 0
        self.size = size
        self.key: bytes | None = None
        self._version = self.tag = 0
        self.dram = self._dram_off = self.seg = self._seg_off = self.vram = self._crc = -1
        self.expires = 0.0
        self.readers = self.hits = self.seen = 0
        self.pinned = self.sticky = self.dead = self.durable = False

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        if not 0 <= value < VALUE_SIZE_LIMIT:
            raise ValueError(f"an entry's size is from 0 to 2**48 bytes, got {value}")
        if self.queue:
            raise ValueError("the size of a queued entry cannot change (its queue counts its bytes)")
        self._size = value

    @property
    def dram_off(self) -> int:
        return self._dram_off

    @dram_off.setter
    def dram_off(self, value: int) -> None:
        if value != -1 and (value < 0 or value % ALLOC_UNIT or value // ALLOC_UNIT >= 0xFFFFFFFF):
            raise ValueError(
                f"a DRAM offset is a multiple of {ALLOC_UNIT} below {ALLOC_UNIT} * 2**32 (or -1), got {value}"
            )
        self._dram_off = value

    @property
    def seg_off(self) -> int:
        return self._seg_off

    @seg_off.setter
    def seg_off(self, value: int) -> None:
        if value != -1 and (value < 0 or value % SSD_ALIGN or value // SSD_ALIGN >= 0xFFFFFFFF):
            raise ValueError(
                f"an SSD offset is a multiple of {SSD_ALIGN} below {SSD_ALIGN} * 2**32 (or -1), got {value}"
            )
        self._seg_off = value

    @property
    def crc(self) -> int:
        return self._crc

    @crc.setter
    def crc(self, value: int) -> None:
        if value != -1 and not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"a CRC-32C is a 32-bit int (or -1 for none), got {value}")
        self._crc = value

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        if not 0 <= value < VERSION_LIMIT:
            raise ValueError(f"a version is an int from 0 to 2**126, got {value!r:.40}")
        self._version = value


class EntryQueue:
    """``_engine.EntryQueue`` on an OrderedDict: the same operations and order, keyed by the entry
    itself (its id), as the Cython queue links entries, not keys."""

    def __init__(self, ident: int) -> None:
        if not 1 <= ident <= 3:
            raise ValueError(f"a queue's ident is 1, 2 or 3, got {ident}")
        self.ident = ident
        self.nbytes = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()

    @property
    def count(self) -> int:
        return len(self._entries)

    def append(self, key: bytes, entry: Entry) -> None:
        if entry.queue:
            raise ValueError(f"entry is already in queue {entry.queue}")
        entry.key = key
        self._entries[id(entry)] = entry
        entry.queue = self.ident
        self.nbytes += entry.size

    def _check(self, entry: Entry) -> None:
        if entry.queue != self.ident:
            raise ValueError(f"entry is in queue {entry.queue}, not in queue {self.ident}")

    def remove(self, entry: Entry) -> None:
        self._check(entry)
        del self._entries[id(entry)]
        entry.queue = 0
        self.nbytes -= entry.size

    def move_to_back(self, entry: Entry) -> None:
        self._check(entry)
        self._entries.move_to_end(id(entry))

    def first(self) -> Entry | None:
        return next(iter(self._entries.values()), None)

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        for entry in self._entries.values():
            yield entry.key, entry  # type: ignore[misc]

    def __iter__(self) -> Iterator[bytes]:
        for key, _ in self.items():
            yield key

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        for entry in self._entries.values():
            entry.queue = 0
        self._entries.clear()
        self.nbytes = 0


class KeyIndex(dict):
    """``_engine.KeyIndex`` as a dict: encoded keys to entries, each entry's ``key`` set as it goes in,
    a caller's key looked up as the stores take it (``lookup``), and ``keys``, ``values`` and ``items``
    as lists taken at once."""

    def __setitem__(self, raw: bytes, entry: Entry) -> None:
        if type(raw) is not bytes:
            raise TypeError(f"the index's keys are encoded keys (bytes), got {type(raw).__name__}")
        if type(entry).__name__ != "Entry":  # either engine's: the tests run PlainPath's twin on both
            raise TypeError(f"the index holds entries, got {type(entry).__name__}")
        entry.key = raw
        super().__setitem__(raw, entry)

    def lookup(self, key: Any) -> Entry | None:
        return self.get(encode_key(key))

    def keys(self) -> list[bytes]:  # type: ignore[override]
        return list(super().keys())

    def values(self) -> list[Entry]:  # type: ignore[override]
        return list(super().values())

    def items(self) -> list[tuple[bytes, Entry]]:  # type: ignore[override]
        return list(super().items())


INDEX_HEADER_BYTES, INDEX_SLOT_BYTES = 64, 32
_HEAD = struct.Struct("<QQq")  # magic, slots, heartbeat (ns)
_U32 = struct.Struct("<I")
_SLOT = struct.Struct("<IIQQII")  # seq, hits, h1, h2, off (64-byte units), size
_IDX_MAGIC, _TOMB, _PROBES, _STALE_NS = 0x31584449434D4F4F, 0xFFFFFFFF, 32, 2_000_000_000


class SharedIndex:
    """The shared index's layout and seqlock protocol in plain Python (see ``_shared_index.h``).

    The node writes and readers in other processes read the same memory, so each step touches only the
    fields the C version touches, in its order: a slot is never rewritten whole by a reader."""

    def __init__(self, table: object, pool: object = None, *, create: bool = False) -> None:
        self.table = _write_view(table, "index table")
        self.pool = None if pool is None else _read_view(pool, "pool")
        n = len(self.table)
        if n < INDEX_HEADER_BYTES + INDEX_SLOT_BYTES:
            raise ValueError("index table too small")
        if create:
            self.table[:] = bytes(n)
            slots = 1
            while slots * 2 * INDEX_SLOT_BYTES + INDEX_HEADER_BYTES <= n:
                slots *= 2
            _HEAD.pack_into(self.table, 0, _IDX_MAGIC, slots, time.monotonic_ns())
        magic, self.slots, _ = _HEAD.unpack_from(self.table, 0)
        slots = self.slots
        if (
            magic != _IDX_MAGIC
            or slots == 0
            or slots & (slots - 1)
            or slots > (n - INDEX_HEADER_BYTES) // INDEX_SLOT_BYTES
        ):
            raise ValueError("not a mooncakefs shared index")

    def _slot(self, i: int) -> list[int]:
        return list(_SLOT.unpack_from(self.table, INDEX_HEADER_BYTES + i * INDEX_SLOT_BYTES))

    def _write(self, i: int, h1: int, h2: int, off: int, size: int) -> None:
        """Seq made odd, the slot changed, seq made even again: a reader that overlaps sees seq move."""
        at = INDEX_HEADER_BYTES + i * INDEX_SLOT_BYTES
        seq = self._slot(i)[0]
        _U32.pack_into(self.table, at, (seq + 1) & 0xFFFFFFFF)
        _SLOT.pack_into(self.table, at, (seq + 1) & 0xFFFFFFFF, 0, h1, h2, off, size)
        _U32.pack_into(self.table, at, (seq + 2) & 0xFFFFFFFF)

    def _probe(self, h1: int) -> Iterator[int]:
        for p in range(_PROBES):
            yield (h1 + p) & (self.slots - 1)

    def _find(self, h1: int, h2: int) -> int:
        for i in self._probe(h1):
            s = self._slot(i)
            if (s[2], s[3]) == (h1, h2):
                return i
            if s[2] == s[3] == 0:
                return -1
        return -1

    def publish(self, digest: bytes, offset: int, size: int) -> bool:
        h1, h2 = struct.unpack("<QQ", digest)
        if (h1 == h2 == 0) or size >= _TOMB or offset % 64 or offset // 64 >= _TOMB:
            self.remove(digest)
            return False
        free = -1
        for i in self._probe(h1):
            s = self._slot(i)
            if (s[2], s[3]) == (h1, h2):
                self._write(i, h1, h2, offset // 64, size)
                return True
            empty = s[2] == s[3] == 0
            if free < 0 and (empty or s[5] == _TOMB):
                free = i
            if empty:
                break
        if free < 0:
            return False
        self._write(free, h1, h2, offset // 64, size)
        return True

    def remove(self, digest: bytes) -> bool:
        h1, h2 = struct.unpack("<QQ", digest)
        i = self._find(h1, h2)
        if i < 0 or self._slot(i)[5] == _TOMB:
            return False
        self._write(i, h1, h2, 0, _TOMB)
        return True

    def hits(self, digest: bytes) -> int:
        i = self._find(*struct.unpack("<QQ", digest))
        return 0 if i < 0 else self._slot(i)[1]

    def beat(self) -> None:
        struct.pack_into("<q", self.table, 16, time.monotonic_ns())

    def stop(self) -> None:
        struct.pack_into("<q", self.table, 16, 0)

    def read_into(self, digest: bytes, dst: object) -> int:
        if self.pool is None:
            raise ValueError("this index was opened without the pool")
        out = _write_view(dst, "buffer")
        beat = _HEAD.unpack_from(self.table, 0)[2]
        if beat == 0 or time.monotonic_ns() - beat > _STALE_NS:
            return -1
        h1, h2 = struct.unpack("<QQ", digest)
        i = self._find(h1, h2)
        if i < 0:
            return -1
        at = INDEX_HEADER_BYTES + i * INDEX_SLOT_BYTES
        seq, _, a, b, off, size = self._slot(i)
        if seq & 1 or (a, b) != (h1, h2) or _U32.unpack_from(self.table, at)[0] != seq:
            return -1  # the node is changing the slot, or changed it while we read it
        if size == _TOMB or off * 64 + size > len(self.pool):
            return -1
        if size > len(out):
            return -2 - size
        out[:size] = self.pool[off * 64 : off * 64 + size]
        if _U32.unpack_from(self.table, at)[0] != seq:  # the node changed the slot mid-copy: the block may be reused
            return -1
        hits = _U32.unpack_from(self.table, at + 4)[0]  # racy and approximate, as in C: only the hits field
        _U32.pack_into(self.table, at + 4, (hits + 1) & 0xFFFFFFFF)
        return size

    def read_batch(self, keys: list[Any], dsts: list[Any], results: list[Any]) -> list[int]:
        if len(dsts) != len(keys) or len(results) != len(keys):
            raise ValueError("read_batch takes one buffer and one result slot per key")
        left = []
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            try:
                raw = encode_key(key)
            except MooncakeError as exc:
                results[i] = exc
                continue
            if dsts[i] is None:
                got = self.read(key_digest(raw))
            else:
                n = self.read_into(key_digest(raw), dsts[i])
                got = n if n >= 0 else None
            if got is None:
                left.append(i)
            else:
                results[i] = got
        return left

    def read(self, digest: bytes, room: int = 65536) -> bytes | None:
        buf = bytearray(room)
        n = self.read_into(digest, buf)
        return None if n < 0 else bytes(buf[:n])

    def release(self) -> None:
        self.table.release()
        if self.pool is not None:
            self.pool.release()


StoreLock = threading.Lock  # _engine.StoreLock: a threading.Lock that its PlainPath takes in C


class PlainPath:
    """``_engine.PlainPath`` in plain Python: the same steps in the same order."""

    def __init__(self, dram: Any, store: Any, lock: Any, small_max: int, batch_max: int, batch_bytes: int) -> None:
        self.dram, self.store, self.lock = dram, store, lock
        self.index, self.counters, self.expiring = store._index, dram.counters, store._expiring
        self.has_ssd, self.has_vram = store._ssd is not None, store._vram is not None
        self.closed = self.shared = False
        self.hits = 0
        self.fresh, self.main, self.ghost = dram.fresh, dram.main, dram.ghost
        self.allocator, self.view = dram.allocator, dram.view
        self.high, self.low, self.fresh_max, self.ghost_factor = dram.high, dram.low, dram.fresh_max, dram.ghost_factor
        self.small_max, self.batch_max, self.batch_bytes = small_max, batch_max, batch_bytes
        # entries of the engine in use: the tests also run this twin in a store on the Cython queues
        self.new_entry = importlib.import_module("mooncakefs._engine").Entry

    def close(self) -> None:
        self.closed = True

    def fold_counters(self) -> None:
        if self.hits:
            self.counters["hits"] += self.hits
            self.hits = 0

    def index_shared(self) -> None:
        self.shared = True

    def _plain_store(self) -> bool:
        return not (self.closed or self.shared or self.has_vram or self.expiring)

    @contextlib.contextmanager
    def _lock_open(self) -> Iterator[None]:
        with self.lock:
            if self.closed:
                self.store._check_open()
            yield

    # -- writing --

    def _make_room(self, size: int) -> None:
        allocator = self.allocator
        if allocator.used + size <= self.high:
            return
        while allocator.used + size > self.low:
            queue = self.fresh if (self.fresh.nbytes > self.fresh_max or not self.main.count) else self.main
            victim = queue.first()
            if victim is None:
                break
            if victim.readers:
                if not self.dram.evict_one():
                    break
                continue
            vraw = victim.key
            queue.remove(victim)
            del self.index[vraw]
            victim.dead = True
            allocator.free(victim.dram)
            victim.dram = victim.dram_off = -1
            self.counters["evictions"] += 1
            self.ghost[vraw] = None
            if len(self.ghost) > self.ghost_factor * len(self.index) + 64:
                self.ghost.popitem(last=False)

    def _put(self, raw: bytes, key: Any, entry: Entry, value: Any, src: memoryview, options: Any) -> bool:
        size = entry.size
        changed = False
        if entry.sticky and self.has_ssd:
            self.store._put_locked(raw, key, entry, value, options, self.batch_max + 1)
            return False
        if not self.has_ssd:
            self._make_room(size)
        handle = -1
        if not self.has_ssd or self.allocator.used + size <= self.high:
            handle, offset = self.allocator.reserve(size)
        if handle < 0:
            handle, offset = self.dram.reserve(size)
            changed = self.has_ssd
            if handle < 0:
                self.store._put_locked(raw, key, entry, value, options, size + 1)
                return False
        self.view[offset : offset + size] = src
        entry.dram, entry.dram_off = handle, offset
        old = self.index.get(raw)
        self.index[raw] = entry
        if old is not None:
            self.dram.unqueue(raw, old)
            changed = changed or old.seg >= 0
            self.store._discard(raw, old)
        if entry.sticky:
            pass
        elif old is not None:
            self.main.append(raw, entry)
        elif self.ghost and raw in self.ghost:
            del self.ghost[raw]
            self.main.append(raw, entry)
        else:
            self.fresh.append(raw, entry)
        return changed

    def put(self, key: Any, value: Any, **options: Any) -> None:
        if options:
            type(self.store).put(self.store, key, value, **options)
        elif not self._put_small(key, value):
            self.store._put_general(key, value, PLAIN_PUT, None)

    def _put_small(self, key: Any, value: Any) -> bool:
        if type(key) is InternalKey:
            return False
        try:
            src = _read_view(value, "value")
        except (BufferError, TypeError, ValueError):  # what _engine's _readable turns away
            return False
        if src.nbytes >= self.small_max:
            return False
        raw = encode_key(key)
        entry = self.new_entry(src.nbytes)
        with self.lock:
            if not self._plain_store():
                return False
            changed = False
            try:
                changed = self._put(raw, key, entry, value, src, PLAIN_PUT)
            finally:
                if changed:
                    self.store._commit()
        return True

    def _put_item(self, item: tuple[Any, ...], results: list[Any], options: Any, held: memoryview | None) -> bool:
        i, raw, key, entry, value = item
        if held is not None:
            try:
                return self._put(raw, key, entry, value, held, options)
            except BATCH_ERRORS as exc:
                results[i] = exc
            return False
        try:
            src = _read_view(value, "value")
            if src.nbytes != entry.size:
                raise ValueError(f"value is {src.nbytes} bytes, {entry.size} expected")
            return self._put(raw, key, entry, value, src, options)
        except BATCH_ERRORS as exc:
            results[i] = exc
        return False

    def put_run(
        self, run: list[Any], results: list[Any], options: Any, plain: bool, views: list[memoryview] | None = None
    ) -> None:
        at = 0
        while at < len(run):
            with self._lock_open():
                copied = 0
                if plain and self._plain_store():
                    changed = False
                    try:
                        while at < len(run) and copied < self.batch_bytes:
                            item = run[at]
                            at += 1
                            copied += item[3].size
                            changed |= self._put_item(item, results, options, None if views is None else views[at - 1])
                    finally:
                        if changed:
                            self.store._commit()
                else:
                    while at < len(run) and copied < self.batch_bytes:
                        i, raw, key, entry, value = run[at]
                        at += 1
                        copied += entry.size
                        try:
                            self.store._put_locked(raw, key, entry, value, options, self.batch_max + 1)
                        except BATCH_ERRORS as exc:
                            results[i] = exc
                if at == len(run) and len(run) > 1:
                    self._leaf_first(run)

    def prepare_run(
        self,
        pairs: list[tuple[Any, Any]],
        at: int,
        results: list[Any],
        run: list[Any],
        views: list[memoryview] | None = None,
    ) -> int:
        while at < len(pairs):
            key, value = pairs[at]
            results.append(None)
            try:
                try:
                    view = _read_view(value, "value")
                except TypeError:
                    raise value_error(value) from None
                try:
                    if view.nbytes > self.batch_max:
                        return at
                    raw = encode_key(key)
                    entry = self.new_entry(view.nbytes)
                    entry.sticky = type(key) is InternalKey
                    run.append((at, raw, key, entry, value))
                    if views is not None:  # kept for put_run, as PlainPath._prepare keeps it
                        views.append(view)
                        view = None
                finally:
                    if view is not None:
                        view.release()
            except BATCH_ERRORS as exc:
                results[at] = exc
            at += 1
        return at

    def batch_put(self, items: Any, **options: Any) -> list[Any]:
        if options:
            return type(self.store).batch_put(self.store, items, **options)
        results = self._batch_put_small(items)
        return self.store._batch_put_general(items, PLAIN_PUT) if results is None else results

    def _batch_put_small(self, items: Any) -> list[Any] | None:
        if type(items) is list:
            pairs = list(items)  # our own, as PlainPath's: the caller's may change while the lock is awaited
            if any(type(pair) is not tuple or len(pair) != 2 for pair in pairs):
                return None
        elif type(items) is dict:
            pairs = list(items.items())
        else:
            return None
        results: list[Any] = []
        run: list[Any] = []
        views: list[memoryview] = []
        try:
            if self.prepare_run(pairs, 0, results, run, views) != len(pairs):
                return None
            self.put_run(run, results, PLAIN_PUT, True, views)
            return results
        finally:
            for view in views:
                view.release()

    def _leaf_first(self, run: list[Any]) -> None:
        for item in reversed(run):
            if item[3].queue == self.fresh.ident:
                self.fresh.move_to_back(item[3])

    # -- reading --

    def _hit(self, key: Any, limit: int) -> Entry | None:
        entry = self.index.lookup(key)
        if entry is None or entry.dram < 0 or entry.size > limit or entry.expires:
            return None
        self.hits += 1
        self._touch(entry)
        return entry

    def _touch(self, entry: Entry) -> None:
        if entry.queue == self.main.ident:
            self.main.move_to_back(entry)
        elif entry.queue == self.fresh.ident:
            self.fresh.remove(entry)
            self.main.append(entry.key, entry)

    def _copy_out(self, entry: Entry) -> bytes:
        return self.view[entry.dram_off : entry.dram_off + entry.size].tobytes()

    def get(self, key: Any) -> bytes:
        value = self._get_small(key)
        return self.store._get_general(key) if value is None else value

    def _get_small(self, key: Any) -> bytes | None:
        with self.lock:
            if self.closed:
                return None
            entry = self._hit(key, self.small_max - 1)
            return None if entry is None else self._copy_out(entry)

    def get_into(self, key: Any, buffer: Any) -> int:
        try:
            out = _write_view(buffer, "buffer")
        except (BufferError, TypeError, ValueError):  # what _engine's _writable turns away
            return -1
        with self.lock:
            if self.closed:
                return -1
            entry = self._hit(key, self.small_max - 1)
            if entry is None:
                return -1
            if out.nbytes < entry.size:
                return -2 - entry.size
            out[: entry.size] = self.view[entry.dram_off : entry.dram_off + entry.size]
            return entry.size

    def lease(self, key: Any) -> Entry | None:
        with self.lock:
            if self.closed:
                return None
            entry = self._hit(key, VALUE_SIZE_LIMIT)
            if entry is not None:
                entry.readers += 1
            return entry

    def unlease(self, entry: Entry) -> None:
        with self.lock:
            if entry.readers > 1 or not entry.dead:
                entry.readers -= 1
            else:
                self.store._release_lease(entry)

    def _read_many(self, keys: list[Any], buffers: list[Any] | None, results: list[Any], i: int) -> int:
        copied = hits = 0
        try:
            while i < len(keys):
                key = keys[i]
                i += 1
                try:
                    entry = self.index.lookup(key)
                    if entry is None or entry.dram < 0 or entry.size > self.batch_max or entry.expires:
                        continue
                    if buffers is None:
                        results[i - 1] = self._copy_out(entry)
                    else:
                        try:
                            out = _write_view(buffers[i - 1], "buffer")
                        except TypeError:
                            out = None
                        if out is not None and out.nbytes >= entry.size:
                            out[: entry.size] = self.view[entry.dram_off : entry.dram_off + entry.size]
                            results[i - 1] = entry.size
                        else:
                            results[i - 1] = self.store._copy_into(key, entry, buffers[i - 1])
                    hits += 1
                    self._touch(entry)
                    if entry.size >= self.small_max:
                        copied += entry.size
                        if copied >= self.batch_bytes:
                            break
                except BATCH_ERRORS as exc:
                    results[i - 1] = exc
        finally:
            self.counters["hits"] += hits
        return i

    def read_batch(self, keys: list[Any], buffers: list[Any] | None) -> list[Any]:
        results: list[Any] = [None] * len(keys)
        start = 0
        while start < len(keys):
            with self._lock_open():
                start = self._read_many(keys, buffers, results, start)
        return results

    def batch_get_into(self, keys: Any, buffers: Any) -> list[Any] | None:
        if type(keys) is not list or type(buffers) is not list or len(keys) != len(buffers):
            return None
        keys, buffers = list(keys), list(buffers)  # our own, as PlainPath's
        results = self.read_batch(keys, buffers)
        for i, r in enumerate(results):
            if r is None:
                results[i] = self.store._each(self.store.get_into, keys[i], buffers[i])
        return results


# ------------------------------------------------------------------------ the framing of a connection


def frame_head(op: int, flags: int, m: bytes, payload_len: int, first: Any = None, destination: int = 0) -> bytes:
    """A frame's header and meta ``m``; with ``first`` (the first buffer of a large payload) padded so
    that the payload starts at its ``payload_phase`` for ``destination``."""
    pad = 0 if first is None else (payload_phase(address(first), destination) - HEADER.size - len(m)) % LINE
    head = HEADER.pack(MAGIC, op, flags | pad << PAD_SHIFT, len(m), payload_len) + m
    return head + bytes(pad) if pad else head


def _timed_out(exc: OSError) -> bool:
    """Whether a socket call failed only because its timeout passed."""
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(exc, TimeoutError)


_pack = msgpack.Packer(use_bin_type=True).pack


class Framing:
    """The part of a connection every request and reply goes through (``wire.Channel`` adds the rest):
    its receive buffer, reading a frame's header and meta, receiving a payload, sending a frame.  Not
    thread-safe: one request at a time, by one thread.

    Reads are buffered, so a small frame costs one ``recv``; payloads bigger than what is buffered are
    received straight into the caller's memory."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = None) -> None:
        self.sock, self.peer = sock, peer
        if timeout is not None:
            self.set_timeout(timeout)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self.payload_left = 0  # bytes of the current frame's payload not yet read
        self.flags = 0  # the current frame's header flags
        self.closed = False
        # A node's limit on receiving the current frame (time.monotonic()): a peer that trickles its
        # bytes is dropped once it passes, even though each recv makes progress.
        self.deadline: float | None = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def set_timeout(self, seconds: float) -> None:
        """How long one send or recv may wait: kernel-side timeouts keep the socket blocking, so a recv
        is one syscall."""
        tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def _lost(self, exc: OSError | None) -> Unavailable:
        """The peer is gone or silent: this connection is done for."""
        self.close()
        if exc is None:
            why = "closed by the peer"
        elif _timed_out(exc):
            why = "timed out"
        else:
            why = f"failed: {exc.strerror or exc}"
        return Unavailable(f"{self.peer}: connection {why}")

    # -- sending ----------------------------------------------------------------------------------------

    def send(self, op: int, meta: Any = (), payload: Any = None, flags: int = 0, destination: int = 0) -> None:
        """Send one frame; ``payload`` is a buffer or a list of buffers (sent without copying if large),
        ``destination`` the address (or only its phase in a line) where the peer receives a large one.

        A large payload goes out with its header in one ``sendmsg``: one system call fewer than the
        header sent on its own first, and the payload follows the header in the same call, as its padding
        (``payload_phase``) assumes.  The peer's first read then finds the header with the start of the
        payload (a reader expecting a large payload asks for little: ``read_frame``'s ``first_read``)."""
        m = _pack(meta)
        parts = payload if isinstance(payload, list) else ([] if payload is None else [payload])
        size = sum(memoryview(p).nbytes for p in parts)
        try:
            if size <= SMALL_SEND:
                head = frame_head(op, flags, m, size)
                self.sock.sendall(b"".join([head, *parts]) if parts else head)
            else:  # one system call for the header and the payload (many ranges of a READV reply too)
                self._send_parts([frame_head(op, flags, m, size, parts[0], destination), *parts])
        except OSError as exc:
            raise self._lost(exc) from None

    def send_value(self, op: int, meta: Any, value: memoryview, crc: int | None = None) -> int:
        """Send a frame whose payload is ``value`` then its CRC-32C (CRC_TRAILER); returns the CRC.  A
        large value goes CRC_CHUNK at a time (the header with the first), each chunk's CRC computed right
        after it is sent, while the peer receives it (and checks what came before); the CRC follows.  A
        ``crc`` the caller already has (a copy of a stored value, or of one sent to several nodes) goes out
        with the value in one call, as it is, so a copy whose bytes differ from it is refused."""
        n = len(value)
        if n <= SMALL_SEND:
            if crc is None:
                crc = crc32c(value)
            self.send(op, meta, [value, CRC_TRAILER.pack(crc)], flags=WITH_CRC)
            return crc
        parts: list[Any] = [frame_head(op, WITH_CRC, _pack(meta), n + CRC_TRAILER.size, value)]
        running = 0
        try:
            if crc is not None:
                self._send_parts([*parts, value, CRC_TRAILER.pack(crc)])
                return crc
            for start in range(0, n, CRC_CHUNK):
                chunk = value[start : start + CRC_CHUNK]
                self._send_parts([*parts, chunk])
                parts = []
                running = crc32c(chunk, running)
            self.sock.sendall(CRC_TRAILER.pack(running))
        except OSError as exc:
            raise self._lost(exc) from None
        return running

    def _send_parts(self, parts: list[Any]) -> None:
        """Send a few buffers back to back in one system call (a partial send, which a send timeout can
        cause, goes on where it stopped)."""
        views = [memoryview(p) for p in parts]
        views = [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in views if v.nbytes]
        first = 0
        while first < len(views):
            sent = self.sock.sendmsg(views[first : first + IOV_CHUNK])
            while first < len(views) and sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            if sent:
                views[first] = views[first][sent:]

    # -- receiving --------------------------------------------------------------------------------------

    def read_frame(
        self,
        max_meta: int = MAX_META,
        max_payload: int = MAX_PAYLOAD,
        *,
        idle: float | None = None,
        within: float | None = None,
        first_read: int = FIRST_READ,
    ) -> tuple[int, int, Any, int]:
        """The next frame's (opcode, flags, meta, payload length); read the payload next.  A frame larger
        than the limits is refused before anything is allocated for it.

        A server passes ``idle``, how long to wait for the frame to begin (the socket's own timeout
        repeats until then), and ``within``, how long its header and meta may take once it has begun:
        that sets ``deadline``, which a peer trickling bytes cannot push back."""
        if self.payload_left:
            self.skip_payload()
        if idle is not None and self._start == self._end:
            self._await_frame(idle)
        if within is not None:
            self.deadline = time.monotonic() + within
        self._fill(HEADER.size, first_read)
        magic, op, flags, meta_len, payload_len = HEADER.unpack_from(self._buf, self._start)
        if magic != MAGIC:
            raise ProtocolError(f"{self.peer}: bad frame magic {magic:#06x}")
        if meta_len > max_meta or payload_len > max_payload:
            raise ProtocolError(f"{self.peer}: frame too large (meta {meta_len}, payload {payload_len})")
        self._start += HEADER.size
        meta = self._read_meta(meta_len) if meta_len else ()
        if pad := flags >> PAD_SHIFT:
            self._fill(pad)
            self._start += pad
            flags &= FLAGS_MASK
        self.payload_left = payload_len
        self.flags = flags
        return op, flags, meta, payload_len

    def read_payload_into(self, dst: memoryview) -> None:
        """Fill ``dst`` (a byte view) from the current payload.  What the buffer holds is copied; a small
        rest refills the buffer (one recv for the many small values of a batch); a large one is received
        in place."""
        n = len(dst)
        if n > self.payload_left:
            raise ProtocolError(f"{self.peer}: payload has {self.payload_left} bytes left, {n} wanted")
        self.payload_left -= n
        have = min(n, self._end - self._start)
        if have:
            dst[:have] = self._view[self._start : self._start + have]
            self._start += have
        if have < n and n - have < FIRST_READ:
            self._fill(n - have, ask=min(n - have + self.payload_left, RECV_BUFFER))
            dst[have:] = self._view[self._start : self._start + n - have]
            self._start += n - have
            return
        while have < n:
            try:
                got = self.sock.recv_into(dst[have:], n - have, socket.MSG_WAITALL)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            have += got
            if have < n and self.deadline is not None and time.monotonic() > self.deadline:
                raise self._lost(TimeoutError())

    def read_payload_crc(self, dst: memoryview) -> int:
        """``read_payload_into`` that returns the CRC-32C of what it received, computed chunk by chunk as
        the bytes arrive (the GIL is released for it), while the rest is still in flight."""
        if len(dst) <= CRC_CHUNK:  # the common small value: one read, one CRC
            self.read_payload_into(dst)
            return crc32c(dst)
        crc = 0
        for start in range(0, len(dst), CRC_CHUNK):
            chunk = dst[start : start + CRC_CHUNK]
            self.read_payload_into(chunk)
            crc = crc32c(chunk, crc)
        return crc

    def read_value_into(self, dst: memoryview, what: Callable[[], str]) -> int | None:
        """Receive a PUT's payload: the value into ``dst``, then, if the frame is flagged WITH_CRC, its
        CRC (CRC_TRAILER), which must match what arrived; returns the CRC (None: the sender named none).
        ChecksumError on a mismatch, with the whole payload read, so the connection stays in step.
        ``what`` names the value for the message."""
        if not self.flags & WITH_CRC:
            if self.payload_left != len(dst):
                raise ValueError(f"{what()}: {len(dst)} bytes expected, {self.payload_left} sent")
            self.read_payload_into(dst)
            return None
        if self.payload_left != len(dst) + CRC_TRAILER.size:
            raise ValueError(
                f"{what()}: a put's payload is its value then a {CRC_TRAILER.size}-byte CRC-32C: "
                f"{len(dst)} + {CRC_TRAILER.size} bytes expected, {self.payload_left} sent"
            )
        got = self.read_payload_crc(dst)  # while the sender computes the CRC it sends next
        trailer = bytearray(CRC_TRAILER.size)
        self.read_payload_into(memoryview(trailer))
        (sent,) = CRC_TRAILER.unpack(trailer)
        check_crc(sent, got, what)
        return got

    def skip_payload(self) -> None:
        """Drain what is left of the current payload (a request that failed before reading it)."""
        while self.payload_left:
            n = min(self.payload_left, RECV_BUFFER)
            self.read_payload_into(memoryview(bytearray(n)))

    def _read_meta(self, n: int) -> Any:
        if n <= RECV_BUFFER:
            self._fill(n)
            raw: Any = self._view[self._start : self._start + n]
            self._start += n
        else:
            raw = bytearray(n)
            self.payload_left = n
            self.read_payload_into(memoryview(raw))
        try:
            return msgpack.unpackb(raw, use_list=True, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"{self.peer}: undecodable frame meta ({exc})") from None

    def _await_frame(self, idle: float) -> None:
        """Block until a frame's first bytes arrive, for at most ``idle`` seconds."""
        self._start = self._end = 0
        until = time.monotonic() + idle
        while True:
            try:
                got = self.sock.recv_into(self._view, FIRST_READ)
            except OSError as exc:
                if _timed_out(exc) and time.monotonic() < until:
                    continue
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            self._end = got
            return

    def _fill(self, n: int, ask: int = FIRST_READ) -> None:
        """Make at least ``n`` bytes (at most RECV_BUFFER) readable from the buffer, each recv asking for
        up to ``ask`` (more when ``n`` needs it): a frame's first read takes little of a large payload,
        which is received in place instead."""
        if self._end - self._start >= n:
            return
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + max(n, ask) > RECV_BUFFER:  # no room behind: move what is left to the front
            left = self._end - self._start
            self._buf[:left] = self._view[self._start : self._end]
            self._start, self._end = 0, left
        while self._end - self._start < n:
            want = min(RECV_BUFFER - self._end, max(n - (self._end - self._start), ask))
            try:
                got = self.sock.recv_into(self._view[self._end :], want)
            except OSError as exc:
                raise self._lost(exc) from None
            if not got:
                raise self._lost(None)
            self._end += got
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise self._lost(TimeoutError())
