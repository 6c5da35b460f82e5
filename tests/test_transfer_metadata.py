"""The transfer engine's etcd metadata and its notifications, between real processes and a real etcd:
transfers to a peer found by segment name, its descriptor (addresses, registered buffers) following its
registrations, a dead peer disappearing when its lease expires, names taken and prefixes kept apart; and
Mooncake's TransferNotify delivered to the target's get_notifies over both the same-host path and tcp."""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import pytest
from conftest import child_env, wait_until
from node_helpers import EtcdCluster, free_port
from te_peer import SIZE, pattern
from test_transfer_engine import Peer

from mooncakefs import _engine
from mooncakefs.cluster.etcd import Etcd
from mooncakefs.errors import (
    AddressNotRegistered,
    InvalidArgument,
    OutOfSpace,
    SegmentNameTaken,
    SegmentNotFound,
)
from mooncakefs.transfer import Engine, TransferEngine, TransferNotify, TransferOpcode, server
from mooncakefs.transfer.compat import ERR_INVALID_ARGUMENT, ERR_METADATA
from mooncakefs.transfer.metadata import parse_metadata

MiB = 1 << 20
TTL = 2  # the lease of a peer that dies in a test


@pytest.fixture(scope="module")
def etcd_url():
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (tools/install-deps.sh installs etcd-server)")
    with contextlib.closing(EtcdCluster().start()) as cluster:
        yield cluster.url.removeprefix("http://")


def name() -> str:
    """A fresh segment name that is also an address to listen on."""
    return f"127.0.0.1:{free_port()}"


# ------------------------------------------------------------------------------------------- etcd


def test_parse_metadata() -> None:
    assert parse_metadata("P2PHANDSHAKE").p2p and parse_metadata("").p2p
    spec = parse_metadata("etcd://10.0.0.1:2379,10.0.0.2/kv-cluster/")
    assert spec.url == "http://10.0.0.1:2379,http://10.0.0.2:2379" and spec.prefix == "mooncake/kv-cluster/"
    assert parse_metadata("etcd://h").prefix == "mooncake/"
    for bad in ("http://h:2379", "redis://h", "etcd://", "etcd://h:x", "etcd://:2379"):
        with pytest.raises(InvalidArgument):
            parse_metadata(bad)


@pytest.mark.parametrize("same_host", [True, False], ids=["local", "tcp"])
def test_transfer_through_etcd_metadata(etcd_url: str, same_host: bool) -> None:
    """A peer process found by its segment name in etcd, through Mooncake's API; the descriptor it
    published sits at Mooncake's key, under a lease; a clean close removes it at once."""
    metadata = f"etcd://{etcd_url}/te-test"
    peer = Peer(name(), metadata=metadata)
    try:
        engine = TransferEngine()
        assert engine.initialize(name(), metadata, "tcp", "") == 0
        engine.get_engine().same_host = same_host
        data = pattern(4 * MiB, seed=21)
        assert engine.register_memory(data.ctypes.data, data.nbytes) == 0
        assert engine.transfer_sync_write(peer.session, data.ctypes.data, peer.managed + 5, data.nbytes) == 0
        back = np.zeros(MiB, dtype=np.uint8)
        assert engine.register_memory(back) == 0
        assert engine.transfer_sync(peer.session, back.ctypes.data, peer.addr, MiB, TransferOpcode.READ) == 0
        assert back.tobytes() == pattern(SIZE)[:MiB].tobytes()
        expected = bytearray(SIZE)
        expected[5 : 5 + 4 * MiB] = data.tobytes()
        assert peer.crc()["managed"] == _engine.crc32c(expected)
        assert engine.get_first_buffer_address(peer.session) == peer.addr
        assert engine.get_engine().paths(peer.session) == (["local", "tcp"] if same_host else ["tcp"])

        with Etcd(f"http://{etcd_url}") as client:
            kv = client.get(f"mooncake/te-test/ram/{peer.session}")
            assert kv is not None and kv.lease != 0
            mine = engine.get_engine().session_id
            assert client.get(f"mooncake/te-test/ram/{mine}") is not None
            assert engine.close() == 0
            assert client.get(f"mooncake/te-test/ram/{mine}") is None  # closed: gone at once
    finally:
        peer.kill()


def test_registration_changes_reach_peers(etcd_url: str) -> None:
    """Memory the peer registers after first contact is in its descriptor when ``register`` returns, and
    can be written; once unregistered it leaves the descriptor and transfers to it are refused."""
    metadata = f"etcd://{etcd_url}"
    peer = Peer(name(), metadata=metadata)
    try:
        with Engine(name(), metadata, "tcp", same_host=False) as engine:
            before = engine.segment(peer.session)
            assert before.buffers == [[peer.addr, SIZE, 1], [peer.managed, SIZE, 1]]  # registration order
            assert before.addresses == [f"127.0.0.1:{peer.port}"] and before.protocol == "tcp"
            added = peer.ask(f"register {MiB}")["addr"]
            assert [added, MiB, 1] in engine.segment(peer.session).buffers
            engine.write(peer.session, b"fresh", added + 10)
            out = bytearray(16)
            engine.read(peer.session, out, added)
            assert out == b"\xab" * 10 + b"fresh" + b"\xab"
            assert peer.ask(f"unregister {added}")["rc"] == 0
            assert [added, MiB, 1] not in engine.segment(peer.session).buffers
            with pytest.raises(AddressNotRegistered):
                engine.read(peer.session, out, added)
    finally:
        peer.kill()


def test_dead_peer_leaves_etcd_when_its_lease_expires(etcd_url: str) -> None:
    """A peer killed without closing: transfers fail, its key expires after the lease's ttl, and from then
    on a transfer to it says the segment is gone (SegmentNotFound; Mooncake's API: ERR_METADATA)."""
    metadata = f"etcd://{etcd_url}/dying"
    peer = Peer(name(), metadata=metadata, env=child_env() | {"MOONCAKEFS_TE_LEASE_TTL": str(TTL)})
    try:
        with Engine(name(), metadata, "tcp", same_host=False, io_timeout=3) as engine:
            engine.read(peer.session, bytearray(16), peer.addr)
            peer.kill()
            with Etcd(f"http://{etcd_url}") as client:
                key = f"mooncake/dying/ram/{peer.session}"
                assert wait_until(lambda: client.get(key) is None, timeout=TTL * 10, interval=0.2)
            with pytest.raises(SegmentNotFound, match="lease expired"):
                engine.read(peer.session, bytearray(16), peer.addr)
            compat = TransferEngine()
            assert compat.initialize(name(), metadata, "tcp") == 0
            assert compat.transfer_sync_read(peer.session, bytearray(16), peer.addr, 16) == ERR_METADATA
            assert isinstance(compat.last_error, SegmentNotFound)
            assert compat.get_first_buffer_address(peer.session) == 0
            compat.close()
    finally:
        peer.kill()


def test_segment_names_are_unique_and_prefixes_apart(etcd_url: str) -> None:
    """A bare host name is a segment name as Mooncake has it (the port is any free one): a second engine
    of that name in the same prefix is refused; another prefix is another cluster."""
    with Engine("127.0.0.1", f"etcd://{etcd_url}/a", "tcp") as first:
        assert first.session_id == "127.0.0.1"
        with pytest.raises(SegmentNameTaken, match="already published"):
            Engine("127.0.0.1", f"etcd://{etcd_url}/a", "tcp")
        compat = TransferEngine()
        assert compat.initialize("127.0.0.1", f"etcd://{etcd_url}/a", "tcp") == ERR_INVALID_ARGUMENT
        with Engine("127.0.0.1", f"etcd://{etcd_url}/b", "tcp") as other_cluster:
            assert other_cluster.segment("127.0.0.1").addresses == [f"127.0.0.1:{other_cluster.rpc_port}"]
            with pytest.raises(SegmentNotFound):
                other_cluster.read(f"127.0.0.1:{first.rpc_port}", bytearray(1), 4096)
            with Engine(name(), f"etcd://{etcd_url}/a", "tcp") as same_cluster:
                assert same_cluster.segment("127.0.0.1").addresses == [f"127.0.0.1:{first.rpc_port}"]
                out = bytearray(3)
                buf = first.allocate(4096)
                first.view(buf, 3, write=True)[:] = b"abc"
                same_cluster.read("127.0.0.1", out, buf)
                assert out == b"abc"


# ---------------------------------------------------------------------------------------- notifications


@pytest.mark.parametrize("same_host", [True, False], ids=["local", "tcp"])
def test_notifications_reach_the_peer_process(same_host: bool) -> None:
    """Mooncake's TransferNotify on transfer_sync / batch_transfer_sync: the target process finds it in
    get_notifies, after the bytes, in order, once."""
    peer = Peer()
    try:
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp") == 0
        engine.get_engine().same_host = same_host
        src = pattern(2 * MiB, seed=4)
        assert engine.register_memory(src) == 0
        ok = TransferNotify("layer-0", "kv written")
        assert engine.transfer_sync(peer.session, src.ctypes.data, peer.managed, MiB, TransferOpcode.WRITE, ok) == 0
        assert (
            engine.batch_transfer_sync(
                peer.session,
                [src.ctypes.data + MiB],
                [peer.managed + MiB],
                [MiB],
                TransferOpcode.WRITE,
                TransferNotify("layer-1", "ü" * 3),
            )
            == 0
        )
        assert peer.ask("notifies") == [["layer-0", "kv written"], ["layer-1", "üüü"]]
        assert peer.crc()["managed"] == _engine.crc32c(src.tobytes() + bytes(SIZE - 2 * MiB))
        assert peer.ask("notifies") == []  # collected once
        bad = engine.transfer_sync(peer.session, src.ctypes.data, 4096, 16, TransferOpcode.WRITE, ok)
        assert bad < 0 and peer.ask("notifies") == []  # a failed transfer notifies nobody
        assert engine.transfer_sync(peer.session, src.ctypes.data, peer.managed, 1, 1, "not a notify") < 0
        engine.close()
    finally:
        peer.kill()


def test_notifications_between_engines_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Pythonic calls: notify/notifies both ways; bad arguments; a full queue refuses the sender."""
    monkeypatch.setattr(server, "MAX_NOTIFIES", 3)
    with Engine("127.0.0.1") as a, Engine("127.0.0.1") as b:
        a.notify(b.session_id, "n", "1")
        buf = bytearray(4096)
        a.register(buf)
        b.transfer(a.session_id, "write", [b"x" * 10], [a.registry.first()], notify=("done", "10 bytes"))
        assert buf[:10] == b"x" * 10
        assert a.notifies() == [("done", "10 bytes")] and b.notifies() == [("n", "1")]
        with pytest.raises(InvalidArgument):
            a.notify(b.session_id, "n", b"bytes")  # type: ignore[arg-type]
        for i in range(3):
            a.notify(b.session_id, "n", str(i))
        with pytest.raises(OutOfSpace, match="nobody collected"):
            a.notify(b.session_id, "n", "overflow")
        assert [m for _n, m in b.notifies()] == ["0", "1", "2"]
        a.notify(b.session_id, "n", "again")  # room again once collected
        assert b.notifies() == [("n", "again")]
    compat = TransferEngine()
    assert compat.get_notifies() == []  # not initialized: nothing, as Mooncake's


def test_notify_through_etcd_names(etcd_url: str) -> None:
    metadata = f"etcd://{etcd_url}/notify"
    with Engine(name(), metadata, "tcp") as a, Engine(name(), metadata, "tcp") as b:
        a.notify(b.session_id, "from-a", "hello")  # answered once queued: no wait needed
        assert b.notifies() == [("from-a", "hello")]
