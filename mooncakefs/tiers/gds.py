"""SSD -> VRAM reads: GPUDirect Storage through cuFile, or pread + a host-to-device copy without it.

cuFile (``cuda.bindings.cufile``, whose library ships in the ``nvidia-cufile-cu12`` wheel) reads a file
straight into device memory.  With the ``nvidia-fs`` kernel driver loaded and a filesystem or device
it supports, the NVMe DMA lands in GPU memory ("gds"); without the driver, cuFile's compatibility mode
reads through a host bounce buffer inside the library ("compat") -- correct, not faster.  Which one we
got is reported (``mode``, ``why``), and shown by ``stats()`` and ``mooncakefs status``.  Where cuFile
cannot be used at all, reads fall back to ``pread`` into pinned memory and a copy to the device
("pread+h2d"), saying why.

Each segment file (or the raw device, for an SSD tier on a block device) is registered once
(``cuFileHandleRegister`` on an O_DIRECT descriptor) and kept until it is deleted or the store closes.

Checksums.  A cuFile read lands in device memory, where there is no CRC-32C to run (we ship no GPU
kernels), so checking it costs a copy back to the host: ``verify`` says when that copy is made.
"first" (the default): the first cuFile read of each value on SSD since the store opened is copied
back through pinned staging and checked against the value's CRC-32C; later reads of the same bytes are
not.  "always": every read is checked (a second PCIe transfer per read).  "never": none is.  Why
"first" is enough: an SSD location is written once (segments are append-only, a value is never
rewritten in place, and a value moved by compaction is a new location, checked again), so what can be
wrong with its bytes is wrong before the first read (a write torn by a crash, a bug in the offsets, a
device or file changed under us while the store was closed) and that read catches it; what can go wrong
later, the medium decaying, NVMe's own ECC detects and cuFile reports as a failed read, which raises.
Silent corruption after the first read (a controller returning wrong bytes without an error) is not
caught: ``verify="always"`` is for those who will pay for it.  The "pread+h2d" path checks every read
(the bytes pass through the host anyway).

``cuFileRead`` is called through ctypes: the cuda.bindings wrapper (12.9) drops its return value, the
byte count, which a read must check.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

from mooncakefs import _engine
from mooncakefs._engine import Entry
from mooncakefs.errors import ChecksumError
from mooncakefs.gpu import STAGING_CHUNK, Cuda
from mooncakefs.tiers.ssd import Segment

NVIDIA_FS = Path("/sys/module/nvidia_fs")  # present while the nvidia-fs kernel driver is loaded

GDS, COMPAT, FALLBACK = "gds", "compat", "pread+h2d"
VERIFY_MODES = ("first", "always", "never")  # which cuFile reads are checked against the CRC-32C


def describe_mode(cufile_loaded: bool, nvidia_fs: bool, forced_compat: bool) -> tuple[str, str]:
    """(mode, why) from what was found: the rule ``GpuDirect`` reports by, kept apart to be tested."""
    if not cufile_loaded:
        return FALLBACK, "cuFile is not available"
    if forced_compat:
        return COMPAT, "cuFile is configured to force compatibility mode (CUFILE_FORCE_COMPAT_MODE / cufile.json)"
    if not nvidia_fs:
        return COMPAT, "the nvidia-fs kernel driver is not loaded: cuFile reads through a host bounce buffer"
    return GDS, "nvidia-fs is loaded: reads go from the NVMe device into GPU memory"


class GpuDirect:
    """Reads of SSD-tier values into device memory for one GPU (``cuda``).  Not thread-safe on its own:
    registration runs under the store's lock; reads may run without it."""

    def __init__(self, cuda: Cuda, verify: str = "first") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"gpu_verify must be one of {VERIFY_MODES}, got {verify!r:.40}")
        self.cuda = cuda
        self.verify = verify
        # segment id -> offsets of its values whose cuFile read passed the check ("first"); a segment's
        # set goes with it (released), and segment ids are never reused while the store is open
        self.verified: dict[int, set[int]] = {}
        self.checked = 0  # cuFile reads checked against their CRC-32C (a copy to the host each)
        self.handles: dict[str, tuple[int, int, bool]] = {}  # name -> (cuFile handle, fd, fd is ours)
        self._descr: list[Any] = []  # the CUfileDescr_t each handle was registered from, kept alive
        self._read: Any = None
        self._cufile: Any = None
        self.library = ""  # the libcufile.so.0 loaded
        opened = None
        try:
            from cuda.bindings import cufile
            from cuda.pathfinder import load_nvidia_dynamic_lib

            cufile.driver_open()
            opened = cufile
            self.library = load_nvidia_dynamic_lib("cufile").abs_path
            # use_errno: a read that fails with -1 left its reason in errno (a filesystem error)
            self._read = ctypes.CDLL(self.library, use_errno=True).cuFileRead
            self._read.restype = ctypes.c_ssize_t
            self._read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int64]
            self._cufile = cufile
        except Exception as exc:  # ImportError, the library missing, cuFileDriverOpen refusing
            if opened is not None:  # opened, then the library could not be found: close it again
                with contextlib.suppress(Exception):
                    opened.driver_close()
            self.mode, self.why = FALLBACK, f"cuFile is not available ({type(exc).__name__}: {exc})"
            return
        try:
            forced = bool(cufile.get_parameter_bool(cufile.BoolConfigParameter.FORCE_COMPAT_MODE))
        except Exception:  # an older libcufile without the parameter API: its default, not forced
            forced = False
        self.mode, self.why = describe_mode(True, NVIDIA_FS.exists(), forced)

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "why": self.why,
            "registered": len(self.handles),
            "library": self.library,
            "verify": self.verify,
            "checked": self.checked,
        }

    def _handle(self, seg: Segment) -> tuple[int, int]:
        """The segment's cuFile handle (registered on first use) and where its values start."""
        name, fd, base = seg.place.gpu_source()
        known = self.handles.get(name)
        if known is not None:
            return known[0], base
        cufile = self._cufile
        ours = fd < 0
        if ours:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # a filesystem without O_DIRECT: cuFile's compatibility mode still reads it
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        descr = cufile.Descr()
        descr.type = cufile.FileHandleType.OPAQUE_FD
        descr.handle.fd = fd
        descr.fs_ops = 0
        try:
            handle = cufile.handle_register(descr.ptr)
        except BaseException:
            if ours:
                os.close(fd)
            raise
        self._descr.append(descr)
        self.handles[name] = (handle, fd, ours)
        return handle, base

    def released(self, seg: Segment) -> None:
        """The SSD tier let a deleted segment go (``SsdTier.on_release``): deregister its file.  The raw
        device's one registration stays (its name is the device's, not the segment's)."""
        self.verified.pop(seg.id, None)
        name, fd, _ = seg.place.gpu_source()
        if fd < 0:
            self.forget(name)

    def forget(self, name: str) -> None:
        """Deregister a file (and close the descriptor we opened for it)."""
        known = self.handles.pop(name, None)
        if known is not None:
            self._cufile.handle_deregister(known[0])
            if known[2]:
                os.close(known[1])

    def prepare(self, seg: Segment) -> Any:
        """Register the segment now (under the store's lock); returns what ``read`` needs."""
        if self.mode == FALLBACK:
            return None
        try:
            return self._handle(seg)
        except Exception as exc:  # this file cannot be registered (its filesystem): read it the host way
            self.why = f"{self.why}; {seg.place.name} could not be registered ({exc}), read by pread+h2d"
            return None

    def read(self, entry: Entry, seg: Segment, prepared: Any, dst: int) -> str:
        """Read the entry's value from ``seg`` into device address ``dst``; returns the path taken."""
        if prepared is None:
            self._read_through_host(entry, seg, dst)
            return FALLBACK
        handle, base = prepared
        done, size = 0, entry.size
        with self.cuda.active:  # cuFile reads in the current context
            # a DLPack producer ordered its work on ``dst`` before our stream, but cuFile's read is not
            # issued on it: wait for that stream first
            self.cuda.sync()
            while done < size:
                n = self._read(handle, dst, size - done, base + entry.seg_off + done, done)
                if n == -1:  # a system error: its errno says which (-n is no cuFile status here)
                    err = ctypes.get_errno()
                    raise OSError(err, f"cuFileRead of {seg.place.name} failed: {os.strerror(err)}")
                if n < 0:  # a cuFile status, negated
                    raise OSError(f"cuFileRead of {seg.place.name} failed: {self._cufile.op_status_error(-n)}")
                if n == 0:
                    raise OSError(f"segment {seg.place.name} ends before offset {entry.seg_off + size}")
                done += n
        if self._must_check(entry, seg):
            self._check_on_host(entry, dst)
            self.verified.setdefault(seg.id, set()).add(entry.seg_off)  # before released(seg): we hold a lease
        return self.mode

    def _must_check(self, entry: Entry, seg: Segment) -> bool:
        """Whether this cuFile read is checked (``verify``; a value with no CRC-32C cannot be)."""
        if self.verify == "never" or entry.crc < 0:
            return False
        return self.verify == "always" or entry.seg_off not in self.verified.get(seg.id, ())

    def _check_on_host(self, entry: Entry, dst: int) -> None:
        """Copy the value just read into device memory at ``dst`` back through pinned staging, chunk by
        chunk, and check its CRC-32C."""
        cuda, size = self.cuda, entry.size
        view = self._staging()
        crc = 0
        with cuda.lock:  # the staging buffer is the device's: one user at a time
            for done in range(0, size, STAGING_CHUNK):
                n = min(STAGING_CHUNK, size - done)
                cuda.d2h(cuda.staging[1], dst + done, n)  # pinned: a direct copy
                crc = _engine.crc32c(view[:n], crc)
            self.checked += 1
        if crc != entry.crc:
            raise ChecksumError("the SSD copy fails its CRC-32C check (corrupted on disk)")

    def _staging(self) -> memoryview:
        """The pinned staging buffer SSD reads use (the second: the device's copies use the first)."""
        return memoryview((ctypes.c_char * STAGING_CHUNK).from_address(self.cuda.staging[1])).cast("B")

    def _read_through_host(self, entry: Entry, seg: Segment, dst: int) -> None:
        """pread into pinned staging, checked against the value's CRC-32C, then copied to the device."""
        cuda = self.cuda
        view = self._staging()
        with cuda.lock:  # the staging buffer is the device's: one reader at a time
            crc = self._stage_chunks(entry, seg, dst, view)
        if crc != entry.crc:
            raise ChecksumError("the SSD copy fails its CRC-32C check (corrupted on disk)")

    def _stage_chunks(self, entry: Entry, seg: Segment, dst: int, view: memoryview) -> int:
        """pread the value chunk by chunk into ``view`` (pinned), copying each to ``dst``; its CRC-32C."""
        cuda, size = self.cuda, entry.size
        crc = 0
        for done in range(0, size, STAGING_CHUNK):
            n = min(STAGING_CHUNK, size - done)
            got = 0
            while got < n:
                k = seg.place.read_into(view[got:n], entry.seg_off + done + got)
                if k == 0:
                    raise OSError(f"segment {seg.place.name} ends before offset {entry.seg_off + size}")
                got += k
            crc = _engine.crc32c(view[:n], crc)
            cuda.h2d(dst + done, cuda.staging[1], n)  # pinned: a direct copy
        return crc

    def close(self) -> None:
        for name in list(self.handles):
            with contextlib.suppress(Exception):
                self.forget(name)
        self._descr.clear()
        if self._cufile is not None:
            with contextlib.suppress(Exception):
                self._cufile.driver_close()
