"""Helpers for tests that run real node daemons (``mooncakefs node``) in child processes.

A ``NodeProcess`` is one ``python -m mooncakefs.cli node`` process whose socket, data dir and log live
under a test's tmp dir.  ``start()`` waits until a client can connect (polling ``mooncakefs.connect``),
``kill()`` / ``stop()`` end it; every node a fixture makes is SIGKILLed at teardown if still running.
Also here: raw protocol helpers (a handshaken ``mooncakefs.wire.Channel``), free loopback ports, and a
/metrics scraper.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import child_env, wait_until

READY_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """One node daemon.  ``listen``/``metrics``: "auto" (a free loopback port), "none", or HOST:PORT."""

    def __init__(
        self,
        base: Path,
        *,
        name: str = "node",
        dram: str = "64MiB",
        ssd: str = "0",
        listen: str = "auto",
        metrics: str = "none",
        secret: bytes | None = None,
        data: Path | None = None,
        socket_path: Path | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.dram, self.ssd = dram, ssd
        self.data = data or self.base / f"{name}-data"
        # AF_UNIX paths are limited to 108 bytes: keep the socket short even under a deep tmp_path.
        self.socket_path = socket_path or self.base / f"{name}.sock"
        if len(str(self.socket_path)) > 100:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket_path}")
        self.listen = f"127.0.0.1:{free_port()}" if listen == "auto" else listen
        self.metrics = f"127.0.0.1:{free_port()}" if metrics == "auto" else metrics
        self.secret_file: Path | None = None
        if secret is not None:
            self.secret_file = self.base / f"{name}.secret"
            self.secret_file.write_bytes(secret + b"\n")
            os.chmod(self.secret_file, 0o600)
        self.extra = extra
        self.env = env
        self.log_path = self.base / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # -- addresses ---------------------------------------------------------------------------------------

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host, int(port)

    @property
    def tcp_url(self) -> str:
        host, port = self.tcp_address
        return f"tcp://{host}:{port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics}/metrics"

    def url(self, transport: str) -> str:
        return self.unix_url if transport == "unix" else self.tcp_url

    # -- lifecycle ---------------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "mooncakefs.cli",
            "node",
            "--data",
            str(self.data),
            "--dram",
            self.dram,
            "--ssd",
            self.ssd,
            "--socket",
            str(self.socket_path),
            "--listen",
            self.listen,
            "--metrics",
            self.metrics,
            "--log-format",
            "json",
            "--no-prefault",
        ]
        if self.secret_file is not None:
            args += ["--secret-file", str(self.secret_file)]
        return [*args, *self.extra]

    def launch(self) -> subprocess.Popen:
        """Start the process without waiting for it to serve."""
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        env = child_env()
        env.pop("MOONCAKEFS_SECRET", None)
        env.pop("MOONCAKEFS_SOCKET", None)
        if self.env:
            env.update(self.env)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        return self.proc

    def start(self, timeout: float = READY_TIMEOUT) -> NodeProcess:
        self.launch()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll until a client gets through the handshake on the Unix socket (and TCP, if listening)."""
        import mooncakefs

        deadline = time.monotonic() + timeout
        urls = [self.unix_url] + ([self.tcp_url] if self.listen != "none" else [])
        secret = self.secret_file.read_bytes().strip() if self.secret_file else None
        while urls:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode} before serving:\n{self.log()}")
            try:
                with mooncakefs.connect(urls[0], secret=secret, timeout=2):
                    urls.pop(0)
                    continue
            except mooncakefs.Unavailable:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not serving {urls[0]} after {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGSTOP the node and wait until the kernel shows it stopped (delivery is asynchronous)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        assert wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T"), "the node did not stop"

    def kill(self) -> None:
        """SIGKILL the node (by its own pid) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process dies on SIGKILL too, but be tidy
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, and wait for the exit status."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return "(no log)"


def scrape_metrics(node: NodeProcess, timeout: float = 5.0) -> dict[str, float]:
    """The node's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(node.metrics_url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def raw_channel(url: str, *, secret: bytes | None = None, timeout: float = 5.0, handshake: bool = True):
    """A ``mooncakefs.wire.Channel`` to the node, past the HELLO/AUTH handshake unless told otherwise."""
    from mooncakefs import wire

    if url.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = url[len("unix://") :]
    else:
        host, _, port = url[len("tcp://") :].rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    sock.settimeout(timeout)
    sock.connect(address)
    sock.settimeout(None)
    ch = wire.Channel(sock, url, timeout=timeout)
    if handshake:
        op, _flags, meta, _n = ch.read_frame()
        assert op == wire.Op.HELLO, op
        _version, _instance, nonce = meta
        proof = wire.auth_proof(secret, nonce) if nonce is not None and secret is not None else None
        ch.send(wire.Op.AUTH, [wire.VERSION, proof])
        ch.read_reply()
    return ch


@contextlib.contextmanager
def mapped_node(node: NodeProcess):
    """(channel, pool, index): the node's DRAM pool and shared index, mapped read-write as any client of
    its Unix socket may map them, with the channel that asked; all closed on exit."""
    import mmap

    from mooncakefs import wire

    ch = raw_channel(node.unix_url)
    ch.send(wire.Op.MAP, [])
    op, _flags, meta, _n, fds = ch.read_frame_with_fds(2)
    assert op == wire.Op.OK, meta
    try:
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        pool, index = mmap.mmap(fds[0], meta[0], mmap.MAP_SHARED, rw), mmap.mmap(fds[1], meta[1], mmap.MAP_SHARED, rw)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        yield ch, pool, index
    finally:
        pool.close()
        index.close()
        ch.close()


wait_for = wait_until  # the suite's polling helper, under the name these tests use


class EtcdCluster:
    """A real etcd of one or more members on free loopback ports, its data on /dev/shm.  ``stop()``
    and ``start()`` again keep the data (an etcd outage); ``kill_member(i)`` loses one member."""

    def __init__(self, members: int = 1, *, extra_client_urls: tuple[str, ...] = ()) -> None:
        import tempfile

        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.extra_client_urls = extra_client_urls
        self.base = Path(tempfile.mkdtemp(prefix="mooncakefs-etcd-", dir="/dev/shm"))
        self.procs: list[subprocess.Popen | None] = [None] * members

    @property
    def url(self) -> str:
        """Every member, comma-separated, as mooncakefs takes it."""
        return ",".join(f"http://127.0.0.1:{p}" for p in self.client_ports)

    def member_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.client_ports[i]}"

    def start(self) -> EtcdCluster:
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        for i, name in enumerate(self.names):
            if self.procs[i] is None or self.procs[i].poll() is not None:
                self.procs[i] = self._launch(i, name, initial)
        assert wait_until(self.healthy, timeout=30, interval=0.1), "etcd did not become healthy"
        return self

    def _launch(self, i: int, name: str, initial: str) -> subprocess.Popen:
        client = ",".join([self.member_url(i), *self.extra_client_urls])
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return subprocess.Popen(
            [
                "etcd",
                "--name",
                name,
                "--data-dir",
                str(self.base / name),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                self.member_url(i),
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                initial,
                "--initial-cluster-token",
                self.base.name,
                "--log-level",
                "error",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def healthy(self) -> bool:
        from mooncakefs.cluster.membership import connect_etcd

        try:
            client = connect_etcd(self.url, timeout=1)
            try:
                client.get("/health-probe")
                return True
            finally:
                client.close()
        except Exception:
            return False

    def kill_member(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)

    def stop(self) -> None:
        """Stop every member (SIGTERM; a member may linger a few seconds handing over leadership)."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def close(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
