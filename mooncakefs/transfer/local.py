"""The ``local`` transport: the peer's pool is mapped into this process, so a transfer is a memcpy."""

from __future__ import annotations

from mooncakefs import _engine
from mooncakefs.transfer import READ, Batch, Transfer


class LocalTransport:
    """Copies between local buffers and a mapped shared-memory pool (the GIL is released for the copy)."""

    name = "local"

    def __init__(self, pool: memoryview) -> None:
        self.pool = pool

    def accepts(self, transfer: Transfer) -> bool:
        return transfer.region.pool_offset >= 0

    def parts(self, transfer: Transfer) -> int:
        return 1

    def submit(self, transfers: list[Transfer], batch: Batch) -> None:
        """Runs the copies now, in the caller's thread: nothing is faster than starting at once."""
        for t in transfers:
            start = t.region.pool_offset + t.offset
            remote = self.pool[start : start + len(t.buffer)]
            if len(remote) != len(t.buffer):
                batch.fail(ValueError(f"region at {start} (+{len(t.buffer)}) runs past the "
                                      f"{len(self.pool)}-byte pool"))
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
