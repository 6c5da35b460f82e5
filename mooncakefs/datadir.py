"""The data directory: where it is by default, who may read it, and the lock that gives one process the use
of it."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import stat
import sys
from pathlib import Path

from mooncakefs.errors import InvalidArgument, StoreLocked


def default_path() -> Path:
    """$MOONCAKEFS_DATA, else $XDG_DATA_HOME/mooncakefs, else ~/.local/share/mooncakefs."""
    if env := os.environ.get("MOONCAKEFS_DATA"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mooncakefs"


DIR_MODE, FILE_MODE = 0o700, 0o600  # keys, sizes and checksums are private to the store's user


def private_dir(path: Path) -> Path:
    """Make ``path`` (and its missing parents) and leave it mode 0700 whatever the umask.

    The umask is process-wide, so it is never changed (other threads create files too); instead an
    existing directory of ours that others may enter is tightened.  One owned by someone else is left
    as it is: changing it is its owner's business.  A path that cannot be a directory of ours (a file
    is there, no permission, a read-only filesystem) is InvalidArgument, naming the path and why, and
    so is one that is not ours to tighten (``_check_ours_to_tighten``)."""
    existed = path.is_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except FileExistsError:  # exist_ok covers a directory: something else is there
        raise InvalidArgument(f"cannot use {path} as a directory: it exists and is not one") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot create the directory {path}: {exc.strerror or exc}") from None
    if existed:
        _check_ours_to_tighten(path)
    _tighten(path, DIR_MODE)
    return path


#: What mooncakefs keeps in its directories: a looser one holding any of these is a store's to tighten.
OWN_NAMES = re.compile(r"LOCK|node-id|mount\.log|ssd|(index|fs)\.sqlite.*|seg-\d{8}\.(dat|keys)")
IGNORED_NAMES = {"lost+found"}  # what a fresh filesystem holds: its root may be an SSD dir


def _check_ours_to_tighten(path: Path) -> None:
    """InvalidArgument for an existing directory of ours that others may enter and that is not a
    store's: shared by every user (sticky, like /tmp), or holding files of other kinds.  A mistyped or
    empty --data ("$UNSET") would otherwise have made the current directory, /, /home or /tmp mode
    0700, locking every other user out."""
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == DIR_MODE:
        return  # nothing will be changed
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_ISVTX:
        raise InvalidArgument(
            f"{path} is a directory every user shares (mode {mode:04o}, like /tmp): give a directory of your own in it"
        )
    names = set(os.listdir(path)) - IGNORED_NAMES
    if names and not any(OWN_NAMES.fullmatch(name) for name in names):
        shown = ", ".join(sorted(names)[:3]) + (", …" if len(names) > 3 else "")
        raise InvalidArgument(
            f"{path} (mode {mode:04o}) holds files that are not mooncakefs's ({shown}): its directories are "
            f"made private (0700), and this one is not mooncakefs's to change; give a new or empty "
            f"directory, or chmod 700 {path} first"
        )


def private_file(path: Path, flags: int = os.O_RDWR) -> int:
    """Open (creating if need be) ``path`` mode 0600 whatever the umask; returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tighten(*paths: Path) -> None:
    """Take group and other access off those of ``paths`` that exist and are ours (files: 0600)."""
    for path in paths:
        _tighten(path, FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() and not os.path.islink(path) and st.st_mode & 0o777 != mode:
        os.chmod(path, mode)


class DataDirLock:
    """An exclusive flock on ``<dir>/LOCK``, which records its holder.

    flock locks belong to an open file, so a second open() in the same process is refused as surely as
    one from another process, and the kernel drops the lock when its holder dies (no stale locks)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "LOCK"
        try:
            self.fd = private_file(self.path)
        except OSError as exc:  # a directory this user cannot write, or on a read-only filesystem
            raise InvalidArgument(f"cannot use {directory} as a data dir: {self.path}: {exc.strerror or exc}") from None
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
