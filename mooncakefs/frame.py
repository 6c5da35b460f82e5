"""A frame's layout, the buffer sizes of the code that reads and writes frames, and the check of the
CRC-32C a value carries in one (wire.py describes the protocol).  Its own module because that code is in
two places that wire.py imports and that cannot import it back: ``mooncakefs._engine.Framing`` and its
pure-Python twin in ``mooncakefs._reference``."""

from __future__ import annotations

import struct
from collections.abc import Callable

from mooncakefs.errors import ChecksumError

MAGIC = 0x434D  # b"MC"
HEADER = struct.Struct("<HBBIQ")  # magic, opcode, flags, meta length, payload length
MAX_META = 8 << 20  # a batch of 4096 keys of 1 KiB fits
MAX_PAYLOAD = 1 << 48
RECV_BUFFER = 256 << 10
SMALL_SEND = 64 << 10  # payloads up to this are copied next to the header: one send() per frame
# A frame's first recv asks for at most this much: enough for a small request whole, little enough that a
# large payload lands mostly in place (what the buffer took of it is copied out again).
FIRST_READ = 64 << 10
IOV_CHUNK = 512  # buffers handed to one sendmsg / recvmsg_into (the kernel takes at most IOV_MAX, 1024)
PAD_SHIFT = 2  # frame header flags from this bit up: bytes of padding between the meta and the payload
FLAGS_MASK = (1 << PAD_SHIFT) - 1
LINE = 64  # cache line: a large payload's stream offset is padded to its source's phase in one
CRC_CHUNK = 1 << 20  # a value is checksummed in chunks this big as it is sent or received, while still in cache
CRC_TRAILER = struct.Struct("<I")  # the CRC-32C that follows a PUT's value in its payload
WITH_CRC = 1  # frame header flag: the payload is a value followed by its CRC-32C (CRC_TRAILER)


def payload_phase(source: int, destination: int = 0) -> int:
    """The offset modulo LINE at which a payload from address ``source``, bound for address
    ``destination`` in the receiver (a pool block, on a line, unless the receiver said where), should
    start in the stream.

    Each copy of it (the sender's into the kernel's socket pages, the receiver's out of them) is slow
    when its destination lies 1-31 bytes past its source modulo a page (see wire.py's docstring); the
    kernel's pages start each frame on a line (the previous frame's pages are freed by the time a
    request's reply or the next request comes).  The source's own phase makes the sender's copy
    aligned, and is kept unless it puts the receiver's destination 1-31 bytes past it: then half a line
    further keeps both copies 32-63 bytes apart."""
    if 0 < (destination - source) % LINE < LINE // 2:
        return (source + LINE // 2) % LINE
    return source % LINE


def crc_error(expected: int | None, got: int, what: Callable[[], str]) -> ChecksumError | None:
    """The ChecksumError of a value whose bytes (CRC ``got``) are not the ones sent (CRC ``expected``;
    None: the sender named none), else None.  ``what`` names the value."""
    if expected is None or expected == got:
        return None
    return ChecksumError(
        f"{what()} fails its CRC-32C check (expected {expected:#010x}, got {got:#010x}): its bytes "
        "were corrupted in transit or in the sender's memory"
    )


def check_crc(expected: int | None, got: int, what: Callable[[], str]) -> None:
    """Raise ``crc_error``'s ChecksumError, if any."""
    if (exc := crc_error(expected, got, what)) is not None:
        raise exc
