"""The ``local`` transports: same host, no socket on the data path.

``LocalTransport``: a node's pool is mapped into this process, so a transfer is a memcpy.
``ProcessTransport``: a transfer engine peer on this host (memfd mapping or ``process_vm_readv/writev``).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable

from mooncakefs import _engine
from mooncakefs.errors import MooncakeError, TransferError, Unavailable
from mooncakefs.transfer.core import READ, WRITE, Progress, Transfer, Transport
from mooncakefs.transfer.memory import PeerTable, read_version

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
        self._maps: dict[int, tuple[mmap.mmap, memoryview, int]] = {}  # peer memfd -> (map, view, peer addr)
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
                for m, view, _addr in self._maps.values():
                    view.release()
                    m.close()
                self._maps.clear()
            table = self._table = PeerTable(rows, version)
        return table

    def _mapped(self, row: list[int]) -> tuple[memoryview, int]:
        addr, length, _writable, memfd = row
        with self._lock:
            hit = self._maps.get(memfd)
            if hit is None or hit[2] != addr:
                path = f"/proc/{self.pid}/fd/{memfd}"
                if not os.readlink(path).startswith("/memfd:mooncakefs-te-buffer"):
                    raise OSError(errno.ESTALE, f"{path} is no longer the peer's buffer")
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    size = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
                    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)
                hit = self._maps[memfd] = (m, memoryview(m), addr)
            return hit[1], hit[2]

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
                    view, base = self._mapped(row)
                    theirs = view[remote - base : remote - base + len(t.buffer)]
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

    def _give_up(self, transfers: list[Transfer], batch: Progress, exc: BaseException) -> None:
        """The kernel will not let us reach the peer's memory: tcp from now on."""
        if self.enabled:
            self.enabled = False
            log.warning("same-host path to %s unusable (%s): using tcp", self.peer, exc)
        batch.add_parts(sum(self._fallback.parts(t) - 1 for t in transfers))
        self._fallback.submit(transfers, batch)

    def close(self) -> None:
        with self._lock:
            for m, view, _addr in self._maps.values():
                view.release()
                m.close()
            self._maps.clear()
        self._version_view.release()
        self._version_map.close()
