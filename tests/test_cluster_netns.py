"""A node cut off from the cluster by a real network partition is fenced: once 2/3 of its lease ttl has
passed without etcd confirming its lease, it acknowledges no write, while the rest of the cluster lets its
lease expire and hands its groups to the other nodes; when the link returns it rejoins and takes writes again.

Real processes, a real etcd and the kernel's network namespaces, all on this machine::

    root namespace                                   network namespace mcfs-iso-<pid>
      etcd    127.0.0.1 + 10.213.N.1                   node I  10.213.N.2 (MOONCAKEFS_HOST=iso)
      node A  10.213.N.1 (host-a)     veth pair        client, two ClusterStores:
      node B  10.213.N.1 (host-b)   <===========>        "unix": host "iso", the node's own host
      the test: clients of host root-client              "tcp":  host "iso-peer", another host on
                                                                 the same side of the cut

Taking the root end of the veth down cuts the namespace off.  Its node and client can reach neither etcd
nor the other nodes, and their packets are silently dropped as on a broken link, so the node learns of it
only from its lease refreshes timing out.  Both clients in the namespace can still reach the isolated
node.  The "unix" one talks to it as processes on the node's own host do (Unix socket and shared memory
pool, so a big put is PUT_BEGIN + memcpy + PUT_END), the "tcp" one as a client on another host of the
minority side does.  The fence must hold on both paths, so the test exercises both.  Apart from the "unix"
client, which shares the node's host on purpose, every node and client names its own MOONCAKEFS_HOST.
netns does not isolate the filesystem, so a client whose host matched a node's would take that node's Unix
socket and go around the network that the test cuts.

The root namespace gets an "unreachable" route for the namespace's subnet, behind the veth's own route.
With the veth down its connected route goes away, and without that route, packets to 10.213.N.2 would
follow the default route off the machine instead of failing at once as an unreachable host does.

The last test overwrites a key of the cut-off node while it is out of the map: when the node comes back as
the key's owner, it must catch up (take the newer version) before it serves the key again.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import child_env, kill_process, wait_until
from node_helpers import NodeProcess, free_port, raw_channel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed"),
]

TTL = 3  # --lease-ttl of every node: fenced 2 s after its last confirmed refresh, out of the map after ~3 s
FENCE_S = TTL * 2 / 3
MARGIN_S = 1.0  # scheduling slack on a busy machine, on top of FENCE_S
PARTITION_S = 8.0  # how long the client in the namespace keeps writing while cut off


# ------------------------------------------------------------------------------------- the namespace


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Partition:
    """A network namespace joined to the root one by a veth pair; ``cut()`` and ``heal()`` the link."""

    ns: str
    root_if: str
    subnet: str  # "10.213.N"
    undo: list[list[str]] = field(default_factory=list)

    @property
    def root_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def iso_ip(self) -> str:
        return f"{self.subnet}.2"

    def cut(self) -> None:
        ip("link", "set", self.root_if, "down")

    def heal(self) -> None:
        ip("link", "set", self.root_if, "up")

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def _free_subnet() -> str:
    taken = ip("-o", "addr").stdout + ip("route", "show", "table", "all").stdout
    for i in range(224):
        n = 16 + (os.getpid() + i) % 224
        if f"10.213.{n}." not in taken:
            return f"10.213.{n}"
    pytest.skip("no free 10.213.N.0/24 subnet for the test's veth pair")


@pytest.fixture
def partition():
    """The namespace and its veth pair, both ends up.  Everything is deleted at teardown, in reverse order;
    the namespace goes last, after the ``cluster`` fixture has killed the processes in it."""
    pid = os.getpid()
    ns, root_if, iso_if = f"mcfs-iso-{pid}", f"mcv{pid}r", f"mcv{pid}i"
    made = ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root): {made.stderr.strip()}")
    net = Partition(ns, root_if, "")
    net.undo.append(["netns", "del", ns])
    try:
        net.subnet = _free_subnet()
        try:
            ip("link", "add", root_if, "type", "veth", "peer", "name", iso_if)
            net.undo.append(["link", "del", root_if])  # deletes both ends
            ip("link", "set", iso_if, "netns", ns)
            ip("addr", "add", f"{net.root_ip}/24", "dev", root_if)
            ip("link", "set", root_if, "up")
            unreachable = ["unreachable", f"{net.subnet}.0/24", "metric", "4000"]
            ip("route", "add", *unreachable)
            net.undo.append(["route", "del", *unreachable])
            ip("-n", ns, "addr", "add", f"{net.iso_ip}/24", "dev", iso_if)
            ip("-n", ns, "link", "set", iso_if, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot set up the veth pair ({' '.join(exc.cmd)}): {exc.stderr.strip()}")
        yield net
    finally:
        for args in reversed(net.undo):
            ip(*args, check=False)


def etcd_answers(url: str) -> bool:
    from mooncakefs.cluster.membership import connect_etcd

    try:
        client = connect_etcd(url, timeout=1)
        try:
            client.status()
        finally:
            client.close()
        return True
    except Exception:
        return False


@pytest.fixture
def etcd(partition):
    """A single-member etcd in the root namespace, on loopback and on the root end of the veth.
    Yields (URL for the root namespace, URL for the isolated one)."""
    client, peer = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="mooncakefs-etcd-", dir="/dev/shm")
    proc = subprocess.Popen(
        [
            "etcd",
            "--name",
            "t",
            "--data-dir",
            data,
            "--listen-client-urls",
            f"http://127.0.0.1:{client},http://{partition.root_ip}:{client}",
            "--advertise-client-urls",
            f"http://{partition.root_ip}:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"t=http://127.0.0.1:{peer}",
            "--log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{client}"
        assert wait_until(lambda: etcd_answers(url), timeout=20, interval=0.1), "etcd did not start"
        yield url, f"http://{partition.root_ip}:{client}"
    finally:
        kill_process(proc)
        shutil.rmtree(data, ignore_errors=True)


class NetnsNode(NodeProcess):
    """A node daemon inside a network namespace (``ip netns exec`` execs it: the pid is the node's)."""

    def __init__(self, *args, netns: Partition, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.netns = netns

    def argv(self) -> list[str]:
        return self.netns.exec_argv(*super().argv())


@dataclass
class Cluster:
    name: str
    secret: bytes
    etcd: str  # as the root namespace reaches it
    iso_etcd: str  # as the isolated namespace reaches it
    net: Partition
    nodes: dict[str, NodeProcess]
    iso: str = ""  # the isolated node's id
    stores: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"etcd://{self.etcd.removeprefix('http://')}/{self.name}"

    def placement(self):
        """The placement map in etcd now (None if there is none yet, or etcd did not answer)."""
        from mooncakefs.cluster.membership import cluster_prefix, connect_etcd
        from mooncakefs.cluster.placement import PlacementMap

        try:
            client = connect_etcd(self.etcd, timeout=2)
            try:
                kv = client.get(cluster_prefix(self.name) + "placement")
            finally:
                client.close()
        except Exception:
            return None
        return None if kv is None else PlacementMap.from_json(kv.value)

    def wait_for_map(self, predicate, timeout: float, what: str):
        assert wait_until(
            lambda: (m := self.placement()) is not None and predicate(m), timeout=timeout, interval=0.1
        ), f"the placement map did not {what} within {timeout} s: {self.placement()}"
        return self.placement()

    def connect(self, **options):
        """A ClusterStore from the root namespace (host root-client), closed at teardown."""
        import mooncakefs

        store = mooncakefs.connect(self.url, secret=self.secret, **options)
        self.stores.append(store)
        return store


def owned_by(pmap, node: str, prefix: str, count: int = 1) -> list[str]:
    """``count`` keys whose group lists ``node`` first under ``pmap`` (where a replicas=1 put goes)."""
    found = [k for k in (f"{prefix}-{i}" for i in range(100 * count + 100)) if pmap.owners(k.encode())[0] == node]
    assert len(found) >= count
    return found[:count]


@pytest.fixture
def cluster(partition, etcd, tmp_path, monkeypatch):
    """Nodes A and B in the root namespace, node I in the isolated one, all mapped; killed at teardown."""
    root_etcd, iso_etcd = etcd
    cluster_name = f"netns{os.getpid()}"
    secret = secrets.token_hex(16).encode()
    monkeypatch.setenv("MOONCAKEFS_HOST", "root-client")
    monkeypatch.delenv("MOONCAKEFS_SECRET", raising=False)

    def member(etcd_url: str, host: str) -> dict:
        return {
            "dram": "32MiB",
            "secret": secret,
            "env": {"MOONCAKEFS_HOST": host},
            "extra": ("--etcd", etcd_url, "--cluster", cluster_name, "--lease-ttl", str(TTL)),
        }

    nodes: dict[str, NodeProcess] = {
        name: NodeProcess(
            tmp_path, name=name, listen=f"{partition.root_ip}:{free_port()}", **member(root_etcd, f"host-{name}")
        )
        for name in ("a", "b")
    }
    nodes["iso"] = NetnsNode(
        tmp_path, name="iso", listen=f"{partition.iso_ip}:{free_port()}", netns=partition, **member(iso_etcd, "iso")
    )
    c = Cluster(cluster_name, secret, root_etcd, iso_etcd, partition, nodes)
    try:
        for node in nodes.values():
            node.launch()
        for node in nodes.values():
            node.wait_ready()
        first = c.wait_for_map(lambda m: len(m.nodes) == 3, timeout=20, what="list the three nodes")
        c.iso = next(ident for ident, record in first.nodes.items() if record["host"] == "iso")
        assert first.nodes[c.iso]["tcp"] == nodes["iso"].listen
        yield c
    finally:
        for store in c.stores:
            with contextlib.suppress(Exception):
                store.close()
        for node in nodes.values():
            node.kill()
        for node in nodes.values():
            sys.stderr.write(f"\n--- node {node.name} ---\n{node.log()[-3000:]}\n")  # shown if the test failed


# -------------------------------------------------------------------------- the client in the namespace

CLIENT = r'''
import json, os, sys, threading, time
import mooncakefs
from mooncakefs.errors import MooncakeError

etcd, cluster, iso, partition_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
out_lock = threading.Lock()


def say(**fields):
    with out_lock:
        print(json.dumps(fields), flush=True)


def patiently(fn, timeout=15.0):
    """Setup calls may meet a slow machine: retry them for a while (the test is about what follows)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except MooncakeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def value_of(key, size):
    return (key.encode() + b"/") * (size // (len(key) + 1)) + b"." * (size % (len(key) + 1))


stores = {}
for via, host in (("unix", "iso"), ("tcp", "iso-peer")):
    os.environ["MOONCAKEFS_HOST"] = host  # a ClusterStore takes its host from here when it connects
    stores[via] = mooncakefs.connect(f"etcd://{etcd}/{cluster}", failover=0.5, timeout=1.0)


def keys(prefix):
    """Keys whose group lists the isolated node first: replicas=1 puts go there."""
    i = 0
    while True:
        key = f"{prefix}-{i}"
        if stores["tcp"].map.owners(key.encode())[0] == iso:
            yield key
        i += 1


SIZES = (4096, 64 << 10)  # over the Unix socket: an inline PUT, and PUT_BEGIN + shared memory + PUT_END
before = {}
for via, store in stores.items():
    for size in SIZES:
        key = next(keys(f"pre-{via}-{size}"))
        patiently(lambda: store.put(key, value_of(key, size), replicas=1, pin=True))  # pinned: never evicted
        assert patiently(lambda: store.get(key)) == value_of(key, size)
        before[key] = (via, size)
say(ready=True, epoch=stores["tcp"].map.epoch,
    transport={via: store._links[iso].url.split(":")[0] for via, store in stores.items()})

assert sys.stdin.readline().strip() == "go"


def writer(via):
    store, fresh, n = stores[via], keys(f"cut-{via}"), 0
    while time.monotonic() - go < partition_s:
        key, size = next(fresh), SIZES[n % 2]
        start = time.monotonic()
        try:
            store.put(key, value_of(key, size), replicas=1)
            result, why = "ok", ""
        except MooncakeError as exc:
            result, why = type(exc).__name__, str(exc)
        say(op="put", via=via, key=key, size=size, start=start, end=time.monotonic(), result=result, why=why,
            owner=store.map.owners(key.encode())[0], epoch=store.map.epoch)
        n += 1
        time.sleep(0.05)


def reader(via):
    store, n = stores[via], 0
    mine = [(key, size) for key, (w, size) in before.items() if w == via]
    while time.monotonic() - go < partition_s:
        key, size = mine[n % len(mine)]
        start = time.monotonic()
        try:
            result, why = ("ok", "") if store.get(key) == value_of(key, size) else ("mismatch", "")
        except MooncakeError as exc:
            result, why = type(exc).__name__, str(exc)
        say(op="get", via=via, key=key, start=start, end=time.monotonic(), result=result, why=why)
        n += 1
        time.sleep(0.05)


go = time.monotonic()
threads = [threading.Thread(target=fn, args=(via,)) for via in stores for fn in (writer, reader)]
for t in threads:
    t.start()
for t in threads:
    t.join()
say(done=True)

# once the link is back: the same clients, still holding the old map, get their writes in again
assert sys.stdin.readline().strip() == "healed"
for via, store in stores.items():
    key, start, errors = next(keys(f"healed-{via}")), time.monotonic(), []
    while True:
        try:
            store.put(key, b"after the partition", replicas=1)
            break
        except MooncakeError as exc:
            errors.append(type(exc).__name__)
            if time.monotonic() - start > 20:
                raise
            time.sleep(0.2)
    say(op="healed-put", via=via, key=key, took=time.monotonic() - start, errors=errors,
        owner=store.map.owners(key.encode())[0], epoch=store.map.epoch)
say(done=True)
'''


def value_of(key: str, size: int) -> bytes:
    """The value the client in the namespace writes under ``key`` (as its ``value_of``)."""
    return (key.encode() + b"/") * (size // (len(key) + 1)) + b"." * (size % (len(key) + 1))


class Lines:
    """A child's stdout as JSON lines, read by a thread so that the test can wait with a timeout."""

    def __init__(self, proc: subprocess.Popen, stderr_path: Path) -> None:
        self.proc, self.stderr_path = proc, stderr_path
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def next(self, timeout: float) -> dict:
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"the client in the namespace said nothing for {timeout:.0f} s\n{self.stderr()}"
            ) from None
        if line is None:
            raise AssertionError(f"the client in the namespace exited ({self.proc.wait()})\n{self.stderr()}")
        return json.loads(line)

    def until_done(self, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        got = []
        while not (record := self.next(max(0.1, deadline - time.monotonic()))).get("done"):
            got.append(record)
        return got

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-6000:]
        return ""


# ------------------------------------------------------------------------------------------- the tests


def test_a_partitioned_node_is_fenced_then_rejoins(cluster, tmp_path):
    import mooncakefs

    net, iso, iso_node = cluster.net, cluster.iso, cluster.nodes["iso"]
    first = cluster.placement()

    # the client in the namespace loads the map and writes through the isolated node while the link is up
    script = tmp_path / "iso_client.py"
    script.write_text(CLIENT)
    stderr_path = tmp_path / "iso_client.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            net.exec_argv(
                sys.executable,
                str(script),
                cluster.iso_etcd.removeprefix("http://"),
                cluster.name,
                iso,
                str(PARTITION_S),
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            bufsize=1,
            env=child_env() | {"MOONCAKEFS_SECRET": cluster.secret.decode()},
        )
    try:
        lines = Lines(proc, stderr_path)
        ready = lines.next(timeout=60)
        assert ready.get("ready") and ready["epoch"] == first.epoch, ready
        assert ready["transport"] == {"unix": "unix", "tcp": "tcp"}, ready

        root = cluster.connect(failover=TTL + 10, timeout=2.0)
        moved = owned_by(root.map, iso, "moved", 3)

        # cut the link: from here the namespace's node reaches neither etcd nor the other nodes
        net.cut()
        cut_at = time.monotonic()
        lines.send("go")

        # the rest of the cluster drops the isolated node from the map (its lease expired) and takes over its
        # groups: a client of the root namespace still routing by the old map fails over to the new owners
        for key in moved:
            root.put(key, key.encode() * 100, replicas=1)
        failed_over = time.monotonic() - cut_at
        assert iso not in root.map.nodes and root.map.epoch > first.epoch, root.map
        assert failed_over < TTL + 8, f"the root client needed {failed_over:.1f} s to write past the cut"
        for key in moved:
            assert root.map.owners(key.encode())[0] != iso
            assert root.get(key) == key.encode() * 100
        second = cluster.placement()
        assert sorted(second.nodes) == sorted(set(first.nodes) - {iso}) and second.epoch > first.epoch

        # what the client in the namespace saw meanwhile
        attempts = lines.until_done(timeout=PARTITION_S + 30)
        report = "\n".join(
            f"{a['op']:4} {a['via']:4} {a['start'] - cut_at:6.2f}..{a['end'] - cut_at:6.2f} s "
            f"after the cut: {a['result']} {a['why'][:90]}"
            for a in attempts
        )
        puts = [a for a in attempts if a["op"] == "put"]
        gets = [a for a in attempts if a["op"] == "get"]
        assert all(a["owner"] == iso and a["epoch"] == first.epoch for a in puts), report  # all routed to it
        # a put that starts this late reaches the node past its fence: it must not be acknowledged.  (The
        # node's lease expires TTL after its last refresh, so acknowledging only before 2/3 TTL leaves the
        # new owners a clean handover.)
        late = [a for a in puts if a["start"] - cut_at > FENCE_S + MARGIN_S]
        for via in ("unix", "tcp"):
            assert [a for a in late if a["via"] == via], f"no put via {via} after the fence deadline:\n{report}"
        acknowledged = [a for a in late if a["result"] == "ok"]
        assert not acknowledged, f"the isolated node acknowledged writes after it should be fenced:\n{report}"
        assert {a["result"] for a in late} <= {"Fenced", "Unavailable", "StaleEpoch"}, report
        # reads go on: the isolated node still serves what it holds
        assert gets and all(a["result"] == "ok" for a in gets), report
        for via in ("unix", "tcp"):
            assert [a for a in gets if a["via"] == via and a["start"] - cut_at > FENCE_S + MARGIN_S], report

        # heal the link: the node's lease is gone, so it registers again and the controller maps it again
        net.heal()
        healed_at = time.monotonic()
        third = cluster.wait_for_map(lambda m: iso in m.nodes, timeout=20, what="take the node back")
        rejoined = time.monotonic() - healed_at
        assert third.epoch > second.epoch and sorted(third.nodes) == sorted(first.nodes)

        # a fresh client writes to the node again, and the node holds what it was sent
        fresh = cluster.connect(failover=10, timeout=2.0)
        (key,) = owned_by(fresh.map, iso, "back")
        fresh.put(key, b"back again", replicas=1)
        assert fresh.get(key) == b"back again"
        with mooncakefs.connect(f"tcp://{iso_node.listen}", secret=cluster.secret, timeout=5) as direct:
            assert direct.get(key) == b"back again"
        # nothing acknowledged on either side is lost: the isolated node's writes from before its fence,
        # and the majority's writes to its groups while it was away
        for a in puts:
            if a["result"] == "ok":
                assert fresh.get(a["key"]) == value_of(a["key"], a["size"]), a
        for key in moved:
            assert fresh.get(key) == key.encode() * 100

        # and the clients that lived through the partition in the namespace get their writes in again
        lines.send("healed")
        healed = lines.until_done(timeout=60)
        assert {h["via"] for h in healed} == {"unix", "tcp"}, healed
        assert all(h["owner"] == iso and h["epoch"] >= third.epoch for h in healed), healed
        sys.stdout.write(
            f"\n{report}\nfailed over {failed_over:.1f} s after the cut; rejoined {rejoined:.1f} s "
            f"after the heal; {healed}\n"
        )
    finally:
        kill_process(proc)


def test_a_fenced_node_refuses_every_write_with_fenced(cluster):
    """A client on the isolated node's host (its Unix socket, which the cut does not touch) writes twice:
    one put is half sent when the link goes and finishes after the lease expired, the other starts then.
    Both must be refused with Fenced (or StaleEpoch), as an error reply on a connection that stays up."""
    import mooncakefs
    from mooncakefs.wire import HEADER, MAGIC, Op, _pack

    first = cluster.placement()
    late_key, after_key = owned_by(first, cluster.iso, "fence", 2)
    value = b"v" * 4096
    channels = {}
    for name in ("late", "after"):
        ch = raw_channel(cluster.nodes["iso"].unix_url, secret=cluster.secret)
        ch.send(Op.EPOCH, [first.epoch])
        ch.read_reply()
        channels[name] = ch
    meta = _pack([late_key.encode(), len(value), 0, None, None])
    channels["late"].sock.sendall(HEADER.pack(MAGIC, Op.PUT, 0, len(meta), len(value)) + meta + value[:1000])

    cluster.net.cut()
    cluster.wait_for_map(lambda m: cluster.iso not in m.nodes, timeout=TTL + 10, what="drop the cut-off node")

    problems = []

    def outcome(name: str) -> None:
        try:
            channels[name].read_reply()
            problems.append(f"{name}: the put was acknowledged")
        except (mooncakefs.Fenced, mooncakefs.StaleEpoch):
            pass
        except mooncakefs.Unavailable as exc:
            problems.append(f"{name}: the node dropped the connection instead of answering Fenced ({exc})")

    channels["late"].sock.sendall(value[1000:])
    outcome("late")
    channels["after"].send(Op.PUT, [after_key.encode(), len(value), 0, None, None], value)
    outcome("after")
    for ch in channels.values():
        ch.close()
    assert not problems, problems


def test_an_overwrite_acknowledged_during_the_partition_survives_the_rejoin(cluster):
    """The rejoining node holds the key's old value in an older version: it never serves it, and repair
    never lets it win over the overwrite."""
    import mooncakefs

    iso = cluster.iso
    store = cluster.connect(failover=TTL + 10, timeout=2.0)
    (key,) = owned_by(store.map, iso, "over")
    store.put(key, b"before the partition", replicas=1)

    cluster.net.cut()
    cluster.wait_for_map(lambda m: iso not in m.nodes, timeout=TTL + 10, what="drop the cut-off node")
    during = cluster.connect(failover=10, timeout=2.0)
    during.put(key, b"during the partition", replicas=1)  # acknowledged by the key's new owner
    assert during.get(key) == b"during the partition"

    cluster.net.heal()
    cluster.wait_for_map(lambda m: iso in m.nodes, timeout=20, what="take the node back")
    after = cluster.connect(failover=10, timeout=2.0)
    seen = []
    deadline = time.monotonic() + 3  # while repair runs on every node
    while time.monotonic() < deadline:
        try:
            seen.append(after.get(key))
        except mooncakefs.MooncakeError as exc:
            seen.append(type(exc).__name__)
        time.sleep(0.1)
    assert set(seen) == {b"during the partition"}, sorted(set(seen), key=str)
