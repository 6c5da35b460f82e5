"""Shared memory on the largest pages the host lends (``mooncakefs.shm``): explicit huge pages where
reserved, transparent ones where the host allows them for shmem, 4 KiB pages otherwise, with no error
in any case; ``MOONCAKEFS_HUGEPAGES=off`` keeps 4 KiB pages.  The users (the node's DRAM pool, the
transfer engine's managed buffers) work on whichever they got."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from mooncakefs import shm
from mooncakefs.tiers.dram import DramTier
from mooncakefs.transfer.memory import ManagedBuffer

MiB = 1 << 20


def shmem_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Pretend the host's shmem THP policy is ``text`` (as the kernel writes it)."""
    fake = tmp_path / "shmem_enabled"
    fake.write_text(text + "\n")
    monkeypatch.setattr(shm, "SHMEM_THP", fake)


def usable(memory: shm.SharedMemory, size: int) -> None:
    """The memory holds what is written to it, through this mapping and through a second one of its fd."""
    assert memory.length >= size
    data = np.frombuffer(memory.map, dtype=np.uint8)[:size]
    data[:] = np.arange(size, dtype=np.uint64).view(np.uint8)[:size] if size % 8 == 0 else 7
    again = mmap.mmap(memory.fd, size)
    try:
        assert again[: min(size, 4096)] == memory.map[: min(size, 4096)]
        assert again[size - 16 : size] == memory.map[size - 16 : size]
    finally:
        again.close()


def test_without_reserved_huge_pages_a_memfd_on_small_or_transparent_pages_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refusing MFD_HUGETLB (no hugetlbfs) or its mmap (none reserved: ENOMEM) is no error:
    the memory comes from a plain memfd, advised for THP, which it is said to have only where the host's
    shmem policy grants it."""
    real_create = os.memfd_create

    def no_hugetlb(name: str, flags: int = 0) -> int:
        if flags & os.MFD_HUGETLB:
            raise OSError(errno.EINVAL, "no hugetlbfs")
        return real_create(name, flags)

    monkeypatch.setattr(os, "memfd_create", no_hugetlb)
    shmem_policy(tmp_path, monkeypatch, "always within_size [advise] never deny force")
    memory = shm.create("mooncakefs-test", 4 * MiB)
    assert memory.pages == shm.THP
    usable(memory, 4 * MiB)
    memory.close()
    shmem_policy(tmp_path, monkeypatch, "always within_size advise [never] deny force")
    memory = shm.create("mooncakefs-test", 4 * MiB + 5)
    assert (memory.pages, memory.length) == (shm.SMALL, 4 * MiB + 4096)
    usable(memory, 4 * MiB + 5)
    memory.close()
    monkeypatch.undo()

    real_mmap = mmap.mmap

    def none_reserved(fd: int, length: int, *args: object, **kwargs: object) -> mmap.mmap:
        """As the kernel answers where no huge pages are reserved (which it does itself on most hosts)."""
        if os.fstat(fd).st_blksize >= shm.HUGE_PAGE:  # a hugetlbfs file
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real_mmap(fd, length, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", none_reserved)
    before = set(os.listdir("/proc/self/fd"))
    memory = shm.create("mooncakefs-test", 2 * MiB)
    assert memory.pages in (shm.THP, shm.SMALL)
    usable(memory, 2 * MiB)
    memory.close()
    assert set(os.listdir("/proc/self/fd")) == before  # the refused memfd was closed, not leaked


def test_huge_pages_off_keeps_small_pages_and_a_bad_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm.HUGEPAGES_ENV, "off")
    memory = shm.create("mooncakefs-test", 4 * MiB)
    assert memory.pages == shm.SMALL
    usable(memory, 4 * MiB)
    memory.close()
    monkeypatch.setenv(shm.HUGEPAGES_ENV, "sometimes")
    with pytest.raises(ValueError, match="MOONCAKEFS_HUGEPAGES='sometimes': expected 'auto' or 'off'"):
        shm.create("mooncakefs-test", 4 * MiB)
    monkeypatch.delenv(shm.HUGEPAGES_ENV)
    small = shm.create("mooncakefs-test", 4096)  # below one huge page: never asked for
    assert small.pages == shm.SMALL
    small.close()
    with pytest.raises(ValueError, match="positive size"):
        shm.create("mooncakefs-test", 0)


def test_the_shmem_policy_is_read_from_the_bracketed_word(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shmem_policy(tmp_path, monkeypatch, "always within_size advise [never] deny force")
    assert shm.shmem_thp_mode() == "never"
    shmem_policy(tmp_path, monkeypatch, "[always] within_size advise never deny force")
    assert shm.shmem_thp_mode() == "always"
    monkeypatch.setattr(shm, "SHMEM_THP", tmp_path / "absent")
    assert shm.shmem_thp_mode() == "never"


@pytest.mark.skipif(shm.free_hugetlb_bytes() < 8 * MiB, reason="no free reserved 2 MiB huge pages (vm.nr_hugepages)")
def test_reserved_huge_pages_back_the_pool_and_managed_buffers() -> None:
    """Where the host reserved huge pages, both users get them, in whole huge pages."""
    memory = shm.create("mooncakefs-test", 2 * MiB + 1)
    assert (memory.pages, memory.length) == (shm.HUGETLB, 4 * MiB)
    usable(memory, 2 * MiB + 1)
    memory.close()
    buf = ManagedBuffer(2 * MiB)
    assert buf.pages == shm.HUGETLB
    buf.close()
    tier = DramTier(2 * MiB)
    assert tier.pages == shm.HUGETLB and len(tier.view) == tier.capacity
    tier.close()


def _mapped_ranges(fd_name: str) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if fd_name in line]


@pytest.mark.skipif(shm.free_hugetlb_bytes() < 8 * MiB, reason="no free reserved 2 MiB huge pages (vm.nr_hugepages)")
def test_another_process_mapping_of_a_huge_paged_memfd_goes_at_close() -> None:
    """A 3 MiB pool is a 4 MiB memfd on huge pages; a client that mapped 3 MiB could never unmap it
    (munmap of a hugetlb mapping wants whole huge pages; mmap.close ignores the EINVAL), so each
    client or transfer-engine remap leaked the mapping and pinned its pages."""
    owner = shm.create("mooncakefs-map-whole", 3 * MiB)
    assert owner.pages == shm.HUGETLB
    before = len(_mapped_ranges("mooncakefs-map-whole"))
    for _ in range(3):
        m = shm.map_whole(owner.fd, 3 * MiB)
        m[3 * MiB - 1] = 7
        m.close()
    assert len(_mapped_ranges("mooncakefs-map-whole")) == before
    owner.close()


def test_a_memfd_shorter_than_promised_is_refused() -> None:
    owner = shm.create("mooncakefs-short", 64 * 1024)
    with pytest.raises(OSError) as caught:
        shm.map_whole(owner.fd, owner.length + 1)
    assert caught.value.errno == errno.ESTALE
    owner.close()


def test_the_pool_and_managed_buffers_say_which_pages_they_got(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm.HUGEPAGES_ENV, "off")
    tier = DramTier(4 * MiB)
    buf = ManagedBuffer(4 * MiB)
    assert tier.pages == buf.pages == shm.SMALL and len(tier.view) == tier.capacity == 4 * MiB
    tier.arena.write(64, b"pool")
    assert tier.arena.read(64, 4) == b"pool"
    tier.close()
    buf.close()
