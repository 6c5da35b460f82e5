"""The shared index: clients on the node's host read DRAM values with no round trip to the node.

The Cython index must lay out and change its table exactly as the pure-Python twin does, and a reader
racing the node (blocks freed and reused under it) must never return a wrong value: only a miss.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import struct
import time
import zlib

import pytest
from node_helpers import NodeProcess

import mooncakefs
from mooncakefs import _engine, _reference

HEADER = _engine.INDEX_HEADER_BYTES


def digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16).digest()


def table_pair(slots: int = 64):
    size = HEADER + slots * _engine.INDEX_SLOT_BYTES
    pool = bytearray(random.Random(1).randbytes(1 << 16))
    fast_table, ref_table = bytearray(size), bytearray(size)
    fast = _engine.SharedIndex(fast_table, create=True)
    ref = _reference.SharedIndex(ref_table, create=True)
    return (fast, fast_table), (ref, ref_table), pool


def test_layout_constants_agree():
    assert (_engine.INDEX_HEADER_BYTES, _engine.INDEX_SLOT_BYTES) == (
        _reference.INDEX_HEADER_BYTES, _reference.INDEX_SLOT_BYTES)


def test_engine_and_reference_change_the_table_identically():
    """A long random run of publishes and removes on a small table (chains, tombstones, full probes)."""
    (fast, fast_table), (ref, ref_table), pool = table_pair(slots=64)
    rng = random.Random(7)
    keys = [digest(f"k{i}".encode()) for i in range(150)]
    for _ in range(3000):
        d = rng.choice(keys)
        if rng.random() < 0.6:
            off, size = rng.randrange(0, 1000) * 64, rng.randrange(0, 4000)
            assert fast.publish(d, off, size) == ref.publish(d, off, size)
        else:
            assert fast.remove(d) == ref.remove(d)
        assert fast_table[HEADER:] == ref_table[HEADER:]
    readers = _engine.SharedIndex(fast_table, pool), _reference.SharedIndex(ref_table, pool)
    for d in keys:
        a, b = bytearray(5000), bytearray(5000)
        assert readers[0].read_into(d, a) == readers[1].read_into(d, b)
        assert a == b


def test_read_reports_miss_too_small_and_stale_node():
    for impl in (_engine, _reference):
        table, pool = bytearray(HEADER + 16 * 32), bytearray(b"x" * 128 + b"hello" + bytes(1000))
        node = impl.SharedIndex(table, create=True)
        reader = impl.SharedIndex(table, pool)
        d = digest(b"a")
        assert reader.read_into(d, bytearray(8)) == -1  # never published
        assert node.publish(d, 128, 5)
        out = bytearray(8)
        assert reader.read_into(d, out) == 5 and out[:5] == b"hello"
        assert reader.read(d) == b"hello"
        assert reader.read_into(d, bytearray(2)) == -2 - 5  # too small: the caller asks the node
        assert node.hits(d) >= 2
        node.stop()  # a stopped (or silent) node: every read goes to the node
        assert reader.read_into(d, out) == -1
        node.beat()
        assert node.remove(d) and reader.read_into(d, out) == -1
        assert not node.publish(d, 100, 5)  # not 64-byte aligned: refused, not published


def test_a_node_index_is_rejected_when_garbage():
    with pytest.raises(ValueError, match="not a mooncakefs shared index"):
        _engine.SharedIndex(bytearray(4096))


# -- racing a real node ----------------------------------------------------------------------------

def make_value(key_no: int, version: int, size: int) -> bytes:
    """A self-checking value: who wrote it, which version, its length, a CRC over all of it."""
    body = random.Random(key_no * 1_000_003 + version).randbytes(max(0, size - 16))
    head = struct.pack("<III", key_no, version, size)
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def check_value(data: bytes, key_no: int) -> None:
    k, _version, size = struct.unpack_from("<III", data)
    (crc,) = struct.unpack_from("<I", data, 12)
    assert (k, size, len(data)) == (key_no, size, size), "a value from another key or a torn length"
    assert zlib.crc32(data[:12] + data[16:]) == crc, "a torn or overwritten value"


def writer(url: str, seconds: float, keys: int) -> None:
    store = mooncakefs.connect(url)
    rng, version, end = random.Random(3), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        version += 1
        k = rng.randrange(keys)
        if rng.random() < 0.1:
            store.remove(f"k{k}")
        else:
            store.put(f"k{k}", make_value(k, version, rng.choice([64, 4096, 20000, 60000])))


def reader(url: str, seconds: float, keys: int, out: mp.Queue) -> None:
    store = mooncakefs.connect(url)
    rng, end, checked = random.Random(5), time.monotonic() + seconds, 0
    buf = bytearray(65536)
    while time.monotonic() < end:
        k = rng.randrange(keys)
        try:
            n = store.get_into(f"k{k}", buf)
        except KeyError:
            continue
        check_value(bytes(buf[:n]), k)
        checked += 1
    out.put(checked)


@pytest.fixture
def small_node(tmp_path):
    node = NodeProcess(tmp_path, dram="2MiB", ssd="0", listen="none").start()
    yield node.unix_url
    assert node.terminate() == 0


def test_readers_racing_evictions_and_overwrites_never_see_a_wrong_value(small_node):
    """A 2 MiB pool, 128 keys of up to 60 KB: blocks are freed and reused all the time under readers
    copying through the shared index.  Every value a reader returns must be whole and the key's own."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = mooncakefs.connect(small_node)
    for k in range(64):
        store.put(f"k{k}", make_value(k, 0, 4096))
    procs = [ctx.Process(target=writer, args=(small_node, 3.0, 128))]
    procs += [ctx.Process(target=reader, args=(small_node, 3.0, 128, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, "a reader saw a wrong value (its traceback is above)"
    checked = [results.get(timeout=5) for _ in range(3)]
    assert min(checked) > 100
    assert store.stats()["dram"]["evictions"] > 0  # the pool really was churning


def test_same_host_reads_skip_the_node_and_see_every_update(small_node):
    store = mooncakefs.connect(small_node)
    store.put("a", b"one")
    before = store.stats()
    for _ in range(200):
        assert store.get("a") == b"one"
    assert store.stats()["dram"]["hits"] == before["dram"]["hits"]  # no request reached the node
    store.put("a", b"two")
    assert store.get("a") == b"two"  # read-your-writes
    store.remove("a")
    with pytest.raises(KeyError):
        store.get("a")
    store.put("t", b"expiring", ttl=60)  # values that may expire are never in the shared index
    assert store.get("t") == b"expiring"
    assert os.path.exists(small_node[len("unix://"):])


def test_a_slot_changed_during_the_copy_is_a_miss():
    """The reader's second sequence check, made deterministic: a copy of 256 MiB runs without the GIL,
    and meanwhile another thread republishes the slot (as the node does before reusing a block)."""
    import threading

    size = 256 << 20
    pool = bytearray(size + 4096)
    table = bytearray(HEADER + 64 * _engine.INDEX_SLOT_BYTES)
    node = _engine.SharedIndex(table, create=True)
    reader = _engine.SharedIndex(table, pool)
    d = digest(b"big")
    node.publish(d, 0, size)
    dst = bytearray(size)
    result = []
    started = threading.Event()

    def read() -> None:
        started.set()
        result.append(reader.read_into(d, dst))

    t = threading.Thread(target=read)
    t.start()
    started.wait()
    time.sleep(0.002)  # the copy is under way (it takes tens of milliseconds)
    node.publish(d, 4096, size)  # the slot moves on: the block may be reused from here
    t.join()
    assert result == [-1]
    assert reader.read_into(d, dst) == size  # unchanged slot: a hit
