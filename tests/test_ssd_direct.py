"""Large page-aligned values reach SSD segments with O_DIRECT; everything still reads back exactly."""

import errno
import mmap
import os
import select
import threading

import pytest
from conftest import kill_process, spawn_python

import mooncakefs
from mooncakefs.keys import InternalKey
from mooncakefs.tiers.segments import SegmentFile, SegmentFiles
from mooncakefs.tiers.ssd import DIRECT_ALIGN, fsck

MiB = 1 << 20


def aligned_buffer(fill: int, size: int = MiB) -> mmap.mmap:
    buf = mmap.mmap(-1, size)  # page-aligned, as the filesystem's chunk buffers are
    buf.write(bytes([fill]) * size)
    return buf


def test_aligned_values_go_direct_and_mix_with_buffered_ones(tmp_path):
    small = {f"small/{i}": os.urandom(1000 + i) for i in range(5)}
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        for i in range(4):
            store.put(InternalKey(b"big/%d" % i), aligned_buffer(i))  # written through to SSD
            key = f"small/{i}"
            store.put(key, small[key], durable=True)  # buffered, unaligned, in the same segment
        segments = list(store._ssd.segments.values())
        assert any(seg.place.direct_fd >= 0 for seg in segments), "no O_DIRECT write happened"
        offsets = [int(off) for (off,) in store._ssd.db.execute("SELECT off FROM objects WHERE size = ?", (MiB,))]
        assert offsets and all(off % DIRECT_ALIGN == 0 for off in offsets)
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        for i in range(4):
            assert store.get(InternalKey(b"big/%d" % i)) == bytes([i]) * MiB
            key = f"small/{i}"
            assert store.get(key) == small[key]


def test_unaligned_large_values_take_the_page_cache(tmp_path):
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        data = bytearray(os.urandom(MiB + 1))  # not a multiple of the page size
        store.put("odd", data, durable=True)
        assert all(seg.place.direct_fd == -1 for seg in store._ssd.segments.values())
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        assert store.get("odd") == data


# -- write-through without the store lock ----------------------------------------------------------------
# A large page-aligned put reserves its room in a segment under the store's lock, writes its bytes without
# it (so other calls, and other puts' disk writes, go on meanwhile) and is indexed only once they are there.

HANG_GUARD = 60.0  # s: only ever waited out when something is wrong


def _blocked_direct_writes(monkeypatch) -> tuple[threading.Event, threading.Event, threading.Event]:
    """Make O_DIRECT segment writes announce themselves and wait for a go: (started, go, written)."""
    started, go, written = threading.Event(), threading.Event(), threading.Event()
    write = SegmentFile.write

    def blocked(self, data, off, direct):
        if direct:
            started.set()
            go.wait(HANG_GUARD)
        write(self, data, off, direct)
        if direct:
            written.set()

    monkeypatch.setattr(SegmentFile, "write", blocked)
    return started, go, written


def test_other_calls_go_on_while_a_write_through_is_on_the_disk(tmp_path, monkeypatch):
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        store.put(InternalKey(b"old"), aligned_buffer(1))
        started, go, written = _blocked_direct_writes(monkeypatch)
        writer = threading.Thread(target=store.put, args=(InternalKey(b"new"), aligned_buffer(2)))
        writer.start()
        try:
            assert started.wait(HANG_GUARD), "the write-through never started"
            # the store lock is free: these answer while the write is held
            store.put("small", b"x" * 100, durable=True)
            old = store.get(InternalKey(b"old"))
            new_visible = store.exists(InternalKey(b"new"))
            assert not written.is_set(), "the other calls waited for the held write (it holds the store lock)"
            assert old == bytes([1]) * MiB
            assert not new_visible, "a value was visible before its bytes were written"
        finally:
            go.set()
            writer.join(HANG_GUARD)
        assert store.get(InternalKey(b"new")) == bytes([2]) * MiB
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        assert store.get(InternalKey(b"new")) == bytes([2]) * MiB
        assert store.get("small") == b"x" * 100


def test_concurrent_write_throughs_share_segments_and_read_back(tmp_path):
    """Eight threads putting aligned values at once, into 4 MiB segments (several values in flight per
    segment, segments sealed under them), overwriting each other's keys: every value reads back exact,
    also after a reopen, and fsck finds the index and journals in agreement."""
    values = {i: aligned_buffer(i) for i in range(8)}
    opts = {"dram": "16MiB", "ssd": "256MiB", "segment_size": "4MiB"}
    with mooncakefs.open(tmp_path, **opts) as store:

        def writer(t: int) -> None:
            for n in range(12):
                store.put(InternalKey(b"k%d" % ((t + n) % 10)), values[(t + n) % 8])

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_GUARD)
        assert not any(seg.writing for seg in store._ssd.segments.values())
        for k in range(10):
            value = store.get(InternalKey(b"k%d" % k))
            assert value in {bytes(v) for v in values.values()}
        expected = {k: store.get(InternalKey(b"k%d" % k)) for k in range(10)}
        store.persist()
    with mooncakefs.open(tmp_path, **opts) as store:
        for k, value in expected.items():
            assert store.get(InternalKey(b"k%d" % k)) == value
    report = fsck(SegmentFiles(tmp_path / "ssd", make=False), tmp_path / "index.sqlite")
    assert report.ok, report.lines()


def test_a_failed_unlocked_write_is_given_back(tmp_path, monkeypatch):
    """A disk error during the unlocked write fails the put (a full disk: OutOfSpace), keeps the old
    value, and leaves no room taken."""
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        store.put(InternalKey(b"k"), aligned_buffer(1))
        live = store._ssd.live

        def full(self, data, off, direct):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(SegmentFile, "write", full)
        with pytest.raises(mooncakefs.OutOfSpace):
            store.put(InternalKey(b"k"), aligned_buffer(2))
        assert store._ssd.live == live
        assert not any(seg.writing for seg in store._ssd.segments.values())
        monkeypatch.undo()
        assert store.get(InternalKey(b"k")) == bytes([1]) * MiB
        store.put(InternalKey(b"k"), aligned_buffer(3))
        assert store.get(InternalKey(b"k")) == bytes([3]) * MiB


def test_a_failed_first_write_leaves_no_segment_behind(tmp_path, monkeypatch):
    """A full disk on the very first write-through: the segment made for it holds nothing live, so
    giving the room back deletes it, and no row names the value."""
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:

        def full(self, data, off, direct):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(SegmentFile, "write", full)
        with pytest.raises(mooncakefs.OutOfSpace):
            store.put("k", aligned_buffer(1), durable=True)
        assert not store._ssd.segments and store._ssd.live == 0 and store._ssd.used == 0
        assert store._ssd.db.execute("SELECT COUNT(*) FROM objects").fetchone() == (0,)
        assert not store.exists("k")
        assert store._dram.used == 0, "the failed put kept its DRAM block"
    assert not list((tmp_path / "ssd").glob("seg-*.dat"))


SMALL_VALUE = b"s" * 100


def put_small(store: mooncakefs.Store, **options) -> None:
    """Another caller's put of ``k``: small, so written under the store lock, and durable, so on SSD."""
    store.put("k", SMALL_VALUE, durable=True, **options)


# Each race: the put held in its unlocked write (keywords), the value there before it (None: none),
# what another caller does meanwhile, what the held put raises once let go, and which value is left.
WRITE_RACES = {
    "if_absent loses to a put": ({"if_absent": True}, None, put_small, mooncakefs.KeyExists, SMALL_VALUE),
    "if_newer loses to a newer put": (
        {"version": 1, "if_newer": True}, None, lambda store: put_small(store, version=2), mooncakefs.NotNewer,
        SMALL_VALUE,
    ),
    "overwritten meanwhile": ({}, None, put_small, None, b"\x02" * MiB),
    "old value removed meanwhile": ({}, b"\x01" * MiB, lambda store: store.remove("k"), None, b"\x02" * MiB),
}  # fmt: skip


@pytest.mark.parametrize("race", WRITE_RACES)
def test_a_put_of_the_same_key_during_an_unlocked_write(tmp_path, monkeypatch, race):
    """The held put is checked again when it publishes: a refused one gives back its SSD room and its DRAM
    block, an accepted one replaces whatever came meanwhile; either way nothing is left over (after the
    key is removed, the tiers are empty) and the segment it shares with older values stays."""
    options, before, meanwhile, raises, left = WRITE_RACES[race]
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        if before is not None:
            store.put("k", aligned_buffer(before[0]), durable=True)
        started, go, _ = _blocked_direct_writes(monkeypatch)
        outcome: list[BaseException | None] = []

        def held_put() -> None:
            try:
                store.put("k", aligned_buffer(2), durable=True, **options)
            except mooncakefs.MooncakeError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        writer = threading.Thread(target=held_put)
        writer.start()
        try:
            assert started.wait(HANG_GUARD), "the write-through never started"
            meanwhile(store)
        finally:
            go.set()
            writer.join(HANG_GUARD)
        assert len(outcome) == 1 and type(outcome[0]) is (raises or type(None)), outcome
        assert store.get("k") == left
        assert not any(seg.writing for seg in store._ssd.segments.values())
        assert store._ssd.live == -(-len(left) // 512) * 512, "SSD room of a value no row names is still live"
        store.persist()
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        assert store.get("k") == left
        assert store.remove("k")
        assert store._ssd.live == 0 and store._dram.used == 0
    report = fsck(SegmentFiles(tmp_path / "ssd", make=False), tmp_path / "index.sqlite")
    assert report.ok, report.lines()


KILLED_MID_WRITE = r"""
import mmap, sys, threading
import mooncakefs
from mooncakefs.keys import InternalKey
from mooncakefs.tiers.segments import SegmentFile

def aligned(fill):
    buf = mmap.mmap(-1, 1 << 20)
    buf.write(bytes([fill]) * (1 << 20))
    return buf

store = mooncakefs.open(sys.argv[1], dram="64MiB", ssd="256MiB")
store.put(InternalKey(b"before"), aligned(1), durable=True)
write = SegmentFile.write
half_written = threading.Event()

def half_then_hang(self, data, off, direct):
    if direct:  # the second half first: the file then reaches past the value, so only its row can tell
        half = len(data) // 2
        write(self, data[half:], off + half, direct)
        half_written.set()
        threading.Event().wait()  # killed here, the first half never written
    write(self, data, off, direct)

SegmentFile.write = half_then_hang
threading.Thread(target=store.put, args=(InternalKey(b"torn"), aligned(2)), daemon=True).start()
assert half_written.wait(60), "the torn value's write never started"
store.put("after", b"y" * 100, durable=True)  # commits the index while the torn value's room is reserved
print("ready", flush=True)
threading.Event().wait()
"""


def test_kill_9_mid_unlocked_write_keeps_what_was_committed_and_nothing_torn(tmp_path):
    proc = spawn_python(KILLED_MID_WRITE, str(tmp_path))
    try:
        answered, _, _ = select.select([proc.stdout], [], [], HANG_GUARD)
        assert answered, "the durable put waited for the held write (it holds the store lock)"
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    finally:
        kill_process(proc)
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        assert store.get(InternalKey(b"before")) == bytes([1]) * MiB
        assert store.get("after") == b"y" * 100
        assert not store.exists(InternalKey(b"torn")), "a value whose bytes were never all written came back"
    report = fsck(SegmentFiles(tmp_path / "ssd", make=False), tmp_path / "index.sqlite")
    assert report.ok, report.lines()


def test_a_durable_commit_syncs_its_segments_at_once(tmp_path, monkeypatch):
    """persist() of values in several segments syncs them on threads together (the filesystem then
    joins their flushes): each sync here waits until another one has started."""
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB", segment_size="1MiB") as store:
        keys = [InternalKey(b"k%d" % i) for i in range(4)]
        for i, key in enumerate(keys):
            store.put(key, aligned_buffer(i))  # a segment each
        assert len(store._ssd.segments) == 4
        together = threading.Barrier(2, timeout=HANG_GUARD)
        synced = []
        sync = SegmentFile.sync

        def sync_with_another(self):
            together.wait()
            synced.append(self.path)
            sync(self)

        monkeypatch.setattr(SegmentFile, "sync", sync_with_another)
        store.persist(keys)
        assert len(set(synced)) == 4
