"""DRAM + SSD tiers: eviction, promotion, pinning, OutOfSpace, SSD space reclamation, restart, RSS bound."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import MiB, as_bytes_key, rand_bytes, run_python, tier_of, wait_until
from mooncakefs._engine import crc32c  # checked against an independent oracle in test_engine_reference

import mooncakefs

SMALL = dict(dram="8MiB", ssd="128MiB", segment_size="4MiB")


@pytest.fixture(params=["files", "blockdev"])
def ssd_backend(request) -> str:
    """Every test here that opens its stores with ``store_factory`` runs with the SSD tier's segments in
    files and on a raw block device (a loop device): the tier's contract is the same for both."""
    return request.param


def value_for(key: str, size: int = MiB) -> bytes:
    return rand_bytes(size, key)


def fill(store, prefix: str, count: int, size: int = MiB, **put_options) -> list[str]:
    keys = [f"{prefix}{i}" for i in range(count)]
    for k in keys:
        store.put(k, value_for(k, size), **put_options)
    return keys


def segment_files(path):
    return sorted((path / "ssd").glob("seg-*.dat"))


def _dram_within_bounds(store) -> bool:
    d = store.stats()["dram"]
    return d["used"] <= d["capacity"]


# ------------------------------------------------------------------------------------------- eviction


def test_eviction_demotes_lru_to_ssd(store_factory):
    store = store_factory(**SMALL)
    keys = fill(store, "k", 24)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd"), "the oldest object was not demoted"
    assert tier_of(store, "k23") == "dram", "the newest object should still be in DRAM"
    stats = store.stats()
    assert stats["dram"]["evictions"] > 0
    assert stats["ssd"]["objects"] > 0
    assert stats["objects"] == 24
    assert len(store) == 24
    assert stats["dram"]["used"] <= stats["dram"]["capacity"]
    # nothing is lost: every value comes back byte-exact, wherever it lives
    for k in keys:
        assert store.get(k) == value_for(k), k
    assert {as_bytes_key(k) for k in store.keys()}  # noqa: SIM118 == {k.encode() for k in keys}


def test_eviction_is_lru_not_fifo(store_factory):
    store = store_factory(**SMALL)
    fill(store, "k", 6)  # 6 MiB of 8: below the high watermark
    assert store.get("k0") == value_for("k0")  # k0 becomes the most recently used of the six
    for i in range(6, 9):
        store.put(f"k{i}", value_for(f"k{i}"))
    assert wait_until(lambda: tier_of(store, "k1") == "ssd"), "k1 (least recently used) was not demoted"
    assert tier_of(store, "k0") == "dram", "k0 was used recently and must not be the one demoted"
    assert tier_of(store, "k8") == "dram"


def test_dram_stays_within_capacity_while_filling(store_factory):
    store = store_factory(**SMALL)
    for i in range(40):
        store.put(f"k{i}", value_for(f"k{i}"))
        d = store.stats()["dram"]
        assert d["used"] <= d["capacity"], (i, d)


def test_watermark_options(store_factory):
    store = store_factory(dram="8MiB", ssd="64MiB", segment_size="4MiB", high_watermark=0.5, low_watermark=0.25)
    keys = fill(store, "k", 12)
    cap = store.stats()["dram"]["capacity"]
    # once settled, DRAM holds no more than the high watermark (plus one object of slack for the put
    # that crossed it)
    assert wait_until(lambda: store.stats()["dram"]["used"] <= 0.5 * cap + MiB + 4096), store.stats()
    assert tier_of(store, "k0") == "ssd"
    for k in keys:
        assert store.get(k) == value_for(k)


def test_eviction_without_ssd_drops(store_factory):
    store = store_factory(dram="8MiB", ssd=None)
    keys = fill(store, "k", 24)
    present = 0
    for k in keys:
        try:
            got = store.get(k)
        except mooncakefs.KeyNotFound:
            assert not store.exists(k)
            continue
        assert got == value_for(k), f"{k} returned wrong bytes"
        present += 1
    assert 1 <= present <= 8
    assert store.get("k23") == value_for("k23"), "the newest object must be present"
    assert not store.exists("k0"), "the oldest object must have been dropped"
    stats = store.stats()
    assert stats["dram"]["evictions"] >= 24 - 8
    assert stats["objects"] == len(store) == len(list(store.keys())) == present
    assert "ssd" not in stats


def test_remove_of_ssd_resident_key(store_factory):
    store = store_factory(**SMALL)
    fill(store, "k", 20)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    assert store.remove("k0") is True
    assert not store.exists("k0")
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get("k0")
    assert store.remove("k0") is False
    assert store.stats()["objects"] == 19


def test_ssd_resident_keys_behave_like_any_key(store_factory):
    store = store_factory(**SMALL, promote_after=1000)
    fill(store, "k", 20)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    v = value_for("k0")
    assert store.exists("k0")
    assert "k0" in store
    assert store.batch_exists(["k0", "nope"]) == [True, False]
    assert store.match_prefix(["k0", "k1", "k2"]) == 3
    st = store.stat("k0")
    assert st.size == MiB
    assert st.checksum == crc32c(v)
    assert st.pinned is False
    with pytest.raises(mooncakefs.KeyExists):
        store.put("k0", b"other", if_absent=True)
    # every read path returns the exact bytes from SSD
    assert store.get("k0") == v
    assert store["k0"] == v
    buf = bytearray(MiB + 10)
    assert store.get_into("k0", buf) == MiB
    assert bytes(buf[:MiB]) == v
    small = bytearray(b"\xee" * (MiB - 1))
    with pytest.raises(mooncakefs.BufferTooSmall):
        store.get_into("k0", small)
    assert small == bytearray(b"\xee" * (MiB - 1)), "a failed get_into of an SSD value wrote into the buffer"
    with store.view("k0") as mv:
        assert bytes(mv) == v
    assert store.batch_get(["k0", "nope"]) == [v, None]
    out = [bytearray(MiB)]
    assert store.batch_get_into(["k0"], out) == [MiB]
    assert out[0] == v
    assert tier_of(store, "k0") == "ssd"  # promote_after=1000: still on SSD
    assert store.stats()["ssd"]["hits"] >= 6


def test_overwrite_of_ssd_resident_key(store_factory):
    store = store_factory(**SMALL)
    fill(store, "k", 20)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    store.put("k0", b"new small value")
    assert store.get("k0") == b"new small value"
    assert store.stat("k0").size == len(b"new small value")
    assert store.stats()["objects"] == 20


# ------------------------------------------------------------------------------------------ promotion


def test_promotion_after_two_hits(store_factory):
    store = store_factory(**SMALL)
    fill(store, "k", 16)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    promotions = store.stats()["dram"]["promotions"] + store.stats()["ssd"]["promotions"]
    assert store.get("k0") == value_for("k0")
    assert tier_of(store, "k0") == "ssd", "one hit must not promote (default promote_after=2)"
    assert store.get("k0") == value_for("k0")
    assert wait_until(lambda: tier_of(store, "k0") == "dram"), "two hits on an SSD object must promote it"
    stats = store.stats()
    assert stats["dram"]["promotions"] + stats["ssd"]["promotions"] > promotions
    assert store.get("k0") == value_for("k0")
    for i in range(16):
        assert store.get(f"k{i}") == value_for(f"k{i}")


def test_promote_after_option(store_factory):
    store = store_factory(**SMALL, promote_after=3)
    fill(store, "k", 16)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    store.get("k0")
    store.get("k0")
    assert tier_of(store, "k0") == "ssd", "promote_after=3: two hits must not promote"
    assert store.get("k0") == value_for("k0")
    assert wait_until(lambda: tier_of(store, "k0") == "dram")


def test_promotion_counts_get_into_and_view(store_factory):
    store = store_factory(**SMALL)
    fill(store, "k", 16)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    buf = bytearray(MiB)
    store.get_into("k0", buf)
    with store.view("k0") as mv:
        assert bytes(mv) == value_for("k0")
    assert wait_until(lambda: tier_of(store, "k0") == "dram")
    assert buf == value_for("k0")


def test_promoted_object_can_be_demoted_again(store_factory):
    store = store_factory(**SMALL)
    fill(store, "k", 16)
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    store.get("k0")
    store.get("k0")
    assert wait_until(lambda: tier_of(store, "k0") == "dram")
    fill(store, "more", 16)
    # values put once and never read go first: k0, read lately, outlives them all
    assert tier_of(store, "k0") == "dram"
    for i in range(16):  # values read since put compete with k0 on recency, and k0 is the oldest
        store.put(f"hot{i}", value_for(f"hot{i}"))
        store.get(f"hot{i}")
    assert wait_until(lambda: tier_of(store, "k0") == "ssd")
    assert store.get("k0") == value_for("k0")


def test_ttl_applies_on_ssd(store_factory):
    store = store_factory(**SMALL)
    start = time.monotonic()
    store.put("t", value_for("t"), ttl=3)
    fill(store, "k", 16)
    if time.monotonic() - start < 2.5:  # only meaningful while the ttl has not run out yet
        assert wait_until(lambda: tier_of(store, "t") == "ssd", timeout=max(0.1, 2.5 - (time.monotonic() - start)))
    time.sleep(max(0.0, 3.3 - (time.monotonic() - start)))
    assert not store.exists("t")
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get("t")


# ------------------------------------------------------------------------------------------- pinning


@pytest.mark.parametrize("ssd", [None, "128MiB"])
def test_pinned_never_evicted(store_factory, ssd):
    store = store_factory(dram="8MiB", ssd=ssd, segment_size="4MiB")
    pinned = fill(store, "pin", 3, pin=True)  # the least recently used of all
    fill(store, "k", 40)
    for k in pinned:
        st = store.stat(k)
        assert st.tier == "dram", f"pinned {k} left DRAM"
        assert st.pinned is True
        assert store.get(k) == value_for(k)


def test_out_of_space_when_dram_full_of_pinned_no_ssd(store_factory):
    store = store_factory(dram="8MiB", ssd=None)
    stored = []
    with pytest.raises(mooncakefs.OutOfSpace) as info:
        for i in range(20):
            key = f"pin{i}"
            store.put(key, value_for(key), pin=True)
            stored.append(key)
    failed = f"pin{len(stored)}"
    assert failed in str(info.value), "OutOfSpace must name the key"
    assert len(stored) >= 5
    # consistent: the failed key is absent, every pinned value is intact
    assert not store.exists(failed)
    assert store.stats()["objects"] == len(stored) == len(store)
    for k in stored:
        assert store.get(k) == value_for(k)
    # an unpinned put cannot evict pinned objects either: it fails, or it fits in what is left
    try:
        store.put("unpinned", value_for("unpinned"))
    except mooncakefs.OutOfSpace:
        assert not store.exists("unpinned")
    else:
        if store.exists("unpinned"):
            assert store.get("unpinned") == value_for("unpinned")
    for k in stored:
        assert store.get(k) == value_for(k)
    # small values may still fit; a failed overwrite keeps the old value
    with pytest.raises(mooncakefs.OutOfSpace):
        store.put(stored[0], rand_bytes(6 * MiB, "huge"))
    assert store.get(stored[0]) == value_for(stored[0])
    # freeing space makes puts work again
    assert store.remove(stored[-1]) is True
    store.put("after", value_for("after"))
    assert store.get("after") == value_for("after")


def test_out_of_space_in_batch_is_per_key(store_factory):
    store = store_factory(dram="8MiB", ssd=None)
    fill(store, "pin", 6, pin=True)
    results = store.batch_put([("small", b"fits"), ("huge", rand_bytes(5 * MiB, "huge")), ("small2", b"fits too")])
    assert results[0] is None or isinstance(results[0], int)
    assert isinstance(results[1], mooncakefs.OutOfSpace)
    assert results[2] is None or isinstance(results[2], int)
    # "small" is unpinned and there is no SSD: the attempt to make room for "huge" may have dropped it
    assert store.batch_get(["small"])[0] in (b"fits", None)
    assert store.get("small2") == b"fits too"
    assert not store.exists("huge")
    for i in range(6):
        assert store.get(f"pin{i}") == value_for(f"pin{i}")


def test_value_larger_than_dram_without_ssd(store_factory):
    store = store_factory(dram="4MiB", ssd=None)
    store.put("pinned", b"keep me", pin=True)
    with pytest.raises(mooncakefs.OutOfSpace):
        store.put("too-big", rand_bytes(5 * MiB, "big"))
    assert not store.exists("too-big")
    assert store.get("pinned") == b"keep me"
    store.put("ok", b"still works")
    assert store.get("ok") == b"still works"


def test_value_larger_than_dram_goes_to_ssd(store_factory, ssd_backend):
    if ssd_backend == "blockdev":
        pytest.skip("a device region holds one segment of values: test_ssd_blockdev checks the refusal")
    store = store_factory(dram="4MiB", ssd="64MiB", segment_size="4MiB")
    big = rand_bytes(10 * MiB, "big")  # bigger than DRAM and than one segment
    store.put("big", big)
    assert store.get("big") == big
    assert store.stat("big").tier == "ssd"
    assert store.stat("big").size == 10 * MiB
    assert store.stat("big").checksum == crc32c(big)
    buf = bytearray(10 * MiB)
    assert store.get_into("big", buf) == 10 * MiB
    assert buf == big
    with store.view("big") as mv:
        assert bytes(mv) == big
    # repeated hits cannot promote it into a DRAM that cannot hold it; it stays readable
    for _ in range(3):
        assert store.get("big") == big
    store.put("small", b"small")
    assert store.get("small") == b"small"


@pytest.mark.parametrize("ssd", [None, "128MiB"])
def test_view_survives_eviction(store_factory, ssd):
    store = store_factory(dram="8MiB", ssd=ssd, segment_size="4MiB")
    store.put("viewed", value_for("viewed"))
    with store.view("viewed") as mv:
        fill(store, "k", 30)
        assert bytes(mv) == value_for("viewed")
        store.remove("viewed")
        fill(store, "j", 10)
        assert bytes(mv) == value_for("viewed")


def test_view_of_ssd_object_survives_segment_reclamation(store_factory, tmp_path):
    """A view of an SSD value keeps its bytes while the value is removed and its segment reclaimed."""
    path = tmp_path / "db"
    store = store_factory(path, dram="4MiB", ssd="16MiB", segment_size="2MiB", promote_after=1000)
    victim = value_for("victim")
    store.put("victim", victim, durable=True)
    fill(store, "k", 8)
    assert wait_until(lambda: tier_of(store, "victim") == "ssd")
    with store.view("victim") as mv:
        assert store.remove("victim") is True
        live = []
        for i in range(60):  # 60 MiB through a 16 MiB SSD: the victim's segment is deleted and reused
            key = f"churn{i}"
            store.put(key, value_for(key), durable=True)
            live.append(key)
            if len(live) > 3:
                store.remove(live.pop(0))
        assert bytes(mv) == victim
    for key in live:
        assert store.get(key) == value_for(key)


def test_many_small_keys_survive_restart(tmp_path):
    path = tmp_path / "db"
    opts = dict(dram="1MiB", ssd="64MiB", segment_size="4MiB")
    with mooncakefs.open(path, **opts) as store:
        store.batch_put({f"key/{i:05d}": rand_bytes(300 + i % 300, i) for i in range(3000)})
        for i in range(0, 3000, 3):
            store.remove(f"key/{i:05d}")
        store.put("marker", b"durable marker", durable=True)
        on_ssd = {f"key/{i:05d}" for i in range(3000) if i % 3 and tier_of(store, f"key/{i:05d}") == "ssd"}
    assert on_ssd, "1.3 MiB of small values in a 1 MiB DRAM tier: some must have been demoted"
    with mooncakefs.open(path, **opts) as store:
        assert store.get("marker") == b"durable marker"
        for i in range(3000):
            key = f"key/{i:05d}"
            if i % 3 == 0:
                assert not store.exists(key), f"{key} was removed before close"
            elif key in on_ssd or store.exists(key):
                assert store.get(key) == rand_bytes(300 + i % 300, i), key


# ---------------------------------------------------------------------------------- SSD reclamation


@pytest.mark.slow
def test_ssd_space_reclaimed_after_remove(store_factory, tmp_path):
    path = tmp_path / "reclaim"
    store = store_factory(path, dram="4MiB", ssd="32MiB", segment_size="4MiB")
    max_segments = 0
    live = []
    for i in range(200):  # 200 MiB through a 32 MiB SSD
        key = f"k{i}"
        store.put(key, value_for(key), durable=True)
        live.append(key)
        if len(live) > 6:
            assert store.remove(live.pop(0)) is True
        max_segments = max(max_segments, len(segment_files(path)))
    assert max_segments <= 16, f"{max_segments} segment files for a 32 MiB SSD of 4 MiB segments"
    total = sum(f.stat().st_size for f in segment_files(path))
    assert total <= 64 * MiB, f"segment files hold {total} bytes for a 32 MiB SSD"
    for key in live:
        assert store.get(key) == value_for(key)
    assert store.stats()["objects"] == len(live)


@pytest.mark.slow
def test_ssd_space_reclaimed_after_overwrite_by_eviction(store_factory, tmp_path):
    path = tmp_path / "reclaim"
    store = store_factory(path, dram="4MiB", ssd="32MiB", segment_size="4MiB")
    max_segments = 0
    for round_ in range(20):  # 10 keys x 20 rounds x 1 MiB = 200 MiB through a 32 MiB SSD
        for j in range(10):
            store.put(f"k{j}", value_for(f"k{j}-{round_}"))
        max_segments = max(max_segments, len(segment_files(path)))
    assert max_segments <= 16, f"{max_segments} segment files for a 32 MiB SSD of 4 MiB segments"
    for j in range(10):
        assert store.get(f"k{j}") == value_for(f"k{j}-19")
    assert store.stats()["objects"] == 10


def test_ssd_space_reclaimed_after_remove_prefix(store_factory, tmp_path):
    path = tmp_path / "reclaim"
    store = store_factory(path, dram="4MiB", ssd="32MiB", segment_size="4MiB")
    for round_ in range(5):  # 5 x 20 MiB through a 32 MiB SSD
        for j in range(20):
            store.put(f"r{round_}/{j}", value_for(f"r{round_}/{j}"), durable=True)
        assert store.remove_prefix(f"r{round_}/") == 20
        assert len(store) == 0
    assert len(segment_files(path)) <= 16
    store.put("last", value_for("last"), durable=True)
    assert store.get("last") == value_for("last")


def test_segments_are_not_one_file_per_key(store_factory, tmp_path, ssd_backend):
    if ssd_backend == "blockdev":
        pytest.skip("counts segment files: a block device has regions, not files")
    path = tmp_path / "packed"
    store = store_factory(path, dram="4MiB", ssd="64MiB", segment_size="4MiB")
    for i in range(300):
        store.put(f"k{i}", rand_bytes(10_000, i), durable=True)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) < 30, f"{len(files)} files for 300 small keys"
    assert (path / "index.sqlite").exists()
    assert (path / "LOCK").exists()
    assert 1 <= len(segment_files(path)) <= 2


# ----------------------------------------------------------------------------------------- restart


def test_restart_persistence(tmp_path):
    path = tmp_path / "db"
    opts = dict(dram="8MiB", ssd="64MiB", segment_size="4MiB")
    with mooncakefs.open(path, **opts) as store:
        fill(store, "k", 20)  # the older ones are demoted to SSD
        for i in range(5):
            store.put(f"d{i}", rand_bytes(1000 + i, ("d", i)), durable=True)
        store.put("over", b"version 1", durable=True)
        store.put("over", b"version 2", durable=True)
        store.put("gone", b"removed before close", durable=True)
        assert store.remove("gone") is True
        for i in range(3):
            store.put(f"pfx/{i}", b"prefix-removed", durable=True)
        assert store.remove_prefix("pfx/") == 3
        store.put(b"\xff\xfebin", b"binary key", durable=True)
        store.put("empty", b"", durable=True)
        assert wait_until(lambda: tier_of(store, "k0") == "ssd")
        tiers = {f"k{i}": tier_of(store, f"k{i}") for i in range(20)}
        checksums = {f"d{i}": store.stat(f"d{i}").checksum for i in range(5)}

    with mooncakefs.open(path, dram="16MiB", ssd="64MiB", segment_size="4MiB") as store:
        for i in range(5):
            assert store.get(f"d{i}") == rand_bytes(1000 + i, ("d", i))
            assert store.stat(f"d{i}").checksum == checksums[f"d{i}"]
        assert store.get("over") == b"version 2"
        assert not store.exists("gone")
        assert list(store.keys("pfx/")) == []
        assert store.get(b"\xff\xfebin") == b"binary key"
        assert store.get("empty") == b""
        for k, tier in tiers.items():
            if tier == "ssd":
                assert store.get(k) == value_for(k), f"{k} was on SSD at close and must be back"
            else:
                try:
                    got = store.get(k)
                except mooncakefs.KeyNotFound:
                    continue
                assert got == value_for(k)
        present = {as_bytes_key(k) for k in store.keys()}  # noqa: SIM118
        assert len(store) == len(present) == store.stats()["objects"]
        for i in range(5):
            assert f"d{i}".encode() in present
        # the reopened store keeps working
        store.put("new", b"after reopen", durable=True)
        assert store.get("new") == b"after reopen"

    with mooncakefs.open(path, **opts) as store:
        assert store.get("new") == b"after reopen"
        assert store.get("over") == b"version 2"


def test_restart_many_times(tmp_path):
    path = tmp_path / "db"
    opts = dict(dram="4MiB", ssd="32MiB", segment_size="4MiB")
    expected = {}
    for round_ in range(6):
        with mooncakefs.open(path, **opts) as store:
            for k, v in expected.items():
                assert store.get(k) == v, (round_, k)
            for j in range(3):
                k = f"r{round_}-{j}"
                expected[k] = rand_bytes(300_000, k)
                store.put(k, expected[k], durable=True)
            # overwrite and remove things written in earlier rounds
            if round_ >= 1:
                k = f"r{round_ - 1}-0"
                expected[k] = b"overwritten"
                store.put(k, b"overwritten", durable=True)
                k = f"r{round_ - 1}-1"
                del expected[k]
                assert store.remove(k) is True


def test_expired_durable_key_stays_expired_after_restart(tmp_path):
    path = tmp_path / "db"
    opts = dict(dram="8MiB", ssd="32MiB", segment_size="4MiB")
    with mooncakefs.open(path, **opts) as store:
        store.put("t", b"short", ttl=0.3, durable=True)
        store.put("keep", b"long", ttl=3600, durable=True)
    time.sleep(0.6)
    with mooncakefs.open(path, **opts) as store:
        assert not store.exists("t")
        assert store.get("keep") == b"long"
        assert store.stat("keep").expires is not None


# -------------------------------------------------------------------------------------------- RSS

RSS_CHILD = r"""
import json, os, sys
import mooncakefs

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

store = mooncakefs.open(sys.argv[1], dram="64MiB", ssd="1GiB")
buf = bytearray(os.urandom(1 << 20))
store.put("warm", buf)
store.get("warm")
store.remove("warm")
baseline = status("VmRSS")
peak = baseline
for i in range(400):
    buf[:8] = i.to_bytes(8, "little")
    store.put(f"k{i}", buf)
    if i % 4 == 0:
        peak = max(peak, status("VmRSS"))
peak = max(peak, status("VmRSS"))
ok = True
for i in (0, 1, 200, 398, 399):
    got = store.get(f"k{i}")
    buf[:8] = i.to_bytes(8, "little")
    ok = ok and got == bytes(buf)
stats = store.stats()
store.close()
print(json.dumps({"baseline": baseline, "peak": peak, "hwm": status("VmHWM"), "ok": ok,
                  "objects": stats["objects"], "dram_used": stats["dram"]["used"],
                  "dram_capacity": stats["dram"]["capacity"], "ssd_objects": stats["ssd"]["objects"]}))
"""


@pytest.mark.slow
def test_rss_stays_within_dram_budget(tmp_path):
    proc = run_python(RSS_CHILD, str(tmp_path / "rss"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], "values read back in the child were wrong"
    assert result["objects"] == 400
    assert result["dram_used"] <= result["dram_capacity"]
    assert result["ssd_objects"] > 0
    growth = max(result["peak"], result["hwm"]) - result["baseline"]
    assert growth < 128 * MiB, f"RSS grew by {growth / MiB:.1f} MiB for a 64 MiB DRAM tier ({result})"


def test_overwritten_value_does_not_come_back_after_clean_close(tmp_path):
    """A durable value overwritten (not durably) or removed before a clean close must not resurface."""
    path = tmp_path / "db"
    opts = dict(dram="8MiB", ssd="32MiB", segment_size="4MiB")
    with mooncakefs.open(path, **opts) as store:
        store.put("over", b"old durable value", durable=True)
        store.put("over", b"new value, not durable")
        store.put("gone", b"old durable value", durable=True)
        store.remove("gone")
        store.put("prefixed/a", b"old durable value", durable=True)
        store.remove_prefix("prefixed/")
        store.put("prefixed/a", b"new value, not durable")
    with mooncakefs.open(path, **opts) as store:
        assert store.batch_get(["over"])[0] in (b"new value, not durable", None)
        assert not store.exists("gone")
        assert store.batch_get(["prefixed/a"])[0] in (b"new value, not durable", None)


def test_promotion_when_dram_is_full_of_pinned(store_factory):
    store = store_factory(**SMALL)
    store.put("cold", value_for("cold"))
    fill(store, "k", 12)
    assert wait_until(lambda: tier_of(store, "cold") == "ssd")
    pinned = []
    for i in range(7):
        try:
            store.put(f"pin{i}", value_for(f"pin{i}"), pin=True)
        except mooncakefs.OutOfSpace:
            break
        pinned.append(f"pin{i}")
    assert len(pinned) >= 5
    for _ in range(4):  # hits that would promote, into a DRAM with no room: still exact bytes
        assert store.get("cold") == value_for("cold")
    for k in pinned:
        assert store.get(k) == value_for(k)
        assert tier_of(store, k) == "dram"


def test_value_larger_than_both_tiers(store_factory):
    store = store_factory(dram="4MiB", ssd="8MiB", segment_size="2MiB")
    store.put("small", b"small", pin=True)
    store.put("d", b"durable", durable=True)
    with pytest.raises(mooncakefs.OutOfSpace):
        store.put("huge", rand_bytes(12 * MiB, "huge"))
    with pytest.raises(mooncakefs.OutOfSpace):
        store.put("huge", rand_bytes(12 * MiB, "huge"), durable=True)
    assert not store.exists("huge")
    assert store.get("small") == b"small"
    assert store.get("d") == b"durable"


@pytest.mark.parametrize("where", ["dram", "ssd"])
def test_prefixes_with_special_bytes(tmp_path, where):
    """Prefix matching is on raw bytes: no SQL LIKE wildcards, no lost keys at 0xff, NUL inside keys."""
    path = tmp_path / "db"
    opts = dict(dram="8MiB", ssd="32MiB", segment_size="4MiB")
    keys = [
        b"a%b",
        b"axb",
        b"a_c",
        b"abc",
        b"\xff",
        b"\xff\xfe",
        b"\xff\xff",
        b"\xff\xff\x00a",
        b"\xff\xffb",
        b"\x00",
        b"\x00\x00",
        b"pre\x00fix",
        b"pre",
        "ü-key",
        "ü",
    ]
    with mooncakefs.open(path, **opts) as store:
        for k in keys:
            store.put(k, b"v:" + as_bytes_key(k), durable=(where == "ssd"))
    if where == "dram":
        store = mooncakefs.open(path / "fresh", **opts)
        for k in keys:
            store.put(k, b"v:" + as_bytes_key(k))
    else:
        store = mooncakefs.open(path, **opts)  # after a reopen they are all read from SSD
    try:

        def listed(prefix):
            return {as_bytes_key(k) for k in store.keys(prefix)}

        assert listed(b"a%") == {b"a%b"}
        assert listed("a_") == {b"a_c"}
        assert listed(b"\xff\xff") == {b"\xff\xff", b"\xff\xff\x00a", b"\xff\xffb"}
        assert listed(b"\xff") == {b"\xff", b"\xff\xfe", b"\xff\xff", b"\xff\xff\x00a", b"\xff\xffb"}
        assert listed(b"\x00") == {b"\x00", b"\x00\x00"}
        assert listed(b"pre\x00") == {b"pre\x00fix"}
        assert listed("ü") == {"ü-key".encode(), "ü".encode()}
        assert listed("") == {as_bytes_key(k) for k in keys}
        for k in keys:
            assert store.get(k) == b"v:" + as_bytes_key(k)
        assert store.remove_prefix(b"a%") == 1
        assert store.exists(b"axb") and store.exists(b"a_c") and store.exists(b"abc")
        assert store.remove_prefix(b"\xff\xff") == 3
        assert listed(b"\xff") == {b"\xff", b"\xff\xfe"}
        assert store.remove_prefix(b"\x00") == 2
        assert store.get(b"pre\x00fix") == b"v:pre\x00fix"
    finally:
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_under_the_ssd_tier_is_out_of_space(tmp_path):
    """The tier thinks it has room but its disk does not: puts fail with OutOfSpace, nothing is lost."""
    import subprocess

    disk = tmp_path / "small-disk"
    disk.mkdir()
    # A disk of the tier's own: a tmpfs root is 1777 by default, a directory every user shares, which a
    # store refuses to make private (docs/security.md).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs", str(disk)], check=True)
    try:
        with mooncakefs.open(tmp_path / "data", dram="8MiB", ssd="64MiB", ssd_dir=disk, segment_size="1MiB") as store:
            stored = {}
            with pytest.raises(mooncakefs.OutOfSpace, match="disk under the SSD tier"):
                for i in range(16):
                    value = bytes([i]) * (512 << 10)
                    store.put(f"k{i}", value, durable=True)
                    stored[f"k{i}"] = value
            assert len(stored) >= 3
            for key, value in stored.items():
                assert store.get(key) == value
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_failed_overwrite_straight_to_ssd_keeps_the_old_value(tmp_path):
    """A value too big for DRAM goes to SSD; if SSD has no room either, the key keeps its old value."""
    with mooncakefs.open(tmp_path, dram="4MiB", ssd="8MiB", segment_size="1MiB") as store:
        store.put("k", b"old value", durable=True)
        with pytest.raises(mooncakefs.OutOfSpace):
            store.put("k", bytes(12 * MiB))  # larger than DRAM and than the SSD tier
        assert store.get("k") == b"old value"


def test_persist_of_values_in_segments_from_before_a_restart(store_factory, tmp_path):
    """Their segments were opened at load, not written by this process: persisting them must still
    sync (their journal, or the index), not fail."""
    path = tmp_path / "db"
    store = store_factory(path, **SMALL)
    keys = fill(store, "k", 3, durable=True)
    store.close()
    store = store_factory(path, **SMALL)
    assert store.persist(keys) == 0  # all on SSD already: nothing written, their segments synced
    for k in keys:
        assert store.get(k) == value_for(k)
