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
