"""The internal namespace the filesystem stores file chunks in: hidden, reserved, sticky, persistable."""

import pytest

import mooncakefs
from mooncakefs.keys import INTERNAL_PREFIX, InternalKey

MiB = 1 << 20


def chunk(i: int) -> InternalKey:
    return InternalKey(b"test/%d" % i)


def test_internal_keys_are_hidden_from_listing_and_prefix_removal(tmp_path):
    with mooncakefs.open(tmp_path, dram="16MiB") as store:
        store.put(chunk(1), b"file bytes")
        store.put("user", b"kv bytes")
        assert list(store.keys()) == ["user"]
        assert store.remove_prefix("") == 1
        assert store.get(chunk(1)) == b"file bytes"


@pytest.mark.parametrize("key", [INTERNAL_PREFIX, INTERNAL_PREFIX + b"fs/1"])
def test_the_reserved_prefix_is_refused_for_user_keys(tmp_path, key):
    store = mooncakefs.open(tmp_path, dram="16MiB")
    with store, pytest.raises(mooncakefs.InvalidKey, match="reserves"):
        store.put(key, b"x")


def test_sticky_objects_are_demoted_never_dropped(tmp_path):
    with mooncakefs.open(tmp_path, dram="8MiB", ssd="64MiB", segment_size="4MiB") as store:
        for i in range(24):
            store.put(chunk(i), bytes([i]) * MiB)
        assert store.stats()["dram"]["evictions"] > 0
        for i in range(24):
            assert store.get(chunk(i)) == bytes([i]) * MiB


def test_sticky_objects_without_ssd_fill_dram_then_out_of_space(tmp_path):
    with mooncakefs.open(tmp_path, dram="8MiB") as store:
        stored = 0
        with pytest.raises(mooncakefs.OutOfSpace):
            for i in range(16):
                store.put(chunk(i), bytes([i]) * MiB)
                stored += 1
        assert stored >= 6
        for i in range(stored):
            assert store.get(chunk(i)) == bytes([i]) * MiB


def test_plain_objects_make_way_for_sticky_ones_on_a_full_ssd(tmp_path):
    with mooncakefs.open(tmp_path, dram="4MiB", ssd="16MiB", segment_size="2MiB") as store:
        for i in range(12):
            store.put(f"plain/{i}", bytes(MiB))
        for i in range(14):
            store.put(chunk(i), bytes([i]) * MiB)
        for i in range(14):
            assert store.get(chunk(i)) == bytes([i]) * MiB
        # The tiers are now full of sticky data: more is refused, nothing already stored is lost.
        with pytest.raises(mooncakefs.OutOfSpace):
            for i in range(14, 40):
                store.put(chunk(i), bytes(MiB))
        for i in range(14):
            assert store.get(chunk(i)) == bytes([i]) * MiB


def test_sticky_objects_are_written_through_and_persist_flushes_named_keys(tmp_path):
    with mooncakefs.open(tmp_path, dram="32MiB", ssd="64MiB") as store:
        for i in range(5):
            store.put(chunk(i), bytes([i]) * 1000)
        store.put("plain", b"persisted on request")
        store.put("volatile", b"in DRAM only")
        assert store.stat(chunk(0)).tier == "dram"  # written through, still served from DRAM
        assert store.persist() == 0  # the sticky objects are on SSD already
        assert store.persist(["plain", "missing"]) == 1
    with mooncakefs.open(tmp_path, dram="32MiB", ssd="64MiB") as store:
        assert [store.get(chunk(i)) for i in range(5)] == [bytes([i]) * 1000 for i in range(5)]
        assert store.get("plain") == b"persisted on request"
        assert "volatile" not in store


BLOCK = 16 * 1024  # small: put and batch_put store it through _engine.PlainPath


def _fill_sticky(store, way: str) -> tuple[list[int], set[str]]:
    """Put 24 sticky 16 KiB chunks (more than a 256 KiB pool holds) one way; the indexes stored and the
    names of the errors the rest got."""
    items = [(chunk(i), bytes([i]) * BLOCK) for i in range(24)]
    if way == "put":
        results = []
        for key, value in items:
            try:
                store.put(key, value)
                results.append(None)
            except mooncakefs.MooncakeError as exc:
                results.append(exc)
    elif way == "batch_put":
        results = [r for item in items for r in store.batch_put([item])]
    else:  # one batch: one run, PlainPath.put_run called once per MiB
        results = store.batch_put(items)
    return [i for i, r in enumerate(results) if r is None], {type(r).__name__ for r in results if r is not None}


@pytest.mark.parametrize("engine", ["cython", "twin"])
def test_small_sticky_objects_without_ssd_are_never_queued_for_eviction(tmp_path, monkeypatch, engine):
    """A DRAM-only store cannot demote a sticky object (a file chunk), so it never evicts one: once the
    pool is full of them, more are refused with OutOfSpace, whichever way they were put.  Small values go
    through _engine.PlainPath (put, and batch_put's loop; and its twin in _reference, step for step)."""
    from mooncakefs import _engine, _reference

    if engine == "twin":
        monkeypatch.setattr(_engine, "PlainPath", _reference.PlainPath)
    outcomes = {}
    for way in ("put", "batch_put", "one_batch"):
        with mooncakefs.open(tmp_path / way, dram="256KiB") as store:
            stored, errors = _fill_sticky(store, way)
            assert errors == {"OutOfSpace"}, way
            assert len(stored) >= 13, way
            assert stored == list(range(len(stored))), way  # refused from the first that had no room on
            assert store.stats()["dram"]["evictions"] == 0, way
            kept = stored[1:-4]
            for i in stored[-4:]:  # room for plain values, which come and go around the sticky ones
                store.remove(chunk(i))
            assert store.batch_put([(chunk(0), bytes([100]) * BLOCK)]) == [None]  # replaced: still sticky
            for i in range(40):
                store.put(f"plain/{i}", bytes(BLOCK))
            assert store.stats()["dram"]["evictions"] > 0, way
            assert not any(raw.startswith(INTERNAL_PREFIX) for raw in [*store._fresh, *store._lru]), way
            assert store.get(chunk(0)) == bytes([100]) * BLOCK, way
            for i in kept:
                assert store.get(chunk(i)) == bytes([i]) * BLOCK, (way, i)
            outcomes[way] = stored
    assert outcomes["batch_put"] == outcomes["put"] == outcomes["one_batch"]
