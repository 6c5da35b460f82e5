"""The framing of ``mooncakefs.wire``: what crosses the socket for a value, and how many system calls it takes.

A stand-in socket holds what one side sends and serves it to the other as a peer that has sent it all
already (the case where a receiver reads the most at once), counting the calls each side makes.
"""

from __future__ import annotations

import socket

import msgpack
import pytest
from mooncakefs._engine import address, crc32c

from mooncakefs.errors import ChecksumError, Unavailable
from mooncakefs.wire import (
    CRC_CHUNK,
    CRC_TRAILER,
    FIRST_READ,
    HEADER,
    LINE,
    MAGIC,
    PAD_SHIFT,
    SMALL_SEND,
    Channel,
    Op,
)

MiB = 1 << 20


class Pipe:
    """A socket whose peer has already sent everything written to it; ``max_send`` bytes at most are taken
    by one send (a partial send, as a send timeout gives)."""

    family = socket.AF_UNIX

    def __init__(self, max_send: int | None = None) -> None:
        self.data = bytearray()
        self.pos = 0
        self.max_send = max_send
        self.sends = self.recvs = 0
        self.staged = 0  # bytes received into the reading channel's own buffer (copied out again later)
        self.reader_buffer: bytearray | None = None

    def sendall(self, data: object) -> None:
        self.sends += 1
        self.data += memoryview(data).cast("B")  # type: ignore[arg-type]

    def sendmsg(self, buffers: list[object]) -> int:
        self.sends += 1
        sent = 0
        for b in buffers:
            view = memoryview(b).cast("B")  # type: ignore[arg-type]
            if self.max_send is not None:
                view = view[: self.max_send - sent]
            self.data += view
            sent += len(view)
        return sent

    def _serve(self, into: memoryview) -> int:
        n = min(len(into), len(self.data) - self.pos)
        into[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        if into.obj is self.reader_buffer:
            self.staged += n
        return n

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        self.recvs += 1
        return self._serve(buffer[: nbytes or len(buffer)])

    def close(self) -> None:
        pass


def channel(pipe: Pipe) -> Channel:
    ch = Channel(pipe, "test")  # type: ignore[arg-type]
    pipe.reader_buffer = ch._buf
    return ch


PATTERN = bytes(i * 7 % 251 for i in range(4096))


def value_of(size: int) -> memoryview:
    """``size`` bytes of a pattern that does not repeat at any power-of-two offset below 4 KiB."""
    return memoryview(PATTERN * (size // len(PATTERN) + 1))[:size]


@pytest.mark.parametrize("size", [0, 1, SMALL_SEND, SMALL_SEND + 1, CRC_CHUNK, 3 * CRC_CHUNK + 5])
@pytest.mark.parametrize("known_crc", [False, True])
def test_a_put_frame_arrives_whole_with_its_crc(size: int, known_crc: bool) -> None:
    value = value_of(size)
    pipe = Pipe(max_send=100_000)  # every large send is cut short and must go on where it stopped
    crc = channel(pipe).send_value(Op.PUT, ["k", size], value, crc32c(value) if known_crc else None)
    assert crc == crc32c(value)
    ch = channel(pipe)
    op, _flags, meta, _n = ch.read_frame()
    assert (op, meta) == (Op.PUT, ["k", size])
    out = bytearray(size)
    assert ch.read_value_into(memoryview(out), lambda: "k") == crc
    assert out == value and ch.payload_left == 0 and pipe.pos == len(pipe.data)


def test_a_wrong_crc_named_by_the_sender_is_refused_where_the_value_lands() -> None:
    value = value_of(2 * MiB)
    pipe = Pipe()
    channel(pipe).send_value(Op.PUT, [], value, crc32c(value) ^ 1)
    ch = channel(pipe)
    ch.read_frame()
    with pytest.raises(ChecksumError):
        ch.read_value_into(memoryview(bytearray(len(value))), lambda: "k")
    assert ch.payload_left == 0  # the whole payload was read: the connection stays in step


def test_a_1mib_put_sends_its_header_with_its_value_and_lands_in_place() -> None:
    """The header goes out with the value in one system call, then the CRC, computed while the peer
    receives; the receiver's first read takes little of the value and the rest goes straight into
    its place."""
    value = value_of(MiB)
    pipe = Pipe()
    channel(pipe).send_value(Op.PUT, ["k", MiB], value)
    assert pipe.sends == 2
    ch = channel(pipe)
    ch.read_frame()
    ch.read_value_into(memoryview(bytearray(MiB)), lambda: "k")
    assert pipe.recvs == 3  # the header (and the start of the value), the rest of the value, the CRC
    assert pipe.staged <= FIRST_READ + 4


def test_a_value_with_a_known_crc_is_one_send() -> None:
    value = value_of(3 * MiB)
    pipe = Pipe()
    channel(pipe).send_value(Op.PUT, ["k", len(value)], value, crc32c(value))
    assert pipe.sends == 1


@pytest.mark.parametrize("first_read", [FIRST_READ, 256])
def test_a_large_reply_is_one_send_and_lands_in_place(first_read: int) -> None:
    """The header and the payload go out in one system call (the header sent alone first cost the node a
    second one).  The reader's first read takes the header and at most ``first_read`` bytes of the
    payload; the rest is received straight into the caller's buffer."""
    pipe = Pipe()
    channel(pipe).send(Op.OK, [MiB, 0, -1, 5], value_of(MiB))
    assert pipe.sends == 1
    ch = channel(pipe)
    assert ch.read_reply(first_read) == ([MiB, 0, -1, 5], MiB)
    out = bytearray(MiB)
    ch.read_payload_crc(memoryview(out))
    assert out == value_of(MiB) and pipe.staged <= first_read
    assert pipe.recvs == 2


def _slow_copy(source: int, destination: int) -> bool:
    """Whether a kernel copy between these addresses is one of the slow ones on the AMD VMs: its
    destination 1-31 bytes past its source modulo a cache line (see wire's module docstring)."""
    return 0 < (destination - source) % LINE < LINE // 2


@pytest.mark.parametrize("phase", [0, 1, 16, 31, 32, 33, 48, 63])
@pytest.mark.parametrize(("how", "landing"), [("put", 0), ("reply", 0), ("reply", 16), ("reply", 48)])
def test_a_large_payload_is_padded_so_neither_kernel_copy_is_a_slow_one(phase: int, how: str, landing: int) -> None:
    """Wherever the value's buffer starts, the payload lands at a stream offset (the kernel's socket
    pages start each frame on a line) that makes neither the sender's copy into those pages nor the
    receiver's copy out of them a slow one: into a pool block (on a line) for a put, into where the
    reader said it lands the value for a reply.  The frame reads back whole."""
    memory = bytearray(MiB + 2 * LINE)
    skew = (phase - address(memory)) % LINE
    value = memoryview(memory)[skew : skew + MiB]
    value[:] = value_of(MiB)
    assert address(value) % LINE == phase
    pipe = Pipe()
    meta = ["some-key", MiB, 0, None, None]
    if how == "put":
        channel(pipe).send_value(Op.PUT, meta, value)
        start = len(pipe.data) - MiB - CRC_TRAILER.size
    else:
        channel(pipe).send(Op.OK, meta, value, destination=landing)
        start = len(pipe.data) - MiB
    assert not _slow_copy(address(value), start) and not _slow_copy(start, landing)
    ch = channel(pipe)
    op, flags, got_meta, _n = ch.read_frame()
    assert (op, got_meta, flags & ~1) == ((Op.PUT if how == "put" else Op.OK), meta, 0)
    out = bytearray(MiB)
    if how == "put":
        ch.read_value_into(memoryview(out), lambda: "k")
    else:
        ch.read_payload_into(memoryview(out))
    assert out == value and ch.payload_left == 0 and pipe.pos == len(pipe.data)


def test_the_small_values_of_a_batch_are_read_through_the_buffer() -> None:
    """A batch's many small values cost a few reads, not one each (the first read is bounded)."""
    values = [value_of(4096) for _ in range(64)]
    pipe = Pipe()
    channel(pipe).send(Op.BATCH_PUT, [len(values)], values)
    ch = channel(pipe)
    ch.read_frame()
    for v in values:
        out = bytearray(len(v))
        ch.read_payload_into(memoryview(out))
        assert out == v
    assert pipe.recvs <= 3


def test_a_peer_s_padding_is_skipped_bounded_and_a_short_one_drops_the_connection() -> None:
    """Padding flags from a careless or hostile peer: the most a header can ask for (63 bytes) is
    skipped, also on a frame with no payload, and the next frame reads in step; a peer that stops
    inside its padding loses its connection with a clear error, nothing waits for the rest."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ch = Channel(ours, "peer")
        meta = msgpack.packb(["k"])
        theirs.sendall(HEADER.pack(MAGIC, Op.GET, 63 << PAD_SHIFT, len(meta), 0) + meta + b"\xff" * 63)
        theirs.sendall(HEADER.pack(MAGIC, Op.OK, 0, len(meta), 0) + meta)
        assert ch.read_frame() == (Op.GET, 0, ["k"], 0)
        assert ch.read_frame() == (Op.OK, 0, ["k"], 0)
        theirs.sendall(HEADER.pack(MAGIC, Op.GET, 40 << PAD_SHIFT, len(meta), 0) + meta + b"\0" * 10)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(Unavailable, match="closed by the peer"):
            ch.read_frame()
