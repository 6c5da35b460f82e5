"""The shared index: clients on the node's host read DRAM values with no round trip to the node.

The Cython index must lay out and change its table exactly as the pure-Python twin does, and a reader
racing the node (blocks freed and reused under it) must never return a wrong value: only a miss.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import random
import struct
import time
import zlib

import pytest
from conftest import PURE_ENGINE
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
        _reference.INDEX_HEADER_BYTES,
        _reference.INDEX_SLOT_BYTES,
    )


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
        fast.beat(), ref.beat()  # the node is alive however long the run above took (readers trust 2 s)
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
        node.beat()  # a busy machine may have taken the 2 s readers trust a beat for since create
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


def test_a_batch_read_fills_what_is_here_and_leaves_the_rest_to_the_node():
    """``read_batch`` (a client's same-host batch): hits into their buffers or as bytes, refused keys get
    their error, pre-filled slots are left alone, and the misses, the too-small buffers and the values
    over 64 KiB asked as bytes come back for the node; both engines alike."""
    answers = []
    for impl in (_engine, _reference):
        pool = bytearray(random.Random(3).randbytes(1 << 18))
        table = bytearray(HEADER + 64 * _engine.INDEX_SLOT_BYTES)
        node, reader = impl.SharedIndex(table, create=True), impl.SharedIndex(table, pool)
        for name, off, size in ((b"a", 0, 100), (b"b", 128, 5000), (b"big", 64 * 200, 70_000), (b"nil", 64, 0)):
            assert node.publish(digest(name), off, size)
        node.beat()
        keys = ["a", "b", "missing", "", "big", "nil", "a", "b", "skip"]
        dsts = [
            bytearray(100),
            None,
            bytearray(10),
            bytearray(10),
            None,
            bytearray(1),
            bytearray(99),
            bytearray(8000),
            None,
        ]
        results = [None] * 8 + ["already"]
        left = reader.read_batch(keys, dsts, results)
        assert left == [2, 4, 6], impl  # a miss, 70,000 bytes as bytes, 100 bytes into 99
        assert results[0] == 100 and dsts[0] == pool[:100]
        assert results[1] == bytes(pool[128 : 128 + 5000])
        assert isinstance(results[3], mooncakefs.InvalidKey)
        assert results[5] == 0 and results[7] == 5000 and dsts[7][:5000] == pool[128 : 128 + 5000]
        assert results[8] == "already" and [results[i] for i in left] == [None] * 3
        with pytest.raises(ValueError):
            reader.read_batch(keys, dsts[:-1], results)
        answers.append(([type(r).__name__ if isinstance(r, Exception) else r for r in results], left))
    assert answers[0] == answers[1]


def test_a_large_value_is_read_byte_exact_into_a_buffer_at_any_alignment():
    """Values of 4 MiB and more are copied with streaming stores (_stream_copy.h), on each path this CPU
    has: the bytes land exact at odd destination offsets, with a length no vector divides, and nothing
    past them is written."""
    size = (6 << 20) + 45
    pool = bytearray(64) + random.Random(5).randbytes(size) + bytearray(64)
    for impl, kind in ((_engine, "sse2"), (_engine, "avx2"), (_reference, "auto")):
        table = bytearray(HEADER + 16 * 32)
        node = impl.SharedIndex(table, create=True)
        reader = impl.SharedIndex(table, pool)
        d = digest(b"large")
        assert node.publish(d, 64, size)
        impl.force_stream_copy(kind)
        try:
            for shift in (0, 1, 17):
                out = bytearray(size + 64)
                node.beat()
                assert reader.read_into(d, memoryview(out)[shift:]) == size
                assert out[shift : shift + size] == pool[64 : 64 + size]
                assert out[:shift] == bytes(shift) and out[shift + size :] == bytes(64 - shift)
        finally:
            impl.force_stream_copy("auto")


def test_a_node_index_is_rejected_when_garbage():
    with pytest.raises(ValueError, match="not a mooncakefs shared index"):
        _engine.SharedIndex(bytearray(4096))


# -- racing a real node ----------------------------------------------------------------------------


def make_value(key_no: int, version: int, size: int) -> bytes:
    """A self-checking value: who wrote it, which version, its length, a CRC over all of it."""
    body = random.Random(key_no * 1_000_003 + version).randbytes(max(0, size - 16))
    head = struct.pack("<III", key_no, version, size)
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def check_value(data: bytes, key_no: int) -> str | None:
    """What is wrong with ``data`` as a value of key ``key_no``, or None if it is one of that key's values."""
    if len(data) < 16:
        return f"key k{key_no}: a {len(data)}-byte value, shorter than any value written"
    k, version, size = struct.unpack_from("<III", data)
    (crc,) = struct.unpack_from("<I", data, 12)
    if k != key_no:
        return f"key k{key_no}: got a value written for k{k} (version {version})"
    if size != len(data):
        return f"key k{key_no}: a torn length: {len(data)} bytes read, the value says {size}"
    if zlib.crc32(data[:12] + data[16:]) != crc:
        return f"key k{key_no}: version {version} is torn or overwritten (CRC mismatch)"
    return None


# The writer runs until it has made WRITER_OPS changes *and* every reader has checked READS_DURING_WRITES
# values while it was still writing, so the race is guaranteed to happen however slowly (or late) each
# process gets the CPU; RACE_TIMEOUT only bounds a hang.
KEYS, WRITER_OPS, READS_DURING_WRITES, READERS, RACE_TIMEOUT = 128, 6000, 300, 3, 120.0


def writer(url: str, reads: list, done, out: mp.Queue) -> None:
    """Overwrite and remove values until the race has happened; report what it did to ``out``.

    OutOfSpace is counted, not fatal: in a 2 MiB pool whose every value the readers keep hot, the node
    may find nothing cold enough to evict for a moment.  This test is about what readers see."""
    report = {"role": "writer", "puts": 0, "removes": 0, "out_of_space": 0, "error": None}
    try:
        store = mooncakefs.connect(url)
        rng, version, deadline = random.Random(3), 0, time.monotonic() + RACE_TIMEOUT
        while report["puts"] + report["removes"] < WRITER_OPS or min(r.value for r in reads) < READS_DURING_WRITES:
            if time.monotonic() > deadline:
                report["error"] = (
                    f"timed out after {RACE_TIMEOUT:.0f} s: reads checked during writes "
                    f"{[r.value for r in reads]}, writer ops {report['puts'] + report['removes']}"
                )
                break
            version += 1
            k = rng.randrange(KEYS)
            if rng.random() < 0.1:
                store.remove(f"k{k}")
                report["removes"] += 1
                continue
            try:
                store.put(f"k{k}", make_value(k, version, rng.choice([64, 4096, 20000, 60000])))
                report["puts"] += 1
            except mooncakefs.OutOfSpace:
                report["out_of_space"] += 1
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        done.set()
        out.put(report)


def reader(url: str, seed: int, count, done, out: mp.Queue) -> None:
    """Read random keys through the shared index until the writer is done; stop at the first wrong value."""
    report = {"role": f"reader {seed}", "checked": 0, "wrong": None, "error": None}
    try:
        store = mooncakefs.connect(url)
        rng, buf = random.Random(seed), bytearray(65536)
        while not done.is_set():
            k = rng.randrange(KEYS)
            try:
                n = store.get_into(f"k{k}", buf)
            except KeyError:
                continue
            wrong = check_value(bytes(buf[:n]), k)
            if wrong:
                report["wrong"] = wrong
                break
            report["checked"] += 1
            count.value = report["checked"]
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out.put(report)


@pytest.fixture
def small_node(tmp_path):
    node = NodeProcess(tmp_path, dram="2MiB", ssd="0", listen="none").start()
    yield node.unix_url
    assert node.terminate() == 0


def test_readers_racing_evictions_and_overwrites_never_see_a_wrong_value(small_node):
    """A 2 MiB pool, 128 keys of up to 60 KB: blocks are freed and reused all the time under readers
    copying through the shared index.  Every value a reader returns must be whole and the key's own."""
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    counts = [ctx.Value("q", 0, lock=False) for _ in range(READERS)]
    store = mooncakefs.connect(small_node)
    for k in range(64):
        store.put(f"k{k}", make_value(k, 0, 4096))
    procs = [ctx.Process(target=writer, args=(small_node, counts, done, results))]
    procs += [ctx.Process(target=reader, args=(small_node, 5 + i, counts[i], done, results)) for i in range(READERS)]
    for p in procs:
        p.start()
    reports = {}
    for _ in procs:
        try:
            report = results.get(timeout=RACE_TIMEOUT + 60)
        except queue.Empty:
            codes = {p.name: p.exitcode for p in procs}
            pytest.fail(f"a process never reported (it crashed or hung): exit codes {codes}, reports {reports}")
        reports[report["role"]] = report
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode} (reports: {reports})"
    w = reports.pop("writer")
    assert w["error"] is None, f"the writer failed: {w['error']} ({w})"
    for role, r in reports.items():
        assert r["wrong"] is None, f"{role} read a wrong value: {r['wrong']}"
        assert r["error"] is None, f"{role} failed: {r['error']}"
    assert store.stats()["dram"]["evictions"] > 0, f"no eviction: the pool never churned ({w})"


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
    assert os.path.exists(small_node[len("unix://") :])


@pytest.mark.skipif(PURE_ENGINE, reason="the twin copies holding the GIL: no publish can land mid-copy")
def test_a_slot_changed_during_the_copy_is_a_miss():
    """The reader's second sequence check: a copy of 256 MiB runs without the GIL, and meanwhile another
    thread republishes the slot (as the node does before reusing a block).  The node beats before each
    read, as readers take a node silent for 2 s as gone (a miss for another reason).  The publisher watches the
    destination fill (the pool is all ones, the destination zeros) and republishes once the copy has
    begun and before it has ended, so the overlap does not depend on how the machine schedules the
    reader; an attempt where the copy ran to its end first is tried again."""
    import threading

    size = 256 << 20
    pool = bytearray(b"\x01") * (size + 4096)
    table = bytearray(HEADER + 64 * _engine.INDEX_SLOT_BYTES)
    node = _engine.SharedIndex(table, create=True)
    reader = _engine.SharedIndex(table, pool)
    d = digest(b"big")
    probes = range(0, size, 16 << 20)  # where the publisher looks for copied bytes
    outcomes = []
    for attempt in range(50):
        node.publish(d, 4096 * (attempt % 2), size)
        node.beat()
        dst = bytearray(size)
        result: list[int] = []

        def read(dst: bytearray = dst, result: list[int] = result) -> None:
            result.append(reader.read_into(d, dst))

        t = threading.Thread(target=read)
        t.start()
        while not result and not any(dst[i] for i in probes):
            time.sleep(0)  # wait for the copy to begin
        overlapped = not result and not all(dst[i] for i in probes)
        node.publish(d, 4096 * (1 - attempt % 2), size)  # the slot moves on: the block may be reused
        t.join()
        assert result[0] in (-1, size)
        outcomes.append(result[0])
        if overlapped and result[0] == -1:
            break
    assert -1 in outcomes, outcomes
    node.beat()
    assert reader.read_into(d, bytearray(size)) == size  # unchanged slot: a hit


def test_values_every_reader_touched_are_still_evicted_when_a_put_needs_the_room(tmp_path):
    """Reads through the shared index earn a second chance, not immunity: when readers touched every
    DRAM value since eviction last looked (as busy readers do between any two looks), a put must still
    find room.  It used to raise OutOfSpace."""
    import mmap

    with mooncakefs.open(tmp_path / "kv", dram="1MiB", ssd=None) as store:
        table = mmap.mmap(-1, _engine.INDEX_HEADER_BYTES + 4096 * _engine.INDEX_SLOT_BYTES)
        store.share_index(_engine.SharedIndex(table, create=True))
        store._read_shared_since = lambda raw, entry: True  # every value read again before each look
        value = bytes(range(256)) * 32  # 8 KiB: the pool holds about 120
        for i in range(300):
            store.put(f"k{i}", value)
        assert store.get("k299") == value
        assert store.stats()["dram"]["evictions"] >= 180


@pytest.mark.parametrize("module", [_engine, _reference])
def test_a_damaged_header_is_refused_by_both_engines(module):
    """A slot count that is zero, not a power of two or past the end of the mapping, or a wrong magic:
    neither the Cython index nor its twin trusts the table."""
    table = bytearray(HEADER + 64 * _engine.INDEX_SLOT_BYTES)
    module.SharedIndex(table, create=True)
    for slots in (0, 3, 128, 1 << 40):
        bad = bytearray(table)
        struct.pack_into("<Q", bad, 8, slots)
        with pytest.raises(ValueError, match="not a mooncakefs shared index"):
            module.SharedIndex(bad)
    bad = bytearray(table)
    bad[:8] = bytes(8)
    with pytest.raises(ValueError, match="not a mooncakefs shared index"):
        module.SharedIndex(bad)
    with pytest.raises(ValueError, match="too small"):
        module.SharedIndex(bytearray(HEADER))
