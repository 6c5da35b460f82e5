"""One filesystem mounted on two "hosts": a real etcd, three real node processes, and two real kernel FUSE
mounts of ``etcd://…/CLUSTER`` (each daemon with its own $MOONCAKEFS_HOST, so it reaches the nodes over
TCP as a mount on another host would).

Close-to-open consistency (a file written and closed on A is read whole on B, and back), names created,
renamed and removed on one mount seen at once on the other, exactly one winner when both create one name
with O_EXCL at the same moment, a file unlinked on one mount while open on the other, and every chunk of
a file on two nodes.  Then the namespace itself, two instances racing in threads: rmdir against a create
in the directory, and two moves that together would cut a loop off the tree.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import pyfuse3
import pytest
from conftest import MiB, kill_process, rand_bytes, spawn_python, wait_until
from fuse_helpers import FuseMount, expect_errno, guarded, read_file, require_fuse, write_file
from node_helpers import EtcdCluster, NodeProcess

import mooncakefs
from mooncakefs.cluster.membership import list_nodes
from mooncakefs.errors import Unavailable
from mooncakefs.fuse.etcd_namespace import EtcdNamespace
from mooncakefs.fuse.filesystem import chunk_key
from mooncakefs.fuse.namespace import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
    ),
]

CLUSTER = "fs"
CHUNK = MiB


class Hosts:
    """The cluster and its two mounts, A and B."""

    def __init__(self, base) -> None:
        self.etcd = EtcdCluster().start()
        extra = ("--etcd", self.etcd.url, "--cluster", CLUSTER, "--lease-ttl", "3")
        self.nodes = [NodeProcess(base, name=f"n{i}", dram="48MiB", extra=extra) for i in range(3)]
        self.url = f"etcd://{self.etcd.url.replace('http://', '')}/{CLUSTER}"
        self.mounts = [
            FuseMount(
                None,
                base / f"mnt-{host}",
                dram=None,
                ssd=None,
                chunk_size="1MiB",
                extra=[self.url],
                env={"MOONCAKEFS_HOST": f"fs-host-{host}"},
            )
            for host in "ab"
        ]

    def start(self) -> Hosts:
        for node in self.nodes:
            node.start()

        def mapped() -> bool:
            try:
                with mooncakefs.connect(self.url) as probe:
                    return len(probe.map.nodes) == len(self.nodes)
            except Unavailable:
                return False

        assert wait_until(mapped, timeout=30, interval=0.2), "the placement map never listed the 3 nodes"
        for mount in self.mounts:
            mount.start(timeout=30)
        return self

    def holders(self, key) -> int:
        """How many nodes hold ``key`` (each asked directly, no routing)."""
        records, _controller, _map = list_nodes(self.etcd.url, CLUSTER)
        count = 0
        for record in records:
            with mooncakefs.connect("tcp://" + record["tcp"], timeout=5) as direct:
                count += direct.exists(key)
        return count

    def close(self) -> None:
        for mount in self.mounts:
            mount.stop()
        for node in self.nodes:
            node.kill()
        self.etcd.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_fuse()
    hosts = Hosts(tmp_path_factory.mktemp("fuse-cluster"))
    try:
        yield hosts.start()
    finally:
        hosts.close()


@pytest.fixture
def ab(request, cluster, fuse_watchdog):
    """A fresh directory, as (its path on mount A, its path on mount B)."""
    for mount in cluster.mounts:
        assert mount.alive, f"an earlier test killed the mount\n{mount.describe()}"
        fuse_watchdog.watch(mount)
    name = request.node.name.replace("[", "-").replace("]", "")
    a, b = (mount.mnt / name for mount in cluster.mounts)
    guarded(cluster.mounts[0], os.mkdir, a)
    yield a, b
    for mount in cluster.mounts:
        sys.stderr.write(f"\n{mount.describe()}\n")  # shown by pytest only when the test fails


def test_a_file_closed_on_one_host_is_read_whole_on_the_other(cluster, ab, tmp_path):
    a, b = ab
    src = tmp_path / "src"
    payload = rand_bytes(9 * MiB + 12345, "c2o")
    src.write_bytes(payload)
    subprocess.run(["cp", str(src), str(a / "big")], check=True, timeout=60)
    assert os.stat(b / "big").st_size == len(payload)
    subprocess.run(["cmp", str(src), str(b / "big")], check=True, timeout=60)

    # Rewritten (shorter) on B: A, which wrote it and has its pages cached, reads the new bytes.
    short = rand_bytes(3 * MiB + 7, "c2o-2")
    guarded(cluster.mounts[1], write_file, b / "big", short)
    assert guarded(cluster.mounts[0], read_file, a / "big") == short
    # Appended to on A: B sees the whole file.
    with open(a / "big", "ab") as f:
        f.write(b"tail")
    assert guarded(cluster.mounts[1], read_file, b / "big") == short + b"tail"


def test_names_are_one_tree(ab):
    a, b = ab
    os.mkdir(a / "d")
    assert os.path.isdir(b / "d")
    write_file(b / "d" / "f", b"from b")
    assert sorted(os.listdir(a / "d")) == ["f"]
    assert read_file(a / "d" / "f") == b"from b"
    expect_errno(errno.ENOTEMPTY, os.rmdir, a / "d")

    os.rename(a / "d", a / "moved")
    assert sorted(os.listdir(b)) == ["moved"]
    expect_errno(errno.ENOENT, os.stat, b / "d")
    os.rename(b / "moved" / "f", b / "g")
    assert read_file(a / "g") == b"from b"
    os.link(a / "g", a / "g2")
    os.symlink("g", a / "s")
    assert os.stat(b / "g2").st_nlink == 2 and os.readlink(b / "s") == "g"
    os.setxattr(b / "g", "user.tag", b"shared")
    assert os.getxattr(a / "g2", "user.tag") == b"shared"

    os.unlink(b / "g")
    assert read_file(a / "g2") == b"from b"
    expect_errno(errno.ENOENT, os.stat, a / "g")
    os.rmdir(b / "moved")
    assert sorted(os.listdir(a)) == ["g2", "s"]
    expect_errno(errno.EINVAL, os.rename, a, a / "x")  # (a directory into itself: the kernel's check)


RACER = """
import json, os, sys
root, rounds = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
won = []
for i in range(rounds):
    try:
        fd = os.open(os.path.join(root, f"race{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        continue
    os.write(fd, sys.argv[3].encode())
    os.close(fd)
    won.append(i)
print(json.dumps(won))
"""


def test_creating_one_name_on_both_hosts_at_once_has_exactly_one_winner(cluster, ab):
    a, b = ab
    rounds = 40
    racers = [spawn_python(RACER, str(root), str(rounds), host) for root, host in ((a, "A"), (b, "B"))]
    try:
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        results = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            kill_process(racer)
    for racer, (_out, err) in zip(racers, results, strict=True):
        assert racer.returncode == 0, err
    won_a, won_b = (set(json.loads(out)) for out, _err in results)
    assert not won_a & won_b, f"both hosts created {sorted(won_a & won_b)}"
    assert won_a | won_b == set(range(rounds))
    for i in range(rounds):
        winner = b"A" if i in won_a else b"B"
        assert read_file(a / f"race{i}") == winner and read_file(b / f"race{i}") == winner


def test_a_file_unlinked_on_one_host_stays_readable_where_it_is_open(cluster, ab):
    a, b = ab
    payload = rand_bytes(3 * MiB + 5, "open-unlinked")
    write_file(a / "f", payload)
    ino = os.stat(a / "f").st_ino
    with open(b / "f", "rb") as f:
        head = f.read(MiB)
        os.unlink(a / "f")
        expect_errno(errno.ENOENT, os.stat, b / "f")
        rest = f.read()
        assert head + rest == payload
        assert cluster.holders(chunk_key(ino, 3)) > 0  # kept while open on B
    # Closed on B (the last mount that had it open): the chunks go.
    assert wait_until(lambda: cluster.holders(chunk_key(ino, 0)) == 0, timeout=10), "the chunks were not deleted"


def test_every_chunk_is_on_two_nodes(cluster, ab):
    a, b = ab
    payload = rand_bytes(4 * CHUNK + 100, "replicas")
    write_file(b / "r", payload)
    ino = os.stat(a / "r").st_ino
    copies = lambda: [cluster.holders(chunk_key(ino, idx)) for idx in range(5)]  # noqa: E731
    assert wait_until(lambda: copies() == [2] * 5, timeout=10, interval=0.5), copies()
    assert cluster.holders(chunk_key(ino, 5)) == 0
    assert read_file(a / "r") == payload
    stats = json.loads(read_file(a.parent / ".mooncakefs" / "stats.json"))
    assert len(stats["nodes"]) == 3 and stats["fs"]["chunk_size"] == CHUNK
    assert os.statvfs(a).f_blocks > 0
    assert os.listdir(a.parent / ".kv") == []  # (file chunks are not KV objects)


# ------------------------------------------------------------------------ the namespace, without FUSE


@pytest.fixture
def two_namespaces(cluster, request):
    """Two EtcdNamespaces (two mounts' worth) of a cluster of this test's own."""
    name = request.node.name[5:40].replace("_", "-")
    made = [EtcdNamespace(cluster.etcd.url, name, chunk_size=CHUNK) for _ in range(2)]
    yield made
    for ns in made:
        ns.close()


def _race(*calls) -> list:
    """Run the calls in threads released at the same moment: each one's result, or the errno it failed with."""
    barrier = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except pyfuse3.FUSEError as exc:
            out[i] = exc.errno

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


DIR, FILE = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644


def test_rmdir_racing_a_create_inside_one_wins(two_namespaces):
    a, b = two_namespaces
    outcomes = set()
    for i in range(25):
        name = f"d{i}".encode()
        d = a.create(ROOT, name, DIR, 0, 0)
        removed, created = _race(
            lambda name=name: a.unlink(ROOT, name, rmdir=True), lambda d=d: b.create(d.ino, b"f", FILE, 0, 0)
        )
        if created in (errno.ENOENT, errno.ENOTDIR):  # removed first: nothing may be left inside
            assert removed is not None and not isinstance(removed, int), removed
            assert b.entries(d.ino, 0) == [] and b.get(d.ino).nlink == 0
            outcomes.add("removed")
        else:  # created first: the directory stays
            assert removed == errno.ENOTEMPTY, removed
            assert [name for _c, name, _i in a.entries(d.ino, 0)] == [b"f"]
            outcomes.add("created")
    assert outcomes  # (which wins is up to the scheduler)


def test_two_moves_that_would_make_a_loop_cannot_both_succeed(two_namespaces):
    a, b = two_namespaces
    for i in range(15):
        x = a.create(ROOT, f"x{i}".encode(), DIR, 0, 0)
        y = a.create(ROOT, f"y{i}".encode(), DIR, 0, 0)
        results = _race(
            lambda x=x, y=y, i=i: a.rename(ROOT, f"x{i}".encode(), y.ino, b"x", 0),
            lambda x=x, y=y, i=i: b.rename(ROOT, f"y{i}".encode(), x.ino, b"y", 0),
        )
        assert sorted(r == errno.EINVAL for r in results) == [False, True], results
        # Both still hang off the root: one directly, the other inside it.
        top = a.lookup(ROOT, f"x{i}".encode()) or a.lookup(ROOT, f"y{i}".encode())
        assert top in (x.ino, y.ino)
        inner = y.ino if top == x.ino else x.ino
        assert a.get(inner).parent == top and a.get(top).parent == ROOT
