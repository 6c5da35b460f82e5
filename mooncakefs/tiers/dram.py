"""The DRAM tier: one shared-memory pool carved up by the offset allocator, and its cache policy.

The pool is a memfd: anonymous shared memory that the kernel frees when the last process holding it
exits, so a killed process leaks nothing; other processes on the host can map it from a passed file
descriptor (the node daemon hands it to its clients).

Policy (docs/policy.md).  Unpinned residents sit in one of two queues: ``fresh`` (put and not read
since, first in first out) and ``main`` (read at least once, or put again soon after being evicted:
least recently used first).  Most KV-cache blocks are never read again, so eviction takes fresh
objects first while they hold more than their share (``fresh_max``); a key evicted lately is
remembered (the ``ghost`` list), so when it comes back it goes straight to main.  A reservation that
would take the pool past the high watermark first evicts down to the low watermark.  What happens to a
victim (a copy on SSD, or out of the store) is the store's to say (``Placement``).

The two queues are ``_engine.EntryQueue``s: linked through the entries themselves, so a queued object
costs no memory beyond its entry (with OrderedDicts it cost ~90 bytes more).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from mooncakefs import _engine, shm
from mooncakefs._engine import Entry, EntryQueue
from mooncakefs.errors import InvalidArgument
from mooncakefs.tiers.base import Placement
from mooncakefs.units import format_size

FRESH, MAIN = 1, 2  # Entry.queue: which eviction queue holds the entry (0: none, pinned or not in DRAM)
GHOST_FACTOR = 2  # the ghost list remembers this many evicted keys per object in the store
POOL_UNITS_LIMIT = 0xFFFFFFFF  # the offset allocator numbers a pool's ALLOC_UNIT-byte units in 32 bits


def host_memory() -> int:
    """Bytes of physical memory on this host."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_pool_size(capacity: int) -> None:
    """InvalidArgument unless a DRAM pool of ``capacity`` bytes can be made and filled: at least one
    allocation unit, no more units than the allocator numbers, and no more than the host's memory (a
    pool beyond it ends in swap, or in the OOM killer once it fills up or is prefaulted)."""
    if capacity < _engine.ALLOC_UNIT:
        raise InvalidArgument(f"dram must be at least {_engine.ALLOC_UNIT} bytes, got {capacity}")
    if capacity // _engine.ALLOC_UNIT >= POOL_UNITS_LIMIT:
        limit = POOL_UNITS_LIMIT * _engine.ALLOC_UNIT
        raise InvalidArgument(
            f"dram {format_size(capacity)} is more than one DRAM pool holds (under {format_size(limit)})"
        )
    if capacity > (memory := host_memory()):
        raise InvalidArgument(f"dram {format_size(capacity)} is more than this host's memory ({format_size(memory)})")


class DramTier:
    """A fixed-size pool of shared memory with its eviction queues.  Not thread-safe: the store
    serialises calls.  ``place`` (the store) must be set before anything is evicted."""

    name = "dram"

    def __init__(
        self,
        capacity: int,
        *,
        label: str = "mooncakefs-dram",
        prefault: bool = False,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
    ) -> None:
        check_pool_size(capacity)
        memory = shm.create(label, capacity)  # on huge pages where the host lends them
        self.fd, self.map, self.pages = memory.fd, memory.map, memory.pages
        self.view = memoryview(self.map)[:capacity]
        self.arena = _engine.Arena(self.map)
        self._prefaulter = None
        if prefault:  # back the pool with memory now, off the request path
            self._prefaulter = threading.Thread(target=self.arena.prefault, name="mooncakefs-prefault", daemon=True)
            self._prefaulter.start()
        self.allocator = _engine.OffsetAllocator(capacity)
        self.capacity = self.allocator.capacity
        self.release = self.allocator.free  # give a block back by its handle
        self.high = int(self.capacity * high_watermark)
        self.low = int(self.capacity * low_watermark)
        self.fresh = EntryQueue(FRESH)  # residents not read since put, oldest first
        self.main = EntryQueue(MAIN)  # residents read since put, LRU first
        self.fresh_max = self.high // 2  # the store lowers it to its share of the whole store
        self.ghost: OrderedDict[bytes, None] = OrderedDict()  # keys evicted lately, oldest first
        self.ghost_factor = GHOST_FACTOR
        self.counters = dict.fromkeys(("hits", "misses", "evictions", "promotions"), 0)
        self.index: dict[bytes, Entry] = {}  # the store's index (for the ghost list's bound)
        self.place: Placement | None = None
        self.second_chances = False  # values read through a shared index get a second chance
        self.has_lower = False  # a tier below takes what leaves (sticky values can leave only that way)

    def wait_prefault(self) -> None:
        """Wait for the prefault thread, if any, to have backed the whole pool with memory."""
        if self._prefaulter is not None:
            self._prefaulter.join()

    @property
    def used(self) -> int:
        return self.allocator.used

    @property
    def fresh_bytes(self) -> int:
        """Bytes of the values in the fresh queue (what ``fresh_max`` bounds)."""
        return self.fresh.nbytes

    def readonly_view(self, offset: int, size: int) -> memoryview:
        return self.view[offset : offset + size].toreadonly()

    def block(self, entry: Entry) -> memoryview:
        """The entry's bytes in the pool, writable (for filling a reservation, or copying it out)."""
        return self.view[entry.dram_off : entry.dram_off + entry.size]

    # -- the Tier protocol ------------------------------------------------------------------------------

    def allocate(self, raw: bytes, entry: Entry) -> bool:
        entry.dram, entry.dram_off = self.reserve(entry.size)
        return entry.dram >= 0

    def write(self, raw: bytes, entry: Entry, data: Any) -> None:
        self.arena.write(entry.dram_off, data)

    def lease(self, entry: Entry) -> None:
        """Nothing of the tier's: the store's count of the entry's readers keeps its block."""

    def read_value(self, entry: Entry, dst: Any, lease: None) -> Any:
        if dst is None:
            return self.arena.read(entry.dram_off, entry.size)
        return self.arena.read_into(entry.dram_off, entry.size, dst)

    def end_lease(self, lease: None) -> None:
        pass

    def free(self, raw: bytes, entry: Entry) -> None:
        """Give the entry's block back (it must hold no lease) and take it out of its queue."""
        self.unqueue(raw, entry)
        self.release(entry.dram)
        entry.dram = entry.dram_off = -1

    def victims(self) -> Iterator[tuple[bytes, Entry]]:
        """The unleased residents that may leave, in eviction order (second chances aside)."""
        for queue in self._queues():
            for raw, entry in queue.items():
                if not entry.readers:
                    yield raw, entry

    # -- space ------------------------------------------------------------------------------------------

    def reserve(self, size: int) -> tuple[int, int]:
        """A block for ``size`` bytes, evicting as needed: (handle, offset), or (-1, -1) if impossible."""
        allocator = self.allocator
        if size > self.high:
            return -1, -1
        if allocator.used + size > self.high:
            while allocator.used + size > self.low and self.evict_one():
                pass
        handle, offset = allocator.reserve(size)
        while handle < 0 and self.evict_one():
            handle, offset = allocator.reserve(size)
        return handle, offset

    def _queues(self) -> tuple[EntryQueue, EntryQueue]:
        """The queues in the order eviction takes from: fresh first while it holds more than its share
        (or main is empty)."""
        if self.fresh_bytes > self.fresh_max or not self.main:
            return self.fresh, self.main
        return self.main, self.fresh

    def evict_one(self) -> bool:
        """Move one unleased value out of the pool; False if none can go.

        The oldest fresh value goes first while fresh ones hold more than their share (or main is
        empty), else the least recently used of main.  The store demotes it to SSD unless it already
        has a copy there (or in VRAM, which then keeps it); with no room below it leaves the store (and
        its key is remembered in the ghost list), unless it is sticky, in which case the next candidate
        is tried.  A value read through the shared index since eviction last looked gets a second chance
        (it counts as read); when every candidate had one, the oldest goes all the same (busy readers
        must not make puts fail)."""
        place = self.place
        assert place is not None
        if not self.second_chances and not self.has_lower:  # the common case, inline: the head goes
            queue = self._queues()[0]
            entry = queue.first()
            if entry is not None and not entry.readers and entry.vram < 0:  # a VRAM copy: the general path keeps it
                raw = entry.key
                queue.remove(entry)
                self.counters["evictions"] += 1
                place.drop(raw, entry)
                self.remember(raw)
                return True
        lower_full = not self.has_lower
        refreshed: list[tuple[bytes, Entry]] = []  # read through the shared index since last looked at
        victim: Entry | None = None
        raw = b""
        queues = self._queues()
        for second_chances in (self.second_chances, False):
            for queue in queues:
                for raw, entry in queue.items():
                    if entry.readers:
                        continue
                    if second_chances and place.read_since(raw, entry):
                        refreshed.append((raw, entry))
                        continue
                    if entry.seg < 0 and entry.vram < 0 and not lower_full:
                        lower_full = not place.demote(raw, entry, queue is self.main or entry.sticky)
                    if entry.seg >= 0 or entry.vram >= 0 or not entry.sticky:
                        victim = entry
                        break
                if victim is not None:
                    break
            if victim is not None or not refreshed:
                break
        for r, e in refreshed:
            self.touch(r, e)
        if victim is None:
            return False
        entry = victim
        self.unqueue(raw, entry)
        self.counters["evictions"] += 1
        place.withdraw(raw)
        if entry.seg < 0 and entry.vram < 0:  # nowhere to demote it, no copy in VRAM: it leaves the store
            place.drop(raw, entry)
            self.remember(raw)
        else:
            self.release(entry.dram)
            entry.dram = entry.dram_off = -1
        return True

    # -- the queues -------------------------------------------------------------------------------------

    def evictable(self, entry: Entry) -> bool:
        """Whether a resident belongs in a queue: pinned ones stay put, and sticky ones can only leave
        by demotion, so without a tier below they stay put too."""
        return not entry.pinned and (not entry.sticky or self.has_lower)

    def enqueue(self, raw: bytes, entry: Entry, again: bool) -> None:
        """Queue a new resident for eviction: in main if its key was just replaced or evicted lately
        (``again``, or in the ghost list), else in fresh."""
        ghost = self.ghost
        if again or (ghost and raw in ghost):
            if not again:
                del ghost[raw]
            self.main.append(raw, entry)
        else:
            self.fresh.append(raw, entry)

    def unqueue(self, raw: bytes, entry: Entry) -> None:
        """Take an entry out of its eviction queue, if it is in one."""
        queue = entry.queue
        if queue == MAIN:
            self.main.remove(entry)
        elif queue == FRESH:
            self.fresh.remove(entry)

    def touch(self, raw: bytes, entry: Entry) -> None:
        """A read of a resident: the most recently used of main.  O(1)."""
        queue = entry.queue
        if queue == MAIN:
            self.main.move_to_back(entry)
        elif queue == FRESH:
            self.fresh.remove(entry)
            self.main.append(raw, entry)

    def remember(self, raw: bytes) -> None:
        """Note a key evicted without a copy below, so that it enters main if put again soon."""
        ghost = self.ghost
        ghost[raw] = None
        if len(ghost) > self.ghost_factor * len(self.index) + 64:
            ghost.popitem(last=False)

    def clear(self) -> None:
        self.fresh.clear()
        self.main.clear()
        self.ghost.clear()

    def close(self) -> None:
        """Unmap the pool.  Views a caller still holds keep the mapping alive until they go away."""
        self.clear()
        self.arena.release()  # also tells the prefault thread to stop after its current step
        if self._prefaulter is not None:
            self._prefaulter.join()
        self.view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view: the map goes with the last one
            self.map.close()
        os.close(self.fd)
