"""The transfer engine (``mooncakefs.transfer``): Batch semantics, the local (memcpy) transport, and the
TCP transport striping reads and writes over several connections to a real node."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from conftest import KiB, MiB, rand_bytes
from node_helpers import NodeProcess, raw_channel, scrape_metrics

import mooncakefs
from mooncakefs.errors import TransferError, Unavailable
from mooncakefs.transfer.core import READ, WRITE, Batch, Region, Router, Transfer
from mooncakefs.transfer.local import LocalTransport
from mooncakefs.transfer.tcp import TcpTransport
from mooncakefs.wire import Channel, Op

STRIPE = 64 * KiB


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeProcess(tmp_path_factory.mktemp("xfer"), name="xfer", dram="64MiB", ssd="64MiB", metrics="auto")
    n.start()
    yield n
    n.kill()


@pytest.fixture
def node_factory(tmp_path):
    made: list[NodeProcess] = []

    def make(**options) -> NodeProcess:
        n = NodeProcess(tmp_path, name=f"n{len(made)}", **options)
        made.append(n)
        return n.start()

    yield make
    for n in made:
        n.kill()


@pytest.fixture
def tcp_client(node):
    """A TCP client that sends every value through the engine, striped 64 KiB over 3 connections."""
    with mooncakefs.connect(node.tcp_url, timeout=10, connections=3, stripe=STRIPE, inline_max=0) as s:
        yield s


def _ops(node: NodeProcess, op: str) -> float:
    return scrape_metrics(node).get(f'mooncakefs_requests_total{{op="{op}"}}', 0)


# ---------------------------------------------------------------------------------- Batch semantics


def test_batch_done_and_wait():
    empty = Batch(0)
    assert empty.done() and empty.wait() == 0 and empty.wait(0) == 0

    b = Batch(3)
    assert not b.done()
    with pytest.raises(TransferError, match="not complete"):
        b.wait(0.05)
    b.part_done(10)
    b.part_done(20)
    assert not b.done()
    t = threading.Timer(0.05, b.part_done, args=(30,))
    t.start()
    start = time.monotonic()
    assert b.wait(5) == 60  # blocks until the last part, then reports every byte
    assert time.monotonic() - start < 2
    assert b.done() and b.error is None and b.transferred == 60
    assert b.wait() == 60  # waiting again is fine


def test_batch_failure_is_raised_as_transfer_error():
    b = Batch(2)
    b.part_done(5)
    b.fail(ValueError("the peer said no"))
    assert b.done()  # a failure completes the batch: nobody waits for the other part
    with pytest.raises(TransferError, match="the peer said no") as ei:
        b.wait(1)
    assert isinstance(ei.value.__cause__, ValueError)
    b.fail(RuntimeError("second"))  # the first failure is the one reported
    with pytest.raises(TransferError, match="the peer said no"):
        b.wait()

    own = TransferError("as is")
    b2 = Batch(1)
    b2.fail(own)
    with pytest.raises(TransferError) as ei:
        b2.wait()
    assert ei.value is own


def test_transfer_validation():
    region = Region(handle=1, size=100)
    with pytest.raises(ValueError):
        Transfer("copy", memoryview(bytearray(10)), region)
    with pytest.raises(ValueError):
        Transfer(READ, memoryview(bytearray(101)), region)
    with pytest.raises(ValueError):
        Transfer(READ, memoryview(bytearray(10)), region, offset=91)
    with pytest.raises(ValueError):
        Transfer(WRITE, memoryview(bytearray(10)), region, offset=-1)
    Transfer(READ, memoryview(bytearray(10)), region, offset=90)
    Transfer(WRITE, memoryview(b""), region, offset=100)
    with pytest.raises(TransferError, match="no transport"):
        Router([]).submit([Transfer(READ, memoryview(bytearray(1)), region)])
    with pytest.raises(ValueError):
        TcpTransport(lambda: None, connections=0)
    with pytest.raises(ValueError):
        TcpTransport(lambda: None, stripe=0)
    with pytest.raises(ValueError):
        TcpTransport(lambda: None, depth=0)


def test_tcp_worker_sends_the_next_request_before_the_reply():
    """One connection keeps two requests in flight: a peer that answers the first only once the second has
    arrived is served (a worker waiting for each reply before the next request would stall the stream
    between stripes; here it would wait forever, and the hang guard fails the batch)."""
    mine, theirs = socket.socketpair()
    theirs.settimeout(10)  # hang guard
    gate = threading.Event()
    connects = []

    def connect() -> Channel:
        if connects:
            raise Unavailable("one connection only")
        connects.append(1)
        gate.wait(10)  # the worker holds its first stripe until the whole batch is queued
        return Channel(mine, "pair")

    data = rand_bytes(2 * STRIPE, "pipelined")

    def serve() -> None:
        with theirs:
            peer = Channel(theirs, "test")
            asked = [peer.read_frame()[2] for _ in range(2)]  # both requests before any reply
            for _handle, offset, n in asked:
                peer.send(Op.OK, (), data[offset : offset + n])

    server = threading.Thread(target=serve)
    server.start()
    tcp = TcpTransport(connect, connections=1, stripe=STRIPE, attempts=1)
    try:
        out = bytearray(2 * STRIPE)
        batch = Router([tcp]).submit([Transfer(READ, memoryview(out), Region(7, len(out)))])
        gate.set()
        assert batch.wait(20) == len(out)
        assert out == data
    finally:
        tcp.close()
        server.join(15)


class _Trickle:
    """A real socket that moves at most ``most`` bytes per call: what the kernel does when a signal or a
    timeout cuts a vectored ``sendmsg`` / ``recvmsg_into`` short."""

    def __init__(self, sock: socket.socket, most: int) -> None:
        self.sock, self.most, self.family = sock, most, sock.family

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def sendmsg(self, buffers: list) -> int:
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[: self.most]
        return self.sock.send(data)

    def recv_into(self, buf: memoryview, n: int = 0, flags: int = 0) -> int:
        return self.sock.recv_into(buf, min(n or len(buf), self.most))

    def recvmsg_into(self, buffers: list, _anc: int = 0, _flags: int = 0) -> tuple[int, list, int, None]:
        data = self.sock.recv(min(self.most, sum(len(b) for b in buffers)))
        at = 0
        for b in buffers:
            n = min(len(b), len(data) - at)
            b[:n] = data[at : at + n]
            at += n
        return len(data), [], 0, None

    def close(self) -> None:
        self.sock.close()


def test_a_vectored_payload_arrives_whole_through_partial_sends_and_receives():
    """A frame of many ranges (a READV reply: more buffers than one ``sendmsg`` / ``recvmsg_into`` takes,
    empty ones among them) sent and received by calls that each move a few hundred bytes, the first ones
    buffered with the header, lands byte-exact in the receiver's buffers, and the payload is used up."""
    a, b = socket.socketpair()
    a.settimeout(10)  # hang guards
    b.settimeout(10)
    parts = [rand_bytes((i * 37) % 300, f"part {i}") for i in range(700)] + [rand_bytes(200 * KiB, "big")]
    sender, receiver = Channel(_Trickle(a, 1000), "tx"), Channel(_Trickle(b, 777), "rx")  # type: ignore[arg-type]
    sending = threading.Thread(target=sender.send, args=(Op.OK, [], parts))
    sending.start()
    try:
        _meta, size = receiver.read_reply()
        assert size == sum(len(p) for p in parts)
        into = [memoryview(bytearray(len(p))) for p in parts]
        receiver.read_payload_into_many(into)
        assert [bytes(v) for v in into] == parts
        assert receiver.payload_left == 0
    finally:
        sending.join(15)
        sender.close()
        receiver.close()


# ----------------------------------------------------------------------------------- local transport


def test_local_transport_copies_byte_exact():
    pool = bytearray(1 * MiB)
    local = LocalTransport(memoryview(pool))
    engine = Router([local])
    data = rand_bytes(300 * KiB, "local")
    region = Region(handle=7, size=400 * KiB, pool_offset=4096)

    assert local.accepts(Transfer(READ, memoryview(bytearray(1)), region))
    assert not local.accepts(Transfer(READ, memoryview(bytearray(1)), Region(7, 1, -1)))
    batch = engine.submit([Transfer(WRITE, memoryview(data), region, offset=100)])
    assert batch.done() and batch.wait(1) == len(data)  # copies run in the caller: done at once
    assert pool[4096 + 100 : 4096 + 100 + len(data)] == data
    assert pool[:4196] == bytes(4196) and pool[4196 + len(data) :] == bytes(len(pool) - 4196 - len(data))

    # several transfers in one batch, into numpy and bytearray destinations
    out1 = np.zeros(1000, dtype=np.uint8)
    out2 = bytearray(len(data) - 1000)
    n = engine.run(
        [Transfer(READ, memoryview(out1), region, offset=100), Transfer(READ, memoryview(out2), region, offset=1100)],
        timeout=1,
    )
    assert n == len(data)
    assert out1.tobytes() + bytes(out2) == data

    local.close()


def test_local_transport_refuses_a_region_past_the_pool_end():
    """A region that runs off the end of the mapped pool fails the batch; it must never copy short
    and report the full byte count (the tail of the destination would be left as it was)."""
    pool = bytearray(b"p" * (64 * KiB))
    engine = Router([LocalTransport(memoryview(pool))])
    tail = Region(handle=8, size=8192, pool_offset=len(pool) - 4096)
    with pytest.raises(TransferError):
        engine.run([Transfer(WRITE, memoryview(bytes(8192)), tail)], timeout=1)
    out = bytearray(8192)
    with pytest.raises(TransferError):
        engine.run([Transfer(READ, memoryview(out), tail)], timeout=1)


# ------------------------------------------------------------------------------ tcp against a node


def test_striped_write_and_read_are_byte_exact(node, tcp_client):
    value = rand_bytes(5 * MiB, "striped")
    writes, reads = _ops(node, "write"), _ops(node, "read")
    tcp_client.put("striped", value)
    assert _ops(node, "write") - writes == 5 * MiB // STRIPE  # 80 stripes
    got = tcp_client.get("striped")
    assert got == value
    assert _ops(node, "read") - reads == 5 * MiB // STRIPE
    buf = np.empty(5 * MiB + 3, dtype=np.uint8)
    assert tcp_client.get_into("striped", buf) == 5 * MiB
    assert buf[: 5 * MiB].tobytes() == value
    # an uneven size: the last stripe is short
    odd = rand_bytes(5 * MiB + 12345, "odd")
    tcp_client.put("odd", odd)
    assert tcp_client.get("odd") == odd
    assert tcp_client.batch_get(["striped", "odd", "missing"]) == [value, odd, None]
    # the value looks the same to a client that never stripes
    with mooncakefs.connect(node.unix_url) as local:
        assert local.get("striped") == value and local.get("odd") == odd
    assert len(tcp_client._tcp._workers) == 3


def test_engine_directly_over_tcp(node):
    """The engine with only the TCP transport: leases and put ids from a control connection."""
    with mooncakefs.connect(node.tcp_url, timeout=10) as s:
        tcp = TcpTransport(s._connect, connections=3, stripe=STRIPE)
        engine = Router([tcp])
        ctl = raw_channel(node.tcp_url)
        try:
            value = rand_bytes(5 * MiB, "direct")
            ctl.send(Op.PUT_BEGIN, [b"direct", len(value), 0, None, None])
            (put_id, pool_offset), _ = ctl.read_reply()
            assert pool_offset == -1  # a TCP peer never sees pool offsets
            half = len(value) // 2
            batch = engine.submit(
                [
                    Transfer(WRITE, memoryview(value)[:half], Region(put_id, len(value))),
                    Transfer(WRITE, memoryview(value)[half:], Region(put_id, len(value)), half),
                ]
            )
            assert batch.wait(10) == len(value) and batch.done()
            assert not s.exists("direct")  # not visible before PUT_END
            ctl.send(Op.PUT_END, [put_id])
            ctl.read_reply()
            assert s.get("direct") == value

            ctl.send(Op.GET, [b"direct", 0])
            (size, lease, _off), _ = ctl.read_reply()
            assert size == len(value) and lease
            out = bytearray(size)
            assert engine.run([Transfer(READ, memoryview(out), Region(lease, size))], timeout=10) == size
            assert out == value
            part = bytearray(100 * KiB)
            engine.run([Transfer(READ, memoryview(part), Region(lease, size), offset=3 * MiB + 7)], timeout=10)
            assert part == value[3 * MiB + 7 : 3 * MiB + 7 + 100 * KiB]
            ctl.send(Op.RELEASE, [lease])
        finally:
            ctl.close()
            engine.close()
        with pytest.raises(TransferError):
            engine.submit([Transfer(READ, memoryview(bytearray(1)), Region(1, 1))])  # closed


def test_unknown_lease_or_put_id_fails_clearly(node):
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        engine = Router([TcpTransport(s._connect, connections=2, stripe=STRIPE)])
        try:
            for op, what in ((READ, "no lease"), (WRITE, "no unfinished put")):
                buf = memoryview(bytearray(300 * KiB))
                start = time.monotonic()
                with pytest.raises(TransferError, match=what):
                    engine.run([Transfer(op, buf, Region(123456789, len(buf)))], timeout=10)
                assert time.monotonic() - start < 5
            # the engine is still usable afterwards
            s.put("after-bad-id", b"x" * 1000)
            ctl = raw_channel(node.tcp_url)
            ctl.send(Op.GET, [b"after-bad-id", 0])
            (size, lease, _), _ = ctl.read_reply()
            out = bytearray(size)
            engine.run([Transfer(READ, memoryview(out), Region(lease, size))], timeout=10)
            assert out == b"x" * 1000
            ctl.close()
        finally:
            engine.close()


def test_transfer_to_a_dead_node_fails_instead_of_hanging(node_factory):
    n = node_factory(dram="16MiB")
    s = mooncakefs.connect(n.tcp_url, timeout=2, connections=2, stripe=STRIPE, inline_max=0)
    try:
        s.put("v", rand_bytes(1 * MiB, "v"))
        assert s.get("v") == rand_bytes(1 * MiB, "v")
        n.kill()
        start = time.monotonic()
        with pytest.raises(Unavailable):
            s.get("v")
        with pytest.raises(Unavailable):
            s.put("w", bytes(1 * MiB))
        assert time.monotonic() - start < 5
        engine = Router([TcpTransport(s._connect, connections=2, stripe=STRIPE)])
        with pytest.raises(TransferError, match="failed after 3 tries"):
            engine.run([Transfer(READ, memoryview(bytearray(256 * KiB)), Region(1, 256 * KiB))], timeout=10)
        engine.close()
    finally:
        s.close()


def test_tcp_transport_over_the_unix_socket(node):
    """A local client that does not map the pool moves large values through the TCP transport."""
    with mooncakefs.connect(node.unix_url, map_pool=False, stripe=STRIPE, connections=2, inline_max=0) as s:
        value = rand_bytes(2 * MiB + 1, "unmapped")
        s.put("unmapped", value)
        assert s.get("unmapped") == value
        with s.view("unmapped") as mv:
            assert bytes(mv) == value
    with mooncakefs.connect(node.unix_url) as mapped:
        assert mapped.get("unmapped") == value


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_value_bigger_than_dram_goes_through_ssd(node_factory, transport):
    """Unpinned and larger than DRAM: the put's room is outside the pool, so even a local client
    moves it over the socket; it lands on the SSD tier and reads back byte-exact."""
    n = node_factory(dram="8MiB", ssd="64MiB")
    with mooncakefs.connect(n.url(transport), stripe=1 * MiB) as s:
        value = rand_bytes(10 * MiB, "ssd-only")
        s.put("big", value)
        assert s.stat("big").tier == "ssd"
        assert s.get("big") == value
        buf = bytearray(10 * MiB)
        assert s.get_into("big", buf) == 10 * MiB and buf == value
        with s.view("big") as mv:
            assert bytes(mv) == value
