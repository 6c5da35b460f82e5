"""The data directory: where it is by default, and the lock that gives one process the use of it."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from mooncakefs.errors import StoreLocked


def default_path() -> Path:
    """$MOONCAKEFS_DATA, else $XDG_DATA_HOME/mooncakefs, else ~/.local/share/mooncakefs."""
    if env := os.environ.get("MOONCAKEFS_DATA"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mooncakefs"


class DataDirLock:
    """An exclusive flock on ``<dir>/LOCK``, which records its holder.

    flock locks belong to an open file, so a second open() in the same process is refused as surely as
    one from another process, and the kernel drops the lock when its holder dies (no stale locks)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "LOCK"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(self.fd)
            raise StoreLocked(
                f"data dir {directory} is in use by {holder}; a data dir is opened by one process at a time"
            ) from None
        command = " ".join(sys.argv)[:200] or sys.executable
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the file drops the flock
            self.fd = -1
