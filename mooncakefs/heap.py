"""Keep the heap a batch of values frees, so that the next batch does not fault it in again.

``batch_get`` hands its caller many new bytes objects at once.  When the caller drops them, glibc finds
more free memory at the top of its heap than its trim threshold (128 KiB, or twice the largest block it
has had to mmap, at most 64 MiB) and gives it back to the kernel; the next batch then takes every page
again as a fresh fault, zeroed.  With 64 KiB - 16 MiB values that made ``batch_get`` 0.1-0.5x the rate
of the same values read one ``get`` at a time (docs/performance.md, "batch_get and the heap").  glibc
raises its thresholds by itself for one large block, never for many freed together: ``keep_freed``
raises them for the largest batch a process has been handed, as glibc would for one block that size.

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
    KEEP_MAX = _default_keep() if _env is None else parse_size(_env)
except ValueError as exc:
    raise ImportError(f"MOONCAKEFS_HEAP_KEEP={_env!r}: {exc}") from None
KEEP_MAX = min(KEEP_MAX, 2**31 - 1)  # mallopt takes an int
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
    """The caller was just handed ``nbytes`` of values in one batch: keep as much freed heap, so that
    the next batch reuses it.  Thresholds only ever go up."""
    global _kept
    if _set is None or not (want := trim_threshold_for(nbytes, _kept)):
        return
    with _lock:
        if want > _kept and _set(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _set(_M_TRIM_THRESHOLD, want):
            _kept = want


def kept() -> int:
    """The trim threshold this module set, 0 while glibc's own is in force."""
    return _kept
