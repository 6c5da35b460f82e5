"""Registered memory: the only memory a transfer may touch, on either side.

A ``Registry`` is one engine's table of registered ranges, sorted by address.  Every transfer is
checked against it before a byte moves: the local range by the initiator, the remote range by the
peer's server (or, on the same-host path, by the initiator against the peer's published table, which
carries a version the peer bumps on every change).  ``ManagedBuffer`` is memory the engine allocates
itself from a memfd, so that a peer on the same host can map it and copy with a plain memcpy.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from mooncakefs import _engine, shm
from mooncakefs.errors import AddressNotRegistered, AddressOverlapped, InvalidArgument, OutOfBounds

PAGE = mmap.PAGESIZE
MANAGED_LABEL = "mooncakefs-te-buffer"  # a managed buffer's memfd name: what a peer checks before mapping it
_VERSION = struct.Struct("<Q")


@dataclass(slots=True)
class Registered:
    """One registered range.  ``owner`` keeps a registered Python buffer alive while it is registered."""

    addr: int
    length: int
    writable: bool = True
    location: str = "*"
    memfd: int = -1  # the memfd backing it (a managed buffer), which a same-host peer may map
    owner: Any = field(default=None, repr=False)
    seq: int = 0  # registration order (the registry sets it): "first buffer" means first registered

    @property
    def end(self) -> int:
        return self.addr + self.length


def check_range(addr: Any, length: Any, what: str = "address") -> None:
    """Refuse what cannot be an address range, before it gets near memory."""
    if type(addr) is not int or type(length) is not int:
        raise InvalidArgument(f"{what} and length must be ints, got {type(addr).__name__} and {type(length).__name__}")
    if addr <= 0 or addr >= 1 << 64:
        raise AddressNotRegistered(f"{what} {addr:#x} is not a valid pointer")
    if length < 0 or addr + length > 1 << 64:
        raise InvalidArgument(f"length {length} at {what} {addr:#x} is out of range")


class Registry:
    """The ranges registered with one engine.  Thread-safe; lookups are O(log n)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ranges: list[Registered] = []
        self.version = 0
        self._seq = 0
        # The version, published in a memfd that same-host peers map: they re-read the table when it moves.
        self._version_fd = os.memfd_create("mooncakefs-te-version", os.MFD_CLOEXEC)
        os.ftruncate(self._version_fd, PAGE)
        self._version_map = mmap.mmap(self._version_fd, PAGE)

    @property
    def version_fd(self) -> int:
        return self._version_fd

    def _bump(self) -> None:
        self.version += 1
        _VERSION.pack_into(self._version_map, 0, self.version)

    def add(self, entry: Registered) -> None:
        check_range(entry.addr, entry.length)
        if entry.length == 0:
            raise InvalidArgument(f"cannot register 0 bytes at {entry.addr:#x}")
        with self._lock:
            i = bisect.bisect_right(self._starts, entry.addr)
            before = self._ranges[i - 1] if i else None
            after = self._ranges[i] if i < len(self._ranges) else None
            if (before is not None and before.end > entry.addr) or (after is not None and after.addr < entry.end):
                other = before if before is not None and before.end > entry.addr else after
                assert other is not None
                raise AddressOverlapped(
                    f"{entry.addr:#x} (+{entry.length}) overlaps the registered {other.addr:#x} (+{other.length})"
                )
            self._seq += 1
            entry.seq = self._seq
            self._starts.insert(i, entry.addr)
            self._ranges.insert(i, entry)
            self._bump()

    def remove(self, addr: int) -> Registered:
        with self._lock:
            i = bisect.bisect_left(self._starts, addr)
            if i == len(self._starts) or self._starts[i] != addr:
                raise AddressNotRegistered(f"no registered memory starts at {addr:#x}")
            del self._starts[i]
            entry = self._ranges.pop(i)
            self._bump()
            return entry

    def find(self, addr: int, length: int, write: bool = False) -> Registered:
        """The registered range holding ``[addr, addr + length)``; AddressNotRegistered or OutOfBounds."""
        check_range(addr, length)
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            entry = self._ranges[i] if i >= 0 else None
        if entry is None or addr >= entry.end:
            raise AddressNotRegistered(f"address {addr:#x} (+{length} bytes) is not in registered memory")
        if addr + length > entry.end:
            raise OutOfBounds(
                f"{length} bytes at {addr:#x} run {addr + length - entry.end} bytes past the end of "
                f"the registered {entry.addr:#x} (+{entry.length})"
            )
        if write and not entry.writable:
            raise AddressNotRegistered(f"registered memory at {entry.addr:#x} is read-only: it cannot be written")
        return entry

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        """This process's memory at a checked range, as a memoryview (writable for ``write``)."""
        self.find(addr, length, write)
        if length == 0:
            return memoryview(b"")
        return _engine.view_at(addr, length, write)

    def table(self) -> list[list[int]]:
        """The table as a peer sees it: [addr, length, writable, memfd] per range."""
        with self._lock:
            return [[r.addr, r.length, int(r.writable), r.memfd] for r in self._ranges]

    def ordered(self) -> list[list[int]]:
        """[addr, length, writable] per range, in registration order: the buffers a segment descriptor lists."""
        with self._lock:
            return [[r.addr, r.length, int(r.writable)] for r in sorted(self._ranges, key=lambda r: r.seq)]

    def first(self) -> int:
        """The address of the earliest-registered range still registered (0 if none): Mooncake's
        ``getFirstBufferAddress`` means the segment's first buffer in registration order."""
        with self._lock:
            return min(self._ranges, key=lambda r: r.seq).addr if self._ranges else 0

    def __len__(self) -> int:
        return len(self._ranges)

    def close(self) -> None:
        """Forget every range, and move the published version: a same-host peer re-reads the table (and
        finds the engine gone) instead of copying into memory it checked against the old one."""
        with self._lock:
            self._ranges.clear()
            self._starts.clear()
            self._bump()
        self._version_map.close()
        os.close(self._version_fd)


class PeerTable:
    """A peer's registered ranges as it published them: what the same-host path checks against."""

    def __init__(self, rows: list[list[int]], version: int) -> None:
        self.version = version
        rows = sorted(rows)
        self._starts = [r[0] for r in rows]
        self._rows = rows

    def find(self, addr: int, length: int, write: bool) -> list[int]:
        check_range(addr, length, "peer address")
        i = bisect.bisect_right(self._starts, addr) - 1
        row = self._rows[i] if i >= 0 else None
        if row is None or addr >= row[0] + row[1]:
            raise AddressNotRegistered(f"peer address {addr:#x} (+{length} bytes) is not in memory the peer registered")
        if addr + length > row[0] + row[1]:
            raise OutOfBounds(
                f"{length} bytes at peer address {addr:#x} run past the end of the peer's registered "
                f"{row[0]:#x} (+{row[1]})"
            )
        if write and not row[2]:
            raise AddressNotRegistered(f"the peer registered {row[0]:#x} read-only: it cannot be written")
        return row


def read_version(view: memoryview) -> int:
    return _VERSION.unpack_from(view, 0)[0]


class ManagedBuffer:
    """Memory the engine allocated: a memfd mapped here, that a same-host peer can map too, on huge
    pages where the host lends them (``shm.create``)."""

    def __init__(self, length: int) -> None:
        if type(length) is not int or length <= 0:
            raise InvalidArgument(f"a managed buffer needs a positive length, got {length!r:.40}")
        self.length = length
        self._memory = shm.create(MANAGED_LABEL, length)
        self.fd, self.pages = self._memory.fd, self._memory.pages
        self.addr = _engine.address(self._memory.map)

    def close(self) -> None:
        self._memory.close()
