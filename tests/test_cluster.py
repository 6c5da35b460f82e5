"""Cluster membership through a real etcd: nodes register under a lease, `mooncakefs status` lists them,
a clean stop deregisters at once and a killed node leaves when its lease expires."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import child_env, wait_until
from node_helpers import EtcdCluster, NodeProcess, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
)


@pytest.fixture(scope="module")
def etcd():
    """A single-member etcd on free loopback ports, its data on /dev/shm."""
    cluster = EtcdCluster().start()
    try:
        yield cluster.url
    finally:
        cluster.close()


def status(etcd: str, cluster: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "status", "--etcd", etcd, "--cluster", cluster, "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["nodes"]


def test_nodes_register_and_leave(etcd, tmp_path):
    cluster = "t1"
    extra = ("--etcd", etcd, "--cluster", cluster, "--lease-ttl", "3")
    a = NodeProcess(tmp_path, name="a", dram="16MiB", extra=extra).start()
    b = NodeProcess(tmp_path, name="b", dram="32MiB", ssd="64MiB", extra=extra).start()
    try:
        nodes = status(etcd, cluster)
        assert len(nodes) == 2
        by_tcp = {n["tcp"]: n for n in nodes}
        assert by_tcp[a.tcp_url[len("tcp://") :]]["dram"] == 16 << 20
        assert by_tcp[b.tcp_url[len("tcp://") :]]["ssd"] == 64 << 20
        assert all(n["stats"]["dram"]["capacity"] == n["dram"] for n in nodes)  # live, asked of each node
        table = subprocess.run(
            [sys.executable, "-m", "mooncakefs.cli", "status", "--etcd", etcd, "--cluster", cluster],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        ).stdout
        assert "2 nodes in cluster 't1'" in table and "16MiB" in table and "placement epoch" in table
        assert sum(n["controller"] for n in nodes) == 1
        assert wait_until(lambda: all(n["groups"] > 0 for n in status(etcd, cluster)), timeout=10, interval=0.2)
        assert status(etcd, "other") == []  # clusters do not see each other

        ident = next(n["id"] for n in nodes if n["tcp"] == a.tcp_url[len("tcp://") :])
        assert a.terminate() == 0  # a clean stop leaves at once
        assert [n["id"] for n in status(etcd, cluster)] == [n["id"] for n in nodes if n["id"] != ident]

        a.start()  # the same data dir: the same member id
        assert ident in [n["id"] for n in status(etcd, cluster)]

        b.kill()  # SIGKILL: gone when the lease (3 s) expires
        start = time.monotonic()
        assert wait_until(lambda: len(status(etcd, cluster)) == 1, timeout=15, interval=0.5)
        assert time.monotonic() - start < 12
    finally:
        for n in (a, b):
            if n.alive:
                n.kill()


def test_a_node_without_etcd_refuses_to_start(tmp_path):
    node = NodeProcess(tmp_path, extra=("--etcd", f"http://127.0.0.1:{free_port()}", "--lease-ttl", "3"))
    proc = node.launch()
    assert proc.wait(timeout=60) != 0
    assert "etcd" in node.log()
