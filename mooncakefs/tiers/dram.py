"""The DRAM tier: one shared-memory file, mapped once, carved up by the offset allocator.

The file is a memfd: anonymous shared memory that the kernel frees when the last process holding it
exits, so a killed process leaks nothing; other processes on the host can map it from a passed file
descriptor (the node daemon hands it to its clients).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading

from mooncakefs import _engine


class DramTier:
    """A fixed-size pool of shared memory.  Not thread-safe: the store serialises calls."""

    name = "dram"

    def __init__(self, capacity: int, *, label: str = "mooncakefs-dram", prefault: bool = False) -> None:
        if capacity < _engine.ALLOC_UNIT:
            raise ValueError(f"dram must be at least {_engine.ALLOC_UNIT} bytes, got {capacity}")
        self.fd = os.memfd_create(label, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, capacity)
            self.map = mmap.mmap(self.fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)
        self.arena = _engine.Arena(self.map)
        self._prefaulter = None
        if prefault:  # back the pool with memory now, off the request path
            self._prefaulter = threading.Thread(target=self.arena.prefault, name="mooncakefs-prefault", daemon=True)
            self._prefaulter.start()
        self.allocator = _engine.OffsetAllocator(capacity)
        self.capacity = self.allocator.capacity
        # (handle, byte offset) of a block for n bytes, or (-1, -1) when none is free; and its inverse.
        self.alloc = self.allocator.reserve
        self.free = self.allocator.free

    def wait_prefault(self) -> None:
        """Wait for the prefault thread, if any, to have backed the whole pool with memory."""
        if self._prefaulter is not None:
            self._prefaulter.join()

    @property
    def used(self) -> int:
        return self.allocator.used

    def readonly_view(self, offset: int, size: int) -> memoryview:
        return self.view[offset : offset + size].toreadonly()

    def close(self) -> None:
        """Unmap the pool.  Views a caller still holds keep the mapping alive until they go away."""
        self.arena.release()  # also tells the prefault thread to stop after its current step
        if self._prefaulter is not None:
            self._prefaulter.join()
        self.view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view: the map goes with the last one
            self.map.close()
        os.close(self.fd)
