"""The Tier protocol (mooncakefs/tiers/base.py), run against every tier present: allocate, write, read
back, free, usage and capacity, eviction order, and a full tier saying so.  The tiers are real (a memfd
pool, segment files on disk, segments on a loop device); only the store around them is a recording
stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from blockdev_helpers import device_size_for
from conftest import rand_bytes
from mooncakefs._engine import Entry, crc32c

import mooncakefs
from mooncakefs.errors import OutOfSpace
from mooncakefs.tiers.base import TIER_ORDER, Tier
from mooncakefs.tiers.dram import DramTier
from mooncakefs.tiers.ssd import SsdTier

CAPACITY = 1 << 20


class RecordingPlacement:
    """A store stand-in that owns an index and records what the tier asked of it."""

    def __init__(self) -> None:
        self.index: dict[bytes, Entry] = {}
        self.dropped: list[bytes] = []
        self.tier: Tier | None = None

    def demote(self, raw: bytes, entry: Entry, earned: bool) -> bool:
        return False  # no tier below

    def demote_vram(self, raw: bytes, entry: Entry) -> bool:
        return False  # no tier below

    def drop(self, raw: bytes, entry: Entry) -> None:
        """Out of the store: its block goes back to the tier (the real store frees it in every tier)."""
        del self.index[raw]
        entry.dead = True
        self.tier.free(raw, entry)  # type: ignore[union-attr]
        self.dropped.append(raw)

    def lost(self, raw: bytes, entry: Entry) -> None:
        self.index.pop(raw, None)
        entry.dead = True
        self.dropped.append(raw)

    def withdraw(self, raw: bytes) -> None:
        pass

    def read_since(self, raw: bytes, entry: Entry) -> bool:
        return False


def make_dram(tmp_path, place: RecordingPlacement) -> DramTier:
    tier = DramTier(CAPACITY, high_watermark=1.0, low_watermark=1.0)
    tier.index, tier.place = place.index, place
    return tier


SEGMENT = 256 << 10


def make_ssd(tmp_path, place: RecordingPlacement, where: Path | None = None) -> SsdTier:
    tier = SsdTier(
        where or tmp_path / "ssd",
        None if where else CAPACITY,  # a device: all of it (sized to hold CAPACITY bytes of values)
        segment_size=SEGMENT,
        index_path=tmp_path / "index.sqlite",
        format=where is not None,
    )
    tier.attach(place.index, place, high_watermark=1.0)
    return tier


def make_vram(place: RecordingPlacement) -> Tier:
    """The VRAM tier on GPU 0; the test is skipped where there is none (tests/test_vram.py says why)."""
    from mooncakefs.gpu import gpu_unavailable
    from mooncakefs.tiers.vram import VramTier

    why = gpu_unavailable(0)
    if why is not None:
        pytest.skip(why)
    tier = VramTier(CAPACITY, 0)
    tier.place = place
    return tier


@pytest.fixture(params=["dram", "ssd", "ssd-blockdev", "vram"])
def tier_and_place(request, tmp_path) -> Iterator[tuple[Tier, RecordingPlacement]]:
    place = RecordingPlacement()
    if request.param == "dram":
        tier: Tier = make_dram(tmp_path, place)
    elif request.param == "vram":
        tier = make_vram(place)
    elif request.param == "ssd":
        tier = make_ssd(tmp_path, place)
    else:  # the SSD tier on a raw block device (a loop device here)
        loops = request.getfixturevalue("loop_devices")
        tier = make_ssd(tmp_path, place, Path(loops.attach(device_size_for(CAPACITY, SEGMENT))))
    place.tier = tier
    yield tier, place
    tier.close()


def store_value(tier: Tier, place: RecordingPlacement, raw: bytes, data: bytes) -> Entry:
    """What the store does to place a value in one tier: allocate, then write (and admit it to the
    tier's eviction order, which the DRAM tier keeps apart from writing)."""
    entry = Entry(len(data))
    entry.crc = crc32c(data)
    assert tier.allocate(raw, entry), f"{tier.name}: no room for {len(data)} bytes"
    tier.write(raw, entry, memoryview(data))
    if isinstance(tier, DramTier):
        tier.enqueue(raw, entry, False)
    elif tier.name == "vram":
        tier.admit(raw, entry)  # type: ignore[attr-defined]
    place.index[raw] = entry
    return entry


def test_tiers_are_named_in_the_one_order():
    from mooncakefs.tiers.vram import VramTier

    assert [VramTier.name, DramTier.name, SsdTier.name] == list(TIER_ORDER)


def test_write_read_free_and_usage(tier_and_place):
    tier, place = tier_and_place
    assert tier.capacity >= CAPACITY and tier.used == 0
    values = {f"k{i}".encode(): rand_bytes(1000 + 4096 * i, seed=i) for i in range(4)}
    entries = {raw: store_value(tier, place, raw, data) for raw, data in values.items()}
    assert tier.used >= sum(len(v) for v in values.values())
    for raw, data in values.items():
        out = bytearray(len(data) + 10)
        lease = tier.lease(entries[raw])
        try:
            assert tier.read_value(entries[raw], memoryview(out), lease) == len(data)
            assert tier.read_value(entries[raw], None, lease) == data
        finally:
            tier.end_lease(lease)
        assert bytes(out[: len(data)]) == data
    for raw in values:
        tier.free(raw, entries[raw])
    assert tier.used == 0  # all given back (SSD: a segment's file goes with its last value)


def test_a_leased_ssd_value_stays_readable_after_it_is_freed(tier_and_place):
    """The store reads SSD values without its lock: a value freed meanwhile (overwritten, removed, its
    segment deleted) must still read back whole until the lease ends.  (A DRAM block is held by the
    store's count of readers instead: it is never freed under a lease.)"""
    tier, place = tier_and_place
    if tier.name != "ssd":
        pytest.skip("the DRAM tier's blocks are kept by the store's readers count, not by the tier")
    data = rand_bytes(100_000, seed="leased")
    entry = store_value(tier, place, b"leased", data)
    lease = tier.lease(entry)
    try:
        seg_off = entry.seg_off
        tier.free(b"leased", entry)  # its segment's last value: the segment goes
        entry.seg_off = seg_off
        out = bytearray(len(data))
        assert tier.read_value(entry, memoryview(out), lease) == len(data) and bytes(out) == data
    finally:
        tier.end_lease(lease)
    assert tier.used == 0


def test_victims_come_oldest_first(tier_and_place):
    tier, place = tier_and_place
    keys = [f"v{i}".encode() for i in range(5)]
    for i, raw in enumerate(keys):
        store_value(tier, place, raw, rand_bytes(2048, seed=i))
    assert [raw for raw, _ in tier.victims()] == keys


def test_a_full_tier_refuses_and_evicts_only_what_may_go(tier_and_place):
    """Pinned values may not leave: once they fill the tier, allocate says no (the store turns that into
    OutOfSpace); unpinned ones are evicted to make room, oldest first."""
    tier, place = tier_and_place
    entry = Entry(tier.capacity + 1)
    assert not tier.allocate(b"huge", entry)
    block = 64 << 10
    pinned = 0
    while True:
        e = Entry(block)
        e.pinned = True
        e.crc = crc32c(bytes(block))
        if not tier.allocate(b"p%d" % pinned, e):
            break
        tier.write(b"p%d" % pinned, e, memoryview(bytes(block)))
        place.index[b"p%d" % pinned] = e
        pinned += 1
    assert pinned >= (tier.capacity // block) - 2
    assert place.dropped == []  # nothing evictable: nothing was dropped


def test_eviction_makes_room_from_the_oldest(tier_and_place):
    tier, place = tier_and_place
    block = 64 << 10
    n = tier.capacity // block + 4
    for i in range(n):
        store_value(tier, place, b"e%d" % i, rand_bytes(block, seed=i))
    assert place.dropped and place.dropped == [b"e%d" % i for i in range(len(place.dropped))]
    assert tier.used <= tier.capacity


@pytest.mark.parametrize("tier_name", ["dram", "ssd"])
def test_the_store_says_which_tier_is_full(tmp_path, tier_name):
    with mooncakefs.open(tmp_path / "kv", dram="1MiB", ssd="1MiB") as store:
        if tier_name == "dram":
            with pytest.raises(OutOfSpace, match="no room for a pinned value of 2MiB: the DRAM pool is 1MiB"):
                store.put("big", bytes(2 << 20), pin=True)
        else:
            with pytest.raises(OutOfSpace, match="on the SSD tier"):
                store.put("big", bytes(2 << 20), durable=True)
        assert "big" not in store


def test_an_ssd_victim_with_a_copy_in_vram_stays_in_the_store(tmp_path):
    """The SSD tier evicts its copy of a value that VRAM also holds (promoted there by reads into GPU
    buffers): only its SSD copy goes, not the value.  (The VRAM block is a number here: no GPU needed.)"""
    place = RecordingPlacement()
    tier = make_ssd(tmp_path, place)
    place.tier = tier
    try:
        block = 64 << 10
        kept = store_value(tier, place, b"in-vram", rand_bytes(block, seed="v"))
        kept.vram = 7
        for i in range(tier.capacity // block + 4):
            store_value(tier, place, b"f%d" % i, rand_bytes(block, seed=i))
        assert kept.seg == -1  # its SSD copy was evicted...
        assert b"in-vram" not in place.dropped and place.index[b"in-vram"] is kept  # ...the value was not
        assert place.dropped  # others, with no copy elsewhere, left the store
    finally:
        tier.close()


def test_a_dram_victim_with_a_copy_in_vram_keeps_it(tmp_path):
    """DRAM evicts a value that VRAM also holds: it gives up its DRAM block and stays in the store."""
    place = RecordingPlacement()
    tier = make_dram(tmp_path, place)
    place.tier = tier
    try:
        block = 64 << 10
        kept = store_value(tier, place, b"in-vram", rand_bytes(block, seed="v"))
        kept.vram = 7
        for i in range(tier.capacity // block + 4):
            store_value(tier, place, b"f%d" % i, rand_bytes(block, seed=i))
        assert kept.dram == -1 and b"in-vram" not in place.dropped and place.index[b"in-vram"] is kept
        assert place.dropped
    finally:
        tier.close()
