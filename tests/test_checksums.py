"""End-to-end CRC-32C of values that cross a socket (docs/architecture.md, wire protocol): real node
processes, raw frames, a node's pool scribbled over through its socket, and a TCP proxy that flips one
byte in flight.  A put whose bytes do not match its CRC is refused with nothing stored; a get whose
bytes do not match is a ChecksumError in the client (per item in a batch); the connection stays usable.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import wait_until
from node_helpers import EtcdCluster, NodeProcess, mapped_node, raw_channel

import mooncakefs
from mooncakefs import _engine, wire
from mooncakefs.cluster.placement import PlacementMap
from mooncakefs.errors import ChecksumError
from mooncakefs.wire import CRC_TRAILER, WITH_CRC, Op

KiB, MiB = 1 << 10, 1 << 20
MARKER = b"<<flip-a-byte-here>>"  # the proxy corrupts the last byte of the first one it sees


@pytest.fixture
def node_factory(tmp_path):
    """``make(**NodeProcess options)``: a started node under tmp_path, SIGKILLed at teardown."""
    made: list[NodeProcess] = []

    def make(**options) -> NodeProcess:
        options.setdefault("name", f"n{len(made)}")
        node = NodeProcess(tmp_path, **options)
        made.append(node)
        return node.start()

    yield make
    for node in made:
        node.kill()
    for node in made:  # shown by pytest only when the test failed
        sys.stderr.write(f"\n--- {node.name} log ---\n{node.log()}\n")


def value(size: int, seed: int = 1) -> bytes:
    """``size`` bytes of a pattern with MARKER in the middle."""
    body = bytes((i * 131 + seed) & 0xFF for i in range(min(size, 4096))) * (size // 4096 + 1)
    mid = size // 2
    return body[:mid] + MARKER + body[mid + len(MARKER) : size]


def dram_used(node: NodeProcess) -> int:
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        return s.stats()["dram"]["used"]


# ----------------------------------------------------------------------------- puts with a wrong CRC


@pytest.mark.parametrize("size", [100, 1 * MiB])
def test_a_put_whose_bytes_fail_their_crc_is_refused_and_nothing_is_stored(node_factory, size):
    node = node_factory(dram="32MiB")
    data = value(size)
    baseline = dram_used(node)
    ch = raw_channel(node.tcp_url)
    meta = [b"bad", size, *wire.pack_put_options()]
    ch.send(Op.PUT, meta, [data, CRC_TRAILER.pack(_engine.crc32c(data) ^ 1)], flags=WITH_CRC)
    with pytest.raises(ChecksumError, match="CRC-32C"):
        ch.read_reply()
    # the connection stays in step: the same put with the right CRC goes through on it
    ch.send(
        Op.PUT,
        [b"good", size, *wire.pack_put_options()],
        [data, CRC_TRAILER.pack(_engine.crc32c(data))],
        flags=WITH_CRC,
    )
    ch.read_reply()
    ch.close()
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        assert not s.exists("bad")
        assert s.get("good") == data
        assert s.stat("good").checksum == _engine.crc32c(data)  # the CRC that came with it, kept
        s.remove("good")
    assert dram_used(node) == baseline  # the refused put's room was given back


def test_a_striped_put_is_checked_at_put_end_over_the_whole_value(node_factory):
    node = node_factory(dram="32MiB")
    data = value(3 * MiB)
    baseline = dram_used(node)
    ch = raw_channel(node.tcp_url)
    for crc, ok in ((_engine.crc32c(data) ^ 0x80000000, False), (_engine.crc32c(data), True)):
        ch.send(Op.PUT_BEGIN, [b"striped", len(data), *wire.pack_put_options()])
        (put_id, _offset), _ = ch.read_reply()
        for start in range(0, len(data), MiB):
            ch.send(Op.WRITE, [put_id, start], data[start : start + MiB])
            ch.read_reply()
        ch.send(Op.PUT_END, [put_id], CRC_TRAILER.pack(crc), flags=WITH_CRC)
        if ok:
            ch.read_reply()
        else:
            with pytest.raises(ChecksumError):
                ch.read_reply()
            with mooncakefs.connect(node.tcp_url, timeout=5) as s:
                assert not s.exists("striped")
            assert dram_used(node) == baseline
    ch.close()
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        assert s.get("striped") == data


def test_a_batch_put_refuses_only_the_values_that_fail_their_crc(node_factory):
    node = node_factory(dram="32MiB")
    values = [value(100, seed=i) for i in range(3)]
    crcs = [_engine.crc32c(v) for v in values]
    crcs[1] ^= 1
    ch = raw_channel(node.tcp_url)
    ch.send(Op.BATCH_PUT, [[b"b0", b"b1", b"b2"], [len(v) for v in values], *wire.pack_put_options(), crcs], values)
    (errors,), _ = ch.read_reply()
    ch.close()
    assert errors[0] is None and errors[2] is None
    assert errors[1][0] == "ChecksumError", errors
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        assert s.batch_get(["b0", "b1", "b2"]) == [values[0], None, values[2]]


# ------------------------------------------------------------- a value corrupted in the node's memory


def flip_in_pool(node: NodeProcess, key: bytes, at: int) -> None:
    """Flip one byte of a DRAM-resident value in the node's pool, where the node keeps it."""
    with mapped_node(node) as (ch, pool, _index):
        ch.send(Op.GET, [key, 0])  # inline limit 0: a lease, with the value's pool offset
        (size, lease, offset), _ = ch.read_reply()
        assert lease and offset >= 0 and at < size
        pool[offset + at] ^= 0x01
        ch.send(Op.RELEASE, [lease])


def test_a_value_corrupted_in_the_nodes_memory_fails_a_get_over_tcp(node_factory):
    node = node_factory(dram="32MiB")
    small, large, fine = value(4 * KiB, 1), value(2 * MiB, 2), value(2 * MiB, 3)
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        s.put("small", small)
        s.put("large", large)
        s.put("fine", fine)
    flip_in_pool(node, b"small", 7)
    flip_in_pool(node, b"large", len(large) - 1)
    # inline replies (the default) and leased values read in stripes through the transfer engine
    for options in ({}, {"inline_max": 64 * KiB, "stripe": 512 * KiB}):
        with mooncakefs.connect(node.tcp_url, timeout=5, **options) as s:
            for key, size in (("small", 4 * KiB), ("large", 2 * MiB)):
                with pytest.raises(ChecksumError, match=f"key '{key}'.*CRC-32C"):
                    s.get(key)
                buf = bytearray(size)
                with pytest.raises(ChecksumError):
                    s.get_into(key, buf)
            assert s.get("fine") == fine  # the connections stay usable
            bufs = [bytearray(2 * MiB) for _ in range(3)]
            results = s.batch_get_into(["fine", "large", "small"], bufs)
            assert results[0] == len(fine) and bufs[0] == fine
            assert isinstance(results[1], ChecksumError) and isinstance(results[2], ChecksumError), results
            assert s.batch_get(["large", "fine"]) == [None, fine]  # batch_get: None for a corrupted value
            with pytest.raises(ChecksumError), s.view("large"):
                pass
    # on the node's host the value is copied out of the shared pool, with no wire to check
    with mooncakefs.connect(node.unix_url, timeout=5) as s:
        assert len(s.get("large")) == len(large)


# ---------------------------------------------------------------------- a byte flipped in flight


class FlippingProxy:
    """A TCP proxy in front of a node that, when armed for a direction, flips the last byte of the
    next MARKER it forwards that way (once per arming)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed = {"up": 0, "down": 0}  # up: client -> node; down: node -> client
        self.flipped = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, direction: str) -> None:
        with self._lock:
            self.armed[direction] += 1

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            node = socket.create_connection(self.target)
            self._socks += [client, node]
            threading.Thread(target=self._pump, args=(client, node, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(node, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        tail = b""
        try:
            while chunk := src.recv(1 << 16):
                seen = tail + chunk
                at = seen.find(MARKER)
                if at >= 0:
                    with self._lock:
                        flip = self.armed[direction] > 0
                        if flip:
                            self.armed[direction] -= 1
                            self.flipped[direction] += 1
                    if flip:  # the marker's last byte is in this chunk: the tail is shorter than it
                        i = at + len(MARKER) - 1 - len(tail)
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0x01]) + chunk[i + 1 :]
                dst.sendall(chunk)
                tail = seen[-(len(MARKER) - 1) :]
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            s.close()


@pytest.fixture
def proxied(node_factory) -> Iterator[tuple[NodeProcess, FlippingProxy]]:
    node = node_factory(dram="64MiB")
    proxy = FlippingProxy(node.tcp_address)
    yield node, proxy
    proxy.close()


ENGINE = {"inline_max": 64 * KiB, "stripe": 512 * KiB}  # larger values through PUT_BEGIN/WRITE/PUT_END, READ


@pytest.mark.parametrize(
    "size, options", [(100, {}), (3 * MiB, {}), (3 * MiB, ENGINE)], ids=["small", "inline", "striped"]
)
def test_a_byte_flipped_in_flight_fails_the_put_and_stores_nothing(proxied, size, options):
    node, proxy = proxied
    data = value(size)
    with mooncakefs.connect(proxy.url, timeout=5, **options) as s:
        proxy.arm("up")
        with pytest.raises(ChecksumError, match="key 'k'"):
            s.put("k", data)
        assert proxy.flipped["up"] == 1
        assert not s.exists("k")
        s.put("k", data)  # not armed any more: the same client, on the same connections, stores it
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        assert s.get("k") == data


@pytest.mark.parametrize(
    "size, options", [(100, {}), (3 * MiB, {}), (3 * MiB, ENGINE)], ids=["small", "inline", "striped"]
)
def test_a_byte_flipped_in_flight_fails_the_get(proxied, size, options):
    node, proxy = proxied
    data = value(size)
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        s.put("k", data)
    with mooncakefs.connect(proxy.url, timeout=5, **options) as s:
        calls: list[Callable[[], object]] = [lambda: s.get("k"), lambda: s.get_into("k", bytearray(size))]
        for call in calls:
            proxy.arm("down")
            with pytest.raises(ChecksumError, match="key 'k'"):
                call()
        assert proxy.flipped["down"] == 2
        assert s.get("k") == data  # the connections stay usable


def test_a_batch_get_reports_a_byte_flipped_in_flight_for_its_item_only(proxied):
    node, proxy = proxied
    plain = bytes(range(256)) * 16
    flipped = value(4 * KiB)
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        s.put("plain", plain)
        s.put("flipped", flipped)
    with mooncakefs.connect(proxy.url, timeout=5) as s:
        bufs = [bytearray(4 * KiB), bytearray(4 * KiB), bytearray(4 * KiB)]
        proxy.arm("down")
        results = s.batch_get_into(["plain", "flipped", "plain"], bufs)
        assert results[0] == results[2] == len(plain) and bufs[0] == bufs[2] == plain
        assert isinstance(results[1], ChecksumError), results
        assert s.batch_get_into(["flipped"], [bufs[1]]) == [len(flipped)] and bufs[1] == flipped


def test_a_get_given_the_crc_its_value_must_have_refuses_a_different_value_on_every_path(proxied):
    """``get(key, crc=...)``: a copy checked against the CRC its writer published (a reader taking a chunk
    from another reader's node, mooncakefs.p2p).  A stale copy is consistent with the node's own CRC of
    it, so only the writer's tells it apart; the bytes are checked once, in the pass that checks the
    wire, and also where they come through the shared pool (no wire there)."""
    node, proxy = proxied
    current, stale = value(3 * MiB, 1), value(3 * MiB, 2)
    with mooncakefs.connect(node.tcp_url, timeout=5) as s:
        s.put("small", current[:100])
        s.put("k", stale)
    clients = {
        "inline": mooncakefs.connect(node.tcp_url, timeout=5),
        "striped": mooncakefs.connect(node.tcp_url, timeout=5, **ENGINE),
        "pool": mooncakefs.connect(node.unix_url, timeout=5),
    }
    try:
        for path, s in clients.items():
            assert s.get("small", crc=_engine.crc32c(current[:100])) == current[:100], path
            with pytest.raises(ChecksumError, match="key 'k'"):
                s.get("k", crc=_engine.crc32c(current))
            assert s.get("k", crc=_engine.crc32c(stale)) == stale, path  # the connection stays usable
            assert s.get("k") == stale, path  # without it: the node's own CRC, as before
    finally:
        for s in clients.values():
            s.close()
    # and a byte flipped in flight still fails it, checked against the given CRC
    with mooncakefs.connect(proxy.url, timeout=5) as s:
        proxy.arm("down")
        with pytest.raises(ChecksumError):
            s.get("k", crc=_engine.crc32c(stale))
        assert proxy.flipped["down"] == 1


# ---------------------------------------------------------------------------- repair between replicas


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh)")
def test_repair_copies_a_value_with_its_stored_crc_and_never_spreads_a_corrupted_one(tmp_path, request):
    """A node joins and takes over two keys: the intact one is copied to it, the one scribbled over in
    the old owner's memory is refused by the new owner (its bytes fail the CRC kept since the put),
    and the old owner drops it instead of serving it."""
    from test_cluster_store import Cluster

    with contextlib.closing(EtcdCluster().start()) as etcd:
        cluster = Cluster(tmp_path, etcd.url, "crc-repair", 2)
        try:
            cluster.start()
            with mooncakefs.connect(cluster.url) as store:
                now = store.map
                after = PlacementMap.compute(
                    now.epoch + 1, {**now.nodes, "latecomer": {}}, groups=now.groups, width=now.width
                )
                moving = [
                    k for k in (f"moving/{i}" for i in range(10_000)) if after.owners(k.encode())[0] == "latecomer"
                ]
                owner_id = now.owners(moving[0].encode())[0]
                good, bad = [k for k in moving if now.owners(k.encode())[0] == owner_id][:2]
                owner = cluster.node_of(owner_id)
                store.put(good, value(4 * KiB, 1), replicas=1)
                store.put(bad, value(4 * KiB, 2), replicas=1)
            flip_in_pool(owner, bad.encode(), 100)
            late = NodeProcess(tmp_path, name="late", dram="32MiB", extra=cluster.nodes[0].extra)
            late.data.mkdir(parents=True)
            (late.data / "node-id").write_text("latecomer\n")
            cluster.nodes.append(late.start())
            cluster.wait_members(3)
            assert wait_until(lambda: cluster.holders(good) == {"latecomer"}, timeout=20), cluster.holders(good)
            assert wait_until(lambda: not cluster.holders(bad), timeout=20), cluster.holders(bad)
            assert "fails its CRC-32C check here" in owner.log()
            with mooncakefs.connect(late.tcp_url, timeout=5) as direct:
                assert direct.get(good) == value(4 * KiB, 1)
        finally:
            cluster.close()
