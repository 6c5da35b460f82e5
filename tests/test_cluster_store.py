"""The cluster as one store: real node processes, a real etcd, ``connect("etcd://…")``.

Placement, replication, failover on ``kill -9``, repair, a restarted node rejoining, stale epochs
refused, etcd down (reads go on, writes fail clearly, then recover) and a 3-member etcd losing one.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until
from mooncakefs._engine import crc32c
from node_helpers import EtcdCluster, NodeProcess, scrape_metrics

import mooncakefs
import mooncakefs.cluster.client
import mooncakefs.wire
from mooncakefs.cluster.client import NodeLink
from mooncakefs.cluster.placement import PlacementMap
from mooncakefs.errors import InvalidArgument, KeyNotFound, StaleEpoch, Unavailable

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
)

TTL = 3


@pytest.fixture(scope="module")
def etcd():
    cluster = EtcdCluster().start()
    try:
        yield cluster
    finally:
        cluster.close()


class Cluster:
    """Node processes of one named cluster, and helpers to look inside it."""

    def __init__(self, base: Path, etcd_url: str, name: str, nodes: int, *, ssd: str = "0") -> None:
        self.etcd_url, self.name = etcd_url, name
        self.url = f"etcd://{etcd_url.replace('http://', '')}/{name}"
        extra = ("--etcd", etcd_url, "--cluster", name, "--lease-ttl", str(TTL))
        self.nodes = [NodeProcess(base, name=f"{name}{i}", dram="32MiB", ssd=ssd, extra=extra) for i in range(nodes)]
        self.clients: list = []

    def start(self) -> Cluster:
        for n in self.nodes:
            n.start()
        self.wait_members(len(self.nodes))
        return self

    def ident(self, node: NodeProcess) -> str:
        return (node.data / "node-id").read_text().strip()

    def node_of(self, ident: str) -> NodeProcess:
        return next(n for n in self.nodes if self.ident(n) == ident)

    def wait_members(self, count: int, timeout: float = 20) -> None:
        """Until the placement map lists exactly ``count`` nodes."""

        def settled() -> bool:
            try:
                with mooncakefs.connect(self.url) as probe:
                    return len(probe.map.nodes) == count
            except Unavailable:
                return False

        assert wait_until(settled, timeout=timeout, interval=0.2), f"the map never listed {count} nodes"

    def client(self, **options) -> mooncakefs.ClusterStore:
        c = mooncakefs.connect(self.url, **options)
        self.clients.append(c)
        return c

    def holders(self, key: str) -> set[str]:
        """The live nodes holding ``key`` (asked of each directly, no routing)."""
        out = set()
        for n in self.nodes:
            if n.alive:
                with mooncakefs.connect(n.tcp_url, timeout=5) as direct:
                    if direct.exists(key):
                        out.add(self.ident(n))
        return out

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for n in self.nodes:
            if n.alive:
                n.kill()


@pytest.fixture
def make_cluster(etcd, tmp_path, request):
    made: list[Cluster] = []

    def make(nodes: int = 3, *, etcd_url: str | None = None, **kw) -> Cluster:
        name = f"{request.node.name[5:25].replace('_', '-')}{len(made)}"
        c = Cluster(tmp_path, etcd_url or etcd.url, name, nodes, **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.close()


def test_keys_live_on_the_first_r_nodes_of_their_group(make_cluster):
    cluster = make_cluster(3)
    store = cluster.client()
    assert len(store.map.nodes) == 3 and store.map.epoch >= 1
    values = {f"k{i}": f"value {i}".encode() * (i + 1) for i in range(60)}
    for i, (k, v) in enumerate(values.items()):
        store.put(k, v, replicas=1 + i % 3)
    for i, k in enumerate(list(values)[:12]):
        assert cluster.holders(k) == set(store.map.owners(k.encode())[: 1 + i % 3]), k
    for k, v in values.items():
        assert store.get(k) == v
        buf = bytearray(len(v))
        assert store.get_into(k, buf) == len(v) and buf == v
        with store.view(k) as mv:
            assert bytes(mv) == v
    keys = [*list(values), "absent"]
    assert store.batch_get(keys) == [*values.values(), None]
    assert store.batch_exists(keys) == [True] * len(values) + [False]
    assert store.match_prefix(["k0", "k1", "absent", "k2"]) == 2
    assert sorted(store.keys()) == sorted(values) and len(store) == len(values)
    assert store.stat("k5").size == len(values["k5"])
    assert store.remove("k0") and not store.exists("k0") and cluster.holders("k0") == set()
    with pytest.raises(KeyNotFound):
        store.get("k0")
    assert store.batch_put({f"b{i}": b"x" * i for i in range(1, 40)}, replicas=2) == [None] * 39
    assert cluster.holders("b7") == set(store.map.owners(b"b7")[:2])
    big = [(f"big{i}", bytes([i]) * (1 << 20)) for i in range(12)]  # past one frame per node: sent one by one
    assert store.batch_put(big, replicas=2) == [None] * 12
    assert all(cluster.holders(k) == set(store.map.owners(k.encode())[:2]) for k, _ in big[:4])
    assert store.batch_get([k for k, _ in big]) == [v for _, v in big]
    with pytest.raises(ValueError, match="replicas"):
        store.put("k", b"v", replicas=4)
    with pytest.raises(ValueError, match="replicas"):
        store.put("k", b"v", replicas=0)
    with pytest.raises(ValueError, match="placement"):
        store.put("k", b"v", placement="elsewhere")
    # tier= travels to every copy's node, checked as the embedded store checks it
    store.put("tiered", b"t", replicas=2, tier="dram")
    assert store.get("tiered") == b"t" and cluster.holders("tiered") == set(store.map.owners(b"tiered")[:2])
    with pytest.raises(InvalidArgument, match="tier='vram' needs a VRAM tier"):
        store.put("in-vram", b"v", tier="vram")  # these nodes have none
    with pytest.raises(InvalidArgument, match="tier must be one of"):
        store.put("in-gpu", b"v", tier="gpu")
    assert not store.exists("in-vram") and not store.exists("in-gpu")


def test_copies_sent_over_tcp_share_one_crc_of_the_value(make_cluster, monkeypatch):
    """A put with replicas=3 from another host checksums its value once, not once per copy, and every
    node checks the copy it receives against that CRC (a value changed after it was taken is refused)."""
    cluster = make_cluster(3)
    monkeypatch.setenv("MOONCAKEFS_HOST", "another-host")  # the nodes are reached over TCP
    store = cluster.client()
    checksummed: list[int] = []

    def counting_crc32c(data, crc=0):
        checksummed.append(memoryview(data).nbytes)
        return crc32c(data, crc)

    sent_crcs: list[int | None] = []  # the CRC each copy went out with (None: computed as it was sent)
    send_value = mooncakefs.wire.Channel.send_value

    def recording_send_value(self, op, meta, value, crc=None):
        sent_crcs.append(crc)
        return send_value(self, op, meta, value, crc)

    monkeypatch.setattr(mooncakefs.cluster.client, "crc32c", counting_crc32c)
    monkeypatch.setattr(mooncakefs.wire.Channel, "send_value", recording_send_value)
    value = bytes(range(256)) * 4096  # 1 MiB
    store.put("once", value, replicas=3)
    assert sum(checksummed) == len(value)
    assert len(sent_crcs) == 3 and sent_crcs[0] is not None and len(set(sent_crcs)) == 1
    assert cluster.holders("once") == set(store.map.owners(b"once"))
    assert store.get("once") == value


def test_local_placement_stays_on_this_host_and_is_found_from_everywhere(make_cluster):
    cluster = make_cluster(3)
    store = cluster.client()
    here = store._local_node(store.map)
    keys = [f"prefill/{i}" for i in range(30)]
    for k in keys:
        store.put(k, k.encode() * 100, placement="local")
    assert all(cluster.holders(k) >= {here} for k in keys)
    moved = [k for k in keys if store.map.owners(k.encode())[0] != here]
    assert moved, "some keys should belong to other nodes"
    other = cluster.client()
    for k in moved:
        assert cluster.holders(k) == {here} | set(store.map.owners(k.encode())[:1])  # value here, pointer there
        assert other.get(k) == k.encode() * 100 and other.exists(k)
    assert other.batch_get(moved) == [k.encode() * 100 for k in moved]
    assert other.batch_exists(moved) == [True] * len(moved)
    assert other.remove(moved[0]) and not other.exists(moved[0])


def test_kill_9_under_load_loses_no_acknowledged_put_and_repair_restores_replicas(make_cluster):
    cluster = make_cluster(3)
    acked: dict[str, bytes] = {}
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def writer(w: int) -> None:
        store = cluster.client()
        i = 0
        while not stop.is_set():
            key, value = f"w{w}/{i}", f"{w}:{i}".encode() * 64
            try:
                store.put(key, value, replicas=2)
            except Exception as exc:
                errors.append(f"put {key}: {exc!r}")
                continue
            with lock:
                acked[key] = value
            i += 1

    def reader() -> None:
        store = cluster.client()
        while not stop.is_set():
            with lock:
                sample = list(acked.items())[-50:]
            for key, value in sample:
                try:
                    assert store.get(key) == value
                except Exception as exc:
                    errors.append(f"get {key}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(acked) > 200, timeout=20)
        victim = cluster.nodes[1]
        victim_id = cluster.ident(victim)
        victim.kill()
        killed = time.monotonic()
        time.sleep(TTL + 3)
        before = len(acked)
        assert wait_until(lambda: len(acked) > before + 100, timeout=10), "writes did not resume"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    store = cluster.client()
    assert victim_id not in store.map.nodes
    for key, value in acked.items():
        assert store.get(key) == value, key
    assert time.monotonic() - killed < 60
    survivors = [n for n in cluster.nodes if n.alive]

    def replicated() -> bool:
        held = {cluster.ident(n): set() for n in survivors}
        for n in survivors:
            with mooncakefs.connect(n.tcp_url) as direct:
                keys = list(acked)
                held[cluster.ident(n)] = {k for k, p in zip(keys, direct.batch_exists(keys), strict=True) if p}
        return all(sum(k in h for h in held.values()) == 2 for k in acked)

    assert wait_until(replicated, timeout=30, interval=0.5), "repair did not restore 2 replicas"


def test_a_restarted_node_rejoins_with_its_ssd_data(make_cluster):
    cluster = make_cluster(3, ssd="64MiB")
    store = cluster.client()
    values = {f"d{i}": f"durable {i}".encode() * 500 for i in range(40)}
    for k, v in values.items():
        store.put(k, v, durable=True)
    node = cluster.nodes[2]
    ident = cluster.ident(node)
    mine = [k for k in values if store.map.owners(k.encode())[0] == ident]
    assert mine
    seconds = [f"r2/{i}" for i in range(200) if store.map.owners(f"r2/{i}".encode())[1] == ident][:5]
    for k in seconds:  # this node is their second replica
        store.put(k, b"two copies", replicas=2, durable=True)
    with mooncakefs.connect(node.tcp_url, timeout=5) as direct:
        versions = direct.versions(mine)
    assert all(v and v >> 63 == store.map.epoch for v in versions)  # the writer's epoch, then its clock
    node.kill()
    cluster.wait_members(2)
    node.start()
    cluster.wait_members(3)
    for k, v in values.items():
        assert store.get(k) == v  # the restarted node serves what it had on SSD
    for k in mine:
        assert ident in cluster.holders(k)
    with mooncakefs.connect(node.tcp_url, timeout=5) as direct:
        assert direct.versions(mine) == versions  # kept on SSD: nothing had to be fetched again
    time.sleep(2)  # its repair passes have run: the replica count, kept on SSD too, says to keep them
    for k in seconds:
        assert cluster.holders(k) == set(store.map.owners(k.encode())[:2]), k
    fresh = [f"new{i}" for i in range(40)]
    for k in fresh:
        store.put(k, b"n")
    assert any(ident in cluster.holders(k) for k in fresh), "the restarted node takes new writes"


def test_repair_never_lets_an_older_copy_replace_a_newer_one(make_cluster, tmp_path):
    """A node holding an out-of-date copy of a key it does not own (what a node cut off, or a repair
    push that lost a race, leaves behind) hands it to the key's new owner: the newer copy must win."""
    cluster = make_cluster(2)
    store = cluster.client()
    late = NodeProcess(tmp_path, name="late", dram="32MiB", extra=cluster.nodes[0].extra)
    late.data.mkdir(parents=True)
    (late.data / "node-id").write_text("latecomer\n")
    now = store.map
    after = PlacementMap.compute(now.epoch + 1, {**now.nodes, "latecomer": {}}, groups=now.groups, width=now.width)
    key = next(k for k in (f"contested/{i}" for i in range(10_000)) if after.owners(k.encode())[0] == "latecomer")
    store.put(key, b"newer", replicas=1)
    owner = now.owners(key.encode())[0]
    other = next(n for n in cluster.nodes if cluster.ident(n) != owner)
    with mooncakefs.connect(other.tcp_url, timeout=5) as direct:  # names no epoch: the node takes it
        direct.put(key, b"older", version=1)
    cluster.nodes.append(late.start())
    cluster.wait_members(3)
    assert wait_until(lambda: cluster.holders(key) == {"latecomer"}, timeout=20), cluster.holders(key)
    assert store.get(key) == b"newer"


def test_requests_under_a_stale_epoch_are_refused_and_clients_catch_up(make_cluster, tmp_path):
    cluster = make_cluster(2)
    store = cluster.client()
    old = store.map
    ident = sorted(old.nodes)[0]
    link = NodeLink(old.nodes[ident], epoch=old.epoch)
    try:
        link.put("x", b"1")
        extra = NodeProcess(tmp_path, name="late", dram="32MiB", metrics="auto", extra=cluster.nodes[0].extra)
        cluster.nodes.append(extra.start())
        cluster.wait_members(3)
        assert wait_until(lambda: scrape_metrics(extra)["mooncakefs_cluster_epoch"] > old.epoch)
        assert scrape_metrics(extra)["mooncakefs_cluster_fenced"] == 0
        assert wait_until(lambda: _refused(link), timeout=TTL + 5), "the old epoch is still served"
        with pytest.raises(StaleEpoch):
            link.get("x")
    finally:
        link.close()
    assert store.map.epoch == old.epoch  # not told yet: it finds out from the node
    for i in range(30):
        store.put(f"after/{i}", b"v")
        assert store.get(f"after/{i}") == b"v"
    assert store.map.epoch > old.epoch and len(store.map.nodes) == 3


def _refused(link: NodeLink) -> bool:
    try:
        link.put("y", b"2")
        return False
    except StaleEpoch:
        return True


def test_etcd_down_reads_go_on_writes_fail_clearly_then_recover(tmp_path):
    etcd = EtcdCluster().start()
    cluster = Cluster(tmp_path, etcd.url, "outage", 2)
    try:
        cluster.start()
        store = cluster.client(failover=2)
        for i in range(20):
            store.put(f"k{i}", b"v" * i, replicas=2)
        etcd.stop()
        down = time.monotonic()
        for i in range(20):
            assert store.get(f"k{i}") == b"v" * i  # reads of known placements keep working
        time.sleep(max(0.0, TTL * 2 / 3 + 0.5 - (time.monotonic() - down)))
        with pytest.raises(Unavailable, match="etcd"):
            store.put("during", b"x")
        assert store.get("k3") == b"vvv"
        etcd.start()
        assert wait_until(lambda: _writes(store), timeout=20, interval=0.5), "writes did not recover"
        assert store.get("recovered") == b"ok"
    finally:
        cluster.close()
        etcd.close()


def _writes(store) -> bool:
    try:
        store.put("recovered", b"ok", replicas=2)
        return True
    except Unavailable:
        return False


def test_a_3_member_etcd_losing_one_member_keeps_working(tmp_path):
    etcd = EtcdCluster(3).start()
    cluster = Cluster(tmp_path, etcd.url, "quorum", 3)
    try:
        cluster.start()
        store = cluster.client()
        store.put("before", b"1", replicas=2)
        etcd.kill_member(0)  # the member every client lists first
        for i in range(30):
            store.put(f"k{i}", b"v", replicas=2)
        assert store.get("before") == b"1"
        victim = cluster.nodes[0]
        victim_id = cluster.ident(victim)
        victim.kill()  # membership and placement still change with 2 of 3 etcd members
        cluster.wait_members(2, timeout=30)
        for i in range(30):
            assert store.get(f"k{i}") == b"v"
        store.put("after", b"2", replicas=2)
        assert victim_id not in store.map.nodes
    finally:
        cluster.close()
        etcd.close()
