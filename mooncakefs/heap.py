"""Keep the heap that values free, so that the next values do not fault it in again.

A value read as bytes takes new heap; when its caller drops it, glibc gives the top of its heap back to
the kernel once more than its trim threshold is free there (128 KiB, or twice the largest block it has
had to mmap, at most 64 MiB), and the next value's pages come back as fresh faults, zeroed.  A batch
frees many values at once and always crossed it: ``batch_get`` of 256 KiB - 16 MiB values ran at
0.06-0.3x the rate of single gets of the same values (docs/performance.md, "Values and the heap").  glibc
raises its thresholds by itself for one large block, never for many freed together, and only once it
has had to mmap one: ``keep_values`` sets them where glibc's own rule ends when a store or client
opens, and ``keep_freed`` raises them for the largest batch the process has been handed.

The most kept is ``MOONCAKEFS_HEAP_KEEP`` (a size; 0 leaves glibc's thresholds alone), by default 1 GiB
or a sixteenth of the machine's memory, whichever is less.  Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

from mooncakefs.units import parse_size

MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own dynamic threshold (64-bit): blocks above it are mmapped
TRIM_FLOOR = 2 * MMAP_THRESHOLD  # the ceiling of glibc's own dynamic trim threshold
KEEP_MIN = 1 << 20  # a batch smaller than this is left to glibc's own rule
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def _default_keep() -> int:
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        memory = 16 << 30
    return min(1 << 30, memory // 16)


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")  # None, or it raises, where the C library is another
    except (OSError, ValueError):
        glibc = None
    if not glibc:
        return None
    call = ctypes.CDLL(None).mallopt
    call.argtypes, call.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return call


_env = os.environ.get("MOONCAKEFS_HEAP_KEEP")
try:
    KEEP_MAX = min(_default_keep() if _env is None else parse_size(_env), 2**31 - 1)  # mallopt takes an int
except ValueError as exc:
    raise ImportError(f"MOONCAKEFS_HEAP_KEEP={_env!r}: {exc}") from None
_set = _mallopt() if KEEP_MAX else None
_lock = threading.Lock()
_kept = 0  # the trim threshold this module last set; 0: glibc's own


def trim_threshold_for(nbytes: int, kept: int, most: int = KEEP_MAX) -> int:
    """The trim threshold that keeps a batch of ``nbytes`` freed at once, or 0 where the one in force
    (``kept``, 0 for glibc's own) already does, the batch is too small to matter, or ``most`` is 0."""
    if nbytes < KEEP_MIN or not most:
        return 0
    want = min(max(2 * nbytes, TRIM_FLOOR), most)
    return want if want > kept else 0


def keep_freed(nbytes: int) -> None:
    """A batch of ``nbytes`` of values was just handed out: keep twice as much freed heap (at most
    ``KEEP_MAX``), so that the next batch reuses it.  Thresholds only ever go up."""
    global _kept
    if _set is None or not (want := trim_threshold_for(nbytes, _kept)):
        return
    with _lock:
        if want > _kept and _set(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _set(_M_TRIM_THRESHOLD, want):
            _kept = want


def keep_values() -> None:
    """What a store or client does when it opens: keep the heap that values of up to 32 MiB free, as glibc
    itself does once it has freed one block of 32 MiB.  Before that, glibc's thresholds follow the
    process's history: a client reading 1 MiB values from a node (``RemoteStore.get``) found them low
    enough to hand the heap back and fault it in again at nearly every get, at a quarter to a third of
    the rate."""
    keep_freed(MMAP_THRESHOLD)


def kept() -> int:
    """The trim threshold this module set, 0 while glibc's own is in force."""
    return _kept
