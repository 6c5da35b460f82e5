"""One error hierarchy for every mooncakefs failure.

Each class also derives from the builtin a Python user would reach for (``KeyError`` for a missing key,
``ValueError`` for bad input), so ordinary ``except`` clauses keep working.  Messages name the key and
the reason.  Each class carries the errno the filesystem answers with and the exit status the CLI ends
with (``ERRORS``, at the end: one table, so FUSE and the CLI cannot drift apart).  Every ``MooncakeError`` is
expected (a one-line message, no traceback); anything else that escapes is a bug.
"""

from __future__ import annotations

import errno as _errno
import types
from collections.abc import Sequence
from typing import ClassVar


def describe_key(key: bytes | str) -> str:
    """A short printable form of a key for error messages."""
    if isinstance(key, bytes):
        try:
            key = key.decode()
        except UnicodeDecodeError:
            return repr(key[:80]) + ("…" if len(key) > 80 else "")
    return repr(key[:80] + ("…" if len(key) > 80 else ""))


def given(value: object) -> str:
    """What a caller passed, for a message: its repr (cut short) and its type."""
    return f"{value!r:.60} ({type(value).__name__})"


class MooncakeError(Exception):
    """Base class of every error mooncakefs raises on purpose."""

    errno: ClassVar[int] = _errno.EIO  # what a filesystem call that ran into it fails with
    exit_code: ClassVar[int] = 1  # what the mooncakefs command exits with

    def __str__(self) -> str:  # KeyError would otherwise repr() its message
        return str(self.args[0]) if self.args else self.__class__.__name__


class KeyNotFound(MooncakeError, KeyError):
    """The key is not in the store (never put, removed, evicted or expired)."""

    def __init__(self, key: bytes | str, reason: str = "not in the store") -> None:
        super().__init__(f"key {describe_key(key)}: {reason}")
        self.key = key


class KeyExists(MooncakeError):
    """``put(..., if_absent=True)`` found the key already present."""

    def __init__(self, key: bytes | str) -> None:
        super().__init__(f"key {describe_key(key)}: already exists (put with if_absent=True)")
        self.key = key


class NotNewer(KeyExists):
    """``put(..., if_newer=True)`` found the key holding a value of the same or a later version."""

    def __init__(self, key: bytes | str) -> None:
        MooncakeError.__init__(
            self, f"key {describe_key(key)}: already holds this version or a later one (put with if_newer=True)"
        )
        self.key = key


class InvalidArgument(MooncakeError, TypeError, ValueError):
    """An argument of the wrong type or out of range (``ttl="30"``, ``pin="no"``, a str as a buffer, one
    key where a list of keys is due, ``replicas`` on a single node).  Every store checks arguments the
    same way, on the client's side, before anything is sent.  It is both a TypeError and a ValueError,
    so whichever builtin a caller catches, it catches this."""


class InvalidKey(InvalidArgument):
    """The key is not a str or bytes of 1 to 1024 bytes."""


class BufferTooSmall(MooncakeError, ValueError):
    """The destination buffer cannot hold the value."""

    def __init__(self, key: bytes | str, needed: int, given: int) -> None:
        super().__init__(f"key {describe_key(key)}: value is {needed} bytes but the buffer holds {given}")
        self.key, self.needed, self.given = key, needed, given


class OutOfSpace(MooncakeError):
    """No tier can take the value, even after evicting everything evictable."""


class ChecksumError(MooncakeError):
    """Bytes do not match the CRC-32C taken when they were written.  From the SSD tier: the entry is
    dropped.  Over the wire: the put is refused (nothing stored), or the get's buffer holds bad bytes."""


class StoreClosed(MooncakeError):
    """The store was closed; open it again to use it."""


class StoreLocked(MooncakeError):
    """Another process holds the data directory (or the SSD tier's block device)."""


class DeviceRefused(InvalidArgument):
    """The SSD tier will not use this block device as asked: it holds something that is not this store's
    (a filesystem, a partition table, another version's superblock) and formatting was not asked for, it
    is too small, or the size given does not fit it.  Nothing was written to the device."""


class CudaUnavailable(MooncakeError):
    """A VRAM tier or a GPU buffer was asked for, and CUDA cannot give it: the ``cuda`` extra is not
    installed (``pip install 'mooncakefs[cuda]'``), the NVIDIA driver is absent, or there is no such GPU."""


class Unavailable(MooncakeError, ConnectionError):
    """A node cannot be reached, went away mid-request, or did not answer in time."""


class AuthenticationError(MooncakeError, PermissionError):
    """The node refused this client: it lacks the node's cluster secret (or the secret differs)."""


class ProtocolError(MooncakeError):
    """A peer sent a frame that breaks the wire protocol; the connection is dropped."""


class TransferError(MooncakeError):
    """A transfer between two endpoints failed on every connection it was tried on."""


class PathFailed(TransferError):
    """A path to a peer (a connection, an address, a NIC, a device) failed, not the request itself: the
    transfer engine retries it on another path, and raises this only when every path failed."""


class MetadataUnavailable(Unavailable):
    """A transfer engine could not reach its metadata server (etcd) to publish or look up a segment."""


class SegmentNotFound(MetadataUnavailable):
    """No transfer engine publishes that segment name: it never did, or it closed, or it died and the
    lease of its descriptor expired."""


class SegmentNameTaken(InvalidArgument):
    """Another live transfer engine already publishes this segment name."""


class AddressNotRegistered(TransferError, ValueError):
    """A transfer named memory its owner never registered with its transfer engine (or unregistered):
    refused before any byte moves, on whichever side found it."""


class OutOfBounds(AddressNotRegistered):
    """A transfer starts inside registered memory but runs past its end: refused before any byte moves."""


class BadEndpoint(InvalidArgument):
    """A peer's RDMA endpoint description (its device, queue pairs and registered regions with their
    rkeys) is malformed, of another version, or larger than the limits: nothing is connected with it."""


class AddressOverlapped(InvalidArgument):
    """Memory being registered overlaps memory already registered with the same engine."""


class EtcdError(MooncakeError):
    """etcd refused a request (a malformed one, or etcd is out of space)."""


class EtcdUnavailable(EtcdError, Unavailable):
    """etcd could not be reached, or did not answer in time."""


class EtcdCompacted(EtcdError):
    """A watch asked etcd for history it has compacted away: read the current state again and watch from
    there (``compact_revision``: the oldest revision etcd still has)."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class StaleEpoch(MooncakeError):
    """The request was routed with an older placement map than the node's: reload the map and retry."""


class NotServing(Unavailable):
    """The node is up and answering, but cannot serve this request for now: try another, or later."""


class Fenced(NotServing):
    """The node has lost touch with etcd, so it may no longer own what it holds: it refuses writes
    (reads of what it has keep working) until it hears from the cluster again."""


class Rejoining(NotServing):
    """The node is back in the cluster after an absence (a restart, a partition) and is checking what it
    holds against the other nodes: until it has, what it holds may be out of date, so it serves nothing
    under the new placement map."""


class Moved(MooncakeError):
    """The value was put with placement="local" on another node, which ``node`` names (in a cluster,
    the owners of a key's group know where such values live).  The cluster client follows it."""

    def __init__(self, node: str) -> None:
        super().__init__(f"the value lives on node {node}")
        self.node = self.key = node  # on the wire the node travels in the error's key field


# sysexits.h: scripts can tell "retry later" from "fix the input" from "the data is bad"
EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_SOFTWARE = 64, 65, 66, 69, 70
EX_IOERR, EX_TEMPFAIL, EX_PROTOCOL, EX_NOPERM = 74, 75, 76, 77

#: class -> (errno for FUSE, exit status for the CLI).  A class not listed takes its parent's row
#: (the first base in the MRO that has one); ``MooncakeError``'s is (EIO, 1).
ERRORS: dict[type[MooncakeError], tuple[int, int]] = {
    MooncakeError: (_errno.EIO, 1),
    KeyNotFound: (_errno.ENOENT, EX_NOINPUT),
    KeyExists: (_errno.EEXIST, 1),
    InvalidArgument: (_errno.EINVAL, EX_USAGE),
    BufferTooSmall: (_errno.ERANGE, EX_USAGE),
    OutOfSpace: (_errno.ENOSPC, EX_IOERR),
    ChecksumError: (_errno.EIO, EX_DATAERR),
    StoreClosed: (_errno.EIO, EX_SOFTWARE),
    StoreLocked: (_errno.EBUSY, EX_TEMPFAIL),
    CudaUnavailable: (_errno.ENODEV, EX_UNAVAILABLE),
    Unavailable: (_errno.ETIMEDOUT, EX_UNAVAILABLE),  # as NFS soft mounts answer when the server is away
    NotServing: (_errno.EAGAIN, EX_TEMPFAIL),  # up, refusing for now: retry shortly
    AuthenticationError: (_errno.EACCES, EX_NOPERM),
    ProtocolError: (_errno.EPROTO, EX_PROTOCOL),
    TransferError: (_errno.EIO, EX_IOERR),
    AddressNotRegistered: (_errno.EFAULT, EX_USAGE),
    EtcdError: (_errno.EIO, EX_UNAVAILABLE),
    EtcdUnavailable: (_errno.ETIMEDOUT, EX_UNAVAILABLE),  # listed: its first base, EtcdError, is not Unavailable
    StaleEpoch: (_errno.ESTALE, EX_TEMPFAIL),
    Moved: (_errno.EREMOTE, 1),
}


def _apply_table() -> None:
    """Give each listed class its row; unlisted subclasses inherit it (attribute lookup follows the MRO,
    which is why a class whose first base is not the one whose row it should take is listed)."""
    for cls, (code, status) in ERRORS.items():
        cls.errno, cls.exit_code = code, status


def errno_of(exc: BaseException) -> int:
    """The errno a filesystem call fails with for ``exc``: the table's, an OSError's own, else EIO."""
    if isinstance(exc, MooncakeError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


def exit_code_of(exc: BaseException) -> int:
    """The mooncakefs command's exit status for ``exc``: the table's, else 1."""
    return exc.exit_code if isinstance(exc, MooncakeError) else 1


#: Rows of a ``code_in`` table: an exception class (or a union of them, ``A | B``) and its code.
CodeTable = Sequence[tuple[type[BaseException] | types.UnionType, int]]


def code_in(table: CodeTable, exc: BaseException, default: int) -> int:
    """The code of the first row of ``table`` that ``exc`` is an instance of, else ``default``.  For the
    foreign return codes of the Mooncake drop-ins, each its own table; first match wins, so a subclass's
    row goes before its base's."""
    return next((code for kinds, code in table if isinstance(exc, kinds)), default)


_apply_table()
