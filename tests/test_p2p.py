"""Readers serve what they fetched: a cluster mount's ``cp`` and the P2P Store API, with a real etcd, real
node processes and real FUSE mounts on loopback (each "host" is a MOONCAKEFS_HOST: a mount or P2PStore
whose host runs a node keeps and serves what it fetched there).

Bytes are counted where they leave: each node's ``mooncakefs_sent_bytes`` metric.  No timing is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import MiB, rand_bytes, wait_until
from fuse_helpers import FuseMount, require_fuse
from node_helpers import EtcdCluster, NodeProcess, scrape_metrics

import mooncakefs
from mooncakefs.errors import InvalidArgument, KeyExists, KeyNotFound, Unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
    ),
]

CLUSTER = "p2p"
CHUNK = 4 * MiB
SENT = "mooncakefs_sent_bytes_total"


class Hosts:
    """etcd, nodes on hosts h0..h3, and mounts started on demand on any host (one with no node: "w")."""

    def __init__(self, base) -> None:
        self.base = base
        self.etcd = EtcdCluster().start()
        extra = ("--etcd", self.etcd.url, "--cluster", CLUSTER, "--lease-ttl", "3")
        self.nodes = {
            f"h{i}": NodeProcess(
                base, name=f"h{i}", dram="160MiB", metrics="auto", extra=extra, env={"MOONCAKEFS_HOST": f"h{i}"}
            )
            for i in range(4)
        }
        self.url = f"etcd://{self.etcd.url.replace('http://', '')}/{CLUSTER}"
        self.mounts: dict[str, FuseMount] = {}

    def start(self) -> Hosts:
        for node in self.nodes.values():
            node.start()

        def mapped() -> bool:
            try:
                with mooncakefs.connect(self.url) as probe:
                    return len(probe.map.nodes) == len(self.nodes)
            except Unavailable:
                return False

        assert wait_until(mapped, timeout=30, interval=0.2), "the placement map never listed the nodes"
        return self

    def mount(self, host: str) -> FuseMount:
        if host not in self.mounts:
            m = FuseMount(
                None,
                self.base / f"mnt-{host}",
                dram=None,
                ssd=None,
                chunk_size="4MiB",
                extra=[self.url],
                env={"MOONCAKEFS_HOST": host},
            )
            self.mounts[host] = m.start(timeout=30)
        return self.mounts[host]

    def sent(self) -> dict[str, float]:
        return {host: scrape_metrics(node).get(SENT, 0.0) for host, node in self.nodes.items()}

    def close(self) -> None:
        for mount in self.mounts.values():
            mount.stop()
        for node in self.nodes.values():
            node.kill()
        self.etcd.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    require_fuse()
    h = Hosts(tmp_path_factory.mktemp("p2p"))
    try:
        yield h.start()
    finally:
        for m in h.mounts.values():
            sys.stderr.write(f"\n{m.describe()}\n")
        h.close()


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before[k]) for k in after}


def cp_out(mount: FuseMount, name: str, dest) -> bytes:
    subprocess.run(["cp", str(mount.mnt / name), str(dest)], check=True, timeout=120)
    return dest.read_bytes()


def test_a_remote_chunk_crosses_the_wire_once_per_copy(hosts, tmp_path):
    """Each 1 MiB kernel read of a 4 MiB chunk used to fetch the whole chunk again: 4x the file."""
    payload = rand_bytes(10 * CHUNK + 12345, "once")
    src = tmp_path / "src"
    src.write_bytes(payload)
    subprocess.run(["cp", str(src), str(hosts.mount("w").mnt / "once")], check=True, timeout=120)
    reader = hosts.mount("r")  # a host with no node: every chunk comes over TCP
    before = hosts.sent()
    assert cp_out(reader, "once", tmp_path / "out") == payload
    sent = sum(delta(before, hosts.sent()).values())
    assert len(payload) <= sent <= len(payload) * 1.02, (sent, len(payload))


def test_a_reader_takes_chunks_from_an_earlier_reader_and_checks_them(hosts, tmp_path):
    payload = rand_bytes(12 * CHUNK + 777, "fan")
    src = tmp_path / "src"
    src.write_bytes(payload)
    subprocess.run(["cp", str(src), str(hosts.mount("w").mnt / "fan")], check=True, timeout=120)

    first, second = hosts.mount("h1"), hosts.mount("h2")
    before = hosts.sent()
    assert cp_out(first, "fan", tmp_path / "a") == payload
    after_first = hosts.sent()
    assert cp_out(second, "fan", tmp_path / "b") == payload
    after_second = hosts.sent()
    by_first, by_second = delta(before, after_first), delta(after_first, after_second)
    # each copy moved at most one file's worth over the wire ...
    assert sum(by_first.values()) <= len(payload) * 1.02, by_first
    assert sum(by_second.values()) <= len(payload) * 1.02, by_second
    # ... the second reader took from the first reader's node, which kept what it fetched (at equal load
    # a reader is asked before a replica, and its first request found nothing in flight) ...
    assert by_second["h1"] > 0, by_second
    # ... and the hosts that read no copy sent about one copy in all: the second reader asked them only
    # while what the first one's record said it took from them left some of the file (each of its
    # threads checks before a request: up to 4 may cross the line at once)
    replicas_sent = sum(by[host] for by in (by_first, by_second) for host in ("h0", "h3"))
    assert replicas_sent <= len(payload) + 4 * CHUNK, (by_first, by_second)

    # copies tampered with on the readers' nodes are skipped, never served
    from mooncakefs.cluster.client import ClusterStore
    from mooncakefs.fuse.etcd_namespace import EtcdNamespace
    from mooncakefs.p2p.swarm import cache_key

    ino = os.stat(first.mnt / "fan").st_ino
    with ClusterStore(hosts.url) as probe:
        ns = EtcdNamespace(probe.etcd_url, CLUSTER, chunk_size=CHUNK)
        try:
            sums = ns.get(ino).sums
        finally:
            ns.close()
        ident = {record["host"]: node for node, record in probe.map.nodes.items()}
    spoiled: dict[str, set[int]] = {}
    for host in ("h1", "h2"):
        with mooncakefs.connect(hosts.nodes[host].unix_url) as node:
            for idx, crc in sums.items():
                if node.exists(cache_key(ino, idx, crc)):
                    # zeros of the chunk's own size (the last chunk is short), so only its CRC can tell
                    size = min(CHUNK, len(payload) - idx * CHUNK)
                    node.put(cache_key(ino, idx, crc), b"\0" * size, pin=True)
                    spoiled.setdefault(ident[host], set()).add(idx)
    assert spoiled, "the readers kept no copies"
    assert cp_out(hosts.mount("h3"), "fan", tmp_path / "c") == payload
    # (whether h3 asks a spoiled copy at all depends on the holders' load as it sees it, so the test
    # asserts what must hold either way: h3's bytes are the writer's; test_p2p_choice.py covers the choice)


def test_the_p2p_store_api(hosts, monkeypatch):
    from mooncakefs.p2p import P2PStore, PayloadInfo

    def instance(host: str) -> P2PStore:
        monkeypatch.setenv("MOONCAKEFS_HOST", host)
        return P2PStore(hosts.url, f"{host}:12345")

    monkeypatch.setenv("MOONCAKEFS_HOST", "nowhere")
    with pytest.raises(Unavailable, match="needs a node"):
        P2PStore(hosts.url, "x:1")

    seed, second, third = instance("h0"), instance("h1"), instance("h2")
    try:
        parts = [rand_bytes(5 * MiB + 3, "p0"), rand_bytes(MiB, "p1")]
        seed.register("ckpt/step-1/shard-0", parts, max_shard_size=2 * MiB)
        seed.put("ckpt/step-1/small", b"tiny")
        with pytest.raises(KeyExists):
            seed.register("ckpt/step-1/small", [b"again"])
        with pytest.raises(InvalidArgument):
            seed.register("x", b"not a list")
        assert second.list("ckpt/step-1/") == [
            PayloadInfo("ckpt/step-1/shard-0", 2 * MiB, 6 * MiB + 3, [5 * MiB + 3, MiB]),
            PayloadInfo("ckpt/step-1/small", 64 * MiB, 4, [4]),
        ]
        assert second.list("other/") == []

        outs = [bytearray(5 * MiB + 3), bytearray(MiB)]
        second.get_replica("ckpt/step-1/shard-0", outs)
        assert [bytes(o) for o in outs] == parts
        assert second.get("ckpt/step-1/small") == b"tiny"
        assert sorted(h["peer"] for h in third.holders("ckpt/step-1/shard-0")) == ["h0:12345", "h1:12345"]
        with pytest.raises(InvalidArgument):
            third.get_replica("ckpt/step-1/shard-0", [bytearray(10)])
        with pytest.raises(KeyNotFound):
            third.get("ckpt/none")

        # the seed stops serving: the third instance pulls from the second, and the seed sends nothing
        seed.delete_replica("ckpt/step-1/shard-0")
        before = hosts.sent()
        assert third.get("ckpt/step-1/shard-0") == b"".join(parts)
        sent = delta(before, hosts.sent())
        assert sent["h0"] == 0 and sent["h1"] >= len(b"".join(parts)), sent

        # a holder with a bad copy is skipped: h1's copy of shard 0 is spoiled, h2's is good
        meta = second._meta("ckpt/step-1/shard-0")
        with mooncakefs.connect(hosts.nodes["h1"].unix_url) as h1:
            h1.put(second._shard_key(meta, 0), b"\xff" * (2 * MiB), pin=True)
        fourth = instance("h3")
        for _ in range(4):  # (holders are tried in a random order)
            assert fourth.get("ckpt/step-1/shard-0") == b"".join(parts)
            fourth.delete_replica("ckpt/step-1/shard-0")
        seed.unregister("ckpt/step-1/small")
        assert [p.name for p in fourth.list("ckpt/")] == ["ckpt/step-1/shard-0"]
        fourth.close()
    finally:
        for s in (seed, second, third):
            s.close()


def watch_cli(hosts: Hosts, *args: str, **kwargs) -> list[str]:
    etcd_url = hosts.etcd.url.split(",")[0]
    return [sys.executable, "-m", "mooncakefs.cli", "watch", "--etcd", etcd_url, "--cluster", CLUSTER, *args]


def test_mooncakefs_watch_shows_who_holds_what_and_who_served_whom(hosts, tmp_path):
    from conftest import child_env

    payload = rand_bytes(6 * CHUNK + 99, "watched")
    src = tmp_path / "src"
    src.write_bytes(payload)
    subprocess.run(["mkdir", "-p", str(hosts.mount("w").mnt / "ckpt")], check=True)
    subprocess.run(["cp", str(src), str(hosts.mount("w").mnt / "ckpt" / "shard")], check=True, timeout=120)
    env = child_env()
    # live, from before the copies start (stdout a pipe: each redraw is one block, then a blank line)
    live = subprocess.Popen(
        watch_cli(hosts, "--interval", "0.2", "/ckpt"), stdout=subprocess.PIPE, text=True, env=env, bufsize=1
    )
    guard = threading.Timer(180, live.terminate)  # a view that never shows it must not hang the test
    guard.start()
    try:
        first = live.stdout.readline()
        assert first.startswith("/ckpt/shard: 24MiB in 7 chunks of 4MiB; 0 readers"), first
        assert cp_out(hosts.mount("h1"), "ckpt/shard", tmp_path / "a") == payload
        assert cp_out(hosts.mount("h2"), "ckpt/shard", tmp_path / "b") == payload
        seen: list[str] = []
        for line in live.stdout:  # the watch redraws when the readers' records change
            seen.append(line)
            if line.startswith("/ckpt/shard") and "2 readers, 2 done" in line:
                break
        else:
            pytest.fail("the live view ended without showing both readers done:\n" + "".join(seen))
    finally:
        guard.cancel()
        live.terminate()
        live.wait(timeout=30)

    out = subprocess.run(
        watch_cli(hosts, "--json", str(hosts.mount("h3").mnt / "ckpt" / "shard")),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (f,) = data["files"]
    assert (f["path"], f["size"], f["chunks"]) == ("/ckpt/shard", len(payload), 7)
    readers = {r["node"]: r for r in f["readers"] if r["current"]}
    with mooncakefs.connect(hosts.url) as probe:
        ident = {record["host"]: node for node, record in probe.map.nodes.items()}
    assert set(readers) == {ident["h1"], ident["h2"]} and not any(r["reading"] for r in readers.values())
    for r in readers.values():  # each holds some chunks and took at most the file from others (what it
        # holds by now can be fewer than it took: its small DRAM tier may have let some go)
        assert 0 < r["chunks"] <= 7 and 0 < sum(r["took_from"].values()) <= 7 * CHUNK
    # the second reader took from the first (it kept what it fetched), and the report adds it up
    assert readers[ident["h2"]]["took_from"].get(ident["h1"], 0) > 0
    assert f["served"][ident["h1"]] == readers[ident["h2"]]["took_from"][ident["h1"]]
    # every node's traffic is there; h1 served h2, so it sent (a node holding only replicas no reader
    # happened to choose sends nothing: which replica a read takes is left to chance)
    assert all(t is not None for t in data["nodes"].values()), data["nodes"]
    assert data["nodes"][ident["h1"]]["sent"] >= f["served"][ident["h1"]] > 0, data["nodes"]

    once = subprocess.run(watch_cli(hosts, "--once", "/ckpt/shard"), env=env, capture_output=True, text=True)
    assert once.returncode == 0 and "2 readers, 2 done" in once.stdout and "served:" in once.stdout


def test_mooncakefs_watch_says_what_is_wrong(hosts, tmp_path):
    from conftest import child_env

    env = child_env()
    missing = subprocess.run(watch_cli(hosts, "--json", "/no/such/file"), env=env, capture_output=True, text=True)
    assert missing.returncode == 66 and "no such file or directory" in json.loads(missing.stdout)["error"]
    elsewhere = subprocess.run(watch_cli(hosts, str(tmp_path)), env=env, capture_output=True, text=True)
    assert elsewhere.returncode == 64 and "is not on a mooncakefs mount" in elsewhere.stderr
    nobody = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "watch", "--etcd", "http://127.0.0.1:1", "--once", "/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nobody.returncode == 69 and "Error:" in nobody.stderr


def test_watch_names_a_missing_path_and_a_cluster_with_no_filesystem_as_such():
    """The reasons read as reasons, not as keys: "key 'the cluster has no ...': not in the store" was the
    message of a watch on a cluster no mount had used yet."""
    from conftest import child_env

    from mooncakefs.cluster.membership import connect_etcd
    from mooncakefs.p2p.report import Distribution

    etcd = EtcdCluster().start()
    try:
        with connect_etcd(etcd.url) as client, pytest.raises(KeyNotFound) as missing:
            Distribution(client, CLUSTER).files("/no/such/file")
        assert str(missing.value) == "key '/no/such/file': no such file or directory in the cluster's filesystem"
        fresh = subprocess.run(
            [sys.executable, "-m", "mooncakefs.cli", "watch", "--etcd", etcd.url, "--cluster", CLUSTER, "--json", "/x"],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        error = json.loads(fresh.stdout)["error"]
        assert fresh.returncode == 66 and "the cluster has no filesystem yet" in error, (fresh.returncode, error)
        assert "not in the store" not in error, error
    finally:
        etcd.close()


def test_a_record_names_its_biggest_sources_and_sums_the_rest():
    from mooncakefs.p2p.swarm import top_sources

    few = {"a": 3, "b": 1}
    assert top_sources(few) == few
    many = {f"n{i}": i for i in range(1, 21)}
    assert top_sources(many, keep=3) == {"n20": 20, "n19": 19, "n18": 18, "others": sum(range(1, 18))}
