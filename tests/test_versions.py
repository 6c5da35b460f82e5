"""Value versions and tags: every put may carry them, and they are kept with the value, on SSD across
restarts.  A cluster node keeps there each value's version (the map's epoch, then the writer's clock) and
how it was placed (its replica count); ``if_newer`` puts replace only older versions.  Cluster repair
relies on all of it (see test_cluster_netns.py for the partition it settles)."""

from __future__ import annotations

import sqlite3

import pytest

import mooncakefs
from mooncakefs import errors
from mooncakefs.api import PutOptions

BIG = 1 << 100  # a version past 64 bits, as the cluster's are from epoch 2 on


def test_put_records_its_version(store):
    store.put("a", b"1", version=7)
    store.put("b", b"2")
    assert store.stat("a").version == 7
    assert store.stat("b").version == 0  # the default
    assert store.versions(["a", "b", "missing"]) == [7, 0, None]


def test_overwrite_takes_the_new_version_even_if_lower(store):
    """A plain put always replaces: versions order repair, not the writer's own overwrites."""
    store.put("k", b"new", version=BIG)
    store.put("k", b"newer", version=3)
    assert store.get("k") == b"newer"
    assert store.versions(["k"]) == [3]


@pytest.mark.parametrize(
    "existing, incoming, replaced", [(None, 5, True), (4, 5, True), (5, 5, False), (6, 5, False), (BIG, BIG + 1, True)]
)
def test_if_newer_replaces_only_an_older_version(store, existing, incoming, replaced):
    if existing is not None:
        store.put("k", b"old", version=existing)
    if replaced:
        store.put("k", b"incoming", version=incoming, if_newer=True)
    else:
        with pytest.raises(errors.NotNewer) as caught:
            store.put("k", b"incoming", version=incoming, if_newer=True)
        assert isinstance(caught.value, errors.KeyExists) and "if_newer" in str(caught.value)
    assert store.get("k") == (b"incoming" if replaced else b"old")
    assert store.versions(["k"]) == [incoming if replaced else existing]


def test_if_newer_is_checked_when_a_begun_put_is_published(store):
    """A newer value published while a two-part put was being filled wins over it."""
    pending = store.begin_put("k", 4, PutOptions(version=5, if_newer=True))
    pending.buffer[:] = b"late"
    store.put("k", b"meanwhile", version=9)
    with pytest.raises(errors.NotNewer):
        store.end_put(pending)
    assert store.get("k") == b"meanwhile"


def test_batch_put_takes_version_and_if_newer(store):
    store.put("b", b"held", version=10)
    results = store.batch_put([("a", b"1"), ("b", b"2"), ("c", b"3" * (1 << 20))], version=5, if_newer=True)
    assert results[0] is None and isinstance(results[1], errors.NotNewer) and results[2] is None
    assert store.versions(["a", "b", "c"]) == [5, 10, 5]


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1 << 126, ValueError), (1.5, TypeError), ("7", TypeError)])
def test_bad_versions_are_refused(store, bad, error):
    with pytest.raises(error):
        store.put("k", b"v", version=bad)
    assert not store.exists("k")


@pytest.mark.parametrize("bad", [-1, 1 << 32, 2.0])
def test_bad_tags_are_refused(store, bad):
    with pytest.raises(ValueError, match="tag"):
        store.put("k", b"v", tag=bad)
    assert not store.exists("k")


def test_if_absent_and_if_newer_together_are_refused(store):
    with pytest.raises(ValueError, match="not both"):
        store.put("k", b"v", if_absent=True, if_newer=True)


def test_versions_survive_a_restart_on_ssd(store_factory, tmp_path):
    path = tmp_path / "persist"
    store = store_factory(path, dram="4MiB", ssd="64MiB", segment_size="4MiB")
    store.put("durable", b"d", version=BIG + 1, durable=True, tag=0xFFFF_FFFF)
    store.put("demoted", b"x" * (1 << 20), version=BIG + 2, tag=2 << 8)
    for i in range(8):  # push "demoted" out of DRAM onto SSD
        store.put(f"filler/{i}", b"f" * (1 << 20))
    assert store.stat("demoted").tier == "ssd"
    store.close()
    store = store_factory(path, dram="4MiB", ssd="64MiB", segment_size="4MiB")
    assert store.versions(["durable", "demoted"]) == [BIG + 1, BIG + 2]
    index = store.raw_index()
    assert index[b"durable"] == (BIG + 1, 0xFFFF_FFFF) and index[b"demoted"] == (BIG + 2, 2 << 8)
    assert store.get("demoted") == b"x" * (1 << 20)


def test_an_index_from_before_versions_is_upgraded(store_factory, tmp_path):
    """An SSD index written before values had versions opens, its values at version 0."""
    path = tmp_path / "old"
    store = store_factory(path, dram="4MiB", ssd="64MiB", segment_size="4MiB")
    store.put("kept", b"value", durable=True)
    store.close()
    db = sqlite3.connect(path / "index.sqlite")
    for column in ("version_hi", "version_lo", "tag"):
        db.execute(f"ALTER TABLE objects DROP COLUMN {column}")
    db.commit()
    db.close()
    store = store_factory(path, dram="4MiB", ssd="64MiB", segment_size="4MiB")
    assert store.get("kept") == b"value" and store.raw_index()[b"kept"] == (0, 0)
    store.put("new", b"n", version=3, durable=True, tag=5)
    assert store.raw_index()[b"new"] == (3, 5)


def test_not_newer_is_exported():
    assert mooncakefs.NotNewer is errors.NotNewer
