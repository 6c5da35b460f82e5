"""The node daemon and its client, end to end: real ``mooncakefs node`` processes, real sockets.

- API parity of ``mooncakefs.connect`` over the Unix socket (mapped pool) and TCP (framed protocol);
- several client processes at once; clients and nodes killed at the worst moment;
- the cluster secret, socket permissions, SIGTERM, /metrics;
- a fuzzer throwing malformed frames at the node, which must keep serving.

The nodes are started by ``tests/node_helpers.py``; every one is SIGKILLed at teardown if still running.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import random
import resource
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import KiB, MiB, child_env, kill_process, rand_bytes, spawn_python
from heap_probe import HAS_MALLINFO2, heap_after_batch
from node_helpers import NodeProcess, free_port, raw_channel, scrape_metrics, wait_for

import mooncakefs
from mooncakefs import wire
from mooncakefs.errors import (
    AuthenticationError,
    BufferTooSmall,
    InvalidArgument,
    InvalidKey,
    KeyExists,
    KeyNotFound,
    OutOfSpace,
    ProtocolError,
    Unavailable,
)
from mooncakefs.keys import INTERNAL_PREFIX, InternalKey
from mooncakefs.wire import HEADER, MAGIC, Op

TRANSPORTS = ["unix", "tcp"]
SIZES = [0, 4 * KiB, 1 * MiB, 16 * MiB]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def node_factory(tmp_path):
    """``make(start=True, **NodeProcess options)``: a node under tmp_path, SIGKILLed at teardown."""
    made: list[NodeProcess] = []

    def make(start: bool = True, **options) -> NodeProcess:
        options.setdefault("name", f"n{len(made)}")
        node = NodeProcess(tmp_path, **options)
        made.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in made:
        node.kill()
    for node in made:  # shown by pytest only when the test failed
        sys.stderr.write(f"\n--- {node.name} log ---\n{node.log()}\n")


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """One node (64 MiB DRAM, 128 MiB SSD, TCP and /metrics) for the API tests of this module."""
    node = NodeProcess(tmp_path_factory.mktemp("shared"), name="shared", dram="64MiB", ssd="128MiB", metrics="auto")
    node.start()
    yield node
    node.kill()


def _leases_and_pending_settle(node: NodeProcess) -> bool:
    m = scrape_metrics(node)
    return m.get("mooncakefs_read_leases", -1) == 0 and m.get("mooncakefs_pending_puts", -1) == 0


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def client(shared_node, transport, request):
    """A RemoteStore on the shared node over ``transport``; keys go under ``client.ns`` (removed after).
    After the test the node must hold no read lease and no unfinished put for it."""
    assert shared_node.alive, shared_node.log()
    store = mooncakefs.connect(shared_node.url(transport), timeout=10)
    store.ns = f"t{abs(hash(request.node.nodeid)) % 10**8}/"
    yield store
    with contextlib.suppress(Exception):
        store.remove_prefix(store.ns)
    store.close()
    assert shared_node.alive, shared_node.log()
    assert wait_for(lambda: _leases_and_pending_settle(shared_node), timeout=5), scrape_metrics(shared_node)


# ---------------------------------------------------------------------------------- 1. API parity


@pytest.mark.parametrize("size", SIZES, ids=["0B", "4KiB", "1MiB", "16MiB"])
def test_put_get_roundtrip_is_byte_exact(client, size):
    key = client.ns + f"v{size}"
    value = rand_bytes(size, ("roundtrip", size))
    client.put(key, value)
    assert client.exists(key) and key in client
    got = client.get(key)
    assert type(got) is bytes and got == value

    exact = bytearray(size)
    assert client.get_into(key, exact) == size and exact == value
    roomy = bytearray(b"\xee" * (size + 17))
    assert client.get_into(key, roomy) == size
    assert roomy[:size] == value and roomy[size:] == b"\xee" * 17, "get_into wrote past the value"
    with client.view(key) as mv:
        assert len(mv) == size and mv.readonly and bytes(mv) == value

    info = client.stat(key)
    assert info.size == size and info.key == key and info.tier == "dram" and not info.pinned
    assert info.expires is None
    assert info.checksum == mooncakefs._engine.crc32c(value)

    # other buffer kinds as the source
    client.put(key, memoryview(bytearray(value)))
    assert client.get(key) == value
    assert client.remove(key) is True
    assert not client.exists(key) and key not in client
    assert client.remove(key) is False
    with pytest.raises(KeyNotFound):
        client.get(key)


def test_overwrite_and_key_forms(client):
    k = client.ns + "same"
    client.put(k, b"first")
    client.put(k.encode(), b"second-longer-value" * 3000)  # str and bytes name the same key
    assert client.get(k) == b"second-longer-value" * 3000
    client.put(k, b"")
    assert client.get(k.encode()) == b""

    raw = client.ns.encode() + b"\xff\xfe-not-utf8"
    client.put(raw, b"bin")
    assert client.get(raw) == b"bin"
    listed = list(client.keys(client.ns))
    assert raw in listed and k in listed  # utf-8 keys come back as str, others as bytes
    long_key = client.ns + "x" * (1024 - len(client.ns))
    client.put(long_key, b"1024-byte key")
    assert client.get(long_key) == b"1024-byte key"


def test_numpy_buffers(client):
    k = client.ns + "np"
    arr = np.random.default_rng(3).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
    client.put(k, arr)
    out = np.empty_like(arr)
    assert client.get_into(k, out) == arr.nbytes
    assert np.array_equal(out, arr)
    flat = np.empty(arr.nbytes + 8, dtype=np.uint8)
    assert client.get_into(k, flat) == arr.nbytes
    assert flat[: arr.nbytes].tobytes() == arr.tobytes()
    assert np.frombuffer(client.get(k), dtype=np.float32).reshape(arr.shape).tolist() == arr.tolist()

    small = np.arange(100, dtype=np.int16)
    client.put(k + "/small", small)
    got = np.zeros(100, dtype=np.int16)
    assert client.get_into(k + "/small", got) == 200 and np.array_equal(got, small)

    with pytest.raises(TypeError):
        client.put(k + "/strided", arr[:, ::2])  # not contiguous
    with pytest.raises(TypeError):
        client.get_into(k, b"\0" * arr.nbytes)  # read-only destination
    assert not client.exists(k + "/strided")


def test_error_classes(client):
    ns = client.ns
    with pytest.raises(KeyNotFound) as ei:
        client.get(ns + "missing")
    assert isinstance(ei.value, KeyError) and "missing" in str(ei.value)
    with pytest.raises(KeyNotFound):
        client.get_into(ns + "missing", bytearray(10))
    with pytest.raises(KeyNotFound):
        client.stat(ns + "missing")
    with pytest.raises(KeyNotFound), client.view(ns + "missing"):
        pass
    with pytest.raises(KeyNotFound):
        del client[ns + "missing"]

    # if_absent
    client.put(ns + "once", b"original", if_absent=True)
    with pytest.raises(KeyExists):
        client.put(ns + "once", b"replacement", if_absent=True)
    with pytest.raises(KeyExists):
        client.put(ns + "once", bytes(3 * MiB), if_absent=True)  # the reserve-then-fill path too
    assert client.get(ns + "once") == b"original"

    # a too-small buffer: nothing written, and the sizes reported (small value and large value)
    for size in (100, 2 * MiB):
        key = ns + f"big{size}"
        client.put(key, rand_bytes(size, size))
        buf = bytearray(b"\x55" * (size - 1))
        with pytest.raises(BufferTooSmall) as ei:
            client.get_into(key, buf)
        assert ei.value.needed == size and ei.value.given == size - 1 and isinstance(ei.value, ValueError)
        assert buf == b"\x55" * (size - 1), "BufferTooSmall must leave the buffer untouched"
        assert client.get(key) == rand_bytes(size, size)  # and the connection is still fine

    # invalid keys: caught by the client, before anything is sent
    for bad in ("", b"", "x" * 1025, b"y" * 1025, 17, None, INTERNAL_PREFIX + b"abc", "\udc80"):
        with pytest.raises(InvalidKey):
            client.put(bad, b"v")
        with pytest.raises(InvalidKey):
            client.get(bad)
        assert bad not in client

    # a pinned value bigger than DRAM: OutOfSpace, and the reservation is not leaked
    before = client.stats()["dram"]["used"]
    with pytest.raises(OutOfSpace):
        client.put(ns + "huge", bytes(80 * MiB), pin=True)
    assert not client.exists(ns + "huge")
    assert client.stats()["dram"]["used"] == before

    with pytest.raises(ValueError):
        client.put(ns + "ttl", b"v", ttl=-1)


def test_pin_ttl_and_stat(client):
    k = client.ns + "pinned"
    client.put(k, b"p" * 5000, pin=True)
    assert client.stat(k).pinned
    client.put(client.ns + "ttl", b"short-lived", ttl=0.3)
    info = client.stat(client.ns + "ttl")
    assert info.expires is not None and 0 < info.expires - time.time() <= 0.3 + 0.05
    assert wait_for(lambda: not client.exists(client.ns + "ttl"), timeout=3)
    with pytest.raises(KeyNotFound):
        client.get(client.ns + "ttl")


def _embedded_error(tmp_path: Path, **put_options) -> str:
    """What the embedded store (no VRAM tier, as the shared node has none) says to a put with these options."""
    with mooncakefs.open(tmp_path / "embedded", dram="4MiB") as store, pytest.raises(InvalidArgument) as refused:
        store.put("k", b"v", **put_options)
    return str(refused.value)


def _puts_served(node: NodeProcess) -> float:
    metrics = scrape_metrics(node)
    return sum(metrics.get(f'mooncakefs_requests_total{{op="{op}"}}', 0) for op in ("put", "put_begin"))


@pytest.mark.parametrize("size", [16, 1 * MiB], ids=["16B", "1MiB"])  # in the PUT; PUT_BEGIN on the Unix socket
def test_a_put_tier_travels_to_the_node_and_is_checked_as_the_embedded_store_checks_it(
    client, shared_node, tmp_path, size
):
    """``tier=`` reaches the node's store: a node without a VRAM tier refuses tier="vram" as the embedded
    store does (nothing stored) and takes tier="dram"; a tier name no store knows is refused by the client
    before any frame is sent."""
    key, value = client.ns + "tiered", rand_bytes(size, "tier")
    with pytest.raises(InvalidArgument) as refused:
        client.put(key, value, tier="vram")
    assert str(refused.value) == _embedded_error(tmp_path, tier="vram")
    assert not client.exists(key)
    client.put(key, value, tier="dram")
    assert client.stat(key).tier == "dram" and client.get(key) == value
    puts = _puts_served(shared_node)
    for bad in ("gpu", "VRAM", 0):
        with pytest.raises(InvalidArgument) as refused:
            client.put(key, b"never sent", tier=bad)
        assert str(refused.value) == _embedded_error(tmp_path, tier=bad)
    assert _puts_served(shared_node) == puts and client.get(key) == value


def test_a_put_frame_without_a_tier_is_still_taken(shared_node, transport):
    """The tier is an optional last field of PUT's meta: a frame without it (a client from before it)
    is a plain put, and one with it is placed by it."""
    ch = raw_channel(shared_node.url(transport))
    try:
        ch.send(Op.PUT, [b"oldstyle/k", 3, 0, None, None], b"old")
        ch.read_reply()
        ch.send(Op.PUT, [b"oldstyle/k", 3, 0, None, None, "vram"], b"new")
        with pytest.raises(InvalidArgument, match="tier='vram' needs a VRAM tier"):
            ch.read_reply()
        ch.send(Op.PUT_BEGIN, [b"oldstyle/big", 3, 0, None, None, "gpu"])
        with pytest.raises(InvalidArgument, match="tier must be one of"):
            ch.read_reply()
    finally:
        ch.close()
    with mooncakefs.connect(shared_node.url(transport), timeout=10) as client:
        assert client.get("oldstyle/k") == b"old" and not client.exists("oldstyle/big")
        assert client.remove_prefix("oldstyle/") == 1


def test_listing_prefix_stats_persist(client):
    ns = client.ns
    chain = [f"{ns}blk/{i}" for i in range(10)]
    for i, k in enumerate(chain[:6]):
        client.put(k, bytes([i]) * 1000)
    assert client.match_prefix(chain) == 6
    assert client.match_prefix(chain[:3]) == 3
    assert client.match_prefix([ns + "nope", *chain]) == 0
    assert client.match_prefix([]) == 0
    assert sorted(client.keys(ns + "blk/")) == sorted(chain[:6])
    assert sorted(k for k in client if k.startswith(ns)) == sorted(chain[:6])

    stats = client.stats()
    assert {"dram", "ssd", "objects"} <= stats.keys()
    assert {"capacity", "used", "objects", "hits", "misses", "evictions", "promotions"} <= stats["dram"].keys()
    assert stats["dram"]["capacity"] == 64 * MiB
    assert len(client) == stats["objects"] >= 6

    assert client.persist(chain[:2]) == 2  # written to the SSD tier
    assert client.persist([chain[0], ns + "missing"]) == 0  # already there / skipped
    assert isinstance(client.persist(), int)

    assert client.remove_prefix(ns + "blk/") == 6
    assert list(client.keys(ns + "blk/")) == []
    assert client.match_prefix(chain) == 0


def test_batch_operations(client):
    ns = client.ns
    big = rand_bytes(5 * MiB, "batch-big")  # bigger than one batch frame: sent on its own
    items = {ns + "a": b"alpha", ns + "b": rand_bytes(200 * KiB, "b"), ns + "big": big, ns + "empty": b""}
    assert client.batch_put(items) == [None] * 4
    results = client.batch_put([(ns + "c", b"c"), ("", b"bad"), (ns + "a", b"again")], if_absent=True)
    assert results[0] is None and isinstance(results[1], InvalidKey) and isinstance(results[2], KeyExists)
    assert client.get(ns + "a") == b"alpha"

    keys = [ns + "a", ns + "missing", ns + "big", ns + "b", ns + "empty", ns + "c"]
    assert client.batch_get(keys) == [b"alpha", None, big, items[ns + "b"], b"", b"c"]

    bufs = [bytearray(10), bytearray(10), bytearray(5 * MiB), bytearray(100), np.empty(0, np.uint8)]
    res = client.batch_get_into([ns + "a", ns + "missing", ns + "big", ns + "b", ns + "empty"], bufs)
    assert res[0] == 5 and bufs[0][:5] == b"alpha"
    assert isinstance(res[1], KeyNotFound)
    assert res[2] == 5 * MiB and bufs[2] == big
    assert isinstance(res[3], BufferTooSmall) and res[3].needed == 200 * KiB
    assert res[4] == 0
    with pytest.raises(ValueError):
        client.batch_get_into([ns + "a"], [])

    assert client.batch_exists([ns + "a", ns + "missing", "", ns + "big"]) == [True, False, False, True]
    assert client.batch_get([]) == [] and client.batch_put({}) == []


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc 2.33+ (mallinfo2) to see the heap")
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_clients_dropped_batch_stays_in_its_heap_for_the_next(shared_node, transport):
    """As the embedded store's (test_heap.py): a client's batch_get keeps the heap its values free."""
    kept = heap_after_batch("remote", shared_node.url(transport))
    assert kept["at_open"] == kept["kept"] > 0
    assert kept["free"] >= 16 * MiB
    gone = heap_after_batch("remote", shared_node.url(transport), MOONCAKEFS_HEAP_KEEP="0")
    assert gone["free"] < 8 * MiB


def test_mapping_protocol(client):
    k = client.ns + "m"
    client[k] = b"mapped"
    assert client[k] == b"mapped" and k in client
    client[k] = np.arange(10, dtype=np.uint8)
    assert client[k] == bytes(range(10))
    del client[k]
    assert k not in client
    with pytest.raises(KeyError):
        client[k]
    assert "" not in client and 5 not in client  # invalid keys are simply absent
    assert repr(client).startswith("<mooncakefs.RemoteStore ")


@pytest.mark.parametrize("size", [4 * KiB, 4 * MiB], ids=["4KiB", "4MiB"])
def test_put_in_place_stores_what_fill_writes_or_nothing(client, size):
    """``put_in_place``: the value is written where it will live (in the node's pool on its host, else a
    buffer sent after); stored only when ``fill`` says it wrote it all, and never half.  (A reader of
    a cluster mount receives a peer's chunk this way: straight off the socket into its node's pool.)"""
    payload = bytes(range(256)) * (size // 256)
    key = client.ns + "in-place"

    def fill(out: memoryview) -> bool:
        assert len(out) == size
        out[:] = payload
        return True

    assert client.put_in_place(key, size, fill) is True
    assert client.get(key) == payload

    def give_up(out: memoryview) -> bool:
        out[: size // 2] = b"\xff" * (size // 2)  # half written, then nothing to store
        return False

    assert client.put_in_place(client.ns + "not-there", size, give_up) is False
    assert not client.exists(client.ns + "not-there")

    def fail(out: memoryview) -> bool:
        raise KeyNotFound("somewhere/else")

    with pytest.raises(KeyNotFound):
        client.put_in_place(key, size, fail)
    assert client.get(key) == payload  # the value it would have replaced is still there
    with pytest.raises(mooncakefs.InvalidArgument):
        client.put_in_place(key, -1, fill)
    # (the fixture checks the node holds no unfinished put afterwards: given-up ones were aborted)


def test_view_keeps_value_while_replaced(client, transport):
    k = client.ns + "viewed"
    old, new = rand_bytes(1 * MiB, "old"), rand_bytes(1 * MiB, "new")
    client.put(k, old)
    with client.view(k) as mv:
        if transport == "unix":  # zero-copy: a slice of the mapped pool
            assert isinstance(mv.obj, mmap.mmap)
        with pytest.raises(TypeError):
            mv[0] = 1
        client.put(k, new)
        assert client.get(k) == new
        client.remove(k)
        assert not client.exists(k)
        assert bytes(mv) == old, "a viewed value changed under its lease"
    client.put(k, old)
    assert client.get(k) == old


class _CountingSocket:
    """A client connection's socket that counts its receives (and does everything else as the socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.recvs = sock, 0

    def recv_into(self, *args):
        self.recvs += 1
        return self.sock.recv_into(*args)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def test_a_small_get_over_tcp_is_one_receive(shared_node):
    """A get has no buffer to land a value in, so its first receive asks for a small value whole: one
    recv per get (a get_into a large buffer reads the reply's header first, to land a large value in place)."""
    with mooncakefs.connect(shared_node.url("tcp"), timeout=10) as store:
        store.put("one-recv", rand_bytes(4 * KiB, "one-recv"))
        (ch,) = store._idle  # the pooled connection the next requests take
        ch.sock = counting = _CountingSocket(ch.sock)
        for _ in range(5):
            assert store.get("one-recv") == rand_bytes(4 * KiB, "one-recv")
        assert counting.recvs == 5
        store.remove("one-recv")


def test_internal_keys_are_optional_and_hidden(client):
    # Plain str/bytes keys are all a user needs; InternalKey still travels (the filesystem's chunks).
    ikey = InternalKey(client.ns.encode() + b"chunk-0")
    client.put(ikey, b"chunk bytes")
    assert client.get(ikey) == b"chunk bytes"
    assert ikey not in list(client.keys(""))
    assert client.exists(ikey)
    assert client.remove(ikey)
    with pytest.raises(InvalidKey):
        client.put(bytes(ikey), b"user keys may not use the reserved prefix")


def test_one_client_many_threads(client):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                key = f"{client.ns}th{t}/{i % 3}"
                value = rand_bytes(50 * KiB + i, (t, i))
                client.put(key, value)
                assert client.get(key) == value
                buf = bytearray(len(value))
                assert client.get_into(key, buf) == len(value) and buf == value
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_connect_errors(tmp_path):
    with pytest.raises(Unavailable):
        mooncakefs.connect(f"unix://{tmp_path}/nobody.sock", timeout=1)
    with pytest.raises(Unavailable):
        mooncakefs.connect(f"tcp://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(mooncakefs.InvalidArgument, match="etcd://host:2379/CLUSTER"):  # it did not name the cluster URL
        mooncakefs.connect("http://example.invalid/")
    with pytest.raises(mooncakefs.InvalidArgument, match="tcp://host:port"):  # a port past 65535
        mooncakefs.connect("tcp://127.0.0.1:99999")
    for timeout in (0, -1, float("nan"), 1e308, "10", True):
        with pytest.raises(mooncakefs.InvalidArgument, match="timeout must be a number of seconds"):
            mooncakefs.connect(f"tcp://127.0.0.1:{free_port()}", timeout=timeout)


def test_arrays_of_python_objects_are_refused_by_a_node_client(client):
    """As by the embedded store (test_api): nothing of theirs crosses the socket, nothing lands in them."""
    client.put(client.ns + "k", b"\x01" * 48)
    objects = np.array([b"a", 7, None], dtype=object)
    with pytest.raises(mooncakefs.InvalidArgument, match="holds Python objects"):
        client.put(client.ns + "o", objects)
    with pytest.raises(mooncakefs.InvalidArgument, match="holds Python objects"):
        client.get_into(client.ns + "k", objects)
    assert objects[0] == b"a" and not client.exists(client.ns + "o")


def test_closed_client_raises_unavailable(shared_node):
    store = mooncakefs.connect(shared_node.unix_url)
    store.close()
    assert store.closed
    with pytest.raises(Unavailable):
        store.get("anything")
    store.close()  # twice is fine


# -------------------------------------------------------------------------- 2. many client processes

CLIENT_CODE = r"""
import hashlib, json, random, struct, sys
import mooncakefs
from mooncakefs.errors import KeyNotFound

url, wid, iters, ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opts = json.loads(sys.argv[5])
s = mooncakefs.connect(url, timeout=20, **opts)
HEAD = struct.Struct("<IIQ")

def make(w, seq, size):
    body = random.Random(f"{w}/{seq}").randbytes(size)
    return HEAD.pack(w, seq, size) + hashlib.sha256(body).digest() + body

def check(v):
    v = bytes(v)
    w, seq, size = HEAD.unpack_from(v)
    assert len(v) == HEAD.size + 32 + size, f"length {len(v)} for {w}/{seq}/{size}"
    assert v == make(w, seq, size), f"bytes differ for {w}/{seq}"
    return [w, seq]

rng = random.Random(wid)
own = {}
written, seen = [], []
counts = {}
for seq in range(iters):
    op = rng.random()
    size = rng.choice([0, 1000, 40000, 300000])
    if op < 0.25:
        key = f"{ns}own/{wid}/{rng.randrange(4)}"
        s.put(key, make(wid, seq, size)); own[key] = (seq, size); name = "put"
    elif op < 0.45:
        key = f"{ns}own/{wid}/{rng.randrange(4)}"; name = "get"
        try:
            v = s.get(key)
        except KeyNotFound:
            assert key not in own, f"lost {key}"
        else:
            assert v == make(wid, *own[key]), f"{key} is not what this writer last put"
    elif op < 0.5:
        key = f"{ns}own/{wid}/{rng.randrange(4)}"; name = "remove"
        assert s.remove(key) == (own.pop(key, None) is not None)
    elif op < 0.7:
        key = f"{ns}shared/{rng.randrange(5)}"; name = "shared-put"
        s.put(key, make(wid, seq, size)); written.append([wid, seq])
    elif op < 0.75:
        key = f"{ns}shared/{rng.randrange(5)}"; name = "shared-remove"
        s.remove(key)
    else:
        key = f"{ns}shared/{rng.randrange(5)}"; name = "shared-get"
        try:
            how = rng.randrange(3)
            if how == 0:
                seen.append(check(s.get(key)))
            elif how == 1:
                buf = bytearray(HEAD.size + 32 + 300000)
                n = s.get_into(key, buf)
                seen.append(check(buf[:n]))
            else:
                with s.view(key) as mv:
                    seen.append(check(mv))
        except KeyNotFound:
            pass
    counts[name] = counts.get(name, 0) + 1
for key, (seq, size) in own.items():
    assert s.get(key) == make(wid, seq, size)
s.close()
print(json.dumps({"written": written, "seen": seen, "counts": counts}))
"""


def test_many_client_processes_share_a_node(node_factory):
    node = node_factory(dram="64MiB", metrics="auto")
    ns = "mp/"
    configs = [
        (node.unix_url, {}),
        (node.unix_url, {"inline_max": 1024}),
        (node.tcp_url, {}),
        (node.tcp_url, {"inline_max": 16 * KiB, "stripe": 64 * KiB, "connections": 2}),  # striped
    ]
    procs = [
        spawn_python(CLIENT_CODE, url, str(w), "250", ns, json.dumps(opts)) for w, (url, opts) in enumerate(configs)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"client failed:\n{err}\n{node.log()}"
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            kill_process(p)
    written = {tuple(x) for o in outputs for x in o["written"]}
    seen = [tuple(x) for o in outputs for x in o["seen"]]
    assert sum(o["counts"].get("shared-get", 0) for o in outputs) > 50
    assert seen, "no shared value was ever read"
    assert set(seen) <= written, "a reader saw a value nobody wrote"
    assert node.alive
    with mooncakefs.connect(node.unix_url) as s:
        for i in range(5):
            with contextlib.suppress(KeyNotFound):
                v = s.get(f"{ns}shared/{i}")
                w, seq, _size = struct.unpack_from("<IIQ", v)
                assert (w, seq) in written
    assert wait_for(lambda: _leases_and_pending_settle(node), timeout=5), scrape_metrics(node)


# ------------------------------------------------------------------- 3. a client killed mid-put

HOLDER_CODE = r"""
import socket, sys, time
from mooncakefs import wire
from mooncakefs.wire import HEADER, MAGIC, Op, Channel

url = sys.argv[1]
if url.startswith("unix://"):
    sock = socket.socket(socket.AF_UNIX); sock.connect(url[7:])
else:
    host, _, port = url[6:].rpartition(":"); sock = socket.create_connection((host, int(port)))
ch = Channel(sock, url, timeout=10)
op, _f, (version, instance, nonce), _n = ch.read_frame()
ch.send(Op.AUTH, [wire.VERSION, None]); ch.read_reply()
# a read lease on a value, held
ch.send(Op.GET, [b"held", 0]); (size, lease, off), _ = ch.read_reply()
assert lease and size == 4 << 20, (size, lease)
# a put reserved, half written, and a WRITE frame cut in the middle of its payload
ch.send(Op.PUT_BEGIN, [b"inflight", 8 << 20, 0, None, None]); (put_id, pool_offset), _ = ch.read_reply()
ch.send(Op.WRITE, [put_id, 0], b"a" * (1 << 20)); ch.read_reply()
meta = wire._pack([put_id, 1 << 20])
sock.sendall(HEADER.pack(MAGIC, Op.WRITE, 0, len(meta), 1 << 20) + meta + b"b" * (300 << 10))
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_killed_mid_put_leaks_nothing(node_factory, transport):
    node = node_factory(dram="32MiB")
    with mooncakefs.connect(node.url(transport), timeout=5) as s:
        baseline = s.stats()["dram"]["used"]
        held = rand_bytes(4 * MiB, "held")
        s.put("held", held)
        proc = spawn_python(HOLDER_CODE, node.url(transport))
        try:
            line = proc.stdout.readline()
            assert line.strip() == "holding", proc.stderr.read() if proc.poll() is not None else line
            assert not s.exists("inflight")
            with pytest.raises(KeyNotFound):
                s.get("inflight")
            assert s.stats()["dram"]["used"] >= baseline + 12 * MiB  # the held value and the reservation
            assert s.remove("held")  # the lease keeps the bytes, not the key
            assert not s.exists("held")
            proc.kill()
            proc.wait(10)
            assert wait_for(lambda: s.stats()["dram"]["used"] == baseline, timeout=5), s.stats()
            assert not s.exists("inflight") and list(s.keys("")) == []
            s.put("inflight", b"fresh")  # the key is free to use
            assert s.get("inflight") == b"fresh"
        finally:
            kill_process(proc)
    assert node.alive


# --------------------------------------------------------------- 4. a node that stalls or dies


def test_stalled_then_killed_node_fails_fast_and_restart_recovers(node_factory):
    node = node_factory(dram="32MiB", ssd="64MiB")
    stores = {t: mooncakefs.connect(node.url(t), timeout=2) for t in TRANSPORTS}
    try:
        durable = {}
        for t, s in stores.items():
            for size in (4 * KiB, 1 * MiB, 5 * MiB):
                key = f"{t}/durable/{size}"
                durable[key] = rand_bytes(size, key)
                s.put(key, durable[key], durable=True)
            s.put(f"{t}/volatile", b"v" * 1000)
            assert s.get(f"{t}/durable/{5 * MiB}") == durable[f"{t}/durable/{5 * MiB}"]

        # stalled: every call gives up with Unavailable in bounded time, never hangs. Local readers may
        # still be served from the shared index until the node's heartbeat goes stale (2 s), by design.
        node.stop()
        time.sleep(2.2)
        outcome: dict[str, tuple[str, float]] = {}

        def blocked_get(t: str) -> None:
            start = time.monotonic()
            try:
                stores[t].get(f"{t}/durable/{1 * MiB}")
                outcome[t] = ("returned", time.monotonic() - start)
            except BaseException as exc:
                outcome[t] = (type(exc).__name__, time.monotonic() - start)

        threads = [threading.Thread(target=blocked_get, args=(t,)) for t in TRANSPORTS]
        for th in threads:
            th.start()
        for th in threads:
            th.join(15)
        assert not any(th.is_alive() for th in threads), "a get on a stalled node hung"
        for t in TRANSPORTS:
            name, took = outcome[t]
            assert name == "Unavailable", (t, outcome)
            assert took < 7, f"{t}: took {took:.1f} s with timeout=2"

        # killed: Unavailable at once (connection refused), from every kind of call
        node.kill()
        for t, s in stores.items():
            for call in (
                lambda s=s: s.get("x"),
                lambda s=s: s.put("x", b"1"),
                lambda s=s: s.exists("x"),
                lambda s=s: s.put("x", bytes(2 * MiB)),
                lambda s=s: s.stats(),
            ):
                start = time.monotonic()
                with pytest.raises(Unavailable):
                    call()
                assert time.monotonic() - start < 1.5, t

        # restarted on the same data dir, socket and port: the same client objects carry on
        node.start()
        for t, s in stores.items():
            for key, value in durable.items():
                assert s.get(key) == value, f"{t}: {key} after restart"
                buf = bytearray(len(value))
                assert s.get_into(key, buf) == len(value) and buf == value
            with s.view(f"unix/durable/{1 * MiB}") as mv:
                assert bytes(mv) == durable[f"unix/durable/{1 * MiB}"]
            s.put(f"{t}/after", rand_bytes(3 * MiB, t))
            assert s.get(f"{t}/after") == rand_bytes(3 * MiB, t)
    finally:
        for s in stores.values():
            s.close()


# ------------------------------------------------------------------------------------- 5. security


def test_tcp_needs_the_cluster_secret(node_factory, monkeypatch):
    monkeypatch.delenv("MOONCAKEFS_SECRET", raising=False)
    node = node_factory(secret=b"s3cret-of-the-cluster")
    with pytest.raises(AuthenticationError):
        mooncakefs.connect(node.tcp_url, timeout=3)
    with pytest.raises(AuthenticationError):
        mooncakefs.connect(node.tcp_url, secret="wrong", timeout=3)
    with pytest.raises(AuthenticationError):
        mooncakefs.connect(node.tcp_url, secret=b"s3cret-of-the-cluster-and-more", timeout=3)
    # a raw client that skips or fakes the proof gets an error frame and no service
    ch = raw_channel(node.tcp_url, handshake=False)
    ch.read_frame()
    ch.send(Op.AUTH, [wire.VERSION, b"\0" * 32])
    with pytest.raises(AuthenticationError):
        ch.read_reply()
    with pytest.raises(Unavailable):
        ch.send(Op.PING, [])
        ch.read_reply()
    ch.close()

    with mooncakefs.connect(node.tcp_url, secret="s3cret-of-the-cluster", timeout=3) as s:
        s.put("k", b"authorised")
        assert s.get("k") == b"authorised"
    monkeypatch.setenv("MOONCAKEFS_SECRET", "s3cret-of-the-cluster")
    with mooncakefs.connect(node.tcp_url, timeout=3) as s:
        assert s.get("k") == b"authorised"
    monkeypatch.delenv("MOONCAKEFS_SECRET")
    # the Unix socket is guarded by its permissions instead
    with mooncakefs.connect(node.unix_url, timeout=3) as s:
        assert s.get("k") == b"authorised"
    mode = stat.S_IMODE(os.stat(node.socket_path).st_mode)
    assert stat.S_ISSOCK(os.stat(node.socket_path).st_mode) and mode == 0o600, oct(mode)
    assert node.alive


def test_listening_beyond_loopback_needs_a_secret(tmp_path):
    env = child_env()
    env.pop("MOONCAKEFS_SECRET", None)
    argv = [
        sys.executable,
        "-m",
        "mooncakefs.cli",
        "node",
        "--data",
        str(tmp_path / "d"),
        "--dram",
        "16MiB",
        "--socket",
        str(tmp_path / "n.sock"),
        "--listen",
        f"0.0.0.0:{free_port()}",
        "--metrics",
        "none",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode != 0
    assert "--secret-file" in r.stderr and "0.0.0.0" in r.stderr, r.stderr
    assert not (tmp_path / "n.sock").exists()


@pytest.mark.parametrize("occupant", ["file", "link"])  # a directory: click's --socket refuses it
def test_a_socket_path_that_holds_something_else_is_refused_and_left_alone(tmp_path, occupant):
    """The node deleted whatever sat at --socket (a stale socket, it assumed): a regular file was lost."""
    path = tmp_path / "n.sock"
    if occupant == "file":
        path.write_bytes(b"precious")
    else:
        path.symlink_to(tmp_path / "elsewhere")
    argv = [sys.executable, "-m", "mooncakefs.cli", "node", "--data", str(tmp_path / "d"), "--dram", "16MiB"]
    argv += ["--socket", str(path), "--listen", "none", "--metrics", "none", "--no-prefault"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == InvalidArgument.exit_code, r.stderr
    assert "holds something that is not a socket" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert path.read_bytes() == b"precious" if occupant == "file" else path.is_symlink()


def test_second_node_on_same_socket_or_data_is_refused(node_factory, tmp_path):
    first = node_factory(dram="16MiB", listen="none")
    same_socket = node_factory(start=False, name="b", dram="16MiB", listen="none", socket_path=first.socket_path)
    proc = same_socket.launch()
    assert proc.wait(30) != 0
    assert "already serves" in same_socket.log()
    assert first.socket_path.exists(), "the refused second node deleted the running node's socket"
    same_data = node_factory(start=False, name="c", dram="16MiB", listen="none", data=first.data)
    proc = same_data.launch()
    assert proc.wait(30) != 0
    assert first.alive
    with mooncakefs.connect(first.unix_url) as s:
        s.put("still", b"here")
        assert s.get("still") == b"here"


@pytest.mark.parametrize("size", [16, 2 * MiB])  # in the request; through the pool or the engine
@pytest.mark.parametrize("via", ["unix_url", "tcp_url"])
def test_versions_travel_with_puts(node_factory, via, size):
    """A put's version and if_newer reach the node's store on every path, and NotNewer comes back."""
    node = node_factory(dram="64MiB")
    big = 1 << 100
    with mooncakefs.connect(getattr(node, via), timeout=5) as client:
        client.put("k", b"a" * size, version=big)
        assert client.versions(["k", "missing"]) == [big, None]
        assert client.stat("k").size == size and client.stat("k").version == big
        with pytest.raises(mooncakefs.NotNewer):
            client.put("k", b"b" * size, version=big, if_newer=True)
        client.put("k", b"c" * size, version=big + 1, if_newer=True)
        assert client.get("k") == b"c" * size and client.versions(["k"]) == [big + 1]
        results = client.batch_put([("k", b"d"), ("other", b"e")], version=big, if_newer=True)
        assert isinstance(results[0], mooncakefs.NotNewer) and results[1] is None
        assert client.versions(["other", "k"]) == [big, big + 1]
        with pytest.raises(ValueError):
            client.put("k", b"x", version=-1)
        with pytest.raises(TypeError):
            client.batch_put([("k", b"x")], nonsense=True)


# ------------------------------------------------------------------------------- 6. protocol fuzzing

FUZZ_OPS = [
    Op.PING,
    Op.MAP,
    Op.PUT,
    Op.PUT_BEGIN,
    Op.PUT_END,
    Op.PUT_ABORT,
    Op.WRITE,
    Op.GET,
    Op.READ,
    Op.RELEASE,
    Op.EXISTS,
    Op.REMOVE,
    Op.REMOVE_PREFIX,
    Op.STAT,
    Op.KEYS,
    Op.MATCH_PREFIX,
    Op.STATS,
    Op.PERSIST,
    Op.BATCH_PUT,
    Op.BATCH_GET,
    Op.BATCH_EXISTS,
    Op.BATCH_VERSIONS,
]
TEMPLATES = {  # a well-formed meta for each request
    Op.PING: [],
    Op.MAP: [],
    Op.PUT: [b"fz/k", 4, 0, None, None],
    Op.PUT_BEGIN: [b"fz/k", 64, 0, None, None],
    Op.PUT_END: [1],
    Op.PUT_ABORT: [1],
    Op.WRITE: [1, 0],
    Op.GET: [b"fz/k", 1024],
    Op.READ: [1, 0, 4],
    Op.RELEASE: [1],
    Op.EXISTS: [b"fz/k"],
    Op.REMOVE: [b"fz/k"],
    Op.REMOVE_PREFIX: [b"fz/"],
    Op.STAT: [b"fz/k"],
    Op.KEYS: [b"fz/"],
    Op.MATCH_PREFIX: [[b"fz/k"]],
    Op.STATS: [],
    Op.PERSIST: [[b"fz/k"]],
    Op.BATCH_PUT: [[b"fz/a", b"fz/b"], [2, 2], 0, None, None],
    Op.BATCH_GET: [[b"fz/a"], [1024]],
    Op.BATCH_EXISTS: [[b"fz/a"]],
    Op.BATCH_VERSIONS: [[b"fz/a"]],
}
REF_PREFIX = b"ref/"


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**48, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1 << 20)])
    if kind == 3:
        return rng.choice([0.5, -1.0, 4096.5, 100.0, 1e300, math.inf, -math.inf, math.nan])
    if kind in (4, 5):
        return rng.randbytes(rng.choice([0, 1, 3, 8, 40, 1100]))
    if kind == 6:
        return rng.choice(["", "fz/k", "é", "x" * 1100, "\u0000"])
    if kind in (7, 8):
        return rng.choice([b"fz/k", b"fz/", b"", b"fz/a"])
    if kind in (9, 10):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {_random_value(rng, 3): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _protect_refs(value):
    """Keep fuzzed requests off the reference values (a fuzzed REMOVE_PREFIX b"" would remove them)."""
    if isinstance(value, bytes | str):
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        if REF_PREFIX.startswith(raw) or raw.startswith(REF_PREFIX) or raw.startswith(INTERNAL_PREFIX):
            return b"fz/" + raw
        return value
    if isinstance(value, list):
        return [_protect_refs(v) for v in value]
    if isinstance(value, dict):
        return {_protect_refs(k): _protect_refs(v) for k, v in value.items()}
    return value


def _fuzz_meta(rng: random.Random, op: int):
    if rng.random() < 0.3:
        meta = _random_value(rng)
    else:
        meta = list(TEMPLATES[op])
        for _ in range(rng.randrange(1, 3)):
            choice = rng.randrange(3)
            if choice == 0 and meta:
                meta[rng.randrange(len(meta))] = _random_value(rng)
            elif choice == 1 and meta:
                meta.pop(rng.randrange(len(meta)))
            else:
                meta.append(_random_value(rng))
    return _protect_refs(meta)


def _frame(op: int, meta_bytes: bytes, payload: bytes = b"", declared: int | None = None, flags: int = 0) -> bytes:
    size = len(payload) if declared is None else declared
    return HEADER.pack(MAGIC, op, flags, len(meta_bytes), size) + meta_bytes + payload


class _Fuzzer:
    def __init__(self, node: NodeProcess, url: str, seed: int, secret: bytes | None = None) -> None:
        self.node, self.url, self.rng, self.secret = node, url, random.Random(seed), secret
        self.ch: wire.Channel | None = None
        self.frames = self.replies = self.drops = 0

    def channel(self) -> wire.Channel:
        if self.ch is None or self.ch.closed:
            self.ch = raw_channel(self.url, secret=self.secret, timeout=5)
        return self.ch

    def drop(self) -> None:
        if self.ch is not None:
            self.ch.close()
        self.ch = None
        self.drops += 1

    def reply_or_drop(self, expect_reply: bool = True) -> tuple[int, object] | None:
        """The node must answer (OK/ERROR) or drop the connection; it must never go silent."""
        ch = self.channel()
        try:
            if expect_reply:
                op, _f, meta, _n = ch.read_frame()
                ch.skip_payload()
                assert op in (Op.OK, Op.ERROR), op
                self.replies += 1
                return op, meta
            ch.send(Op.PING, [])
            op, _f, meta, _n = ch.read_frame()
            assert op == Op.OK, (op, meta)
            return op, meta
        except Unavailable as exc:
            assert "timed out" not in str(exc), f"the node went silent on {self.url}"
            self.drop()
        except ProtocolError:
            self.drop()
        return None

    def send_raw(self, data: bytes) -> bool:
        try:
            self.channel().sock.sendall(data)
            return True
        except OSError:
            self.drop()
            return False

    def mutated_frames(self, n: int) -> None:
        for _ in range(n):
            op = self.rng.choice(FUZZ_OPS)
            meta = _fuzz_meta(self.rng, op)
            try:
                meta_bytes = msgpack.packb(meta, use_bin_type=True)
            except (OverflowError, ValueError, TypeError):
                continue
            payload = self.rng.randbytes(self.rng.choice([0, 0, 2, 4, 64, 5000]))
            self.frames += 1
            if self.send_raw(_frame(op, meta_bytes, payload)):
                self.reply_or_drop(expect_reply=op != Op.RELEASE)

    def wrong_types(self) -> None:
        """Every field of every request's well-formed meta, replaced in turn by a value of another type."""
        wrong = [None, True, -1, 2**64 - 1, 0.5, 4096.5, math.nan, b"", "s", [], {}, [1, 2], {b"k": 1}]
        for op in FUZZ_OPS:
            template = TEMPLATES[op]
            for i in range(len(template)):
                for value in wrong:
                    meta = list(template)
                    meta[i] = value
                    payload = b"pp" if op in (Op.PUT, Op.WRITE) else b""
                    self.frames += 1
                    if self.send_raw(_frame(op, msgpack.packb(_protect_refs(meta)), payload)):
                        self.reply_or_drop(expect_reply=op != Op.RELEASE)

    def garbage(self, n: int) -> None:
        for i in range(n):
            ch = raw_channel(self.url, secret=self.secret, timeout=5, handshake=i % 2 == 0)
            with contextlib.suppress(OSError):
                ch.sock.sendall(self.rng.randbytes(self.rng.randrange(1, 3000)))
                ch.sock.shutdown(socket.SHUT_WR)
            self._expect_close(ch)

    def _expect_close(self, ch: wire.Channel) -> None:
        """Drain until the node closes the connection (an ERROR frame or two may come first)."""
        deadline = time.monotonic() + 5
        ch.sock.settimeout(5)
        try:
            while time.monotonic() < deadline:
                if not ch.sock.recv(65536):
                    break
            else:
                raise AssertionError("the node kept a garbage connection open")
        except ConnectionResetError:
            pass
        ch.close()
        self.frames += 1

    def truncated_and_huge(self) -> None:
        meta = msgpack.packb([b"fz/t", 1 << 20, 0, None, None])
        cases = [
            _frame(Op.PUT, meta)[:10],  # header cut short
            _frame(Op.PUT, meta)[: HEADER.size + 5],  # meta cut short
            _frame(Op.PUT, meta, b"z" * 1000, declared=1 << 20),  # payload cut short
            _frame(Op.STATS, b"", declared=0)[: HEADER.size],  # a whole frame: followed by EOF
            HEADER.pack(MAGIC, Op.GET, 0, 0xFFFFFFFF, 0),  # meta length far over MAX_META
            HEADER.pack(MAGIC, Op.PUT, 0, len(meta), 2**64 - 1) + meta,  # payload length absurd
            HEADER.pack(MAGIC, Op.WRITE, 0, 3, 2**47) + msgpack.packb([1, 0]),  # big but legal: then EOF
            HEADER.pack(0xBEEF, Op.PING, 0, 0, 0),  # bad magic
            HEADER.pack(MAGIC, 250, 0, 0, 0),  # unknown opcode
            HEADER.pack(MAGIC, Op.HELLO, 0, 0, 0),  # handshake opcodes after the handshake
            HEADER.pack(MAGIC, Op.OK, 0, 0, 0),
            HEADER.pack(MAGIC, Op.GET, 0, 4, 0) + b"\xc1\xc1\xc1\xc1",  # undecodable msgpack
            HEADER.pack(MAGIC, Op.GET, 0, wire.MAX_META, 0) + b"\x91" * 1000,  # legal size, never sent in full
        ]
        for data in cases:
            ch = raw_channel(self.url, secret=self.secret, timeout=5)
            with contextlib.suppress(OSError):
                ch.sock.sendall(data)
                ch.sock.shutdown(socket.SHUT_WR)
            self._expect_close(ch)
        # before the handshake: a client that never authenticates, or sends a request instead
        for data in (b"", _frame(Op.PING, msgpack.packb([])), _frame(Op.AUTH, msgpack.packb([99, None]))):
            ch = raw_channel(self.url, timeout=5, handshake=False)
            with contextlib.suppress(OSError):
                ch.sock.sendall(data)
                ch.sock.shutdown(socket.SHUT_WR)
            self._expect_close(ch)

    def before_auth(self, n: int) -> None:
        """Random frames (a forged AUTH among them) before the handshake: the node hangs up on each
        connection, having allocated nothing much for it."""
        for _ in range(n):
            op = self.rng.choice([Op.AUTH, Op.AUTH, Op.PING, Op.PUT, Op.GET, self.rng.randrange(256)])
            meta = msgpack.packb(
                _fuzz_meta(self.rng, op)
                if op in TEMPLATES
                else [wire.VERSION, self.rng.randbytes(self.rng.choice([0, 31, 32, 33]))]
            )
            payload = self.rng.randbytes(self.rng.choice([0, 0, 1, 100]))
            data = _frame(op, meta, payload, declared=self.rng.choice([None, None, 1 << 30]))
            if self.rng.random() < 0.3:
                data = data[: self.rng.randrange(1, len(data) + 1)]
            ch = raw_channel(self.url, timeout=5, handshake=False)
            with contextlib.suppress(OSError):
                ch.sock.sendall(data)
                ch.sock.shutdown(socket.SHUT_WR)
            self._expect_close(ch)

    def leases_and_puts(self, ref_key: bytes, ref_size: int) -> None:
        """READ/WRITE with real and random ids, offsets in and out of range: errors, never crashes."""
        ch = self.channel()
        ch.send(Op.GET, [ref_key, 0])
        (size, lease, _off), _ = ch.read_reply()
        assert size == ref_size and lease
        bad_reads = [
            [lease, -1, 4],
            [lease, 0, size + 1],
            [lease, size, 1],
            [lease, 2**63 - 1, 2**63 - 1],
            [lease, 0, -5],
            [lease, 1.5, 4],
            [lease, None, 4],
            [lease, "0", 4],
            [lease ^ 1, 0, 4],
            [self.rng.getrandbits(63), 0, 4],
            [-1, 0, 0],
            [None, 0, 0],
            [[lease], 0, 4],
        ]
        for meta in bad_reads:
            ch.send(Op.READ, meta)
            with pytest.raises((ValueError, TypeError)):
                ch.read_reply()
        ch.send(Op.READ, [lease, size - 10, 10])
        _meta, n = ch.read_reply()
        assert n == 10 and len(ch.read_payload(n)) == 10
        ch.send(Op.PUT_BEGIN, [b"fz/pending", 4096, 0, None, None])
        (put_id, _off), _ = ch.read_reply()
        bad_writes = [
            ([put_id, -1], b"x"),
            ([put_id, 4096], b"x"),
            ([put_id, 4000], b"x" * 200),
            ([put_id, 2**63], b""),
            ([put_id, 0.0], b"x"),
            ([put_id ^ 1, 0], b"x"),
            ([self.rng.getrandbits(63), 0], b"y" * 10),
            ([put_id], b""),
            ([put_id, 0, 0], b""),
        ]
        for meta, payload in bad_writes:
            ch.send(Op.WRITE, meta, payload)
            with pytest.raises((ValueError, TypeError)):
                ch.read_reply()
        for meta in ([put_id ^ 1], [None], ["x"], [put_id, 1]):
            ch.send(Op.PUT_END, meta)
            with pytest.raises((ValueError, TypeError)):
                ch.read_reply()
        ch.send(Op.RELEASE, [lease ^ 1, None, "x", [1], 2**64 - 1])  # no reply, no harm
        ch.send(Op.RELEASE, {"not": "a list"})
        ch.send(Op.PING, [])
        assert ch.read_reply()[0]
        ch.send(Op.PUT_ABORT, [put_id])
        ch.read_reply()
        ch.send(Op.RELEASE, [lease])
        ch.send(Op.PING, [])
        ch.read_reply()


@pytest.mark.parametrize("seed, secret", [(1, None), (2, b"the-fuzzed-cluster-secret")])
def test_protocol_fuzzing_leaves_the_node_serving(node_factory, seed, secret):
    """With a secret, the TCP fuzzer authenticates: every request frame is fuzzed past the handshake."""
    node = node_factory(dram="32MiB", ssd="64MiB", metrics="auto", secret=secret)
    refs = {
        b"ref/small": rand_bytes(100, "s"),
        b"ref/medium": rand_bytes(100 * KiB, "m"),
        b"ref/large": rand_bytes(2 * MiB, "l"),
        b"ref/empty": b"",
    }
    with mooncakefs.connect(node.unix_url) as s:
        for k, v in refs.items():
            s.put(k, v, pin=True)
        baseline = s.stats()["dram"]["used"]

    for i, url in enumerate([node.unix_url, node.tcp_url]):
        fuzzer = _Fuzzer(node, url, seed * 100 + i, secret)
        fuzzer.leases_and_puts(b"ref/large", 2 * MiB)
        fuzzer.truncated_and_huge()
        fuzzer.before_auth(40)
        fuzzer.garbage(15)
        fuzzer.wrong_types()
        fuzzer.mutated_frames(250)
        fuzzer.leases_and_puts(b"ref/medium", 100 * KiB)
        assert node.alive, node.log()
        assert fuzzer.replies > 100, (fuzzer.replies, fuzzer.drops)
        if fuzzer.ch is not None:
            fuzzer.ch.close()

    assert node.alive, node.log()
    for url in (node.unix_url, node.tcp_url):
        with mooncakefs.connect(url, secret=secret, timeout=5) as s:
            for k, v in refs.items():
                assert s.get(k) == v, k
            s.put("after-fuzz", rand_bytes(1 * MiB, "after"))
            assert s.get("after-fuzz") == rand_bytes(1 * MiB, "after")
            s.remove("after-fuzz")
    assert scrape_metrics(node).get('mooncakefs_requests_total{op="ping"}', 0) > 0
    # what the fuzzer managed to store is removable, and then the pool is back where it started
    with mooncakefs.connect(node.unix_url) as s:
        for k in list(s.keys("")):
            if not (k.encode() if isinstance(k, str) else k).startswith(REF_PREFIX):
                s.remove(k)
        assert wait_for(lambda: _leases_and_pending_settle(node), timeout=5), scrape_metrics(node)
        assert wait_for(lambda: s.stats()["dram"]["used"] == baseline, timeout=3), (
            f"DRAM leaked by malformed requests: {s.stats()['dram']['used']} used, {baseline} before "
            "(see test_put_begin_with_a_fractional_size_leaks_no_dram)"
        )


def test_unexpected_exceptions_are_not_logged_as_crashes(node_factory):
    """Malformed requests get an ERROR reply, not an unhandled exception that drops the connection."""
    node = node_factory(dram="16MiB", ssd="32MiB")
    ch = raw_channel(node.unix_url)
    odd = [
        (Op.PUT_BEGIN, [b"fz/x", 1.5, 0, None, None]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 0, math.inf, None]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 0, "soon", None]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 1.5, None, None]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 0, {"a": 1}, None]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 0, None, b"\x01"]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 0, None, 7]),
        (Op.PUT_BEGIN, [b"fz/x", 10, 0, None, b"\xff" * 16]),
        (Op.BATCH_VERSIONS, [[b"a", 3]]),
        (Op.GET, [b"fz/x", "big"]),
        (Op.GET, [{"k": 1}, 0]),
        (Op.GET, [[b"k"], 0]),
        (Op.STAT, [12]),
        (Op.EXISTS, [None]),
        (Op.MATCH_PREFIX, [[None, 3]]),
        (Op.BATCH_GET, [[b"a", b"b"], ["x", None]]),
        (Op.BATCH_PUT, [[b"a"], [1.0], 0, None, None]),
        (Op.BATCH_EXISTS, [[{}]]),
        (Op.PERSIST, [[[]]]),
        (Op.PERSIST, [7]),
        (Op.KEYS, ["str"]),
    ]
    for op, meta in odd:
        ch.send(op, meta)
        frame_op, _f, _reply, _n = ch.read_frame()
        assert frame_op in (Op.OK, Op.ERROR), (op, meta, frame_op)
        ch.skip_payload()
    ch.send(Op.PING, [])
    assert ch.read_reply()[0]
    ch.close()
    assert node.alive
    assert "connection failed" not in node.log(), node.log()


def test_put_begin_with_a_fractional_size_leaks_no_dram(node_factory):
    """A PUT_BEGIN whose size is not an integer is refused without keeping any DRAM."""
    node = node_factory(dram="16MiB", listen="none")
    with mooncakefs.connect(node.unix_url) as s:
        before = s.stats()["dram"]["used"]
        ch = raw_channel(node.unix_url)
        for size in (4_000_000.5, 1.5, 100.0):
            ch.send(Op.PUT_BEGIN, [b"frac", size, 0, None, None])
            with pytest.raises((TypeError, ValueError)):
                ch.read_reply()
        ch.close()
        assert wait_for(lambda: s.stats()["dram"]["used"] == before, timeout=3), s.stats()["dram"]
        s.put("after", bytes(12 * MiB))  # the pool is all there
        assert not s.exists("frac")


def test_put_larger_than_every_tier_is_refused_up_front(node_factory):
    """A put the node could never hold is refused at PUT_BEGIN, before the node sets memory aside
    for it: one client must not be able to make the node reserve gigabytes."""
    node = node_factory(dram="16MiB", ssd="32MiB")
    ch = raw_channel(node.unix_url)
    for size in (1 << 30, 8 << 30, 2**47):
        ch.send(Op.PUT_BEGIN, [b"too-big", size, 0, None, None])
        with pytest.raises(OutOfSpace):
            ch.read_reply()
    ch.close()
    with mooncakefs.connect(node.unix_url) as s:
        assert not s.exists("too-big")
    assert node.alive


# ----------------------------------------------------------------------------------------- 7. SIGTERM


def test_sigterm_exits_cleanly_and_removes_the_socket(node_factory):
    node = node_factory(dram="32MiB", ssd="32MiB")
    s = mooncakefs.connect(node.unix_url, timeout=3)
    s.put("k", rand_bytes(1 * MiB, "k"), durable=True)
    holder = raw_channel(node.tcp_url)
    holder.send(Op.PUT_BEGIN, [b"unfinished", 1 * MiB, 0, None, None])
    holder.read_reply()
    with s.view("k") as mv:  # a lease is out while the node stops
        start = time.monotonic()
        assert node.terminate(timeout=10) == 0, node.log()
        took = time.monotonic() - start
        assert bytes(mv[:4]) == rand_bytes(1 * MiB, "k")[:4]  # the mapping stays valid in this process
    assert took < 5, f"SIGTERM took {took:.1f} s"
    assert not node.socket_path.exists()
    assert '"stopped"' in node.log()
    with pytest.raises(Unavailable):
        s.get("k")
    holder.close()
    node.start()
    assert s.get("k") == rand_bytes(1 * MiB, "k")
    assert not s.exists("unfinished")
    s.close()
    assert node.terminate() == 0


# ----------------------------------------------------------------------------------------- 8. metrics


def test_metrics_endpoint(shared_node):
    with mooncakefs.connect(shared_node.tcp_url) as s:
        s.put("metrics/k", b"m" * 10000)
        assert s.get("metrics/k")
        used = s.stats()["dram"]["used"]
        with urllib.request.urlopen(shared_node.metrics_url, timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        s.remove("metrics/k")
    assert "# TYPE mooncakefs_requests_total counter" in text
    assert 'mooncakefs_requests_total{op="put"}' in text
    assert "mooncakefs_tier_used_bytes" in text
    m = scrape_metrics(shared_node)
    assert m['mooncakefs_requests_total{op="get"}'] >= 1
    assert m['mooncakefs_tier_capacity_bytes{tier="dram"}'] == 64 * MiB
    assert 'mooncakefs_tier_used_bytes{tier="ssd"}' in m
    assert m["mooncakefs_received_bytes_total"] >= 10000
    assert isinstance(used, int)


def test_metrics_used_bytes_matches_stats(node_factory):
    node = node_factory(dram="16MiB", metrics="auto")
    with mooncakefs.connect(node.unix_url) as s:
        s.put("a", bytes(3 * MiB))
        assert scrape_metrics(node)['mooncakefs_tier_used_bytes{tier="dram"}'] == s.stats()["dram"]["used"]
        assert scrape_metrics(node)["mooncakefs_objects"] == 1


def test_wire_round_trip_of_errors():
    for exc in (
        KeyNotFound(b"k"),
        KeyExists("k"),
        BufferTooSmall("k", 10, 5),
        OutOfSpace("full"),
        ValueError("bad"),
        TypeError("worse"),
        InvalidKey("x"),
    ):
        back = wire.error_from_meta(wire.error_meta(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert isinstance(wire.error_from_meta(["Nope", "m", None, 0, 0]), mooncakefs.MooncakeError)
    assert isinstance(wire.error_from_meta([1, 2]), ProtocolError)


def _pool_page_size(client: mooncakefs.RemoteStore) -> int:
    """The page size of the client's mapping of the node's pool (KernelPageSize in /proc/self/smaps)."""
    start = mooncakefs._engine.address(memoryview(client._pool))
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if "-" in line.split()[0] and int(line.split("-")[0], 16) == start:
            for detail in lines[i + 1 :]:
                if detail.startswith("KernelPageSize:"):
                    return int(detail.split()[1]) * 1024
    raise AssertionError("the pool's mapping is not in /proc/self/smaps")


def test_a_client_that_prefaults_the_pool_copies_into_it_without_page_faults(shared_node):
    """``prefault_pool=True`` (the mounts): every page of the node's pool is mapped into the client in a
    background thread, so a put through the pool faults nothing in (each first touch of a 4 KiB page
    otherwise costs a fault: ~7 us on these VMs, several times the copy itself)."""
    value = os.urandom(16 << 20)

    def faults_of_a_put(client: mooncakefs.RemoteStore, key: str) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        client.put(key, value)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with mooncakefs.connect(shared_node.unix_url, prefault_pool=True) as client:
        for thread in threading.enumerate():
            if thread.name == "mooncakefs-pool-prefault":
                thread.join(timeout=120)
        assert faults_of_a_put(client, "prefaulted") < 1024  # 16 MiB is 4096 pages
        assert client.get("prefaulted") == value
    with mooncakefs.connect(shared_node.unix_url) as client:  # (what it saves: a fresh mapping faults)
        pages = (16 << 20) // _pool_page_size(client)  # 4096, or 8 where the pool is on huge pages
        assert faults_of_a_put(client, "faulted") >= pages // 2
    with mooncakefs.connect(shared_node.unix_url) as client:
        client.remove("prefaulted")
        client.remove("faulted")
