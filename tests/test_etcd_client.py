"""mooncakefs's own etcd v3 client (``mooncakefs/cluster/etcd.py``) against a real etcd: every call the
cluster makes (ranges with their options, puts under leases, deletes, transactions with each kind of
comparison, lease keep-alive and expiry), its errors, and that nothing imports etcd3 or protobuf."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time

import pytest
from node_helpers import EtcdCluster

from mooncakefs.cluster import etcd
from mooncakefs.cluster.client import parse_cluster_url
from mooncakefs.cluster.etcd import Etcd, prefix_end
from mooncakefs.errors import EtcdError, EtcdUnavailable, InvalidArgument, Unavailable

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
)


@pytest.fixture(scope="module")
def client():
    with contextlib.closing(EtcdCluster().start()) as cluster, Etcd(cluster.url, timeout=5) as c:
        yield c


def test_prefix_end():
    assert prefix_end("/a/") == b"/a0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"  # every key


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999", "127.0.0.1:2379,127.0.0.1:x", "ftp://127.0.0.1:2379", "http://:2379"]
)
def test_a_bad_etcd_url_is_invalid_argument_naming_it(url):
    """A port out of range was urllib's bare "Port out of range 0-65535" (exit status 1 from the CLI)."""
    with pytest.raises(InvalidArgument, match="etcd URL must look like") as caught:
        etcd.parse_etcd_url(url)
    assert repr(url) in str(caught.value)
    with pytest.raises(InvalidArgument, match=r"cluster URL must look like .*'etcd://127\.0\.0\.1:99999/c'"):
        parse_cluster_url("etcd://127.0.0.1:99999/c")
    with pytest.raises(InvalidArgument, match="cluster URL must look like"):
        parse_cluster_url("etcd://")


def test_get_put_delete_and_revisions(client):
    assert client.get("/kv/none") is None
    first = client.put("/kv/a", "one")
    kv = client.get("/kv/a")
    assert (kv.key, kv.value, kv.version, kv.create_revision, kv.mod_revision) == (b"/kv/a", b"one", 1, first, first)
    second = client.put(b"/kv/a", b"\x00\xfftwo")  # bytes in, bytes out, whatever they hold
    kv = client.get("/kv/a")
    assert (kv.value, kv.version, kv.create_revision, kv.mod_revision) == (b"\x00\xfftwo", 2, first, second)
    assert client.delete("/kv/a") == 1 and client.delete("/kv/a") == 0 and client.get("/kv/a") is None


def test_ranges_over_a_prefix(client):
    revisions = [client.put(f"/r/{name}", str(i)) for i, name in enumerate("cab")]
    client.put("/r0", "just past the prefix")
    assert [kv.key for kv in client.get_prefix("/r/")] == [b"/r/a", b"/r/b", b"/r/c"]  # by key
    assert client.range("/r/", prefix=True, count_only=True).count == 3
    only = client.range("/r/", prefix=True, keys_only=True, limit=2)
    assert [(kv.key, kv.value) for kv in only.kvs] == [(b"/r/a", b""), (b"/r/b", b"")] and only.count == 3
    created = client.range("/r/", prefix=True, by_creation=True)
    assert [kv.key for kv in created.kvs] == [b"/r/c", b"/r/a", b"/r/b"]
    after = client.range("/r/", prefix=True, by_creation=True, min_create_revision=revisions[0] + 1)
    assert [kv.key for kv in after.kvs] == [b"/r/a", b"/r/b"] and after.revision >= revisions[-1]
    assert client.delete("/r/", prefix=True) == 3 and client.get("/r0") is not None


def test_transactions_compare_then_apply_all_or_nothing(client):
    key = "/t/k"
    made = client.txn([etcd.version(key) == 0], [etcd.put_op(key, "v1"), etcd.get_op(key)])
    assert made.succeeded and made.responses[0] is None and made.responses[1][0].value == b"v1"
    again = client.txn([etcd.version(key) == 0], [etcd.put_op(key, "lost")], [etcd.get_op(key)])
    assert not again.succeeded and again.responses[0][0].value == b"v1"
    kv = client.get(key)
    assert kv.mod_revision == made.revision
    assert client.txn(
        [etcd.mod(key) == kv.mod_revision, etcd.value(key) == "v1", etcd.create(key) > 0], [etcd.put_op(key, "v2")]
    ).succeeded
    assert not client.txn([etcd.mod(key) == kv.mod_revision], [etcd.put_op(key, "stale")]).succeeded
    assert not client.txn([etcd.value(key) != "v2"], [etcd.delete_op(key)]).succeeded
    assert client.get(key).value == b"v2"
    client.put("/t/dir/x", "")
    assert not client.txn([etcd.version("/t/dir/", prefix=True) == 0], []).succeeded  # not empty
    gone = client.txn([], [etcd.delete_op("/t/dir/", prefix=True), etcd.delete_op(key)])
    assert gone.responses == [1, 1]
    assert client.txn([etcd.version("/t/dir/", prefix=True) == 0, etcd.mod(key) == 0], []).succeeded  # both absent
    with pytest.raises(EtcdError, match="duplicate key"):  # etcd refuses two writes of one key in one transaction
        client.txn([], [etcd.put_op(key, "a"), etcd.put_op(key, "b")])


def test_leases_keep_keys_while_refreshed_and_drop_them_after(client):
    lease = client.lease(2)
    assert lease.id > 0 and lease.ttl == 2
    client.put("/l/held", "x", lease=lease)
    assert client.get("/l/held").lease == lease.id
    for _ in range(3):  # 3 s of refreshes outlive the 2 s ttl
        time.sleep(1)
        assert lease.refresh() > 0
    assert client.get("/l/held") is not None
    deadline = time.monotonic() + 10
    while client.get("/l/held") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/l/held") is None, "the key outlived its lease"
    assert lease.refresh() <= 0  # expired: the caller takes a new one
    other = client.lease(30)
    client.put("/l/revoked", "x", lease=other.id)
    other.revoke()
    assert client.get("/l/revoked") is None


def test_status_and_errors(client):
    assert client.status() > 0
    with Etcd("http://127.0.0.1:1", timeout=2) as nobody, pytest.raises(EtcdUnavailable) as info:
        nobody.get("/x")
    assert isinstance(info.value, Unavailable) and "127.0.0.1:1" in str(info.value)
    with pytest.raises(ValueError, match="etcd URL"):
        Etcd("https://")


def test_nothing_imports_etcd3_or_protobuf():
    """The serving stacks bring their own protobuf: mooncakefs must not need any."""
    code = (
        "import sys, mooncakefs, mooncakefs.cluster.agent, mooncakefs.cluster.client, mooncakefs.p2p.store, "
        "mooncakefs.fuse.etcd_namespace, mooncakefs.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'etcd3' or m.startswith(('etcd3.', 'google.protobuf')))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
