"""The placement map on its own: deterministic, balanced, and moving little when membership changes."""

from __future__ import annotations

from collections import Counter

from mooncakefs.cluster.placement import PlacementMap, group_of, pointer_key

NODES = {f"n{i:02d}": {"id": f"n{i:02d}", "tcp": f"127.0.0.1:{7000 + i}"} for i in range(10)}


def test_groups_are_stable_and_in_range():
    assert group_of(b"some key", 256) == group_of(b"some key", 256)
    seen = Counter(group_of(f"k{i}".encode(), 64) for i in range(20_000))
    assert set(seen) == set(range(64))
    assert max(seen.values()) < 2 * min(seen.values())


def test_the_map_is_deterministic_and_balanced():
    a = PlacementMap.compute(1, NODES, groups=256, width=3)
    b = PlacementMap.compute(1, dict(reversed(list(NODES.items()))), groups=256, width=3)
    assert a.replicas == b.replicas
    assert all(len(set(r)) == 3 for r in a.replicas)
    share = Counter(n for r in a.replicas for n in r)
    assert set(share) == set(NODES)
    mean = 256 * 3 / len(NODES)
    assert all(0.6 * mean < c < 1.4 * mean for c in share.values()), share
    assert PlacementMap.from_json(a.to_json()) == a


def test_a_node_leaving_moves_only_its_groups():
    before = PlacementMap.compute(1, NODES, groups=256, width=3)
    after = PlacementMap.compute(2, {k: v for k, v in NODES.items() if k != "n03"}, groups=256, width=3)
    for old, new in zip(before.replicas, after.replicas, strict=True):
        if "n03" not in old:
            assert old == new  # untouched
        else:
            survivors = [n for n in old if n != "n03"]
            assert new[: len(survivors)] == survivors  # the others keep their order; one newcomer at the end


def test_a_node_joining_takes_a_fair_share_and_nothing_else_moves():
    small = {k: v for k, v in NODES.items() if k != "n09"}
    before = PlacementMap.compute(1, small, groups=256, width=3)
    after = PlacementMap.compute(2, NODES, groups=256, width=3)
    changed = 0
    for old, new in zip(before.replicas, after.replicas, strict=True):
        if "n09" in new:
            changed += 1
            assert [n for n in new if n != "n09"] == old[:2]
        else:
            assert old == new
    assert 0.5 * 256 * 3 / 10 < changed < 1.5 * 256 * 3 / 10


def test_fewer_nodes_than_the_width():
    m = PlacementMap.compute(1, {"a": {"id": "a"}, "b": {"id": "b"}}, groups=8, width=3)
    assert all(sorted(r) == ["a", "b"] for r in m.replicas)
    assert PlacementMap.compute(1, {}, groups=8).replicas == [[]] * 8


def test_a_pointer_lives_in_its_keys_group():
    for i in range(200):
        raw = f"prefill/{i}".encode()
        assert group_of(pointer_key(raw), 256) == group_of(raw, 256)
    assert pointer_key(b"a") != pointer_key(b"b")
