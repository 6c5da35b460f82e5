"""The embedded store: one index over a DRAM pool and an SSD tier, behind the KV API.

Concurrency model.  One lock guards the index, the tiers' bookkeeping and the counters.  Small values
(< 64 KiB) are copied while it is held: the copy is cheaper than handing off.  Large copies and SSD
reads run outside it, under a read lease (``Entry.readers``): a leased block is never freed or evicted,
so a reader keeps the bytes it started with even if the key is overwritten or removed meanwhile.  The
copies themselves release the GIL (``mooncakefs._engine``).

Atomicity.  A put fills a fresh block that no reader can see, then publishes it by swapping the
index entry under the lock; the old entry is retired and its block freed once its last lease ends.

Tiering.  The store is the front door: it places each value in the fastest tier with room, in one
order (``tiers.base.TIER_ORDER``: VRAM, DRAM, SSD), demotes what a tier evicts to the tier below, and
promotes back up what is read from below.  Each tier keeps its own eviction order (``Tier.victims``):
the DRAM tier's fresh and main queues and ghost list (tiers/dram.py), the SSD tier's write order with
second chances and its compaction (tiers/ssd.py); docs/policy.md says why.  When DRAM must evict, a
value with an SSD copy just gives up its DRAM block; one without is written to SSD (``demote``), or
dropped when there is no SSD tier.  An SSD-only value read ``promote_after`` times is copied back into
DRAM, keeping its SSD copy (while the SSD tier is under half full) so a later eviction costs nothing.
Checksums (CRC-32C) are taken when a value first leaves DRAM, and checked on every SSD read.
"""

from __future__ import annotations

import heapq
import itertools
import mmap
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mooncakefs import _engine
from mooncakefs._engine import Entry, SharedIndex, encode_key
from mooncakefs.api import (
    BATCH_ERRORS,
    PLAIN_PUT,
    KVMapping,
    ObjectInfo,
    PutOptions,
    Replace,
    batch_targets,
    key_list,
    put_options,
    put_pairs,
    raise_buffer_error,
    value_error,
)
from mooncakefs.datadir import DataDirLock, default_path, private_dir
from mooncakefs.errors import (
    BufferTooSmall,
    ChecksumError,
    InvalidArgument,
    InvalidKey,
    KeyExists,
    KeyNotFound,
    NotNewer,
    OutOfSpace,
    StoreClosed,
    describe_key,
    given,
)
from mooncakefs.gpu import DeviceBuffer, device_buffer, is_gpu_buffer
from mooncakefs.heap import keep_freed, keep_values
from mooncakefs.keys import (
    INTERNAL_PREFIX,
    MAX_KEY_BYTES,
    InternalKey,
    Key,
    decode_key,
    encode_prefix,
    key_digest,
)
from mooncakefs.tiers.base import TIER_ORDER, Tier
from mooncakefs.tiers.dram import DramTier, check_pool_size
from mooncakefs.tiers.gds import VERIFY_MODES
from mooncakefs.tiers.ssd import DURABLE, PINNED, STICKY, Reservation, Segment, SsdTier, resolve_ssd
from mooncakefs.tiers.vram import VramTier, VramView, choose_tier, should_promote
from mooncakefs.units import format_size, parse_size

LOCKED_COPY_MAX = 64 * 1024  # values below this are copied under the store lock
BATCH_LOCKED_MAX = 256 * 1024  # in batch calls, values up to this are copied under the lock too...
BATCH_LOCKED_BYTES = 1 << 20  # ...taking it again after each MiB copied, so other threads wait little
STAGING_MIN = 1 << 30  # begin_put may stage at least this much in memory for values bound for SSD
VRAM_LEASE = object()  # what _lease returns for a value read from VRAM (not a segment; None is DRAM)
FRESH_SHARE = 0.05  # of the store (DRAM + SSD, at most half of DRAM): fresh objects beyond it go first


class ValueView:
    """The context manager ``Store.view`` returns: a lease on a value, shown as a read-only memoryview."""

    __slots__ = ("_crc", "_entry", "_key", "_store", "_view", "version")

    def __init__(self, store: Store, key: Key) -> None:
        self._store, self._key = store, key
        self._entry: Entry | None = None
        self._view: memoryview | None = None
        self.version = 0  # the version of the value shown (once entered)
        self._crc = -1

    def __enter__(self) -> memoryview:
        store, key = self._store, self._key
        entry = store._plain.lease(key)
        if entry is not None:  # in DRAM: viewed in place
            self.version, self._crc, self._entry = entry.version, entry.crc, entry
            self._view = store._dram.readonly_view(entry.dram_off, entry.size)
            return self._view
        raw = encode_key(key)
        with store._lock:
            entry = store._find(raw, key)
            self.version, self._crc = entry.version, entry.crc
            if entry.dram >= 0:
                entry.readers += 1
                self._entry = entry
                self._view = store._dram.readonly_view(entry.dram_off, entry.size)
                return self._view
            seg = store._lease(entry)
        # On SSD: a private copy (the read may promote the object).
        self._view = memoryview(store._read_leased(raw, key, entry, seg, None))
        return self._view

    def checksum(self) -> int:
        """The value's CRC-32C (entered views only): the one kept with it, else computed now and kept, so
        a node sending it to another host computes it at most once."""
        if self._crc < 0:
            assert self._view is not None
            self._crc = _engine.crc32c(self._view)
            if self._entry is not None:  # leased bytes do not change: every reader computes the same
                self._entry.crc = self._crc
        return self._crc

    @property
    def pool_offset(self) -> int:
        """Where the value sits in the DRAM pool (entered views only), or -1 for a private SSD copy."""
        return self._entry.dram_off if self._entry is not None else -1

    def __exit__(self, *exc: object) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._entry is not None:
            self._store._plain.unlease(self._entry)
            self._entry = None


class PendingPut:
    """A put whose bytes arrive later (the node fills it from a socket or a client's memcpy).

    ``buffer`` is where the value goes: its DRAM block (``pool_offset`` >= 0), or, when DRAM has no
    room, a private buffer written to SSD at ``Store.end_put``.  Nobody sees it until then.  ``tier``
    is "vram" when ``end_put`` is to copy it from there into VRAM (a put with tier='vram'), else None."""

    __slots__ = ("buffer", "entry", "key", "options", "raw", "tier")

    def __init__(
        self, raw: bytes, key: Key, entry: Entry, buffer: memoryview, options: PutOptions, tier: str | None = None
    ) -> None:
        self.raw, self.key, self.entry, self.buffer, self.options = raw, key, entry, buffer, options
        self.tier = tier

    @property
    def pool_offset(self) -> int:
        return self.entry.dram_off

    @property
    def size(self) -> int:
        return self.entry.size


class Store(KVMapping):
    """A tiered key-value store in one process.  Use ``mooncakefs.open()`` to make one."""

    _fatal = StoreClosed

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        dram: int | str = "1GiB",
        ssd: int | str | None = None,
        ssd_dir: str | Path | None = None,
        ssd_format: bool = False,
        segment_size: int | str = "64MiB",
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        promote_after: int = 2,
        prefault: bool = False,
        vram: int | str | None = None,
        device: int = 0,
        gpu_verify: str = "first",
    ) -> None:
        watermarks = (low_watermark, high_watermark)
        if not all(isinstance(w, int | float) and not isinstance(w, bool) for w in watermarks) or not (
            0 < low_watermark <= high_watermark <= 1
        ):
            raise InvalidArgument(
                f"watermarks must be numbers with 0 < low <= high <= 1, got low={given(low_watermark)} "
                f"high={given(high_watermark)}"
            )
        if type(promote_after) is not int or promote_after < 1:
            raise InvalidArgument(f"promote_after must be an int of at least 1, got {given(promote_after)}")
        if gpu_verify not in VERIFY_MODES:
            raise InvalidArgument(f"gpu_verify must be one of {VERIFY_MODES}, got {gpu_verify!r:.40}")
        dram_bytes = parse_size(dram, what="dram")
        check_pool_size(dram_bytes)  # before the data dir is made or locked
        ssd_where = resolve_ssd(ssd, ssd_dir)  # None: no SSD tier
        self.path = Path(path if path is not None else default_path()).expanduser().resolve()
        private_dir(self.path)  # 0700 whatever the umask: keys and sizes are private
        self._datadir_lock = DataDirLock(self.path)
        self._dram: DramTier | None = None
        self._ssd: SsdTier | None = None
        self._vram: VramTier | None = None
        self._device = device
        self._cuda: Any = None  # gpu.Cuda for GPU buffers: the VRAM tier's, or made on first use
        self._gds: Any = None  # tiers.gds.GpuDirect: SSD -> GPU reads, made on first use
        self._gpu_verify = gpu_verify  # which cuFile reads are checked against their CRC-32C (tiers/gds.py)
        try:
            self._dram = DramTier(
                dram_bytes,
                label=f"mooncakefs:{self.path}",
                prefault=prefault,
                high_watermark=high_watermark,
                low_watermark=low_watermark,
            )
            if ssd_where is not None:
                self._ssd = SsdTier(
                    ssd_where[1] or self.path / "ssd",
                    ssd_where[0],
                    segment_size=parse_size(segment_size, what="segment_size"),
                    index_path=self.path / "index.sqlite",
                    format=ssd_format,
                )
            if vram is not None:
                self._vram = VramTier(parse_size(vram, what="vram"), device)
                self._cuda = self._vram.cuda
                # the DRAM pool pinned: DRAM <-> VRAM copies are direct DMA (best effort)
                self._cuda.register_host(_engine.address(self._dram.view), self._dram.capacity)
                if self._ssd is not None:  # SSD -> VRAM reads: which mode cuFile runs in shows in stats()
                    self._start_gds()
            self._init_state(high_watermark, low_watermark, promote_after)
        except BaseException:  # leave nothing held: the data dir must open again
            self._close_gpu()
            if self._ssd is not None:
                self._ssd.close()
            if self._dram is not None:
                self._dram.close()
            self._datadir_lock.release()
            raise
        keep_values()  # values of up to 32 MiB leave the heap they free to the next (heap.py)

    def _close_gpu(self) -> None:
        """cuFile's registrations, the DRAM pool's pinning (before the pool is unmapped), then the VRAM
        tier and the CUDA device: those last two stay until the last device view is gone
        (``VramTier.close``), as the DRAM pool's mapping stays for the last memoryview."""
        if self._gds is not None:
            self._gds.close()
        if self._cuda is not None and self._dram is not None:
            self._cuda.unregister_host(_engine.address(self._dram.view))
        if self._vram is not None:
            self._vram.close()
        elif self._cuda is not None:
            self._cuda.close()

    def _init_state(self, high_watermark: float, low_watermark: float, promote_after: int) -> None:
        """The index, with whatever the SSD tier already holds, and the tiers wired to it."""
        dram, ssd = self._dram, self._ssd
        self._promote_after = promote_after
        self._index = _engine.KeyIndex()
        dram.index, dram.place, dram.has_lower = self._index, self, ssd is not None
        if ssd is not None:
            ssd.attach(self._index, self, high_watermark)
        # the one place the tiers are put in order (fastest first): what stats() reports, in that order
        if self._vram is not None:
            self._vram.place = self
        self._tiers: tuple[Tier, ...] = tuple(
            sorted((t for t in (self._vram, dram, ssd) if t is not None), key=lambda t: TIER_ORDER.index(t.name))
        )
        # the fresh share is of the whole store (the SSD tier extends main), at most half of DRAM
        dram.fresh_max = min(int((dram.high + (ssd.high if ssd else 0)) * FRESH_SHARE), dram.high // 2)
        self._reserve = dram.reserve  # the hot paths' DRAM calls, bound once
        self._touch = dram.touch
        self._enqueue = dram.enqueue
        self._expiring: list[tuple[float, int, bytes, Entry]] = []  # heap by expiry time
        self._tiebreak = itertools.count()
        self._lock = _engine.StoreLock()  # a threading.Lock that PlainPath takes in C
        # small puts and reads in one C call each (the watermarks and fresh share are set by now)
        self._plain = _engine.PlainPath(dram, self, self._lock, LOCKED_COPY_MAX, BATCH_LOCKED_MAX, BATCH_LOCKED_BYTES)
        # ...with no Python frame before it: an instance's put, get and batch_put are PlainPath's, which
        # come back to this class's methods for anything but a plain small call (the frame and its
        # keyword checks cost a 4 KiB put as much as the C call itself); not where a subclass overrides
        # one, as an instance's attribute would hide the override
        for name in ("put", "get", "batch_put"):
            if getattr(type(self), name) is getattr(Store, name):
                setattr(self, name, getattr(self._plain, name))
        self._idle = threading.Condition(self._lock)  # close() waits here for unlocked copies to end
        self._unlocked_ops = 0
        self._closed = False
        self._shared: SharedIndex | None = None
        self._staged = 0  # bytes of begin_put values waiting in memory to go to SSD
        self._counters = {tier.name: tier.counters for tier in self._tiers}
        self._counters.setdefault("ssd", dict.fromkeys(dram.counters, 0))  # misses are counted without one
        if ssd is not None:
            for rec in sorted(ssd.load(time.time()), key=lambda r: (r.seg, r.off)):  # oldest first
                entry = Entry(rec.size)
                entry.seg, entry.seg_off, entry.crc = rec.seg, rec.off, rec.crc
                entry.expires, entry.version, entry.tag = rec.expires, rec.version, rec.tag
                entry.pinned, entry.sticky = bool(rec.flags & PINNED), bool(rec.flags & STICKY)
                entry.durable = bool(rec.flags & DURABLE)
                self._index[rec.key] = entry
                if not entry.pinned and not entry.sticky:
                    ssd.order[rec.key] = entry
                if entry.expires:
                    heapq.heappush(self._expiring, (entry.expires, next(self._tiebreak), rec.key, entry))

    # -- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for copies in flight, then release the pool, the SSD files and the data dir.  Views still
        held keep what they show: a memoryview the DRAM pool's mapping, a device view the VRAM pool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._plain.close()
            while self._unlocked_ops:
                self._idle.wait()
            self._close_gpu()
            self._dram.close()
            if self._ssd is not None:
                self._ssd.order.clear()
                self._ssd.close()
            self._index.clear()
            self._datadir_lock.release()

    # Views of the DRAM tier's queues, as they were when the store kept them (tests look at them).
    _fresh = property(lambda self: self._dram.fresh)
    _lru = property(lambda self: self._dram.main)
    _ghost = property(lambda self: self._dram.ghost)
    _fresh_bytes = property(lambda self: self._dram.fresh_bytes)

    def persist(self, keys: Iterable[Key] | None = None) -> int:
        """Make objects survive power loss: write those that live only in DRAM to SSD, then flush their
        segments and the index to the disk.  ``keys`` names the objects (missing ones are skipped);
        by default, every sticky object (the filesystem's data: it calls this on unmount).  Returns how
        many objects were written."""
        with self._lock:
            self._check_open()
            if self._ssd is None:
                return 0
            if keys is None:
                chosen = [(raw, e) for raw, e in self._index.items() if e.sticky]
            else:
                chosen = [(raw, self._index.get(raw)) for raw in map(encode_key, key_list(keys, "persist"))]
            segments: set[int] = set()
            written = 0
            for raw, entry in chosen:
                if entry is None:
                    continue
                if entry.seg < 0:
                    self._write_to_ssd(raw, entry, self._host_bytes(entry))
                    written += 1
                segments.add(entry.seg)
            self._ssd.commit(durable_segments=segments or None)
            return written

    def wait_prefault(self) -> None:
        """Wait until the DRAM pool is backed by memory (``prefault=True``): a timed run should not share
        the CPU with the thread doing it."""
        self._check_open()
        self._dram.wait_prefault()

    def shared_pool(self) -> tuple[int, int]:
        """The DRAM pool's shared-memory file descriptor and size, for the node to hand to local clients."""
        self._check_open()
        return self._dram.fd, self._dram.capacity

    def __repr__(self) -> str:
        if self._closed:
            return f"<mooncakefs.Store {self.path} (closed)>"
        tiers = f"dram {format_size(self._dram.used)}/{format_size(self._dram.capacity)}"
        if self._ssd is not None:
            tiers += f", ssd {format_size(self._ssd.used)}/{format_size(self._ssd.capacity)}"
        if self._vram is not None:
            tiers = f"vram {format_size(self._vram.used)}/{format_size(self._vram.capacity)}, {tiers}"
        return f"<mooncakefs.Store {self.path}: {len(self._index)} objects, {tiers}>"

    # -- writing ----------------------------------------------------------------------------------------

    def put(
        self,
        key: Key,
        value: Any,
        *,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        version: int = 0,
        if_newer: bool = False,
        tag: int = 0,
        replicas: int | None = None,
        placement: str | None = None,
        tier: str | None = None,
    ) -> None:
        """Store ``value`` (any C-contiguous buffer, or a GPU buffer: ``__cuda_array_interface__`` or
        DLPack) under ``key``, atomically replacing what was there.

        ``pin`` keeps it in DRAM, never evicted; ``ttl`` (seconds) expires it; ``if_absent`` raises
        KeyExists rather than replace; ``durable`` returns only once it is flushed to the SSD tier.
        ``version`` (an int below 2**126) and ``tag`` (a 32-bit int) are kept with the value, on SSD
        too, for the writer's own use (a cluster node keeps the value's version and placement there);
        ``if_newer`` replaces only a value of a lower version, and raises NotNewer otherwise.
        ``replicas`` and ``placement`` are the cluster's: here only replicas=1 is taken (one copy).
        ``tier`` ("vram" or "dram") overrides where the value goes first (tiers/vram.choose_tier): by
        default a GPU buffer goes to VRAM, if the store has a VRAM tier, and a host buffer to DRAM.

        An instance's ``put`` is ``PlainPath.put`` (``_init_state``): it calls this with options only."""
        options = put_options(pin, ttl, if_absent, durable, version, if_newer, tag, replicas, placement)
        if options is PLAIN_PUT and tier is None:  # options that are all the defaults: a plain put after all
            self._plain.put(key, value)
            return
        if options is not PLAIN_PUT and (replicas is not None or placement is not None):
            options.single_store("put", "embedded store", self.path)
        self._put_general(key, value, options, tier)

    def _put_general(self, key: Key, value: Any, options: PutOptions, tier: str | None) -> None:
        """``put`` with its options checked, of anything ``PlainPath.put`` leaves to it."""
        try:
            size = _engine.nbytes(value)
        except TypeError:
            device = device_buffer(value, stream=self._gpu_stream)
            if device is None:
                raise value_error(value) from None
            with device:
                self._put_gpu(key, device, options, tier)
            return
        if tier is not None:
            self._put_gpu(key, memoryview(value).cast("B"), options, tier)
            return
        raw, entry = self._prepare_put(key, size, options)
        self._put_prepared(raw, key, entry, value, options)

    # -- GPU buffers and the VRAM tier ------------------------------------------------------------------

    def _gpu(self) -> Any:
        """The CUDA device GPU buffers are copied with (the VRAM tier's, else made now): CudaUnavailable
        says what is missing."""
        if self._cuda is None:
            from mooncakefs.gpu import Cuda

            with self._lock:
                if self._cuda is None:
                    self._cuda = Cuda(self._device)
        return self._cuda

    def _start_gds(self) -> None:
        """SSD -> GPU reads (tiers/gds.py), told when the SSD tier lets a segment go."""
        from mooncakefs.tiers.gds import GpuDirect

        self._gds = GpuDirect(self._cuda, self._gpu_verify)
        self._ssd.on_release = self._gds.released  # type: ignore[union-attr]

    def _gpu_stream(self) -> int:
        """The stream a DLPack producer of a CUDA tensor orders its work before: ours, so CUDA comes up
        first (without a stream named it would order it before the legacy default stream, which our
        non-blocking stream does not wait for)."""
        return self._gpu().stream_handle

    def _put_gpu(self, key: Key, value: Any, options: PutOptions, hint: str | None) -> None:
        """A put of a GPU buffer (a DeviceBuffer) or a host one with a tier hint (a memoryview): into
        VRAM where ``choose_tier`` says so and there is room, else through host memory as any put."""
        on_device = isinstance(value, DeviceBuffer) and value.on_device
        size = value.nbytes
        raw, entry = self._prepare_put(key, size, options)
        where = self._first_tier(hint, entry, on_device)
        if where == "vram" and self._put_vram(raw, key, entry, value, options.replace):
            return
        if isinstance(value, DeviceBuffer):  # to the host, then as any put
            host = bytearray(size)
            if size:
                gpu = self._gpu()
                gpu.wait_for(value)  # the producer's stream (CAI v3) may still be writing it
                gpu.d2h(_engine.address(host), value.ptr, size)
            value = host
        self._put_prepared(raw, key, entry, value, options)

    def _first_tier(self, hint: str | None, entry: Entry, on_device: bool) -> str:
        """Where a put of ``entry`` goes first, "vram" or "dram" (``choose_tier``: InvalidArgument for a
        hint this store cannot follow)."""
        return choose_tier(
            hint,
            on_device=on_device,
            has_vram=self._vram is not None,
            pinned=entry.pinned,
            durable=entry.durable,
            sticky=entry.sticky,
        )

    def _put_vram(self, raw: bytes, key: Key, entry: Entry, value: Any, replace: Replace) -> bool:
        """Put a value into a fresh VRAM block: False (nothing done) when VRAM has no room for it.

        The copy (device to device, or host to device, staged when the host memory is not pinned) runs
        without the store's lock, as a large DRAM put's does: the block belongs to an entry that no
        reader sees and no eviction lists until it is published, after the copy."""
        vram = self._vram
        assert vram is not None
        with self._lock:
            self._check_open()
            if self._expiring:
                self._reap_expired()
            self._check_replace(raw, key, entry, replace)
            if not vram.allocate(raw, entry):
                return False
            self._unlocked_ops += 1
        try:
            vram.write(raw, entry, value)
        except BaseException:
            with self._lock:
                self._end_unlocked_op()
                if not self._closed:
                    vram.free(raw, entry)
            raise
        with self._lock:
            self._end_unlocked_op()
            if self._closed:
                raise StoreClosed(f"store {self.path} was closed during put({key!r:.80})")
            try:
                self._check_replace(raw, key, entry, replace)  # another put may have published meanwhile
            except BaseException:
                vram.free(raw, entry)
                raise
            self._publish_vram(raw, entry)
        return True

    def _publish_vram(self, raw: bytes, entry: Entry) -> None:
        """Make a filled VRAM entry the key's value (lock held)."""
        old = self._index.get(raw)
        self._index[raw] = entry
        self._unshare(raw)  # the shared index shows DRAM values only
        if old is not None:
            if old.queue:
                self._dram.unqueue(raw, old)
            self._discard(raw, old)
        self._vram.admit(raw, entry)  # type: ignore[union-attr]
        if entry.expires:
            heapq.heappush(self._expiring, (entry.expires, next(self._tiebreak), raw, entry))
        self._commit()

    def _host_bytes(self, entry: Entry) -> memoryview:
        """The value in host memory (lock held): its DRAM block, or a copy out of VRAM."""
        if entry.dram >= 0:
            return self._dram.block(entry)
        return memoryview(self._vram.read_value(entry, None))  # type: ignore[union-attr]

    def demote_vram(self, raw: bytes, entry: Entry) -> bool:
        """A VRAM value with no copy below leaves the GPU (lock held): into DRAM (evicting there as
        DRAM does), else onto SSD; False when neither can take it."""
        dram = self._dram
        handle, offset = dram.reserve(entry.size)
        if handle >= 0:
            entry.dram, entry.dram_off = handle, offset
            try:
                self._vram.read_value(entry, dram.block(entry))  # type: ignore[union-attr]
            except BaseException:  # else the unfilled block stays the entry's, its copy once VRAM lets go
                dram.free(raw, entry)
                raise
            dram.enqueue(raw, entry, True)  # it was in the fastest tier: it has earned main
            if self._shared is not None:
                self._share(raw, entry)
            return True
        if self._ssd is None:
            return False
        try:
            self._write_to_ssd(raw, entry, self._host_bytes(entry))
        except OutOfSpace:
            return False
        return True

    def get_into_device(self, key: Key, buffer: Any) -> int:
        """``get_into`` for a GPU buffer (``get_into`` calls it): device to device from VRAM, host to
        device from the (pinned) DRAM pool, SSD to device by cuFile (tiers/gds.py).  A value read into
        GPU buffers ``promote_after`` times is copied into VRAM."""
        dst = device_buffer(buffer, stream=self._gpu_stream, writable=True)
        if dst is None:
            raise_buffer_error(buffer)
        assert dst is not None
        return self._get_into_gpu(encode_key(key), key, dst)

    def _get_into_gpu(self, raw: bytes, key: Key, dst: DeviceBuffer) -> int:
        with dst:
            gpu = self._gpu()
            gpu.wait_for(dst)
            if self._ssd is not None and self._gds is None:
                with self._lock:
                    if self._gds is None:
                        self._start_gds()
            with self._lock:
                entry = self._find(raw, key)
                if entry.size > dst.nbytes:
                    raise BufferTooSmall(key, entry.size, dst.nbytes)
                if entry.vram >= 0:
                    self._vram.counters["hits"] += 1  # type: ignore[union-attr]
                    if entry.dram >= 0:  # _find touched its DRAM copy
                        self._vram.touch(raw, entry)  # type: ignore[union-attr]
                # the source is chosen here, under the lock: a promotion by another reader may give the
                # entry a VRAM block the moment the lock is let go, before that block is filled
                seg = prepared = vram_src = dram_src = None
                if entry.vram >= 0:
                    vram_src = self._vram.address(entry)  # type: ignore[union-attr]
                elif entry.dram >= 0:
                    dram_src = _engine.address(self._dram.view) + entry.dram_off
                else:
                    seg = self._ssd.lease(entry)  # type: ignore[union-attr]
                    prepared = self._gds.prepare(seg)
                entry.readers += 1
                self._unlocked_ops += 1
            try:
                if vram_src is not None:
                    gpu.d2d(dst.ptr, vram_src, entry.size)
                elif dram_src is not None:
                    gpu.h2d(dst.ptr, dram_src, entry.size)
                elif entry.size:
                    try:
                        self._gds.read(entry, seg, prepared, dst.ptr)
                    except ChecksumError:
                        raise self._drop_corrupt(raw, key, entry) from None
            finally:
                with self._lock:
                    self._release_lease(entry)
                    self._end_unlocked_op()
                    if seg is not None:
                        self._ssd.end_lease(seg)  # type: ignore[union-attr]
            self._promote_to_vram(raw, entry, dst.ptr)
            return entry.size

    def _promote_to_vram(self, raw: bytes, entry: Entry, src: int) -> None:
        """Count a read into the GPU buffer at ``src`` and, once the value has earned it, copy it from
        there into VRAM.  The copy runs without the store's lock, into a block no entry owns yet
        (``VramTier.reserve``); the entry takes it only if it is still the key's value, not in VRAM,
        and the store still open: else the block is given back."""
        vram = self._vram
        with self._lock:
            if entry.dead or self._closed or entry.vram >= 0:
                return
            entry.hits += 1
            if vram is None or not should_promote(entry, self._promote_after, True):
                return
            handle = vram.reserve(entry.size)
            if handle < 0:
                return
            if entry.dead or self._index.get(raw) is not entry:  # evicted to make room: not worth it
                vram.release(handle)
                return
            self._unlocked_ops += 1
        try:
            vram.cuda.d2d(vram.block_address(handle), src, entry.size)
        except BaseException:
            with self._lock:
                self._end_unlocked_op()
                if not self._closed:
                    vram.release(handle)
            raise
        with self._lock:
            self._end_unlocked_op()
            if self._closed:
                return
            if entry.dead or entry.vram >= 0 or self._index.get(raw) is not entry:  # changed during the copy
                vram.release(handle)
                return
            entry.vram, entry.hits = handle, 0
            vram.admit(raw, entry)
            vram.counters["promotions"] += 1

    def device_view(self, key: Key) -> VramView:
        """A zero-copy view of a VRAM value (``__cuda_array_interface__``, ``__dlpack__``), for use as
        ``with store.device_view(key) as v: torch.from_dlpack(v)``.  The block stays leased until the
        block exits and every DLPack tensor made from it is gone; ``close()`` leaves the VRAM pool (and
        the device) to the last of them."""
        raw = encode_key(key)
        with self._lock:
            entry = self._find(raw, key)
            if self._vram is None or entry.vram < 0:
                raise InvalidArgument(
                    f"key {describe_key(key)}: not in VRAM ({self._tier_name(entry)}): put it with tier='vram', "
                    "or get_into a GPU buffer"
                )
            entry.readers += 1
            vram = self._vram
            vram.view_opened()  # counted under the lock: close() cannot free the pool before the view exists

        def let_go() -> None:  # lock held
            if not self._closed:
                self._release_lease(entry)
            vram.view_closed()  # after close(), the last view frees the pool

        def release() -> None:
            """The view's exit, or a DLPack consumer's deleter: on any thread, maybe inside a store call on
            this one (the GC freeing a tensor in a reference cycle while the lock is held), so it never
            waits for the lock: when the lock is busy, another thread lets go once it is free."""
            if self._lock.acquire(blocking=False):
                try:
                    let_go()
                finally:
                    self._lock.release()
            else:
                threading.Thread(
                    target=self._locked, args=(let_go,), name="mooncakefs-view-release", daemon=True
                ).start()

        return VramView(vram, entry, release)

    def _locked(self, call: Any) -> None:
        with self._lock:
            call()

    @staticmethod
    def _tier_name(entry: Entry) -> str:
        """The fastest tier holding the entry."""
        return "vram" if entry.vram >= 0 else "dram" if entry.dram >= 0 else "ssd"

    def begin_put(self, key: Key, size: int, options: PutOptions = PLAIN_PUT, tier: str | None = None) -> PendingPut:
        """Reserve room for a ``size``-byte value: fill ``.buffer``, then ``end_put`` (or ``abort_put``).

        This is ``put`` in two halves, for callers that receive the bytes straight into place (a node
        receiving a put); ``options`` are ``put``'s keywords, checked (``PutOptions``), which the caller
        carries from where it got them, and ``tier`` is ``put``'s for a host buffer, checked here, before
        any bytes arrive.  The bytes arrive in host memory either way: a value bound for VRAM is copied
        there at ``end_put`` (straight from the DRAM pool, which CUDA can reach), and stays where it
        arrived when VRAM has no room.  A value that must go straight to SSD is staged in memory first;
        staging is limited in all (to the DRAM pool's size, or STAGING_MIN if more), so puts in flight
        cannot take the host's memory."""
        if type(size) is not int or not 0 <= size < 1 << 48:
            raise ValueError(f"value size must be an integer from 0 to 2**48, got {size!r:.40}")
        if not isinstance(options, PutOptions):
            raise InvalidArgument(f"begin_put's options must be a PutOptions, got {type(options).__name__}")
        options.single_store("begin_put", "embedded store", self.path)
        raw, entry = self._prepare_put(key, size, options)
        first = "vram" if tier is not None and self._first_tier(tier, entry, False) == "vram" else None
        with self._lock:
            self._check_open()
            if self._expiring:
                self._reap_expired()
            self._check_replace(raw, key, entry, options.replace)
            entry.dram, entry.dram_off = self._reserve(size)
            if entry.dram >= 0:
                return PendingPut(
                    raw, key, entry, self._dram.view[entry.dram_off : entry.dram_off + size], options, first
                )
            if entry.pinned or self._ssd is None:
                self._put_ssd_only(raw, key, entry, b"")  # raises the OutOfSpace a put would
            budget = max(self._dram.capacity, STAGING_MIN)
            if size > self._ssd.capacity or self._staged + size > budget:  # type: ignore[union-attr]
                raise OutOfSpace(
                    f"key {describe_key(key)}: no room to stage {format_size(size)} for the SSD tier "
                    f"({format_size(self._staged)} staged by puts in flight, SSD tier "
                    f"{format_size(self._ssd.capacity)})"  # type: ignore[union-attr]
                )
            try:
                buffer = memoryview(mmap.mmap(-1, size) if size else bytearray())  # page-aligned, for O_DIRECT
            except OSError as exc:
                raise OutOfSpace(f"key {describe_key(key)}: cannot stage {format_size(size)}: {exc.strerror}") from None
            self._staged += size
        return PendingPut(raw, key, entry, buffer, options, first)

    def end_put(self, pending: PendingPut, crc: int | None = None) -> None:
        """Publish a filled ``begin_put``: from here on readers see the new value.  ``crc``: its CRC-32C,
        already checked against the bytes (a node's TCP put), kept so that nothing computes it again."""
        raw, key, entry = pending.raw, pending.key, pending.entry
        if crc is not None:
            entry.crc = crc
        if pending.tier == "vram" and self._end_put_vram(pending):
            return
        with self._lock:
            if entry.dram >= 0:
                self._publish(raw, key, entry, pending.options, pending.buffer)
                return
            try:
                self._check_open()
                self._check_replace(raw, key, entry, pending.options.replace)
                self._put_ssd_only(raw, key, entry, pending.buffer)
            finally:
                self._unstage(pending)

    def _end_put_vram(self, pending: PendingPut) -> bool:
        """Copy a filled put bound for VRAM into a VRAM entry of its own, as a host buffer's put with
        tier='vram' is, then give back the room it arrived in; False (nothing done) when VRAM has no room."""
        _raw, entry = self._prepare_put(pending.key, pending.size, pending.options)  # checked at begin_put
        entry.crc = pending.entry.crc
        try:
            moved = self._put_vram(pending.raw, pending.key, entry, pending.buffer, pending.options.replace)
        except BaseException:
            self.abort_put(pending)
            raise
        if moved:
            self.abort_put(pending)
        return moved

    def abort_put(self, pending: PendingPut) -> None:
        """Give back a ``begin_put`` that will not be published (its writer went away)."""
        with self._lock:
            if pending.entry.dram >= 0:
                if not self._closed:
                    self._dram.release(pending.entry.dram)
                pending.entry.dram = pending.entry.dram_off = -1
            else:
                self._unstage(pending)

    def _unstage(self, pending: PendingPut) -> None:
        if pending.buffer is not None:
            self._staged -= len(pending.buffer)
            pending.buffer = None  # type: ignore[assignment]

    def _put_prepared(self, raw: bytes, key: Key, entry: Entry, value: Any, options: PutOptions) -> None:
        with self._lock:
            if self._put_locked(raw, key, entry, value, options):
                return
            try:
                reserved = self._reserve_ssd(raw, entry, value, options)
            except BaseException:
                self._dram.release(entry.dram)
                raise
            self._unlocked_ops += 1
        try:
            self._dram.arena.write(entry.dram_off, value)
            if reserved is not None:
                self._write_reserved(entry, reserved, value)
        except BaseException:
            with self._lock:
                self._dram.release(entry.dram)
                if reserved is not None and not self._closed:
                    self._ssd.cancel(reserved)  # type: ignore[union-attr]
            raise
        finally:
            with self._lock:
                self._end_unlocked_op()
                if self._closed:
                    raise StoreClosed(f"store {self.path} was closed during put({key!r:.80})")
        with self._lock:
            self._publish(raw, key, entry, options, value, reserved)

    def _writes_through(self, entry: Entry, options: PutOptions) -> bool:
        """Whether a put gets its SSD copy at once: durable values, and sticky ones where there is an SSD tier."""
        return options.durable or (entry.sticky and self._ssd is not None)

    def _reserve_ssd(self, raw: bytes, entry: Entry, value: Any, options: PutOptions) -> Reservation | None:
        """Room on SSD for a large put's write-through, to be written without the lock (lock held), so
        that one put's disk write overlaps other calls and other puts' writes; None where the value is
        written under the lock at publish (no write-through, or not page-aligned).  OutOfSpace if the
        tier has no room."""
        if not self._writes_through(entry, options):
            return None
        data = memoryview(value).cast("B")
        if not SsdTier.unlocked(data):
            return None
        self._make_ssd_room(raw, entry)
        return self._ssd.reserve(data)  # type: ignore[union-attr]

    def _write_reserved(self, entry: Entry, reserved: Reservation, value: Any) -> None:
        """The unlocked half of a reserved write-through: checksum the value and write its bytes."""
        data = memoryview(value).cast("B")
        if entry.crc < 0:
            entry.crc = _engine.crc32c(data)
        self._ssd.write_reserved(reserved, data)  # type: ignore[union-attr]

    def _prepare_put(self, key: Key, size: int, options: PutOptions) -> tuple[bytes, Entry]:
        """A put's key bytes and a fresh entry carrying its (checked) options; no lock needed."""
        raw = encode_key(key)
        entry = Entry(size)
        entry.sticky = type(key) is InternalKey
        if options is PLAIN_PUT:
            return raw, entry
        entry.version, entry.tag = options.version, options.tag
        if options.ttl is not None:
            entry.expires = time.time() + options.ttl
        if options.durable and self._ssd is None:
            raise InvalidArgument(
                f"put({describe_key(key)}, durable=True) needs an SSD tier: open the store with ssd=... (a node: --ssd)"
            )
        entry.pinned, entry.durable = options.pin, options.durable
        return raw, entry

    def _put_locked(
        self,
        raw: bytes,
        key: Key,
        entry: Entry,
        value: Any,
        options: PutOptions,
        locked_max: int = LOCKED_COPY_MAX,
    ) -> bool:
        """The part of a put done under the lock: True if that was all, False if the entry got a DRAM
        block that the caller must fill without the lock and then publish.  Values below
        ``locked_max`` bytes are copied under the lock (a batch raises it: handing off costs more)."""
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed")
        if self._expiring:
            self._reap_expired()
        self._check_replace(raw, key, entry, options.replace)
        entry.dram, entry.dram_off = self._reserve(entry.size)
        if entry.dram < 0:
            self._put_ssd_only(raw, key, entry, value)
            return True
        if entry.size >= locked_max:
            return False
        try:
            self._dram.arena.write(entry.dram_off, value)
        except BaseException:
            self._dram.release(entry.dram)
            raise
        self._publish(raw, key, entry, options, value)
        return True

    def _check_replace(self, raw: bytes, key: Key, entry: Entry, replace: Replace) -> None:
        """Raise if the put may not take the place of the key's current value (lock held)."""
        if replace is Replace.ALWAYS:
            return
        old = self._lookup(raw)
        if old is None:
            return
        if replace is Replace.NEVER:
            raise KeyExists(key)
        if old.version >= entry.version:
            raise NotNewer(key)

    def _publish(
        self, raw: bytes, key: Key, entry: Entry, options: PutOptions, value: Any, reserved: Reservation | None = None
    ) -> None:
        """Make a filled entry the key's value (lock held).  ``value`` is what it was filled from: an SSD
        copy is written from there (the caller's buffer may be aligned for O_DIRECT; the pool block
        need not be), unless it was written already into ``reserved``."""
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed")
        durable = options.durable
        try:
            self._check_replace(raw, key, entry, options.replace)
        except KeyExists:
            self._dram.release(entry.dram)
            if reserved is not None:
                self._ssd.cancel(reserved)  # type: ignore[union-attr]
            raise
        if reserved is not None:
            self._ssd.publish(reserved, raw, entry)  # type: ignore[union-attr]
        elif self._writes_through(entry, options):
            try:
                self._write_to_ssd(raw, entry, memoryview(value).cast("B"))
            except BaseException:
                self._dram.release(entry.dram)
                raise
        old = self._index.get(raw)
        self._index[raw] = entry
        if self._shared is not None:
            self._share(raw, entry)
        if old is not None:
            if old.queue:
                self._dram.unqueue(raw, old)
            self._discard(raw, old)
        if not entry.pinned and (not entry.sticky or self._ssd is not None):  # DramTier.evictable, inline
            self._enqueue(raw, entry, old is not None)  # replaced: used again
        if entry.expires:
            heapq.heappush(self._expiring, (entry.expires, next(self._tiebreak), raw, entry))
        if self._ssd is not None:
            self._ssd.commit(durable_segments={entry.seg} if durable else None)

    def _put_ssd_only(self, raw: bytes, key: Key, entry: Entry, value: Any) -> None:
        """No DRAM block can be had: store straight to SSD if the value may live there (lock held)."""
        if entry.pinned or self._ssd is None:
            raise OutOfSpace(self._no_dram_room(key, entry))
        self._write_to_ssd(raw, entry, memoryview(value).cast("B"))  # OutOfSpace leaves the old value
        old = self._index.get(raw)
        self._unshare(raw)
        if old is not None:
            self._dram.unqueue(raw, old)
            self._discard(raw, old)
        self._index[raw] = entry
        if entry.expires:
            heapq.heappush(self._expiring, (entry.expires, next(self._tiebreak), raw, entry))
        self._commit({entry.seg})

    def _no_dram_room(self, key: Key, entry: Entry) -> str:
        """Why a value that may live only in DRAM got no block (lock held): the pool's size, its high
        watermark (no value above it ever fits), how much pinned or in-use objects hold, and what fits."""
        capacity, high, used = self._dram.capacity, self._dram.high, self._dram.used
        what = "a pinned value" if entry.pinned else "a value"
        if entry.size > high:
            why = (
                f"the DRAM pool is {format_size(capacity)} and its high watermark ({high / capacity:.0%}) "
                f"lets values up to {format_size(high)} in"
            )
        else:
            why = (
                f"{format_size(used)} of the {format_size(capacity)} DRAM pool is held by pinned or in-use "
                f"objects, so at most {format_size(max(0, capacity - used))} fits now (the high watermark, "
                f"{high / capacity:.0%}, is {format_size(high)})"
            )
        if entry.pinned:
            fix = "pinned values live only in DRAM: give the store more DRAM (dram=, a node: --dram) or unpin"
        else:  # only values that cannot go to SSD come here
            fix = (
                "there is no SSD tier: give the store more DRAM (dram=, a node: --dram) or an SSD tier "
                "(ssd=, a node: --ssd)"
            )
        return f"key {describe_key(key)}: no room for {what} of {format_size(entry.size)}: {why}; {fix}"

    def _write_to_ssd(self, raw: bytes, entry: Entry, data: memoryview) -> None:
        """Give an entry an SSD copy of ``data`` (lock held); OutOfSpace if the tier has no room."""
        self._make_ssd_room(raw, entry)
        if entry.crc < 0:
            entry.crc = _engine.crc32c(data)
        self._ssd.write(raw, entry, data)  # type: ignore[union-attr]

    def _make_ssd_room(self, raw: bytes, entry: Entry) -> None:
        """Make room on the SSD tier for the entry's value (lock held); OutOfSpace if there is none."""
        ssd = self._ssd
        assert ssd is not None
        if (limit := ssd.too_large(entry.size)) is not None:
            raise OutOfSpace(f"key {decode_key(raw)!r:.80}: {format_size(entry.size)} does not fit: {limit}")
        if not ssd.allocate(raw, entry):
            raise OutOfSpace(
                f"key {decode_key(raw)!r:.80}: no room for {format_size(entry.size)} on the SSD tier "
                f"({format_size(ssd.used)} of {format_size(ssd.capacity)} used)"
            )

    # -- what the tiers ask of the store (tiers/base.Placement) -----------------------------------------

    def demote(self, raw: bytes, entry: Entry, earned: bool) -> bool:
        """Give a DRAM value leaving the pool an SSD copy (lock held); False once the SSD tier is full.
        A value never read since put is demoted only into free space: reclaiming room for it would push
        out values that earned their place."""
        ssd = self._ssd
        if ssd is None:
            return False
        if not earned and not ssd.has_room(entry.size):
            return True
        try:
            self._write_to_ssd(raw, entry, self._dram.block(entry))
        except OutOfSpace:
            return False
        return True

    def drop(self, raw: bytes, entry: Entry) -> None:
        del self._index[raw]
        self._discard(raw, entry)

    def lost(self, raw: bytes, entry: Entry) -> None:
        if self._index.get(raw) is entry:
            del self._index[raw]
        entry.dead = True
        self._dram.remember(raw)

    def read_since(self, raw: bytes, entry: Entry) -> bool:
        return self._read_shared_since(raw, entry)

    # -- the shared index (node mode) -------------------------------------------------------------------

    def share_index(self, index: SharedIndex) -> None:
        """Keep ``index`` (in shared memory) in step with the DRAM-resident values, so that processes
        mapping the pool can read them with no round trip to the node."""
        with self._lock:
            self._check_open()
            self._shared = index
            self._plain.index_shared()
            self._dram.second_chances = True  # reads through it earn a second chance against eviction
            for raw, entry in self._index.items():
                self._share(raw, entry)

    def _share(self, raw: bytes, entry: Entry) -> None:
        """Publish an entry that just became a key's DRAM value (lock held).  Values that may expire
        are left out: only the node can tell a reader they are gone."""
        assert self._shared is not None
        if entry.dram >= 0 and not entry.expires:
            self._shared.publish(key_digest(raw), entry.dram_off, entry.size)
        else:
            self._shared.remove(key_digest(raw))

    def withdraw(self, raw: bytes) -> None:
        self._unshare(raw)

    def _unshare(self, raw: bytes) -> None:
        """Withdraw a key from the shared index before its block can be freed (lock held)."""
        if self._shared is not None:
            self._shared.remove(key_digest(raw))

    def _read_shared_since(self, raw: bytes, entry: Entry) -> bool:
        """Whether clients read the entry through the shared index since eviction last looked at it."""
        assert self._shared is not None
        hits = self._shared.hits(key_digest(raw))
        if hits == entry.seen:
            return False
        entry.seen = hits
        return True

    def _commit(self, durable_segments: set[int] | None = None) -> None:
        if self._ssd is not None:
            self._ssd.commit(durable_segments=durable_segments)

    def _discard(self, raw: bytes, entry: Entry) -> None:
        """An entry left the index (replaced, removed, expired, evicted): free what no lease holds."""
        entry.dead = True
        if entry.seg >= 0:
            self._ssd.free(raw, entry)  # type: ignore[union-attr]
        if entry.dram >= 0 and not entry.readers:
            self._dram.release(entry.dram)
            entry.dram = entry.dram_off = -1
        if entry.vram >= 0:
            self._vram.unqueue(raw, entry)  # type: ignore[union-attr]
            if not entry.readers:
                self._vram.free(raw, entry)  # type: ignore[union-attr]

    def _release_lease(self, entry: Entry) -> None:
        entry.readers -= 1
        if entry.dead and not entry.readers and entry.dram >= 0:
            self._dram.release(entry.dram)
            entry.dram = entry.dram_off = -1
        if entry.dead and not entry.readers and entry.vram >= 0:
            self._vram.free(b"", entry)  # type: ignore[union-attr]

    def _end_unlocked_op(self) -> None:
        self._unlocked_ops -= 1
        if not self._unlocked_ops:
            self._idle.notify_all()

    # -- reading ----------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed")

    def _lookup(self, raw: bytes) -> Entry | None:
        """The live entry for a key, expiring it if its time has come (lock held)."""
        entry = self._index.get(raw)
        if entry is not None and entry.expires and entry.expires <= time.time():
            self._remove(raw, entry)
            return None
        return entry

    def _find(self, raw: bytes, key: Key) -> Entry:
        """``_lookup`` for a read: counts the hit or miss, refreshes LRU order (lock held)."""
        self._check_open()
        entry = self._lookup(raw)
        dram, ssd = self._counters["dram"], self._counters["ssd"]
        if entry is None:
            dram["misses"] += 1
            if self._ssd is not None:
                ssd["misses"] += 1
            raise KeyNotFound(key)
        if entry.dram >= 0:
            dram["hits"] += 1
            if entry.queue:
                self._touch(raw, entry)
        elif entry.vram >= 0:
            self._vram.touch(raw, entry)  # type: ignore[union-attr]
        else:
            dram["misses"] += 1
            ssd["hits"] += 1
        return entry

    def _remove(self, raw: bytes, entry: Entry) -> None:
        del self._index[raw]
        self._unshare(raw)
        self._dram.unqueue(raw, entry)
        self._discard(raw, entry)
        self._commit()

    def get(self, key: Key) -> bytes:
        """The value as a new bytes object (KeyNotFound if absent)."""
        return self._plain.get(key)  # what an instance's get is (_init_state): PlainPath.get

    def _get_general(self, key: Key) -> bytes:
        """``get`` of anything but a small DRAM value (``PlainPath.get`` leaves it here)."""
        raw = encode_key(key)
        with self._lock:
            entry = self._find(raw, key)
            if entry.dram >= 0 and entry.size < LOCKED_COPY_MAX:
                return self._dram.arena.read(entry.dram_off, entry.size)
            seg = self._lease(entry)
        return self._read_leased(raw, key, entry, seg, None)

    def get_into(self, key: Key, buffer: Any) -> int:
        """Copy the value into the start of writable ``buffer``; returns its length in bytes.

        BufferTooSmall (nothing written) if the buffer is shorter than the value."""
        n = self._plain.get_into(key, buffer)  # the common case, a small DRAM value, in one C call
        if n >= 0:
            return n
        raw = encode_key(key)
        try:
            room = _engine.nbytes(buffer)
            if n < -1:
                raise BufferTooSmall(key, -2 - n, room)
            with self._lock:
                entry = self._find(raw, key)
                if entry.size > room:
                    raise BufferTooSmall(key, entry.size, room)
                if entry.dram >= 0 and entry.size < LOCKED_COPY_MAX:
                    return self._dram.arena.read_into(entry.dram_off, entry.size, buffer)
                seg = self._lease(entry)
            return self._read_leased(raw, key, entry, seg, buffer)
        except TypeError:  # not a buffer, or a read-only one: say so as every store does
            gpu = device_buffer(buffer, stream=self._gpu_stream, writable=True)
            if gpu is not None:
                return self._get_into_gpu(raw, key, gpu)
            raise_buffer_error(buffer)
            raise

    def view(self, key: Key) -> ValueView:
        """A read-only memoryview of the value, for use as ``with store.view(key) as mv: ...``.

        A DRAM-resident value is viewed in place, without a copy; the block stays leased (never evicted
        or reused) until the block exits, even if the key is overwritten or removed meanwhile."""
        return ValueView(self, key)

    def _read_leased(self, raw: bytes, key: Key, entry: Entry, seg: Segment | None, dst: Any) -> Any:
        """Finish a read whose lease ``_lease`` took: into ``dst`` (returns the byte count) or, with no
        ``dst``, into new bytes (returned).  SSD bytes are checked against the entry's CRC."""
        data = None
        if seg is VRAM_LEASE:
            try:
                return self._vram.read_value(entry, None if dst is None else memoryview(dst).cast("B"))  # type: ignore[union-attr]
            finally:
                with self._lock:
                    self._release_lease(entry)
                    self._end_unlocked_op()
        try:
            if seg is None:
                if dst is None:
                    return self._dram.arena.read(entry.dram_off, entry.size)
                return self._dram.arena.read_into(entry.dram_off, entry.size, dst)
            if dst is None:
                data = self._ssd.read_value(entry, None, seg)  # type: ignore[union-attr]
            else:
                data = memoryview(dst).cast("B")[: entry.size]
                if data.readonly:
                    raise TypeError("buffer must be writable")
                self._ssd.read_value(entry, data, seg)  # type: ignore[union-attr]
            self._verify(raw, key, entry, data)
            return data if dst is None else entry.size
        except BaseException:
            data = None  # nothing to promote
            raise
        finally:
            self._end_lease(raw, entry, seg, data)

    def _lease(self, entry: Entry) -> Segment | None:
        """Hold an entry (and its SSD segment, if that is where it is read from) across an unlocked
        copy (lock held)."""
        entry.readers += 1
        self._unlocked_ops += 1
        if entry.dram >= 0:
            return None
        if entry.vram >= 0:
            return VRAM_LEASE  # type: ignore[return-value]
        return self._ssd.lease(entry)  # type: ignore[union-attr]

    def _verify(self, raw: bytes, key: Key, entry: Entry, data: Any) -> None:
        if _engine.crc32c(data) != entry.crc:
            raise self._drop_corrupt(raw, key, entry)

    def _drop_corrupt(self, raw: bytes, key: Key, entry: Entry) -> ChecksumError:
        """Drop an entry whose SSD copy failed its CRC-32C check (unless a newer one replaced it) and
        return the error that says so: a corrupted value is never served, and never read again."""
        with self._lock:
            if self._index.get(raw) is entry:
                self._remove(raw, entry)
        return ChecksumError(
            f"key {describe_key(key)}: the SSD copy fails its CRC-32C check (corrupted on disk); the entry was dropped"
        )

    def _end_lease(self, raw: bytes, entry: Entry, seg: Any, data: Any) -> None:
        """Release a lease taken by ``_lease``; an SSD read that completed may promote the object."""
        with self._lock:
            self._release_lease(entry)
            self._end_unlocked_op()
            if seg is None:
                return
            self._ssd.end_lease(seg)  # type: ignore[union-attr]
            if data is None or entry.dead or entry.dram >= 0 or self._closed:
                return
            entry.hits += 1
            if entry.hits >= self._promote_after and not entry.pinned:
                dram = self._dram
                handle, offset = dram.reserve(entry.size)
                if handle >= 0 and (entry.dead or entry.dram >= 0):  # reclaimed or promoted meanwhile
                    dram.release(handle)
                elif handle >= 0:
                    dram.arena.write(offset, data)
                    entry.dram, entry.dram_off, entry.hits = handle, offset, 0
                    dram.enqueue(raw, entry, True)  # read lately: it has earned main
                    dram.counters["promotions"] += 1
                    if self._shared is not None:
                        self._share(raw, entry)
                    ssd = self._ssd
                    if not entry.sticky and not entry.durable and entry.seg >= 0 and 2 * ssd.live > ssd.high:  # type: ignore[union-attr]
                        # a tier past half full keeps one copy of each value: the DRAM one, now
                        ssd.free(raw, entry)  # type: ignore[union-attr]
                        self._commit()

    # -- queries ----------------------------------------------------------------------------------------

    def exists(self, key: Key) -> bool:
        raw = encode_key(key)
        with self._lock:
            self._check_open()
            return self._lookup(raw) is not None

    def remove(self, key: Key) -> bool:
        """Remove a key; False if it was not there."""
        raw = encode_key(key)
        with self._lock:
            self._check_open()
            entry = self._lookup(raw)
            if entry is None:
                return False
            self._remove(raw, entry)
            return True

    def remove_prefix(self, prefix: Key) -> int:
        """Remove every key starting with ``prefix``; returns how many were removed."""
        raw = encode_prefix(prefix)
        with self._lock:
            self._check_open()
            doomed = [(k, e) for k, e in self._index.items() if k.startswith(raw) and not k.startswith(INTERNAL_PREFIX)]
            now = time.time()
            for k, e in doomed:
                del self._index[k]
                self._unshare(k)
                self._dram.unqueue(k, e)
                self._discard(k, e)
            self._commit()
            return sum(1 for _, e in doomed if not e.expires or e.expires > now)

    def stat(self, key: Key) -> ObjectInfo:
        raw = encode_key(key)
        with self._lock:
            self._check_open()
            entry = self._lookup(raw)
            if entry is None:
                raise KeyNotFound(key)
            if entry.crc < 0 and entry.dram >= 0:  # DRAM-only values get their checksum when first asked for
                entry.crc = self._dram.arena.crc32c(entry.dram_off, entry.size)
            if entry.crc >= 0:
                return self._object_info(raw, entry)
            seg = self._lease(entry)  # VRAM only: its checksum from a copy to the host, made without the lock
        entry.crc = _engine.crc32c(self._read_leased(raw, key, entry, seg, None))  # any reader computes the same
        return self._object_info(raw, entry)

    def _object_info(self, raw: bytes, entry: Entry) -> ObjectInfo:
        return ObjectInfo(
            key=decode_key(raw),
            size=entry.size,
            checksum=entry.crc,
            tier=self._tier_name(entry),
            pinned=bool(entry.pinned),
            expires=entry.expires or None,
            version=entry.version,
        )

    def versions(self, keys: Iterable[Key]) -> list[int | None]:
        """Each key's version (what its writer put it with), None where it is absent."""
        raws = [encode_key(k) for k in key_list(keys, "versions")]
        with self._lock:
            self._check_open()
            return [None if (e := self._lookup(raw)) is None else e.version for raw in raws]

    def keys(self, prefix: Key = "") -> Iterator[Key]:
        """The keys present now (a snapshot), optionally only those starting with ``prefix``."""
        raw = encode_prefix(prefix)
        with self._lock:
            self._check_open()
            self._reap_expired()
            snapshot = [k for k in self._index if k.startswith(raw) and not k.startswith(INTERNAL_PREFIX)]
        return map(decode_key, snapshot)

    def raw_index(self) -> dict[bytes, tuple[int, int]]:
        """Every key present now as raw bytes, internal ones included, with its (version, tag): what
        cluster repair works from."""
        with self._lock:
            self._check_open()
            self._reap_expired()
            return {raw: (entry.version, entry.tag) for raw, entry in self._index.items()}

    def match_prefix(self, keys: Iterable[Key]) -> int:
        """How many leading keys of ``keys`` are present: the cached prefix of a KV-cache block chain.

        The prefix found counts as read, last key first: a block is worth keeping only while the blocks
        before it are kept, so the chain's tail is left the nearest to eviction (leaf first)."""
        keys = key_list(keys, "match_prefix")
        with self._lock:
            self._check_open()
            found: list[tuple[bytes, Entry]] = []
            index = self._index
            for key in keys:
                if type(key) is str:  # the common case, inline: encode_key says why a key is bad
                    raw = key.encode() if key.isascii() else encode_key(key)
                    if not 0 < len(raw) <= MAX_KEY_BYTES:
                        break
                else:
                    try:
                        raw = encode_key(key)
                    except InvalidKey:
                        break
                entry = index.get(raw)
                if entry is None or (entry.expires and self._lookup(raw) is None):
                    break
                found.append((raw, entry))
            touch = self._touch
            for raw, entry in reversed(found):
                if entry.queue:
                    touch(raw, entry)
                elif entry.dram < 0 and not entry.hits:
                    entry.hits = 1  # on SSD: hot for reclaim, so loading the chain cannot drop its tail
            return len(found)

    def stats(self) -> dict[str, Any]:
        """Per-tier capacity, bytes used, object count and hit/miss/eviction/promotion counters.

        For SSD, "used" is the bytes of its segment files and "live" the part still holding values (the
        rest is reclaimed when space is needed).
        "evictions" counts objects that left a tier (DRAM: demoted or dropped; SSD: dropped);
        "promotions" counts objects copied up into DRAM."""
        with self._lock:
            self._check_open()
            self._plain.fold_counters()  # the hits of small reads, counted in C
            in_dram = sum(1 for e in self._index.values() if e.dram >= 0)
            tiers: dict[str, Any] = {
                "dram": {
                    "capacity": self._dram.capacity,
                    "used": self._dram.used,
                    "objects": in_dram,
                    **self._counters["dram"],
                },
            }
            if self._ssd is not None:
                tiers["ssd"] = {
                    "capacity": self._ssd.capacity,
                    "used": self._ssd.used,
                    "live": self._ssd.live,
                    "objects": sum(1 for e in self._index.values() if e.seg >= 0),
                    "segments": len(self._ssd.segments),
                    **self._counters["ssd"],
                }
            if self._vram is not None:
                vram = self._vram
                tiers["vram"] = {
                    "capacity": vram.capacity,
                    "used": vram.used,
                    "objects": sum(1 for e in self._index.values() if e.vram >= 0),
                    "device": vram.device,
                    "name": vram.cuda.name,
                    **vram.counters,
                }
            if self._gds is not None and "ssd" in tiers:
                tiers["ssd"]["gpudirect"] = self._gds.status()
            tiers["objects"] = len(self._index)
            return tiers

    def _reap_expired(self) -> None:
        now = time.time()
        heap = self._expiring
        while heap and heap[0][0] <= now:
            _, _, raw, entry = heapq.heappop(heap)
            if self._index.get(raw) is entry:
                self._remove(raw, entry)

    # -- batches ----------------------------------------------------------------------------------------

    def batch_put(
        self,
        items: Mapping[Key, Any] | Iterable[tuple[Key, Any]],
        *,
        pin: bool = False,
        ttl: float | None = None,
        if_absent: bool = False,
        durable: bool = False,
        version: int = 0,
        if_newer: bool = False,
        tag: int = 0,
        replicas: int | None = None,
        placement: str | None = None,
    ) -> list[Any]:
        """Put many values; one result per item, in order: None, or the exception that item raised.
        The options are ``put``'s, for every item: a bad one (or an item that is not a (key, value)
        pair) fails the whole call, before anything is stored.

        Consecutive values of up to BATCH_LOCKED_MAX bytes are stored under one acquisition of the lock
        per MiB (BATCH_LOCKED_BYTES): KV-cache blocks of 64 KiB cost a lock round trip each otherwise.
        Items are taken to be a chain (a KV-cache prefix, as match_prefix reads it): the new values of
        a run are queued for eviction last item first, so that a chain's tail goes before its head.

        An instance's ``batch_put`` is ``PlainPath.batch_put`` (``_init_state``): it calls this with
        options only."""
        options = put_options(pin, ttl, if_absent, durable, version, if_newer, tag, replicas, placement)
        if options is not PLAIN_PUT:
            options.single_store("batch_put", "embedded store", self.path)
        return self._batch_put(items, options)

    def _batch_put(self, items: Any, options: PutOptions) -> list[Any]:
        """``batch_put`` with its options checked (what a node passes on from the wire: a list of pairs)."""
        if options is PLAIN_PUT:  # the KV-cache case: a batch of small values is one C call, checks included
            return self._plain.batch_put(items)
        return self._batch_put_general(items, options)

    def _batch_put_general(self, items: Any, options: PutOptions) -> list[Any]:
        """``_batch_put`` of what ``PlainPath.batch_put`` leaves to it: a value that is not small, items to
        say what is wrong with, or options."""
        pairs = put_pairs(items)  # says what is wrong with items
        results: list[Any] = []
        small: list[tuple[int, bytes, Key, Entry, Any]] = []  # a run waiting for the lock
        plain = not (options.pin or options.durable or options.ttl is not None or options.version or options.tag)
        at = 0
        while at < len(pairs):
            if plain:  # the values of a run prepared in one call, up to the first one too large for it
                at = self._plain.prepare_run(pairs, at, results, small)
            else:
                at = self._prepare_run(pairs, at, results, small, options)
            if at == len(pairs):
                break
            key, value = pairs[at]  # too large for a run: the run so far goes first, then it alone
            at += 1
            try:
                raw, entry = self._prepare_put(key, _engine.nbytes(value), options)
                self._put_run(small, results, options, plain)
                self._put_prepared(raw, key, entry, value, options)
            except StoreClosed:
                raise
            except BATCH_ERRORS as exc:
                results[-1] = exc
        self._put_run(small, results, options, plain)
        return results

    def _prepare_run(
        self,
        pairs: list[tuple[Key, Any]],
        at: int,
        results: list[Any],
        run: list[tuple[int, bytes, Key, Entry, Any]],
        options: PutOptions,
    ) -> int:
        """``PlainPath.prepare_run`` for any options: a slot in ``results`` for each of ``pairs[at:]`` and
        an item in ``run`` for each value of up to BATCH_LOCKED_MAX bytes; returns the index of the first
        larger one (its slot added), or ``len(pairs)``."""
        while at < len(pairs):
            key, value = pairs[at]
            results.append(None)
            try:
                try:
                    size = _engine.nbytes(value)
                except TypeError:
                    raise value_error(value) from None
                if size > BATCH_LOCKED_MAX:
                    return at
                raw, entry = self._prepare_put(key, size, options)
                run.append((at, raw, key, entry, value))
            except BATCH_ERRORS as exc:
                results[at] = exc
            at += 1
        return at

    def _put_run(
        self,
        run: list[tuple[int, bytes, Key, Entry, Any]],
        results: list[Any],
        options: PutOptions,
        plain: bool = False,
    ) -> None:
        """Store a run of prepared values under the lock, taken once per MiB (``PlainPath.put_run``), the
        run's head left the newest of the fresh queue; then empty the run.  ``plain``: no item is
        pinned, expiring, versioned or tagged."""
        self._plain.put_run(run, results, options, plain and options.replace is Replace.ALWAYS)
        run.clear()

    def batch_get_into(self, keys: Iterable[Key], buffers: Iterable[Any]) -> list[Any]:
        """get_into for many keys; one result per key: the byte count, or the exception for that key."""
        results = self._plain.batch_get_into(keys, buffers)  # lists of keys and buffers: one C call
        if results is None:
            results = self._plain.batch_get_into(*batch_targets(keys, buffers))  # raises what is wrong
        return results

    def _copy_into(self, key: Key, entry: Entry, buffer: Any) -> int | None:
        """A DRAM value into ``buffer`` where ``PlainPath.read_batch`` could not copy it (lock held):
        BufferTooSmall, or why the buffer is refused, as ``get_into`` says it; None for a GPU buffer
        (``get_into`` takes it, one key at a time)."""
        try:
            room = _engine.nbytes(buffer)
            if entry.size > room:
                raise BufferTooSmall(key, entry.size, room)
            return self._dram.arena.read_into(entry.dram_off, entry.size, buffer)
        except TypeError:
            if is_gpu_buffer(buffer):
                return None
            raise_buffer_error(buffer)
            raise

    def batch_get(self, keys: Iterable[Key]) -> list[bytes | None]:
        """The values of many keys, None for each key that is missing (or invalid, or corrupted)."""
        keys = list(key_list(keys, "batch_get"))
        results = self._plain.read_batch(keys, None)  # under the lock, once per MiB copied
        out = [self._each(self.get, keys[i]) if r is None else r for i, r in enumerate(results)]
        values = [None if isinstance(v, Exception) else v for v in out]
        keep_freed(sum(map(len, filter(None, values))))
        return values

    def batch_exists(self, keys: Iterable[Key]) -> list[bool]:
        out = [self._each(self.exists, key) for key in key_list(keys, "batch_exists")]
        return [v is True for v in out]

    # -- the mapping protocol (the rest is KVMapping's) -------------------------------------------------

    def __contains__(self, key: object) -> bool:
        try:
            return self.exists(key)  # type: ignore[arg-type]
        except InvalidKey:
            return False

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            self._reap_expired()
            return len(self._index)


def open(
    path: str | Path | None = None, *, dram: int | str = "1GiB", ssd: int | str | None = None, **options: Any
) -> Store:
    """Open (creating if needed) the store in ``path`` (default: $MOONCAKEFS_DATA or
    ~/.local/share/mooncakefs) with a DRAM pool of ``dram`` bytes and, if ``ssd`` is given, an SSD tier.
    ``ssd`` is a size ("20GiB", in ``ssd_dir``), or a raw block device: "/dev/nvme1n1" (all of it) or
    "/dev/nvme1n1:2TiB" (docs/nvme-of.md).

    Options: ssd_dir (default <path>/ssd; a block device there is used raw), ssd_format (False: a block
    device that holds anything but this store's SSD tier is refused; True formats it, erasing it),
    segment_size ("64MiB"), high_watermark (0.95),
    low_watermark (0.85), promote_after (2 SSD hits), prefault (False: back the whole DRAM pool with
    memory in a background thread now, rather than page by page on first use), vram (a VRAM tier of this
    size on GPU ``device``: needs ``pip install 'mooncakefs[cuda]'`` and an NVIDIA GPU), device (0),
    gpu_verify ("first": which SSD -> GPU reads through cuFile are checked against the value's CRC-32C,
    by a copy back to the host: the first of each value since open, "always", or "never"; tiers/gds.py)."""
    return Store(path, dram=dram, ssd=ssd, **options)
