"""The VRAM tier: one device memory pool per GPU, carved up by the DRAM tier's offset allocator.

The pool is one ``cuMemAlloc`` made when the store opens; ``_engine.OffsetAllocator`` hands out its
offsets exactly as it does for the DRAM pool (the allocator only does arithmetic on offsets, so it does
not care whose memory they are).  Copies run on the tier's CUDA stream (``gpu.Cuda``): device to device
when the other side is on the GPU, through pinned memory when it is on the host (the DRAM pool is
registered with CUDA, so DRAM <-> VRAM is direct DMA).

Policy: values reach VRAM when they are put from a GPU buffer, put with ``tier="vram"``, or read into
GPU buffers ``promote_after`` times (they keep their DRAM or SSD copy).  Eviction is least recently used
first; a value with no copy below is demoted to DRAM (the store's ``Placement.demote_vram``), and dropped
only when no tier below can take it.  Pinned and sticky values never enter VRAM: they belong to DRAM
and SSD.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from mooncakefs import _engine
from mooncakefs._engine import Entry
from mooncakefs.api import check_tier
from mooncakefs.errors import InvalidArgument
from mooncakefs.gpu import DL_CUDA, Cuda, DeviceBuffer, export_dlpack
from mooncakefs.tiers.base import Placement
from mooncakefs.units import format_size


def choose_tier(hint: str | None, *, on_device: bool, has_vram: bool, pinned: bool, durable: bool, sticky: bool) -> str:
    """Where a put places a value: "vram" or "dram" (DRAM then spills to SSD as before).

    A GPU buffer goes to VRAM when the store has a VRAM tier, a host buffer to DRAM, unless ``hint``
    says otherwise.  Pinned, durable and sticky values go to DRAM: pinned ones live there, and the other
    two need their SSD copy written from host memory."""
    check_tier(hint)
    if hint == "vram":
        if not has_vram:
            raise InvalidArgument("tier='vram' needs a VRAM tier: open the store with vram=... (a node: --vram)")
        if pinned or durable:
            raise InvalidArgument("tier='vram' cannot be combined with pin or durable (they keep a value in DRAM/SSD)")
    if pinned or durable or sticky or not has_vram:
        return "dram"
    if hint is not None:
        return hint
    return "vram" if on_device else "dram"


def should_promote(entry: Entry, promote_after: int, has_vram: bool) -> bool:
    """Whether a read into a GPU buffer earns a value outside VRAM its place there."""
    return has_vram and entry.vram < 0 and not entry.pinned and not entry.sticky and entry.hits >= promote_after


class VramTier:
    """A fixed-size pool of device memory on one GPU, with an LRU eviction order.  Not thread-safe: the
    store serialises calls to its bookkeeping; copies into blocks nobody else can reach (reserved, or
    leased) may run without the store's lock.  ``place`` (the store) must be set before anything is
    evicted."""

    name = "vram"

    def __init__(self, capacity: int, device: int = 0, *, cuda: Cuda | None = None) -> None:
        if capacity < _engine.ALLOC_UNIT:
            raise ValueError(f"vram must be at least {_engine.ALLOC_UNIT} bytes, got {capacity}")
        self.cuda = cuda if cuda is not None else Cuda(device)
        self._owns_cuda = cuda is None  # close() gives back only a Cuda it made
        self.device = self.cuda.device
        try:
            free, total = self.cuda.mem_info()
            if capacity > free:
                raise InvalidArgument(
                    f"vram={format_size(capacity)} does not fit on GPU {self.device} ({self.cuda.name}): "
                    f"{format_size(free)} of {format_size(total)} is free"
                )
            self.allocator = _engine.OffsetAllocator(capacity)
            self.capacity = self.allocator.capacity
            self.base = self.cuda.alloc(self.capacity)
        except BaseException:
            if self._owns_cuda:
                self.cuda.close()
            raise
        self.lru: OrderedDict[bytes, Entry] = OrderedDict()  # residents, least recently used first
        self.counters = dict.fromkeys(("hits", "misses", "evictions", "promotions"), 0)
        self.place: Placement | None = None
        self.views = 0  # device views alive (with their DLPack tensors): the pool outlives close() for them
        self._closed = False

    @property
    def used(self) -> int:
        return self.allocator.used

    def address(self, entry: Entry) -> int:
        """The device address of the entry's value."""
        return self.block_address(entry.vram)

    def block_address(self, handle: int) -> int:
        """The device address of a block by its allocator handle (``reserve``'s, or an entry's ``vram``)."""
        return self.base + self.allocator.offset(handle)

    def reserve(self, size: int) -> int:
        """A block of ``size`` bytes, evicting least recently used values to make room: its handle, or -1.
        It belongs to no entry, so nothing reads or evicts it: a promotion fills it without the store's
        lock, then hands it to its entry (or ``release``s it)."""
        if size > self.capacity:
            return -1
        handle = self.allocator.alloc(size)
        while handle < 0 and self.evict_one():
            handle = self.allocator.alloc(size)
        return handle

    def release(self, handle: int) -> None:
        """Give back a block ``reserve`` handed out that no entry took."""
        self.allocator.free(handle)

    # -- the Tier protocol ------------------------------------------------------------------------------

    def allocate(self, raw: bytes, entry: Entry) -> bool:
        entry.vram = self.reserve(entry.size)  # its offset is the allocator's to say: the entry keeps 4 bytes less
        return entry.vram >= 0

    def write(self, raw: bytes, entry: Entry, data: Any) -> None:
        """Fill the entry's block from a GPU buffer (device to device) or a host buffer (host to device)."""
        if isinstance(data, DeviceBuffer):
            self.cuda.wait_for(data)
            if data.on_device:
                self.cuda.d2d(self.address(entry), data.ptr, entry.size)
            else:
                self.cuda.h2d(self.address(entry), data.ptr, entry.size)
            return
        if entry.size:
            self.cuda.h2d(self.address(entry), _engine.address(data), entry.size)

    def admit(self, raw: bytes, entry: Entry) -> None:
        """Enter the eviction order as the most recently used (the store calls it on publishing)."""
        self.lru[raw] = entry

    def touch(self, raw: bytes, entry: Entry) -> None:
        if self.lru.get(raw) is entry:
            self.lru.move_to_end(raw)

    def lease(self, entry: Entry) -> None:
        """Nothing of the tier's: the store's count of the entry's readers keeps its block."""

    def read_value(self, entry: Entry, dst: Any, lease: None = None) -> Any:
        """Copy the value out: into a GPU buffer (a DeviceBuffer), a writable host buffer (returns the
        length), or new bytes (``dst`` None)."""
        if isinstance(dst, DeviceBuffer):
            if dst.on_device:
                self.cuda.d2d(dst.ptr, self.address(entry), entry.size)
            else:
                self.cuda.d2h(dst.ptr, self.address(entry), entry.size)
            return entry.size
        out = bytearray(entry.size) if dst is None else dst
        if entry.size:
            view = memoryview(out).cast("B")
            if view.readonly:
                raise TypeError("buffer must be writable")
            self.cuda.d2h(_engine.address(view), self.address(entry), entry.size)
        return bytes(out) if dst is None else entry.size

    def end_lease(self, lease: None) -> None:
        pass

    def unqueue(self, raw: bytes, entry: Entry) -> None:
        """Take the entry out of the eviction order (it left the store; a lease may still hold its block)."""
        if self.lru.get(raw) is entry:
            del self.lru[raw]

    def free(self, raw: bytes, entry: Entry) -> None:
        """Give the entry's block back (it must hold no lease) and take it out of the LRU order."""
        self.unqueue(raw, entry)
        self.allocator.free(entry.vram)
        entry.vram = -1

    def victims(self) -> Iterator[tuple[bytes, Entry]]:
        for raw, entry in self.lru.items():
            if not entry.readers:
                yield raw, entry

    def evict_one(self) -> bool:
        """Move the least recently used unleased value out of VRAM: it keeps its DRAM or SSD copy if it
        has one, else the store demotes it (to DRAM, or SSD below it), else it leaves the store."""
        place = self.place
        assert place is not None
        victim = next(self.victims(), None)
        if victim is None:
            return False
        raw, entry = victim
        self.counters["evictions"] += 1
        if entry.dram < 0 and entry.seg < 0 and not place.demote_vram(raw, entry):
            place.drop(raw, entry)  # the store frees the block with the rest of the entry
            return True
        self.free(raw, entry)
        return True

    def dlpack(self, entry: Entry, on_release: Any) -> Any:
        """A zero-copy DLPack capsule of the value (1-D uint8 on this GPU); ``on_release`` runs once its
        consumer lets go (the store holds the block leased until then)."""
        return export_dlpack(self.address(entry), entry.size, (DL_CUDA, self.device), on_release)

    def view_opened(self) -> None:
        """A device view of one of the pool's values was handed out (store lock held)."""
        self.views += 1

    def view_closed(self) -> None:
        """A device view and every DLPack tensor made from it are gone (store lock held): the last one
        after ``close`` frees the pool."""
        self.views -= 1
        if self._closed and not self.views:
            self._free_pool()

    def close(self) -> None:
        """Free the pool and give back the device, once no device view is alive: a view still held (or a
        DLPack tensor made from one) keeps it until the last goes, as a memoryview keeps the DRAM pool's
        mapping, so a caller never reads freed (maybe reused) device memory through one."""
        self.lru.clear()
        self._closed = True
        if not self.views:
            self._free_pool()

    def _free_pool(self) -> None:
        if self.base:
            self.cuda.free(self.base)
            self.base = 0
        if self._owns_cuda:
            self.cuda.close()


class VramView:
    """A VRAM value seen in place (``Store.device_view``): ``__cuda_array_interface__`` (1-D uint8),
    ``__dlpack__`` and ``__dlpack_device__``, so torch/cupy take it without a copy.  The block stays
    leased until the ``with`` block exits and every capsule handed out has been deleted."""

    def __init__(self, tier: VramTier, entry: Entry, release: Any) -> None:
        self._tier, self._entry, self._release = tier, entry, release
        self._holds = 1  # the with block's, plus one per capsule alive
        self._holds_lock = threading.Lock()  # a capsule's deleter runs on whichever thread its consumer lets go
        self._closed = False
        self.nbytes = entry.size
        self.ptr = tier.address(entry)

    def _let_go(self) -> None:
        with self._holds_lock:
            self._holds -= 1
            last = self._holds == 0
        if last:
            self._release()

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"version": 3, "shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, True), "strides": None,
                "stream": None}  # fmt: skip

    def __dlpack_device__(self) -> tuple[int, int]:
        return DL_CUDA, self._tier.device

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        with self._holds_lock:
            if self._closed:
                raise InvalidArgument("this VRAM view was closed: open another with store.device_view(key)")
            self._holds += 1
        return self._tier.dlpack(self._entry, self._let_go)

    def __enter__(self) -> VramView:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._holds_lock:
            closing, self._closed = not self._closed, True
        if closing:
            self._let_go()
