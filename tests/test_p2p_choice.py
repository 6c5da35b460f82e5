"""Where a cluster mount's reader takes a chunk from (``mooncakefs.p2p.swarm``): the choice itself, on a
swarm whose cluster, placement map and reader records are stand-ins (no etcd, nodes or FUSE): which
holder is asked first, when the replicas (the writer's uplink) are asked, which chunk is fetched next."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

from mooncakefs.p2p.swarm import FileState, Peer, Swarm, rank_sources, rarest_first

CHUNK = 1 << 20


class Placement:
    """A placement map that puts every chunk on the same nodes."""

    def __init__(self, owners: list[str]) -> None:
        self.owners_of = owners

    def owners(self, key: bytes) -> list[str]:
        return list(self.owners_of)


def swarm(owners: list[str], node: str = "me") -> Swarm:
    store = SimpleNamespace(map=Placement(owners), replicas=len(owners), is_down=lambda n: False)
    namespace = SimpleNamespace(client=None, prefix="fs/", chunk_size=CHUNK, mount_id="m-me")
    return Swarm(store, namespace, node)  # type: ignore[arg-type]


def file_read_by(peers: list[Peer], chunks: int = 8) -> FileState:
    f = FileState(7, (1, 1), {i: 1000 + i for i in range(chunks)}, chunks, chunks * CHUNK)
    f.peers = peers
    return f


def test_the_least_busy_holder_comes_first_and_down_ones_last():
    ranked = rank_sources(["a", "b", "c"], {"a": 2, "b": 0, "c": 1}, lambda n: 0, lambda n: n == "b")
    assert ranked == ["c", "a", "b"]


def test_at_equal_load_a_reader_comes_before_a_replica():
    ranked = rank_sources(["w", "a", "b"], {"b": 1}, {"w": 9, "a": 0, "b": 0}.__getitem__, lambda n: False, {"w"})
    assert ranked == ["a", "w", "b"]


def test_equal_holders_are_spread_by_the_hash_over_chunks():
    firsts = {rank_sources(["a", "b", "c"], {}, lambda n, i=i: hash((i, n)), lambda n: False)[0] for i in range(64)}
    assert firsts == {"a", "b", "c"}


def test_a_busy_holder_is_passed_over_for_the_writers_node():
    """Peer r1 holds chunk 3, r2's node owns a replica, w (the writer, not reading) owns the other: with
    requests in flight to both readers, this reader asks w (hashing alone never named w at all)."""
    s = swarm(["w", "r2"])
    f = file_read_by([Peer("m1", "r1", [[0, 8]], True), Peer("m2", "r2", [], True)])
    s.inflight.update({"r1": 1, "r2": 2})
    assert [node for node, _, _ in s._sources(f, 3)][:3] == ["w", "r1", "r2"]
    s.inflight.update({"r1": 0, "r2": 0, "w": 3})
    assert [node for node, _, _ in s._sources(f, 3)][-1] == "w"


def test_the_replicas_send_about_one_copy_and_not_chunks_nobody_holds():
    s = swarm(["w", "x"])
    f = file_read_by([Peer("m1", "r1", [[0, 4]], True, {"w": 3 * CHUNK, "me": CHUNK})])
    assert {node for node, _, _ in s._sources(f, 2)} == {"r1", "w", "x"}
    f.from_replicas = f.size - 3 * CHUNK  # with r1's 3 chunks from w, the one copy is spent
    assert [node for node, _, _ in s._sources(f, 2)] == ["r1"]
    f.from_replicas = 0
    # chunk 5: no reader holds it, so it comes from its seed (or the replicas by the cluster's routing)
    assert all(node not in ("w", "x") for node, _, _ in s._sources(f, 5))


def test_the_rarest_chunk_of_the_window_is_fetched_first():
    s = swarm(["w", "x"])
    f = file_read_by(
        [
            Peer("m1", "a", [[0, 4]], True),
            Peer("m2", "b", [[0, 1], [2, 4]], True),
            Peer("m3", "c", [[0, 1], [3, 4]], True),
        ],
        chunks=4,
    )
    assert s._next(f, seeds_only=False) == 1  # held by one reader; chunk 0 by three
    assert rarest_first([0, 1, 2, 3], {0: 3, 1: 0, 2: 2, 3: 2}.__getitem__) == [2, 3, 0, 1]


class BlockingEtcd:
    """Records each put; the first one waits until the test lets it go (a slow etcd round trip)."""

    def __init__(self) -> None:
        self.puts: list[dict] = []
        self.first_entered, self.release = threading.Event(), threading.Event()

    def put(self, key: str, value: str, lease: object = None) -> None:
        if not self.first_entered.is_set():
            self.first_entered.set()
            self.release.wait(30)
        self.puts.append(json.loads(value))


def test_the_record_of_a_close_is_never_overtaken_by_an_earlier_one():
    """A prefetcher made a "reading" record and its put was slow; the file closed meanwhile.  The close's
    record must land last, or the watch shows the reader reading forever (the flake of the watch test:
    h2 never "done")."""
    s = swarm(["w"])
    etcd = s.etcd = BlockingEtcd()
    s.ns._lease = None
    f = file_read_by([])
    f.have.add(0)
    prefetcher = threading.Thread(target=s._announce, args=(f,), kwargs={"force": True})
    prefetcher.start()
    assert etcd.first_entered.wait(30)
    f.closed = True
    closer = threading.Thread(target=s._announce, args=(f,), kwargs={"force": True})
    closer.start()
    closer.join(0.5)  # before the fix it puts now, ahead of the slow one; after it, it waits for it
    etcd.release.set()
    prefetcher.join(30)
    closer.join(30)
    assert [p["reading"] for p in etcd.puts][-1] is False, etcd.puts
