"""The mount through a node: file data in the node's pool, next to another process's KV objects.

A real node process, a real kernel FUSE mount of it (``mooncakefs mount --node``) and a separate
client process using the KV API on the same pool at the same time.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys

import pytest
from conftest import child_env, rand_bytes, run_python
from fuse_helpers import FuseMount, require_fuse
from node_helpers import NodeProcess

pytestmark = pytest.mark.slow

KV_CLIENT = """
import sys, mooncakefs
store = mooncakefs.connect(sys.argv[1])
for i in range(200):
    store.put(f"kv/{i}", bytes([i % 251]) * (1000 + i * 97))
for i in range(200):
    assert store.get(f"kv/{i}") == bytes([i % 251]) * (1000 + i * 97), i
print(sum(1 for _ in store.keys("kv/")))
"""


@pytest.fixture
def node(tmp_path):
    node = NodeProcess(tmp_path, dram="128MiB", ssd="512MiB", listen="none").start()
    yield node.unix_url
    assert node.terminate() == 0


def test_mount_through_a_node_shares_its_pool_with_kv_clients(node, tmp_path):
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([0, 1, 4096, 5 << 20, 9_000_001]):
        (src / f"f{i}").write_bytes(rand_bytes(size, i))
    mount = FuseMount(tmp_path / "meta", mnt, dram=None, ssd=None, extra=["--node", node]).start()
    try:
        kv = subprocess.Popen(
            [sys.executable, "-c", KV_CLIENT, node],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        subprocess.run(["cp", "-r", str(src), str(mnt / "copy")], check=True)
        out, err = kv.communicate(timeout=120)
        assert kv.returncode == 0, err
        assert out.strip() == "200"
        assert not filecmp.dircmp(src, mnt / "copy").diff_files
        for f in src.iterdir():
            assert (mnt / "copy" / f.name).read_bytes() == f.read_bytes()
        # The KV objects show in the mount's /.kv view, and the file chunks count in the node's pool.
        assert sum(1 for p in (mnt / ".kv").iterdir() if p.name.startswith("kv")) == 200
        probe = run_python("import sys, mooncakefs; print(mooncakefs.connect(sys.argv[1]).stats()['objects'])", node)
        assert int(probe.stdout) > 200  # 200 KV objects plus the files' chunks
    finally:
        mount.unmount()
    # Files written and closed survive a remount against the same node (its SSD tier holds them).
    mount = FuseMount(tmp_path / "meta", mnt, dram=None, ssd=None, extra=["--node", node]).start()
    try:
        assert (mnt / "copy" / "f3").read_bytes() == (src / "f3").read_bytes()
    finally:
        mount.unmount()
