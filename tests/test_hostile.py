"""A node facing hostile or careless clients: floods, squatters, strangers, stallers and scribblers.

Each test is an attack from issue 10 reproduced against a real node process: it failed before the
node defended against it.  Other users are real kernel uids (a forked child that setuid()s), and
the flood runs against a node whose RLIMIT_NOFILE was lowered with prlimit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env
from node_helpers import NodeProcess, free_port, mapped_node, raw_channel, wait_for

import mooncakefs
from mooncakefs.errors import InvalidKey, MooncakeError
from mooncakefs.keys import INTERNAL_PREFIX
from mooncakefs.node import Node
from mooncakefs.sockets import UnsafeSocketPath, default_socket
from mooncakefs.wire import HEADER, MAGIC, Op

MiB = 1 << 20
ATTACKER, VICTIM = 40001, 40002  # two real users (no passwd entries needed)
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users and lower limits")


@pytest.fixture
def nodes(tmp_path):
    made: list[NodeProcess] = []

    def make(cls: type[NodeProcess] = NodeProcess, **options: Any) -> NodeProcess:
        node = cls(tmp_path, name=f"n{len(made)}", **options)
        made.append(node)
        return node.start()

    yield make
    for node in made:
        node.kill()
    for node in made:
        sys.stderr.write(f"\n--- {node.name} log ---\n{node.log()}\n")


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's tmp dirs are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="mcfs-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(uid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that has become ``uid``; its result, or ("raised", class, message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no imports, no threads, out with os._exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.environ.pop("MOONCAKEFS_SOCKET", None)
            try:
                result: Any = ("ok", fn())
            except BaseException as exc:
                result = ("raised", type(exc).__name__, str(exc))
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    assert data, "the child died without an answer"
    return pickle.loads(data)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the node hangs up on ``sock`` within ``within`` seconds (what it sends meanwhile is read)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def hello(url: str) -> socket.socket:
    """A raw connection that has read the node's HELLO and said nothing."""
    ch = raw_channel(url, handshake=False)
    op, _flags, _meta, _n = ch.read_frame()
    assert op == Op.HELLO
    return ch.sock


# ------------------------------------------------------------------------------- 1. descriptor floods


class FdLimitedNode(NodeProcess):
    """A node whose soft and hard limits of open files are 64: it cannot raise them itself."""

    def argv(self) -> list[str]:
        return ["prlimit", "--nofile=64:64", "--", *super().argv()]


def test_a_connection_flood_past_the_fd_limit_does_not_stop_the_node_accepting(nodes):
    node = nodes(FdLimitedNode)
    flood: list[socket.socket] = []
    try:
        for _ in range(150):  # more than the node has descriptors: accept() fails with EMFILE
            s = socket.socket()
            s.settimeout(2)
            with contextlib.suppress(OSError):
                s.connect(node.tcp_address)
            flood.append(s)
        # While the flood still holds its connections, a real client gets in: the node sheds the oldest
        # connections still in their handshake to make room.
        with mooncakefs.connect(node.tcp_url, timeout=20) as client:
            client.put("during", b"flood")
            assert client.get("during") == b"flood"
    finally:
        for s in flood:
            s.close()
    with mooncakefs.connect(node.tcp_url, timeout=20) as client, mooncakefs.connect(node.unix_url) as local:
        assert client.get("during") == b"flood"
        assert local.get("during") == b"flood"
    assert "accept failed" in node.log()
    assert node.alive


# ------------------------------------------------------------------------------- 2. socket squatting


def test_a_socket_directory_made_by_another_user_is_refused_by_node_and_client(shared_dir):
    squatted = Path(f"/tmp/mooncakefs-{VICTIM}")
    shutil.rmtree(squatted, ignore_errors=True)
    data = shared_dir / "victim-data"
    data.mkdir()
    os.chown(data, VICTIM, VICTIM)
    try:

        def squat() -> str:  # the attacker gets there first, with a fake node's socket
            os.makedirs(squatted / "mooncakefs", mode=0o755)
            fake = socket.socket(socket.AF_UNIX)
            fake.bind(str(squatted / "mooncakefs" / "node.sock"))
            return str(squatted)

        assert as_user(ATTACKER, squat) == ("ok", str(squatted))

        def victim_client() -> Any:
            return mooncakefs.connect(timeout=2)

        outcome = as_user(VICTIM, victim_client)
        assert outcome[:2] == ("raised", UnsafeSocketPath.__name__), outcome
        assert f"belongs to uid {ATTACKER}, not to you (uid {VICTIM})" in outcome[2], outcome

        def victim_node() -> Any:
            store = mooncakefs.open(data, dram="4MiB", ssd=None)
            try:
                Node(store, unix_path=default_socket()[0], socket_chosen=False).start()
            finally:
                store.close()

        outcome = as_user(VICTIM, victim_node)
        assert outcome[:2] == ("raised", UnsafeSocketPath.__name__), outcome

        shutil.rmtree(squatted)  # root cleans up: now the victim's node makes the directory its own

        def victim_node_and_client() -> Any:
            store = mooncakefs.open(data, dram="4MiB", ssd=None)
            node = Node(store, unix_path=default_socket()[0], socket_chosen=False).start()
            try:
                with mooncakefs.connect(timeout=5) as client:
                    client.put("k", b"mine")
                    value = client.get("k")
                st = os.stat(squatted / "mooncakefs")
                return value, st.st_uid, oct(st.st_mode & 0o777)
            finally:
                node.stop()

        assert as_user(VICTIM, victim_node_and_client) == ("ok", (b"mine", VICTIM, "0o700"))
    finally:
        shutil.rmtree(squatted, ignore_errors=True)


def test_a_socket_directory_others_can_write_is_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafeSocketPath, match="writable by other users"):
        mooncakefs.connect(f"unix://{loose}/node.sock", timeout=2)
    store = mooncakefs.open(tmp_path / "data", dram="4MiB", ssd=None)
    try:
        with pytest.raises(UnsafeSocketPath, match="writable by other users"):
            Node(store, unix_path=loose / "node.sock").start()
    finally:
        store.close()


def test_an_unknown_socket_group_is_a_clear_error_and_leaves_no_socket(tmp_path):
    """Node(..., socket_group=NAME) for a group this host lacks raised a bare KeyError from grp."""
    store = mooncakefs.open(tmp_path / "data", dram="4MiB", ssd=None)
    try:
        with pytest.raises(mooncakefs.InvalidArgument, match=r"no-such-group.*no such group"):
            Node(store, unix_path=tmp_path / "node.sock", socket_group="no-such-group").start()
        assert not (tmp_path / "node.sock").exists()
    finally:
        store.close()


def test_a_socket_directory_this_user_cannot_write_is_named(shared_dir):
    """A node of another user's socket in root's directory said only "[Errno 13] Permission denied"."""
    data = shared_dir / "data"
    data.mkdir()
    os.chown(data, VICTIM, VICTIM)
    roots = shared_dir / "roots"
    roots.mkdir(mode=0o755)

    def node_at(socket_path: Path) -> Any:
        store = mooncakefs.open(data, dram="4MiB", ssd=None)
        try:
            Node(store, unix_path=socket_path).start()
        finally:
            store.close()

    outcome = as_user(VICTIM, lambda: node_at(roots / "node.sock"))
    assert outcome == (
        "raised",
        "InvalidArgument",
        f"cannot create the socket {roots / 'node.sock'}: its directory is not writable by this user",
    ), outcome
    outcome = as_user(VICTIM, lambda: node_at(roots / "sub" / "node.sock"))
    assert outcome[:2] == ("raised", "InvalidArgument"), outcome
    assert f"cannot create {roots / 'sub'}" in outcome[2] and "Permission denied" in outcome[2], outcome


# ------------------------------------------------------------------------------- 3. reserved keys


def test_only_the_nodes_user_reaches_reserved_keys(nodes, shared_dir):
    node = nodes(socket_path=shared_dir / "node.sock", extra=("--socket-mode", "0666"))
    chunk = INTERNAL_PREFIX + b"fs/chunk/1/0"
    ch = raw_channel(node.unix_url)  # root: the mount's own user
    ch.send(Op.PUT, [chunk, 6, 0, None, None], b"secret")
    ch.read_reply()
    ch.close()

    def steal(url: str) -> Any:
        def attempt() -> list[str]:
            seen = []
            for op, meta, payload in (
                (Op.GET, [chunk, 1 << 20], None),
                (Op.PUT, [chunk, 3, 0, None, None], b"bad"),
                (Op.REMOVE, [chunk], None),
                (Op.STAT, [chunk], None),
                (Op.BATCH_GET, [[chunk], [1 << 20]], None),
            ):
                c = raw_channel(url)
                c.send(op, meta, payload)
                try:
                    reply = c.read_reply()[0]
                    seen.append(f"{op}: answered {reply!r}")
                except InvalidKey as exc:
                    seen.append(f"{op}: InvalidKey {exc}")
                c.close()
            return seen

        return as_user(ATTACKER, attempt)

    for url in (node.unix_url, node.tcp_url):
        status, seen = steal(url)
        assert status == "ok", seen
        for line in seen[:4]:
            assert "InvalidKey" in line and "reserves" in line, (url, seen)
        assert "InvalidKey" in str(seen[4]) or "'InvalidKey'" in seen[4], (url, seen)

    ch = raw_channel(node.tcp_url)  # root over loopback TCP: trusted, and the chunk is intact
    ch.send(Op.GET, [chunk, 1 << 20])
    (size, _lease, _off), _n = ch.read_reply()
    assert bytes(ch.read_payload(size)) == b"secret"
    ch.close()


# ------------------------------------------------------------------------------- 4. pre-auth memory


@pytest.mark.parametrize("meta_len, payload_len", [(8 << 20, 0), (64, 1), (2048, 0)])
def test_frames_before_authentication_are_small(nodes, meta_len, payload_len):
    node = nodes(secret=b"a-secret-of-real-length")
    sock = hello(node.tcp_url)
    sock.sendall(HEADER.pack(MAGIC, Op.AUTH, 0, meta_len, payload_len))
    assert closed_by_peer(sock, within=5), "the node waited for an oversized pre-auth frame"
    sock.close()
    with mooncakefs.connect(node.tcp_url, secret="a-secret-of-real-length", timeout=5) as client:
        client.put("k", b"v")


# ------------------------------------------------------------------------------- 5. timeouts


@pytest.fixture
def impatient(nodes):
    return nodes(dram="64MiB", extra=("--io-timeout", "1", "--idle-timeout", "2"))


def test_a_silent_handshake_is_dropped(impatient):
    sock = hello(impatient.tcp_url)
    assert closed_by_peer(sock, within=8)


def test_a_client_trickling_a_frame_is_dropped(impatient):
    ch = raw_channel(impatient.tcp_url)
    frame = HEADER.pack(MAGIC, Op.PING, 0, 1, 0) + b"\x90"
    start = time.monotonic()
    dropped = False
    for byte in frame * 20:  # one byte every 0.3 s: each recv makes progress, the frame never ends in time
        try:
            ch.sock.send(bytes([byte]))
        except OSError:
            dropped = True
            break
        if closed_by_peer(ch.sock, within=0.3):
            dropped = True
            break
    assert dropped, "the node kept a client that sends a byte every 0.3 s"
    assert time.monotonic() - start < 8


def test_an_idle_connection_is_closed_and_clients_reconnect(impatient):
    ch = raw_channel(impatient.tcp_url)
    assert closed_by_peer(ch.sock, within=10)
    with mooncakefs.connect(impatient.tcp_url, timeout=5) as client:
        client.put("k", b"v")
        time.sleep(2.5)  # past the idle timeout: the pooled connection is gone
        assert client.get("k") == b"v"


def test_an_unfinished_put_gives_its_room_back(impatient):
    ch = raw_channel(impatient.tcp_url)
    ch.send(Op.PUT_BEGIN, [b"big", 32 * MiB, 0, None, None])
    (put_id, _offset), _n = ch.read_reply()
    with mooncakefs.connect(impatient.unix_url) as observer:
        assert observer.stats()["dram"]["used"] >= 32 * MiB

        def reclaimed() -> bool:
            ch.send(Op.PING, [])  # the connection stays busy: only the reservation is abandoned
            ch.read_reply()
            return observer.stats()["dram"]["used"] == 0

        assert wait_for(reclaimed, timeout=15, interval=0.3), observer.stats()
    ch.send(Op.PUT_END, [put_id])
    with pytest.raises(ValueError, match="no unfinished put"):
        ch.read_reply()
    ch.close()


# ------------------------------------------------------------------------------- 7. secrets and metrics


def run_node_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = child_env() | (env or {})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mooncakefs.cli",
            "node",
            "--data",
            str(tmp_path / "d"),
            "--socket",
            str(tmp_path / "n.sock"),
            "--metrics",
            "none",
            *args,
        ],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("secret", [" ", "short\n", " \t" * 40])
def test_a_weak_secret_is_refused(tmp_path, secret):
    done = run_node_cli(tmp_path, "--listen", f"0.0.0.0:{free_port()}", env={"MOONCAKEFS_SECRET": secret})
    assert done.returncode != 0
    assert "at least 16" in done.stderr, done.stderr


def test_metrics_beyond_loopback_need_metrics_public(tmp_path):
    done = run_node_cli(tmp_path, "--listen", "none", "--metrics", f"0.0.0.0:{free_port()}")
    assert done.returncode != 0
    assert "--metrics-public" in done.stderr, done.stderr


# ------------------------------------------------------------------------------- 9. the shared index


def scribble_index(node: NodeProcess, write: Callable[[mmap.mmap], None]) -> None:
    """Write over the node's shared index, as any client of its socket may."""
    with mapped_node(node) as (_ch, _pool, index):
        write(index)


def test_a_scribbled_shared_index_neither_crashes_the_node_nor_fools_the_next_client(nodes):
    node = nodes()
    # The slot count, which the node and every reader probe by, set past the end of the mapping.
    scribble_index(node, lambda index: struct.pack_into("<Q", index, 8, 1 << 40))
    with mooncakefs.connect(node.tcp_url, timeout=5) as client:  # TCP: no shared memory involved
        for i in range(200):  # each put publishes into the shared index
            client.put(f"k{i}", b"v%d" % i)
        assert client.get("k199") == b"v199"
    assert node.alive, node.log()
    with pytest.raises(MooncakeError, match="shared index is damaged"):
        mooncakefs.connect(node.unix_url, timeout=5)

    scribble_index(node, lambda index: index.__setitem__(slice(0, 8), b"\0" * 8))  # the magic
    with pytest.raises(MooncakeError, match="shared index is damaged"):
        mooncakefs.connect(node.unix_url, timeout=5)
    assert node.alive, node.log()


# ------------------------------------------------------------------------ the transfer engine's server


def test_the_transfer_engines_server_has_the_nodes_defences():
    from mooncakefs.transfer import Engine

    engine = Engine("127.0.0.1", io_timeout=1)
    try:
        url = f"tcp://127.0.0.1:{engine.server.port}"
        sock = hello(url)
        sock.sendall(HEADER.pack(MAGIC, Op.AUTH, 0, 8 << 20, 0))
        assert closed_by_peer(sock, within=5), "the engine waited for an oversized pre-auth frame"
        sock = hello(url)
        assert closed_by_peer(sock, within=8), "the engine kept a silent handshake"
    finally:
        engine.close()
