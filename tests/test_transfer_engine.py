"""The public transfer engine (``mooncakefs.transfer.TransferEngine`` / ``Engine``) between real processes:
Mooncake's API as written, the same-host path (memfd and process_vm), tcp striped and vectored, refusals
of unregistered and out-of-bounds memory on both sides, the secret handshake, a peer killed mid-batch,
and two hosts in network namespaces."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import child_env, kill_process
from node_helpers import free_port
from te_peer import SIZE, pattern

from mooncakefs import _engine, _reference
from mooncakefs.errors import AddressNotRegistered, AuthenticationError, OutOfBounds, TransferError, Unavailable
from mooncakefs.transfer import Engine, TransferEngine, TransferOpcode
from mooncakefs.transfer.compat import (
    ERR_ADDRESS_NOT_REGISTERED,
    ERR_INVALID_ARGUMENT,
    ERR_METADATA,
    ERR_REJECT_HANDSHAKE,
)

PEER = str(Path(__file__).with_name("te_peer.py"))
MiB = 1 << 20


class Peer:
    """A te_peer.py process: its port, its registered buffer (a pattern) and managed buffer (zeros)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        secret: str | None = None,
        argv_prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        metadata: str = "P2PHANDSHAKE",
        also: tuple[str, ...] = (),
    ) -> None:
        args = [*(argv_prefix or []), sys.executable, PEER, host, protocol, *([secret] if secret else [])]
        args += ["--metadata", metadata, *(f"--also={a}" for a in also)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env or child_env()
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            kill_process(self.proc)
            pytest.fail("the peer process did not start")
        info = json.loads(line)
        if "error" in info:
            kill_process(self.proc)
            pytest.fail(f"the peer process did not start: {info['why']}")
        self.port, self.addr, self.managed, self.pid = info["port"], info["addr"], info["managed"], info["pid"]
        self.session, self.protocol = info["session"], info["protocol"]

    def ask(self, command: str) -> Any:
        """One command on the peer's stdin, and its JSON answer."""
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def crc(self) -> dict[str, int]:
        return self.ask("crc")

    def kill(self) -> None:
        kill_process(self.proc)


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.kill()


@pytest.fixture(params=["local", "tcp"])
def engine(request):
    """An initiator that reaches the peer the same-host way, or (same_host=False) over tcp, striped 256 KiB
    over 3 connections."""
    with Engine("127.0.0.1", protocol="tcp", same_host=request.param == "local", connections=3, stripe=256 << 10) as e:
        yield e


# ------------------------------------------------------------------------------ Mooncake's API as written


def test_issue_example_runs_as_written(peer: Peer) -> None:
    """The issue's snippet, against a peer in another process; then the bytes are checked on both sides."""
    local = np.frombuffer(pattern(4 * MiB, seed=3).tobytes(), dtype=np.uint8).copy()
    ptr, length = local.ctypes.data, local.nbytes
    session, remote_ptr = peer.session, peer.managed

    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "auto") == 0
    port = engine.get_rpc_port()
    assert 0 < port < 65536
    assert engine.register_memory(ptr, length) == 0
    local_ptr = ptr
    assert engine.transfer_sync_write(session, local_ptr, remote_ptr, length) == 0
    back = np.zeros_like(local)
    assert engine.register_memory(back) == 0  # any buffer-protocol object
    assert engine.transfer_sync_read(session, back.ctypes.data, remote_ptr, length) == 0
    assert np.array_equal(back, local)
    local_ptrs = [ptr + i * 4096 for i in range(32)]
    remote_ptrs = [peer.managed + 8 * MiB + i * 4096 for i in range(32)]
    lengths = [4096] * 32
    batch = engine.batch_transfer_async_write(session, local_ptrs, remote_ptrs, lengths)
    assert batch > 0
    assert engine.get_batch_transfer_status(batch) == 0
    assert engine.get_batch_transfer_status([batch]) == -1  # reported once, then forgotten
    expected = bytearray(SIZE)
    expected[: 4 * MiB] = local.tobytes()
    expected[8 * MiB : 8 * MiB + 32 * 4096] = local[: 32 * 4096].tobytes()
    assert peer.crc()["managed"] == _engine.crc32c(expected)
    assert engine.close() == 0


def test_mooncake_seed_snippet_and_codes(peer: Peer) -> None:
    """Mooncake's own docs' form (4 arguments, a numpy buffer's address), the opcode enum, the async
    single-transfer calls, managed buffers and the codes for bad calls."""
    engine = TransferEngine()
    assert engine.initialize("localhost", "P2PHANDSHAKE", "tcp", "") == 0
    buf = np.zeros(MiB, dtype=np.uint8)
    assert engine.register_memory(buf.ctypes.data, buf.nbytes) == 0
    assert engine.register_memory(buf.ctypes.data + 10, 10) == -7  # overlaps
    assert engine.transfer_sync(peer.session, buf.ctypes.data, peer.addr, MiB, TransferOpcode.READ) == 0
    assert bytes(buf) == pattern(SIZE)[:MiB].tobytes()
    assert TransferOpcode.Read == TransferOpcode.READ == 0 and TransferOpcode.WRITE == 1
    bid = engine.transfer_submit_write(peer.session, buf.ctypes.data, peer.managed, 4096)
    while (status := engine.transfer_check_status(bid)) == 0:
        time.sleep(0.001)
    assert status == 1
    managed = engine.allocate_managed_buffer(3 * MiB)
    assert managed > 0
    assert engine.write_bytes_to_buffer(managed, b"hello", 5) == 0
    assert engine.read_bytes_from_buffer(managed, 5) == b"hello"
    assert engine.free_managed_buffer(managed, 3 * MiB) == 0
    assert engine.read_bytes_from_buffer(managed, 5) == b""  # freed: refused, never read
    assert engine.unregister_memory(buf.ctypes.data) == 0
    assert engine.unregister_memory(buf.ctypes.data) == ERR_ADDRESS_NOT_REGISTERED
    assert engine.transfer_sync_read(peer.session, buf.ctypes.data, peer.addr, 16) == ERR_ADDRESS_NOT_REGISTERED
    assert engine.batch_transfer_sync_read(peer.session, [1, 2], [peer.addr], [1, 1]) == ERR_INVALID_ARGUMENT
    assert engine.batch_transfer_async_read(peer.session, [1], [peer.addr], [1]) == 0  # 0: it never started
    assert engine.transfer_sync_read("nohost", buf, peer.addr, 16) == ERR_INVALID_ARGUMENT
    assert engine.initialize("localhost", "P2PHANDSHAKE", "tcp", "") == ERR_INVALID_ARGUMENT  # twice
    assert engine.send_probe(peer.session) == 0
    assert json.loads(engine.get_local_topology())["matrix"]
    engine.close()
    fresh = TransferEngine()
    assert fresh.get_rpc_port() < 0 and "initialize" in str(fresh.last_error)
    assert fresh.initialize("localhost", "redis://127.0.0.1:6379", "tcp", "") == ERR_INVALID_ARGUMENT
    assert "etcd://" in str(fresh.last_error)
    assert fresh.initialize("localhost", f"etcd://127.0.0.1:{free_port()}", "tcp", "") == ERR_METADATA  # no etcd
    assert "cannot reach the metadata server" in str(fresh.last_error)
    assert fresh.initialize("localhost", "P2PHANDSHAKE", "carrier-pigeon", "") == ERR_INVALID_ARGUMENT


# ------------------------------------------------------------------------------- moving bytes, both paths


def test_read_write_roundtrip_both_regions(engine: Engine, peer: Peer) -> None:
    """Reads of the peer's numpy buffer and writes into its managed buffer are byte-exact: 1 byte to 8 MiB."""
    want = pattern(SIZE)
    for n, off in ((1, 0), (4095, 17), (MiB, 3 * MiB), (8 * MiB + 5, 9 * MiB)):
        out = bytearray(n)
        assert engine.read(peer.session, out, peer.addr + off) == n
        assert out == want[off : off + n].tobytes()
    data = pattern(8 * MiB, seed=11)
    assert engine.write(peer.session, data, peer.managed + 123) == 8 * MiB
    back = bytearray(8 * MiB)
    engine.read(peer.session, back, peer.managed + 123)
    assert back == data.tobytes()
    expected = bytearray(SIZE)
    expected[123 : 123 + 8 * MiB] = data.tobytes()
    assert peer.crc() == {"buf": _engine.crc32c(want), "managed": _engine.crc32c(expected)}


def test_paths(engine: Engine, peer: Peer) -> None:
    """Same host: the local path first, tcp behind it; same_host=False: tcp only."""
    expected = ["local", "tcp"] if engine.same_host else ["tcp"]
    assert engine.paths(peer.session) == expected


def test_batch_of_small_and_large(engine: Engine, peer: Peer) -> None:
    """A batch mixing 32 blocks of 4 KiB (gathered into one frame over tcp) with 2 of 3 MiB (striped)."""
    src = pattern(32 * 4096 + 6 * MiB, seed=5)
    local = [memoryview(src)[i * 4096 : (i + 1) * 4096] for i in range(32)]
    local += [memoryview(src)[32 * 4096 :][: 3 * MiB], memoryview(src)[32 * 4096 + 3 * MiB :]]
    remote = [peer.managed + i * 8192 for i in range(32)] + [peer.managed + 16 * MiB, peer.managed + 20 * MiB]
    assert engine.transfer(peer.session, "write", local, remote) == len(src)
    back = bytearray(len(src))
    views = [memoryview(back)[i * 4096 : (i + 1) * 4096] for i in range(32)]
    views += [memoryview(back)[32 * 4096 :][: 3 * MiB], memoryview(back)[32 * 4096 + 3 * MiB :]]
    assert engine.transfer(peer.session, "read", views, remote) == len(src)
    assert back == src.tobytes()


def routed_batches(engine: Engine, session: str) -> list[int]:
    """From now on, the size of each batch the engine routes to ``session`` (the general path)."""
    router = engine._peer(session).router
    routed: list[int] = []
    submit = router.submit
    router.submit = lambda transfers: routed.append(len(transfers)) or submit(transfers)  # type: ignore[method-assign]
    return routed


def test_a_batch_of_pointers_to_a_managed_buffer_is_one_copy_with_no_routing(peer: Peer) -> None:
    """Mooncake's usual call (registered pointers on both sides) to a same-host peer's managed buffer is
    copied by the same-host path's fast path, not routed block by block: byte-exact both ways, blocks in
    two local registrations, a zero-length block skipped; refusals are those of the routed path, with the
    peer's memory untouched; ordinary (process_vm) memory and buffers still take the routed path."""
    block = 256 << 10
    first, second = pattern(16 * block, seed=31), pattern(16 * block, seed=32)
    with Engine("127.0.0.1", protocol="tcp") as e:
        local = [e.register(first), e.register(second)]
        ptrs = [local[i // 16] + (i % 16) * block for i in range(32)]
        remote = [peer.managed + 3 + i * block for i in range(32)]
        routed = routed_batches(e, peer.session)
        assert (
            e.transfer(peer.session, "write", [*ptrs, ptrs[0]], [*remote, peer.managed], [block] * 32 + [0])
            == 32 * block
        )
        first[:], second[:] = 0, 0
        assert e.transfer(peer.session, "read", ptrs, remote, [block] * 32) == 32 * block
        assert first.tobytes() == pattern(16 * block, seed=31).tobytes()
        assert second.tobytes() == pattern(16 * block, seed=32).tobytes()
        assert routed == []
        before = peer.crc()
        with pytest.raises(OutOfBounds):
            e.transfer(peer.session, "write", ptrs[:2], [peer.managed, peer.managed + SIZE - 100], [block, block])
        with pytest.raises(AddressNotRegistered):
            e.transfer(peer.session, "write", ptrs[:2], [peer.managed, peer.addr - 4096], [block, block])
        with pytest.raises(AddressNotRegistered):  # the initiator's own pointer must be registered
            e.transfer(peer.session, "write", [ptrs[0], 0x1000], remote[:2], [block, block])
        assert peer.crc() == before and routed == []
        assert e.transfer(peer.session, "read", ptrs[:1], [peer.addr], [block]) == block  # process_vm
        assert e.transfer(peer.session, "read", [bytearray(block)], [peer.managed], [block]) == block  # a buffer
        assert routed == [1, 1]
        assert first[:block].tobytes() == pattern(SIZE)[:block].tobytes()


def test_the_fast_path_maps_the_managed_buffer_again_when_the_peer_table_moves(peer: Peer) -> None:
    """The peer registering more memory moves its table's version: the next pointer batch fetches the
    table again and still lands in the managed buffer."""
    data = pattern(MiB, seed=41)
    with Engine("127.0.0.1", protocol="tcp") as e:
        ptr = e.register(data)
        assert e.transfer(peer.session, "write", [ptr], [peer.managed], [MiB]) == MiB
        (same_host, _tcp) = e._peer(peer.session).transports
        version = same_host._table.version
        routed = routed_batches(e, peer.session)
        more = peer.ask("register 4096")["addr"]
        assert e.transfer(peer.session, "write", [ptr], [peer.managed + MiB], [MiB]) == MiB
        assert same_host._table.version > version and routed == []
        assert e.transfer(peer.session, "read", [ptr], [more], [4096]) == 4096
        assert data[:4096].tobytes() == b"\xab" * 4096
    expected = bytearray(SIZE)
    expected[:MiB] = expected[MiB : 2 * MiB] = pattern(MiB, seed=41).tobytes()
    assert peer.crc()["managed"] == _engine.crc32c(expected)


def test_read_and_write_batches_at_once_on_one_connection(peer: Peer) -> None:
    """A read and a write of the peer's whole buffers in flight together on one connection complete
    byte-exact: the worker keeps requests in flight, but never sends a write's payload while a read's
    reply is coming back (both sides would block on full socket buffers until the I/O timeout)."""
    data = pattern(SIZE, seed=13)
    out = bytearray(SIZE)
    with Engine("127.0.0.1", protocol="tcp", same_host=False, connections=1, stripe=SIZE, io_timeout=3) as e:
        e.probe(peer.session)
        (tcp,) = e._peer(peer.session).transports
        tcp.attempts = 1  # a connection broken by the I/O timeout fails the batch instead of being retried
        reading = e.submit(peer.session, "read", [out], [peer.addr])
        writing = e.submit(peer.session, "write", [data], [peer.managed])
        assert reading.wait(60) == writing.wait(60) == SIZE
    assert out == pattern(SIZE).tobytes()
    assert peer.crc()["managed"] == _engine.crc32c(data)


def test_a_batch_of_small_blocks_travels_as_a_few_vectored_requests() -> None:
    """32 blocks of 4 KiB are one READV, 32 of 64 KiB (2 MiB) one too, 32 of 256 KiB (8 MiB) four
    WRITEVs or READVs of 2 MiB (not a request per block), byte-exact either way."""
    memory = bytearray(16 * MiB)
    with Engine("127.0.0.1", protocol="tcp") as target:
        base = target.register(memory)
        with Engine("127.0.0.1", protocol="tcp", same_host=False, connections=4) as e:
            for block, per_op in ((4096, 1), (64 << 10, 1), (256 << 10, 4)):
                data = pattern(32 * block, seed=block)
                blocks = [memoryview(data)[i * block : (i + 1) * block] for i in range(32)]
                remote = [base + 2 * i * block for i in range(32)]  # every other block: ranges apart
                before = dict(target.server.requests)
                assert e.transfer(target.session_id, "write", blocks, remote) == len(data)
                out = bytearray(len(data))
                views = [memoryview(out)[i * block : (i + 1) * block] for i in range(32)]
                assert e.transfer(target.session_id, "read", views, remote) == len(data)
                assert out == data.tobytes()
                sent = {op: n - before.get(op, 0) for op, n in target.server.requests.items()}
                assert (sent.get("writev", 0), sent.get("readv", 0), sent.get("read", 0)) == (per_op, per_op, 0)


def test_a_small_sync_batch_is_carried_by_the_thread_that_waits_for_it(peer: Peer) -> None:
    """The thread in a synchronous transfer sends its own small batch and reads the reply (no hand-off
    to a worker thread and back); when its connection breaks, the workers carry the request instead."""
    data = pattern(32 * 4096, seed=21)
    with Engine("127.0.0.1", protocol="tcp", same_host=False) as e:
        e.probe(peer.session)
        (tcp,) = e._peer(peer.session).transports
        connected_by: list[threading.Thread] = []
        connect = tcp._connect

        def recording_connect() -> Any:
            connected_by.append(threading.current_thread())
            return connect()

        tcp._connect = recording_connect
        remote = [peer.managed + i * 4096 for i in range(32)]
        for _ in range(20):
            assert e.transfer(peer.session, "write", [data[i * 4096 : (i + 1) * 4096] for i in range(32)], remote)
        assert threading.current_thread() in connected_by
        for channel in tcp._spare:  # the waiting threads' connections break under them
            channel.sock.shutdown(socket.SHUT_RDWR)
        out = bytearray(len(data))
        for _ in range(3):
            views = [memoryview(out)[i * 4096 : (i + 1) * 4096] for i in range(32)]
            assert e.transfer(peer.session, "read", views, remote) == len(data)
            assert out == data.tobytes()


# ---------------------------------------------------------------------------------------------- safety


def test_unregistered_and_out_of_bounds_are_refused_untouched(engine: Engine, peer: Peer) -> None:
    """Reads and writes beyond what the peer registered are refused, and the peer's memory is unchanged."""
    before = peer.crc()
    junk = bytes(range(256)) * 16
    cases = [
        (peer.addr + SIZE - 100, OutOfBounds),
        (peer.managed + SIZE, AddressNotRegistered),
        (peer.addr - 4096, AddressNotRegistered),
        (4096, AddressNotRegistered),
    ]
    for addr, error in cases:
        with pytest.raises(error):
            engine.write(peer.session, junk, addr)
        with pytest.raises(error):
            engine.read(peer.session, bytearray(len(junk)), addr)
    # a batch with one bad range moves nothing over the local path, and fails as a whole on either
    with pytest.raises(AddressNotRegistered):
        engine.transfer(peer.session, "write", [junk, junk], [peer.managed, 4096])
    if engine.same_host:
        assert peer.crc() == before
    with pytest.raises(AddressNotRegistered):  # the initiator's own pointer must be registered too
        engine.write(peer.session, 0x1000, peer.managed, 16)
    engine.write(peer.session, b"x", peer.managed)  # the connection is still good after refusals


def test_secret_handshake() -> None:
    """A peer with a secret refuses an initiator without it, before any memory is reachable."""
    p = Peer(secret="s" * 20)
    try:
        with Engine("127.0.0.1", same_host=False, secret=None) as plain, pytest.raises(AuthenticationError):
            os.environ.pop("MOONCAKEFS_SECRET", None)
            plain.read(p.session, bytearray(16), p.addr)
        with Engine("127.0.0.1", same_host=False, secret="x" * 20) as wrong, pytest.raises(AuthenticationError):
            wrong.read(p.session, bytearray(16), p.addr)
        compat = TransferEngine()
        assert compat.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp") == 0
        assert compat.transfer_sync_read(p.session, bytearray(16), p.addr, 16) == ERR_REJECT_HANDSHAKE
        compat.close()
        with Engine("127.0.0.1", secret="s" * 20) as good:
            out = bytearray(16)
            good.read(p.session, out, p.addr)
            assert out == pattern(16).tobytes()
    finally:
        p.kill()


def test_dead_peer_mid_batch_fails_within_bound() -> None:
    """A peer killed while a 1 GiB batch is in flight over tcp: the batch fails within a bound, no hang."""
    p = Peer()
    try:
        with Engine("127.0.0.1", same_host=False, connections=3, stripe=MiB, io_timeout=5) as engine:
            out = bytearray(4 * MiB)  # 256 reads into one buffer: only whether they finish matters here
            engine.read(p.session, out, p.addr)  # connected, warm
            batch = engine.submit(p.session, "read", [out] * 256, [p.addr + (i % 7) * 4 * MiB for i in range(256)])
            p.kill()
            started = time.monotonic()
            with pytest.raises(TransferError) as failed:
                batch.wait(60)
            assert "not complete" not in str(failed.value)  # it failed, rather than timing out in wait()
            assert time.monotonic() - started < 30
            assert batch.transferred < 1 << 30
            with pytest.raises((TransferError, Unavailable)):
                engine.read(p.session, bytearray(16), p.addr)
    finally:
        p.kill()


def test_dead_peer_same_host_path() -> None:
    """Over the local path, a dead peer is a TransferError naming it at once."""
    p = Peer()
    try:
        with Engine("127.0.0.1") as engine:
            engine.read(p.session, bytearray(16), p.addr)
            assert engine.paths(p.session)[0] == "local"
            p.kill()
            with pytest.raises((TransferError, Unavailable)):
                engine.read(p.session, bytearray(MiB), p.addr)
    finally:
        p.kill()


def test_a_closed_peers_memory_is_not_written_over_the_same_host_path() -> None:
    """A peer whose engine closed (its process and buffer still there) takes no more writes: the same-host
    path kept the table it had checked and copied into the memory the peer no longer offered."""
    p = Peer()
    try:
        with Engine("127.0.0.1") as engine:
            engine.write(p.session, b"\x00" * 16, p.addr)
            assert engine.paths(p.session)[0] == "local"
            assert p.ask("close") == {"rc": 0}
            before = p.ask("bufcrc")
            with pytest.raises((TransferError, Unavailable)):
                engine.write(p.session, b"\xff" * 16, p.addr)
            assert p.ask("bufcrc") == before
    finally:
        p.kill()


def test_dead_peer_compat_codes(peer: Peer) -> None:
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp") == 0
    engine.get_engine().same_host = False
    buf = bytearray(MiB)
    assert engine.transfer_sync_read(peer.session, buf, peer.addr, MiB) == 0
    peer.kill()
    started = time.monotonic()
    assert engine.transfer_sync_read(peer.session, buf, peer.addr, MiB) < 0
    assert engine.batch_transfer_async_read(peer.session, [buf], [peer.addr], [MiB]) in (0, *range(1, 100))
    assert time.monotonic() - started < 30
    engine.close()


# -------------------------------------------------------------------------------------- units, no peer


def test_vm_copy_matches_reference() -> None:
    """The Cython process_vm path and its ctypes twin copy the same bytes, many ranges at once."""
    src = pattern(3 * MiB, seed=9)
    for impl in (_engine, _reference):
        dst = np.zeros(3 * MiB, dtype=np.uint8)
        n = impl.vm_copy(
            os.getpid(),
            [dst.ctypes.data + i * MiB for i in range(3)],
            [src.ctypes.data + i * MiB for i in range(3)],
            [MiB, MiB, 5],
            False,
        )
        assert n == 2 * MiB + 5
        assert np.array_equal(dst[: 2 * MiB + 5], src[: 2 * MiB + 5]) and not dst[2 * MiB + 5 :].any()
        with pytest.raises(OSError):
            impl.vm_copy(os.getpid(), [dst.ctypes.data], [4096], [16], False)
        assert bytes(impl.view_at(src.ctypes.data, 4)) == src[:4].tobytes()


def test_registry_bounds() -> None:
    from mooncakefs.errors import AddressOverlapped, InvalidArgument
    from mooncakefs.transfer.memory import Registered, Registry

    r = Registry()
    try:
        r.add(Registered(0x10000, 0x1000))
        r.add(Registered(0x20000, 0x1000, writable=False))
        with pytest.raises(AddressOverlapped):
            r.add(Registered(0x10800, 0x1000))
        with pytest.raises(AddressOverlapped):
            r.add(Registered(0xF000, 0x1001))
        r.add(Registered(0xF000, 0x1000))  # touching is not overlapping
        assert r.find(0x10000, 0x1000).addr == 0x10000
        with pytest.raises(OutOfBounds):
            r.find(0x10FFF, 2)
        with pytest.raises(AddressNotRegistered):
            r.find(0x11000, 1)
        with pytest.raises(AddressNotRegistered):
            r.find(0x20000, 1, write=True)  # read-only
        with pytest.raises(InvalidArgument):
            r.find("0x10000", 1)  # type: ignore[arg-type]
        v = r.version
        r.remove(0x10000)
        assert r.version == v + 1
        with pytest.raises(AddressNotRegistered):
            r.find(0x10000, 1)
    finally:
        r.close()


def test_engine_in_a_subprocess_example_script(tmp_path: Path, peer: Peer) -> None:
    """The snippet as a user would paste it into a script of their own (no test helpers in sight)."""
    script = tmp_path / "user.py"
    script.write_text(
        textwrap.dedent(f"""
        import numpy as np
        from mooncakefs.transfer import TransferEngine
        buf = np.arange(4096, dtype=np.uint8)
        engine = TransferEngine()
        engine.initialize("127.0.0.1", "P2PHANDSHAKE", "auto")
        session = "127.0.0.1:{peer.port}"
        engine.register_memory(buf.ctypes.data, buf.nbytes)
        assert engine.transfer_sync_write(session, buf.ctypes.data, {peer.managed}, 4096) == 0
        out = np.zeros(4096, dtype=np.uint8)
        engine.register_memory(out)
        assert engine.transfer_sync_read(session, out.ctypes.data, {peer.managed}, 4096) == 0
        assert (out == buf).all()
        print("ok")
    """)
    )
    run = subprocess.run([sys.executable, str(script)], env=child_env(), capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "ok", run.stderr


# ------------------------------------------------------------------------------- two hosts (netns)

from test_cluster_netns import partition  # noqa: E402, F401  (the namespace + veth pair fixture)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_two_hosts_in_network_namespaces(partition) -> None:  # noqa: F811
    """A peer in its own network namespace is another host: tcp only, byte-exact, striped; cutting the
    link mid-batch fails the batch within the io timeout."""
    p = Peer(partition.iso_ip, argv_prefix=partition.exec_argv())
    try:
        with Engine(partition.root_ip, connections=3, stripe=MiB, io_timeout=3) as engine:
            assert engine.paths(p.session) == ["tcp"]
            out = bytearray(16 * MiB)
            assert engine.read(p.session, out, p.addr + 5) == 16 * MiB
            assert out == pattern(SIZE)[5 : 5 + 16 * MiB].tobytes()
            engine.write(p.session, out, p.managed)
            assert p.crc()["managed"] == _engine.crc32c(bytes(out) + bytes(SIZE - 16 * MiB))
            batch = engine.submit(p.session, "read", [out] * 200, [p.addr] * 200)
            partition.cut()
            started = time.monotonic()
            with pytest.raises(TransferError):
                batch.wait(120)
            assert time.monotonic() - started < 60  # 3 tries x the 3 s io timeout, plus slack
    finally:
        partition.heal()
        p.kill()
