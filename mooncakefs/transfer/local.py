"""The ``local`` transports: same host, no socket on the data path.

``LocalTransport``: a node's pool is mapped into this process, so a transfer is a memcpy.
``ProcessTransport``: a transfer engine peer on this host (memfd mapping or ``process_vm_readv/writev``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from mooncakefs import _engine, shm
from mooncakefs.errors import MooncakeError, TransferError, Unavailable
from mooncakefs.transfer.core import READ, WRITE, Batch, Progress, Transfer, Transport
from mooncakefs.transfer.memory import MANAGED_LABEL, PeerTable, read_version

log = logging.getLogger("mooncakefs.transfer")


class LocalTransport:
    """Copies between local buffers and a mapped shared-memory pool (the GIL is released for the copy)."""

    name = "local"

    def __init__(self, pool: memoryview) -> None:
        self.pool = pool

    def accepts(self, transfer: Transfer) -> bool:
        return transfer.region.pool_offset >= 0

    def parts(self, transfer: Transfer) -> int:
        return 1

    def submit(self, transfers: list[Transfer], batch: Progress) -> None:
        """Runs the copies now, in the caller's thread: nothing is faster than starting at once."""
        for t in transfers:
            start = t.region.pool_offset + t.offset
            remote = self.pool[start : start + len(t.buffer)]
            if len(remote) != len(t.buffer):
                batch.fail(ValueError(f"region at {start} (+{len(t.buffer)}) runs past the {len(self.pool)}-byte pool"))
                return
            try:
                if t.op == READ:
                    _engine.copy(t.buffer, remote)
                else:
                    _engine.copy(remote, t.buffer)
            except (ValueError, TypeError) as exc:
                batch.fail(exc)
                return
            batch.part_done(len(t.buffer))

    def close(self) -> None:
        self.pool.release()


class _PeerMapping(NamedTuple):
    """A peer's managed buffer mapped here: ``peer_addr`` in its address space is ``local_addr`` in ours."""

    map: mmap.mmap
    view: memoryview
    peer_addr: int
    local_addr: int

    def drop(self) -> None:
        """Unmap it, unless a copy still holds it (``copy_at`` pins it): then it goes with its last user."""
        self.view.release()
        with contextlib.suppress(BufferError):
            self.map.close()


class ProcessTransport:
    """A peer process on this host: its registered memory is reached without a socket.

    Per transfer: memory the peer allocated from a memfd (a managed buffer) is mapped here and copied with
    memcpy; other registered memory is copied by the kernel with ``process_vm_readv`` / ``writev`` (one
    syscall for a whole batch).  Every range is checked against the peer's published table first; the
    table is fetched again whenever the version the peer publishes in shared memory moves.  If the kernel
    refuses (another user, a ptrace policy), the transport turns itself off, says so once, and hands the
    transfers to ``fallback`` (tcp)."""

    name = "local"

    def __init__(
        self,
        pid: int,
        fetch_table: Callable[[], tuple[int, list[list[int]]]],
        version_fd: int,
        fallback: Transport,
        peer: str,
    ) -> None:
        self.pid, self.peer = pid, peer
        self._fetch = fetch_table
        self._fallback = fallback
        self._lock = threading.Lock()
        self._maps: dict[int, _PeerMapping] = {}  # by the peer's memfd
        self.enabled = True
        self.same_process = pid == os.getpid()
        fd = os.open(f"/proc/{pid}/fd/{version_fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._version_map = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._version_view = memoryview(self._version_map)
        self._table: PeerTable | None = None

    def accepts(self, transfer: Transfer) -> bool:
        return self.enabled

    def parts(self, transfer: Transfer) -> int:
        return 1

    def _current(self) -> PeerTable:
        version = read_version(self._version_view)
        table = self._table
        if table is None or table.version != version:
            version, rows = self._fetch()
            with self._lock:
                for mapping in self._maps.values():
                    mapping.drop()
                self._maps.clear()
            table = self._table = PeerTable(rows, version)
        return table

    def _mapped(self, row: list[int]) -> _PeerMapping:
        addr, length, _writable, memfd = row
        with self._lock:
            hit = self._maps.get(memfd)
            if hit is None or hit.peer_addr != addr:
                path = f"/proc/{self.pid}/fd/{memfd}"
                if not os.readlink(path).startswith(f"/memfd:{MANAGED_LABEL}"):
                    raise OSError(errno.ESTALE, f"{path} is no longer the peer's buffer")
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    m = shm.map_whole(fd, length)
                finally:
                    os.close(fd)
                view = memoryview(m)
                hit = self._maps[memfd] = _PeerMapping(m, view, addr, _engine.address(view))
            return hit

    def submit(self, transfers: list[Transfer], batch: Progress) -> None:
        """Copies now, in the caller's thread: the memfd and same-process blocks in one call with the GIL
        released once, the others with ``process_vm_readv/writev``."""
        try:
            table = self._current()
            rows = [table.find(t.region.handle + t.offset, len(t.buffer), t.op == WRITE) for t in transfers]
        except (MooncakeError, ValueError) as exc:  # refused before any byte moved
            batch.fail(exc)
            return
        except (OSError, Unavailable) as exc:
            self._give_up(transfers, batch, exc)
            return
        vm: list[Transfer] = []
        copied: list[Transfer] = []
        dsts: list[memoryview] = []
        srcs: list[memoryview] = []
        try:
            for t, row in zip(transfers, rows, strict=True):
                remote = t.region.handle + t.offset
                if self.same_process:
                    theirs = _engine.view_at(remote, len(t.buffer), t.op == WRITE)
                elif row[3] >= 0:
                    mapping = self._mapped(row)
                    start = remote - mapping.peer_addr
                    theirs = mapping.view[start : start + len(t.buffer)]
                else:
                    vm.append(t)
                    continue
                dsts.append(t.buffer if t.op == READ else theirs)
                srcs.append(theirs if t.op == READ else t.buffer)
                copied.append(t)
            if copied:  # one call, the GIL released once for every block
                _engine.copy_many(dsts, srcs)
                for t in copied:
                    batch.part_done(len(t.buffer))
            for op in (READ, WRITE):
                group = [t for t in vm if t.op == op]
                if group:
                    _engine.vm_copy(
                        self.pid,
                        [_engine.address(t.buffer) for t in group],
                        [t.region.handle + t.offset for t in group],
                        [len(t.buffer) for t in group],
                        op == WRITE,
                    )
                    for t in group:
                        batch.part_done(len(t.buffer))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                batch.fail(TransferError(f"{self.peer}: the peer process {self.pid} is gone"))
            elif exc.errno in (errno.EPERM, errno.EACCES):
                self._give_up(vm or transfers, batch, exc)
            else:
                batch.fail(TransferError(f"{self.peer}: same-host copy failed: {exc.strerror or exc}"))

    def copy_now(
        self, op: str, local_addrs: Sequence[int], remote_addrs: Sequence[int], lengths: Sequence[int]
    ) -> Batch | None:
        """A batch given as pointers, copied now in this thread: the engine's fast path, with no Transfer,
        route or memoryview per block (at 1 MiB x32 those cost ~10% of the copy).  The local ranges are
        the caller's to have checked; each remote one is checked here against the peer's table.  Returns
        the finished batch (failed if the peer refuses a range, before any byte moved), or None when the
        batch is not all memfd or same-process memory, or the peer's table cannot be had: the caller then
        takes the general path (``submit``), which also falls back to tcp."""
        if not self.enabled:
            return None
        write = op == WRITE
        dsts: list[int] = []
        srcs: list[int] = []
        sizes: list[int] = []
        pinned: dict[int, mmap.mmap] = {}
        batch = Batch(1)
        start, end, shift = 1, 0, 0  # the peer's range the last block fell in, and its offset here
        try:
            table = self._current()
            for local, remote, n in zip(local_addrs, remote_addrs, lengths, strict=True):
                if not n:
                    continue
                if not start <= remote <= remote + n <= end:  # a batch's blocks are usually in one range
                    row = table.find(remote, n, write)
                    start, end = row[0], row[0] + row[1]
                    if self.same_process:
                        shift = 0
                    elif row[3] >= 0:
                        mapping = self._mapped(row)
                        shift = mapping.local_addr - mapping.peer_addr
                        pinned[row[3]] = mapping.map
                    else:
                        return None  # ordinary memory of another process: process_vm, in submit
                theirs = remote + shift
                dsts.append(theirs if write else local)
                srcs.append(local if write else theirs)
                sizes.append(n)
        except (MooncakeError, ValueError) as exc:  # refused before any byte moved
            batch.fail(exc)
            return batch
        except (OSError, Unavailable):
            return None
        batch.nbytes = sum(sizes)
        try:
            _engine.copy_at(dsts, srcs, sizes, list(pinned.values()))
        except ValueError:  # a mapping was dropped meanwhile (the peer's table moved): nothing was copied
            return None
        batch.part_done(batch.nbytes)
        return batch

    def _give_up(self, transfers: list[Transfer], batch: Progress, exc: BaseException) -> None:
        """The kernel will not let us reach the peer's memory: tcp from now on."""
        if self.enabled:
            self.enabled = False
            log.warning("same-host path to %s unusable (%s): using tcp", self.peer, exc)
        batch.add_parts(sum(self._fallback.parts(t) - 1 for t in transfers))
        self._fallback.submit(transfers, batch)

    def close(self) -> None:
        with self._lock:
            for mapping in self._maps.values():
                mapping.drop()
            self._maps.clear()
        self._version_view.release()
        self._version_map.close()
