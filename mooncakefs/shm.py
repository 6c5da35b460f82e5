"""Shared memory for same-host copies: memfds on the largest pages the host lends.

Same-host paths copy between a process's own buffers and a memfd another process maps (the node's DRAM
pool, a transfer engine's managed buffer).  numpy and glibc put large buffers on 2 MiB transparent huge
pages where THP is ``madvise`` or ``always``, but a memfd is shmem, which keeps 4 KiB pages unless the
host says otherwise; a copy between the two then misses the TLB every 4 KiB on the memfd side, which
costs most in a virtual machine (two levels of page tables to walk).  The benchmarks note the host's
settings beside their same-host rows (``tools/bench/_common.py``: ``page_settings``).

``create`` takes, in order:

1. ``MFD_HUGETLB``: explicit huge pages, where the host has reserved enough (``vm.nr_hugepages``);
   the kernel refuses otherwise, and the next is tried without a word.
2. A plain memfd with ``madvise(MADV_HUGEPAGE)``: transparent huge pages, which the kernel grants to
   shmem only when ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` is ``advise`` (this advice),
   ``within_size`` or ``always``.  With ``never`` (many distributions' default) the pages stay 4 KiB.

Both are the host's choice; nothing here changes host settings.  ``MOONCAKEFS_HUGEPAGES=off`` skips
both (4 KiB pages, as before).  A process mapping another's memfd calls ``advise_huge`` on its mapping,
so its page tables can map the huge pages whole.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGE = 2 << 20
HUGEPAGES_ENV = "MOONCAKEFS_HUGEPAGES"
SHMEM_THP = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
ANON_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGETLB_FREE = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
HUGETLB, THP, SMALL = "hugetlb", "thp", "4k"  # what a SharedMemory's pages are (THP: as far as the host grants)


@dataclass
class SharedMemory:
    """A memfd mapped read-write here.  ``pages`` says which kind backs it (``HUGETLB``, ``THP``: huge
    pages advised and allowed by the host, ``SMALL``); ``length`` may exceed the size asked for (hugetlb
    memory comes in whole huge pages)."""

    fd: int
    map: mmap.mmap
    length: int
    pages: str

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def huge_pages_wanted() -> bool:
    """Whether to try huge pages at all (``MOONCAKEFS_HUGEPAGES``: ``auto``, the default, or ``off``)."""
    value = os.environ.get(HUGEPAGES_ENV, "auto").strip().lower()
    if value not in ("auto", "off"):
        raise ValueError(f"{HUGEPAGES_ENV}={value!r}: expected 'auto' or 'off'")
    return value == "auto"


def shmem_thp_mode() -> str:
    """The host's transparent-huge-page policy for shmem, ``never`` where the kernel has no THP."""
    return _policy(SHMEM_THP)


def free_hugetlb_bytes() -> int:
    """Bytes of reserved 2 MiB huge pages free now (what ``MFD_HUGETLB`` memory can come from)."""
    try:
        return int(HUGETLB_FREE.read_text()) * HUGE_PAGE
    except (OSError, ValueError):
        return 0


def _policy(path: Path) -> str:
    """The chosen word of a sysfs policy file (``always [madvise] never``: ``madvise``), ``never`` if absent."""
    try:
        text = path.read_text()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "never"


def create(label: str, size: int) -> SharedMemory:
    """A memfd of at least ``size`` bytes, mapped here, on huge pages where the host lends them."""
    if type(size) is not int or size <= 0:
        raise ValueError(f"shared memory needs a positive size, got {size!r:.40}")
    huge = huge_pages_wanted() and size >= HUGE_PAGE
    if huge:
        made = _hugetlb(label, size)
        if made is not None:
            return made
    length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    fd = os.memfd_create(label, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    pages = SMALL
    if huge and advise_huge(m) and shmem_thp_mode() in ("advise", "within_size", "always", "force"):
        pages = THP
    return SharedMemory(fd, m, length, pages)


def _hugetlb(label: str, size: int) -> SharedMemory | None:
    """The memfd on reserved huge pages, or None where there are none to be had (no hugetlbfs, none
    reserved, too few free: the kernel says so at ``mmap``)."""
    flag = getattr(os, "MFD_HUGETLB", 0)
    if not flag:
        return None
    length = -(-size // HUGE_PAGE) * HUGE_PAGE
    try:
        fd = os.memfd_create(label, os.MFD_CLOEXEC | flag)
    except OSError:
        return None
    try:
        os.ftruncate(fd, length)
        m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        return None
    return SharedMemory(fd, m, length, HUGETLB)


def map_whole(fd: int, at_least: int) -> mmap.mmap:
    """Map another process's memfd read-write, all of it, advised for huge pages.  All of it: a memfd
    on reserved huge pages is whole 2 MiB pages, and an unmap of a shorter length fails (EINVAL, which
    ``mmap.close`` ignores), so a mapping of just what the user asked for would outlive its close."""
    size = os.fstat(fd).st_size
    if size < at_least:
        raise OSError(errno.ESTALE, f"shared memory of {size} bytes where {at_least} were promised")
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    advise_huge(m)  # the owner's huge pages mapped whole here too
    return m


def advise_huge(m: mmap.mmap) -> bool:
    """Ask for transparent huge pages on a shared mapping (advice: False where the kernel refuses it)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    with contextlib.suppress(OSError, ValueError):
        m.madvise(mmap.MADV_HUGEPAGE)
        return True
    return False


def host_pages() -> str:
    """The host's huge-page settings that decide a same-host copy's pages, in words (for benchmark notes):
    what memfds get (``create``) and what anonymous memory (numpy's buffers) gets."""
    return (
        f"shared memory: {free_hugetlb_bytes() // HUGE_PAGE} free reserved 2 MiB pages, shmem THP "
        f"'{shmem_thp_mode()}'{'' if huge_pages_wanted() else f' ({HUGEPAGES_ENV}=off)'}; anonymous memory "
        f"THP '{_policy(ANON_THP)}'"
    )
