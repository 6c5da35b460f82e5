"""Watches in mooncakefs's own etcd client (``Watch``, ``Mirror`` in ``mooncakefs/cluster/etcd.py``) against
a real etcd: events for puts and deletes under a prefix (and none outside it), history from a revision, a
stream cut mid-way resumed with no event lost or repeated, compacted history as a clear error or a full
re-read, and ``close()`` cancelling the watch in etcd and ending its thread.  The cut goes through a TCP
relay between the client and etcd (``Relay``), so the writes made while the watch is cut off are real."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import urllib.request

import pytest
from conftest import wait_until
from node_helpers import EtcdCluster, free_port

from mooncakefs.cluster import etcd
from mooncakefs.cluster.etcd import DELETE, PUT, Etcd, Mirror
from mooncakefs.errors import EtcdCompacted

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (tools/install-deps.sh installs etcd-server)"
)

WAIT = 30  # generous: the machine may be busy; every wait ends as soon as its condition holds


class Relay:
    """A TCP relay to ``target`` on a free loopback port; ``cut()`` drops every connection and refuses new
    ones until ``restore()`` (a link down, as the client sees it)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.open = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if not self.open:
                    client.close()
                    continue
                upstream = socket.create_connection(self.target)
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            self.open = False
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        with self.lock:
            self.open = True

    def close(self) -> None:
        self.cut()
        self.server.close()


@pytest.fixture(scope="module")
def cluster():
    with contextlib.closing(EtcdCluster().start()) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Etcd(cluster.url, timeout=5) as c:
        yield c


@pytest.fixture
def relay(cluster):
    r = Relay(("127.0.0.1", cluster.client_ports[0]))
    yield r
    r.close()


class Collector:
    """What a watch delivered, as (kind, key, value)."""

    def __init__(self) -> None:
        self.events: list[etcd.Event] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[etcd.Event]) -> None:
        with self.lock:
            self.events.extend(events)

    def seen(self) -> list[tuple[str, bytes, bytes]]:
        with self.lock:
            return [(e.kind, e.kv.key, e.kv.value) for e in self.events]


def watchers(cluster: EtcdCluster) -> int:
    """etcd's own count of the watchers it serves."""
    text = urllib.request.urlopen(cluster.member_url(0) + "/metrics", timeout=10).read().decode()
    return int(
        float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("etcd_debugging_mvcc_watcher_total")))
    )


def test_puts_and_deletes_under_a_prefix_arrive_in_order(client):
    got = Collector()
    with client.watch("/w1/", got, prefix=True) as watch:
        assert watch.created.wait(WAIT)
        client.put("/w1/a", "1")
        client.put("/w1", "the prefix itself without its slash: not under it")
        client.put("/w10", "past the prefix")
        client.txn([], [etcd.put_op("/w1/b", "2"), etcd.put_op("/w1/c", "3")])  # two events at one revision
        client.put("/w1/a", "4")
        client.delete("/w1/", prefix=True)
        expected = [
            (PUT, b"/w1/a", b"1"),
            (PUT, b"/w1/b", b"2"),
            (PUT, b"/w1/c", b"3"),
            (PUT, b"/w1/a", b"4"),
            (DELETE, b"/w1/a", b""),
            (DELETE, b"/w1/b", b""),
            (DELETE, b"/w1/c", b""),
        ]
        assert wait_until(lambda: len(got.seen()) >= len(expected), timeout=WAIT)
        assert got.seen() == expected
        assert watch.next_revision == got.events[-1].revision + 1 and watch.error is None


def test_one_key_and_history_from_a_revision(client):
    first = client.put("/w2/k", "old")
    client.put("/w2/k", "new")
    client.put("/w2/kk", "another key")
    got = Collector()
    with client.watch("/w2/k", got, start_revision=first):
        assert wait_until(lambda: len(got.seen()) >= 2, timeout=WAIT)
        client.delete("/w2/k")
        assert wait_until(lambda: len(got.seen()) >= 3, timeout=WAIT)
        assert got.seen() == [(PUT, b"/w2/k", b"old"), (PUT, b"/w2/k", b"new"), (DELETE, b"/w2/k", b"")]


def test_a_cut_stream_resumes_without_losing_or_repeating_events(client, relay):
    got = Collector()
    with Etcd(relay.url, timeout=5) as through, through.watch("/w3/", got, prefix=True) as watch:
        assert watch.created.wait(WAIT)
        client.put("/w3/a", "1")
        assert wait_until(lambda: len(got.seen()) == 1, timeout=WAIT)
        relay.cut()
        assert wait_until(lambda: watch.reconnects >= 1, timeout=WAIT), "the watch did not see its stream break"
        watch.created.clear()
        client.put("/w3/b", "2")  # while the watch is cut off
        client.delete("/w3/a")
        client.put("/w3/c", "3")
        relay.restore()
        assert watch.created.wait(WAIT), "the watch did not come back"
        client.put("/w3/d", "4")
        assert wait_until(lambda: len(got.seen()) >= 5, timeout=WAIT)
        assert got.seen() == [
            (PUT, b"/w3/a", b"1"),
            (PUT, b"/w3/b", b"2"),
            (DELETE, b"/w3/a", b""),
            (PUT, b"/w3/c", b"3"),
            (PUT, b"/w3/d", b"4"),
        ]


def test_compacted_history_is_a_clear_error(client):
    start = client.put("/w4/k", "1")
    now = client.put("/w4/k", "2")
    client.compact(now)
    got = Collector()
    watch = client.watch("/w4/", got, prefix=True, start_revision=start)
    assert wait_until(lambda: not watch.alive, timeout=WAIT), "a watch of compacted history went on"
    assert isinstance(watch.error, EtcdCompacted) and watch.error.compact_revision == now
    assert "compacted" in str(watch.error) and "read the state again" in str(watch.error)
    assert got.seen() == []
    watch.close()  # after it ended on its own: nothing to do, no error


def test_close_cancels_the_watch_in_etcd_and_ends_its_thread(cluster, client, relay):
    base = watchers(cluster)
    watch = client.watch("/w5/", Collector(), prefix=True)
    assert watch.created.wait(WAIT)
    assert wait_until(lambda: watchers(cluster) == base + 1, timeout=WAIT)
    watch.close()
    assert not watch.alive and watch.error is None
    assert wait_until(lambda: watchers(cluster) == base, timeout=WAIT), "etcd still serves the closed watch"
    # a watch waiting to reconnect (its link down) stops at once too
    with Etcd(relay.url, timeout=5) as through:
        broken = through.watch("/w5/", Collector(), prefix=True)
        assert broken.created.wait(WAIT)
        relay.cut()
        assert wait_until(lambda: broken.reconnects >= 1, timeout=WAIT)
        broken.close(timeout=WAIT)
        assert not broken.alive


def test_a_failing_follower_does_not_end_the_watch(client):
    calls: list[int] = []

    def flaky(events: list[etcd.Event]) -> None:
        calls.append(len(events))
        if len(calls) == 1:
            raise RuntimeError("a bug in the follower")

    with client.watch("/w6/", flaky, prefix=True) as watch:
        assert watch.created.wait(WAIT)
        client.put("/w6/a", "1")
        assert wait_until(lambda: len(calls) == 1, timeout=WAIT)
        client.put("/w6/b", "2")
        assert wait_until(lambda: len(calls) == 2, timeout=WAIT) and watch.alive


def test_a_mirror_follows_a_prefix(client):
    client.put("/w7/a", "1")
    changes = threading.Semaphore(0)
    mirror = Mirror(client, "/w7/", on_change=changes.release, resync_s=3600)
    try:
        assert {k: kv.value for k, kv in mirror.snapshot().items()} == {b"/w7/a": b"1"} and mirror.loads == 1
        client.put("/w7/b", "2")
        client.delete("/w7/a")
        assert mirror.wait(lambda kvs: set(kvs) == {b"/w7/b"}, timeout=WAIT)
        assert changes.acquire(timeout=WAIT)
        assert mirror.loads == 1, "a change was read by reading everything again"
    finally:
        mirror.close()
    assert not mirror.watch.alive


def test_a_mirror_reads_everything_again_after_a_compaction_it_missed(cluster, client, relay):
    client.put("/w8/a", "1")
    with Etcd(relay.url, timeout=5) as through:
        mirror = Mirror(through, "/w8/", resync_s=3600)
        try:
            assert mirror.watch.created.wait(WAIT)
            relay.cut()
            assert wait_until(lambda: mirror.watch.reconnects >= 1, timeout=WAIT)
            client.delete("/w8/a")
            client.put("/w8/b", "2")
            client.compact(client.put("/w8/c", "3"))  # the events it missed are gone
            relay.restore()
            assert mirror.wait(lambda kvs: set(kvs) == {b"/w8/b", b"/w8/c"}, timeout=WAIT)
            assert mirror.loads == 2 and mirror.watch.alive
            client.put("/w8/d", "4")  # and it follows on from there
            assert mirror.wait(lambda kvs: b"/w8/d" in kvs, timeout=WAIT)
        finally:
            mirror.close()


def test_a_mirror_reads_everything_again_when_its_resync_is_due(client):
    client.put("/w9/a", "1")
    mirror = Mirror(client, "/w9/", resync_s=0.2)
    try:
        assert wait_until(lambda: (mirror.snapshot(), mirror.loads)[1] >= 2, timeout=WAIT)
    finally:
        mirror.close()


def test_a_watch_ends_when_its_client_is_closed(cluster):
    other = Etcd(cluster.url, timeout=5)
    watch = other.watch("/w10/", Collector(), prefix=True)
    assert watch.created.wait(WAIT)
    other.close()
    assert wait_until(lambda: not watch.alive, timeout=WAIT), "a watch outlived its client"
    assert watch.error is not None and "closed" in str(watch.error)
