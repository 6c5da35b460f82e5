"""``mooncake.p2p_store`` with only Mooncake's names, against a real etcd and real node processes on
three "hosts" (MOONCAKEFS_HOST h0..h2 on loopback): a seed in its own process started through
``mooncakefs as-mooncake`` (as an unmodified program would be), pullers in this process.

The metadata URI is Mooncake's form, a bare etcd endpoint: the nodes run in cluster ``default``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import child_env, wait_until
from node_helpers import EtcdCluster, NodeProcess

import mooncakefs
import mooncakefs.compat

mooncakefs.compat.install()
from mooncake.p2p_store import (  # noqa: E402
    P2PStore,
    PayloadExists,
    PayloadInfo,
    PayloadNotFound,
    PayloadNotOpened,
    PayloadOpened,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
    ),
]

MiB = 1 << 20
SIZES = [3 * MiB + 5, MiB]  # two buffers; with 1 MiB shards: 4 + 1 shards

SEED = """
    import ctypes, json, sys
    from mooncake.p2p_store import P2PStore
    sizes = json.loads(sys.argv[2])
    bufs = [ctypes.create_string_buffer((bytes((i * 7 + j) % 251 for j in range(256)) * (n // 256 + 1))[:n], n)
            for i, n in enumerate(sizes)]
    store = P2PStore(sys.argv[1], "h0:12345")
    store.register("ckpt/step-1/shard-0", [ctypes.addressof(b) for b in bufs], sizes, 1 << 20)
    try:
        store.register("ckpt/step-1/shard-0", [ctypes.addressof(bufs[0])], [16])
    except Exception as exc:
        print(json.dumps({"again": type(exc).__name__}), flush=True)
    for line in sys.stdin:
        if line.strip() == "unregister":
            store.unregister("ckpt/step-1/shard-0")
            print(json.dumps({"unregistered": True}), flush=True)
    store.close()
"""


def expected(i: int, n: int) -> bytes:
    return (bytes((i * 7 + j) % 251 for j in range(256)) * (n // 256 + 1))[:n]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("mc-p2p")
    etcd = EtcdCluster().start()
    extra = ("--etcd", etcd.url, "--cluster", "default", "--lease-ttl", "3")
    nodes = [
        NodeProcess(base, name=f"h{i}", dram="64MiB", extra=extra, env={"MOONCAKEFS_HOST": f"h{i}"}) for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        url = f"etcd://{etcd.url.replace('http://', '')}/default"

        def mapped() -> bool:
            with mooncakefs.connect(url) as probe:
                return len(probe.map.nodes) == 3

        assert wait_until(mapped, timeout=30, interval=0.2), "the placement map never listed the nodes"
        yield etcd.url.replace("http://", "")  # Mooncake's metadataUri: a bare etcd endpoint
    finally:
        for node in nodes:
            node.kill()
        etcd.close()


def on_host(monkeypatch: pytest.MonkeyPatch, host: str, metadata: str) -> P2PStore:
    monkeypatch.setenv("MOONCAKEFS_HOST", host)
    return P2PStore(metadata, f"{host}:12345")


def test_seed_pull_serve_withdraw_with_mooncakes_names(cluster, monkeypatch):
    env = {**child_env(), "MOONCAKEFS_HOST": "h0"}
    seed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mooncakefs.cli",
            "as-mooncake",
            "--",
            sys.executable,
            "-c",
            textwrap.dedent(SEED),
            cluster,
            json.dumps(SIZES),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    second = third = None
    try:
        assert json.loads(seed.stdout.readline()) == {"again": "PayloadOpened"}  # one open per instance
        second, third = on_host(monkeypatch, "h1", cluster), on_host(monkeypatch, "h2", cluster)
        assert second.get_local_server_name() == "h1:12345"
        assert second.list("ckpt/") == [PayloadInfo("ckpt/step-1/shard-0", MiB, sum(SIZES), SIZES)]
        assert second.list("other/") == []

        outs = [np.zeros(n, dtype=np.uint8) for n in SIZES]
        addrs = [o.ctypes.data for o in outs]
        second.get_replica("ckpt/step-1/shard-0", addrs, SIZES)
        assert [o.tobytes() for o in outs] == [expected(i, n) for i, n in enumerate(SIZES)]
        with pytest.raises(PayloadOpened):
            second.get_replica("ckpt/step-1/shard-0", addrs, SIZES)

        # refusals, each before a byte moves
        with pytest.raises(PayloadNotFound):
            third.get_replica("ckpt/none", addrs, SIZES)
        with pytest.raises(ValueError, match="has buffers of"):
            third.get_replica("ckpt/step-1/shard-0", addrs[:1], SIZES[:1])
        with pytest.raises(ValueError, match="as many"):
            third.get_replica("ckpt/step-1/shard-0", addrs, SIZES[:1])
        with pytest.raises(ValueError, match="writable memory"):
            third.get_replica("ckpt/step-1/shard-0", [4096, addrs[1]], SIZES)  # never dereferenced
        with pytest.raises(PayloadNotOpened):
            third.unregister("ckpt/step-1/shard-0")
        with pytest.raises(PayloadNotOpened):
            third.delete_replica("ckpt/step-1/shard-0")
        with pytest.raises(PayloadExists):  # registered by another instance: Mooncake's Create fails too
            third.register("ckpt/step-1/shard-0", [addrs[1]], [SIZES[1]])

        # the seed withdraws (its node drops its copy): the name stays, and the third instance pulls
        # every shard from the second one, which serves what it pulled
        seed.stdin.write("unregister\n")
        seed.stdin.flush()
        assert json.loads(seed.stdout.readline()) == {"unregistered": True}
        assert [p.name for p in third.list()] == ["ckpt/step-1/shard-0"]
        got = [np.zeros(n, dtype=np.uint8) for n in SIZES]
        third.get_replica("ckpt/step-1/shard-0", [g.ctypes.data for g in got], SIZES)
        assert [g.tobytes() for g in got] == [expected(i, n) for i, n in enumerate(SIZES)]

        # the last holder to let go takes the name with it
        second.delete_replica("ckpt/step-1/shard-0")
        assert [p.name for p in third.list("ckpt/")] == ["ckpt/step-1/shard-0"]
        third.delete_replica("ckpt/step-1/shard-0")
        assert third.list("ckpt/") == []

        # force_create replaces a record; the payload is served from memory copied at register time
        data = np.frombuffer(b"abc" * 1000, dtype=np.uint8).copy()
        third.register("ckpt/x", [data.ctypes.data], [data.nbytes])
        second.register("ckpt/x", [data.ctypes.data], [1000], max_shard_size=256, force_create=True)
        data[:] = 0  # Mooncake needs the memory kept until unregister; mooncakefs copied it
        assert second.list("ckpt/x") == [PayloadInfo("ckpt/x", 256, 1000, [1000])]
        back = np.zeros(1000, dtype=np.uint8)
        third.delete_replica("ckpt/x")
        third.get_replica("ckpt/x", [back.ctypes.data], [1000])
        assert back.tobytes() == (b"abc" * 1000)[:1000]
    finally:
        for store in (second, third):
            if store is not None:
                store.close()
        seed.stdin.close()
        seed.wait(timeout=30)
    assert seed.returncode == 0
