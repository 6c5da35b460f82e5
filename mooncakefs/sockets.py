"""Where a node's Unix socket lives, and the checks that keep another local user from standing in for it.

A client trusts whatever answers on the socket with every value it puts, so a socket in a directory that
someone else controls is a hijack: that user removes the real socket (or gets there first) and serves a
fake node.  Like ssh-agent and systemd, both the node and its clients refuse a socket whose directory, or
any directory above it, another user could rename or write into.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from mooncakefs.errors import InvalidArgument, MooncakeError


class UnsafeSocketPath(MooncakeError):
    """The socket's directory could be replaced or written by another user."""


def default_socket() -> tuple[Path, bool]:
    """Where a node listens by default, and whether the user chose it: $MOONCAKEFS_SOCKET (chosen),
    else /run/mooncakefs/node.sock as root, else the user's runtime dir ($XDG_RUNTIME_DIR, or
    /tmp/mooncakefs-UID when that is unset)."""
    if env := os.environ.get("MOONCAKEFS_SOCKET"):
        return Path(env), True
    if os.geteuid() == 0:
        return Path("/run/mooncakefs/node.sock"), False
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/mooncakefs-{os.geteuid()}"
    return Path(runtime) / "mooncakefs" / "node.sock", False


def make_socket_dir(path: Path, chosen: bool) -> None:
    """Create the socket's directory (0700 where it is new) and check it, for a node about to listen."""
    parent = Path(os.path.abspath(path)).parent
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    try:
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile, perhaps by someone else: checked below
                os.mkdir(directory, 0o700)
    except OSError as exc:  # bare "[Errno 13] Permission denied" before, from the CLI too
        raise InvalidArgument(
            f"cannot create {exc.filename}, the directory of the socket {path}: {exc.strerror}"
        ) from None
    check_socket_path(path, chosen)
    if not os.access(
        Path(os.path.abspath(path)).parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids
    ):
        raise InvalidArgument(f"cannot create the socket {path}: its directory is not writable by this user")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):  # the node replaces a stale socket: never anything else
            raise InvalidArgument(
                f"the socket path {path} holds something that is not a socket (a file, a directory, a link): "
                "it is left alone; give the node a path that is free or holds a socket"
            )


def check_socket_path(path: str | os.PathLike[str], chosen: bool) -> None:
    """Refuse a socket path that another user could take over.

    Every directory from the socket's up to ``/`` must be a real directory that only its owner (or
    root) can write, except a sticky one like /tmp, below which the next directory must be ours or
    root's.  A default path (not ``chosen``) must also be in directories of ours or root's: that is
    what stops another user from making /tmp/mooncakefs-UID first.  A chosen path may sit in another
    user's directory (a node run by a service user, its socket shared with --socket-group)."""
    uid = os.geteuid()
    directory = Path(os.path.abspath(path)).parent
    below_sticky = False
    chain = [directory, *directory.parents]
    for d in reversed(chain):  # from / down, so the first problem named is the one nearest the root
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            return  # nothing there yet: a client finds no node, a node creates it
        where = f"the socket directory {d}" if d == directory else f"{d}, above the socket {path},"
        fix = (
            "; use a directory of your own (set XDG_RUNTIME_DIR or MOONCAKEFS_SOCKET, or pass the socket "
            "path) or fix its owner and mode"
        )
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeSocketPath(f"{where} is a symbolic link: whoever owns it can point it elsewhere{fix}")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSocketPath(f"{where} is not a directory{fix}")
        ours = st.st_uid in (uid, 0)
        if not ours and (below_sticky or not chosen):
            raise UnsafeSocketPath(
                f"{where} belongs to uid {st.st_uid}, not to you (uid {uid}): its owner could "
                f"serve a fake node there and read every value you put{fix}"
            )
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if writable_by_others and not (sticky and st.st_uid == 0):
            raise UnsafeSocketPath(
                f"{where} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"they could replace the node's socket{fix}"
            )
        below_sticky = bool(writable_by_others)
    if below_sticky:  # the socket itself sits in a directory like /tmp: it must be ours or root's
        try:
            owner = os.lstat(path).st_uid
        except FileNotFoundError:
            return
        if owner not in (uid, 0):
            raise UnsafeSocketPath(
                f"the socket {path} belongs to uid {owner}, not to you (uid {uid}), in a "
                "directory anyone can write: it may be a fake node; use a directory of your own"
            )
