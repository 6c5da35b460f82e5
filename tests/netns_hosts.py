"""Hosts in network namespaces, each with a node and a cluster mount, joined by a bridge over links shaped
with ``tc`` (for tests/test_p2p_netns.py and tools/bench/p2p_bench.py).

    root namespace: etcd on the bridge (10.214.N.1), the test (it runs ``cp`` on the mounts)
    host k: namespace mcfs-p<pid>-<k>, veth to the bridge, 10.214.N.(10+k); its link shaped to RATE each
            way (tbf on both ends); a node and a mount of etcd://10.214.N.1:port/CLUSTER, MOONCAKEFS_HOST=hk

The node and the mount enter only the host's network namespace (``nsenter --net``): ``ip netns exec``
would also give them a private mount namespace, and the FUSE mount would be invisible to everyone else.
So the mounts are seen from the root namespace, where the test copies out of them.  Bytes a host sent are
read from its veth's counters (``sent(k)``): everything that left the host, whatever the protocol.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import kill_process, wait_until
from fuse_helpers import FuseMount
from node_helpers import NodeProcess, free_port

NODE_PORT = "7480"  # every host's node listens there


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30, check=True)


def netns_unavailable() -> str | None:
    """Why hosts in network namespaces cannot be made here (None when they can)."""
    for tool in ("ip", "tc", "nsenter", "etcd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    return None


class NetnsNode(NodeProcess):
    def __init__(self, *args, netns: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.netns = netns

    def argv(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *super().argv()]


class NetnsMount(FuseMount):
    def __init__(self, *args, netns: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.netns = netns

    def argv(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *super().argv()]


class Testbed:
    """``hosts`` namespaces with links of ``rate`` (tc syntax, e.g. "400mbit") each way."""

    __test__ = False  # a helper, not a test class, though its name starts with "Test"

    def __init__(
        self,
        base: Path,
        hosts: int,
        *,
        rate: str = "400mbit",
        dram: str = "192MiB",
        chunk_size: str = "4MiB",
        replicas: int = 2,
    ) -> None:
        self.base = Path(base)
        self.rate, self.dram, self.chunk_size, self.replicas = rate, dram, chunk_size, replicas
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"mcb{tag}"
        self.names = [f"mcfs-p{tag}-{k}" for k in range(hosts)]
        self.root_ifs = [f"mcp{tag}r{k}" for k in range(hosts)]
        self.subnet = self._free_subnet()
        self.secret = secrets.token_hex(16).encode()
        self.cluster = f"p2p{tag}"
        self.undo: list[list[str]] = []
        self.nodes: list[NetnsNode] = []
        self.mounts: list[NetnsMount] = []
        self.etcd_proc: subprocess.Popen | None = None
        self.etcd_dir = tempfile.mkdtemp(prefix="mooncakefs-etcd-", dir="/dev/shm")
        self.etcd_port = free_port()

    @staticmethod
    def _free_subnet() -> str:
        taken = ip("-o", "addr").stdout + ip("route", "show", "table", "all").stdout
        for i in range(224):
            n = 16 + (os.getpid() + i) % 224
            if f"10.214.{n}." not in taken:
                return f"10.214.{n}"
        raise RuntimeError("no free 10.214.N.0/24 subnet")

    def host_ip(self, k: int) -> str:
        return f"{self.subnet}.{10 + k}"

    @property
    def url(self) -> str:
        return f"etcd://{self.subnet}.1:{self.etcd_port}/{self.cluster}"

    # -- set-up ---------------------------------------------------------------------------------------------

    def start(self) -> Testbed:
        ip("link", "add", self.bridge, "type", "bridge")
        self.undo.append(["link", "del", self.bridge])
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for k, (ns, root_if) in enumerate(zip(self.names, self.root_ifs, strict=True)):
            ip("netns", "add", ns)
            self.undo.append(["netns", "del", ns])
            ip("link", "add", root_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.undo.append(["link", "del", root_if])
            ip("link", "set", root_if, "master", self.bridge)
            ip("link", "set", root_if, "up")
            ip("-n", ns, "addr", "add", f"{self.host_ip(k)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            tc("-n", ns, "qdisc", "add", "dev", "eth0", "root", *self.shape())  # the host's uplink
            tc("qdisc", "add", "dev", root_if, "root", *self.shape())  # its downlink
        self.etcd_proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "t",
                "--data-dir",
                self.etcd_dir,
                "--listen-client-urls",
                f"http://{self.subnet}.1:{self.etcd_port}",
                "--advertise-client-urls",
                f"http://{self.subnet}.1:{self.etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{free_port()}",
                "--log-level",
                "warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from mooncakefs.cluster.membership import connect_etcd

        def answers() -> bool:
            try:
                client = connect_etcd(f"http://{self.subnet}.1:{self.etcd_port}", timeout=1)
                try:
                    client.status()
                finally:
                    client.close()
                return True
            except Exception:
                return False

        assert wait_until(answers, timeout=20, interval=0.1), "etcd did not start"
        etcd = f"http://{self.subnet}.1:{self.etcd_port}"
        for k, ns in enumerate(self.names):
            node = NetnsNode(
                self.base,
                name=f"h{k}",
                dram=self.dram,
                secret=self.secret,
                netns=ns,
                listen=f"{self.host_ip(k)}:{NODE_PORT}",
                env={"MOONCAKEFS_HOST": f"h{k}"},
                extra=("--etcd", etcd, "--cluster", self.cluster, "--lease-ttl", "3"),
            )
            self.nodes.append(node)
            node.launch()
        for node in self.nodes:
            node.wait_ready()
        assert wait_until(lambda: self._mapped() == len(self.names), timeout=30, interval=0.2), "nodes not mapped"
        for k, ns in enumerate(self.names):
            mount = NetnsMount(
                None,
                self.base / f"mnt-h{k}",
                dram=None,
                ssd=None,
                chunk_size=self.chunk_size,
                extra=[self.url, "--replicas", str(self.replicas)],
                netns=ns,
                env={"MOONCAKEFS_HOST": f"h{k}", "MOONCAKEFS_SECRET": self.secret.decode()},
            )
            self.mounts.append(mount.start(timeout=60))
        return self

    def _mapped(self) -> int:
        import mooncakefs

        try:
            with mooncakefs.connect(self.url, secret=self.secret, timeout=2) as probe:
                return len(probe.map.nodes)
        except mooncakefs.MooncakeError:
            return 0

    # -- measuring ------------------------------------------------------------------------------------------

    def sent(self, k: int) -> int:
        """Bytes host ``k`` has sent on its link (what its veth's root end received)."""
        return int(Path(f"/sys/class/net/{self.root_ifs[k]}/statistics/rx_bytes").read_text())

    def copy_out(self, k: int, name: str, dest: Path, timeout: float = 600) -> subprocess.Popen:
        """Start ``cp`` of ``name`` out of host ``k``'s mount (it runs in the root namespace)."""
        return subprocess.Popen(["cp", str(self.mounts[k].mnt / name), str(dest)], stdin=subprocess.DEVNULL)

    def cut(self, k: int) -> None:
        """Partition host ``k``: its link goes down, so whatever it sends or is sent is dropped (no reset,
        no refusal: the others learn by their timeouts, as with a pulled cable)."""
        ip("link", "set", self.root_ifs[k], "down")

    def restore(self, k: int) -> None:
        ip("link", "set", self.root_ifs[k], "up")

    def shape(self, rate: str | None = None, latency: str = "100ms") -> list[str]:
        """A link's qdisc: ``rate`` (the testbed's by default) each way."""
        return ["tbf", "rate", rate or self.rate, "burst", "256kb", "latency", latency]

    def crawl_serving(self, k: int, rate: str) -> None:
        """Host ``k``'s node sends its answers at ``rate`` (a failing NIC, a host swamped by other work):
        what leaves from its node's port goes through a class of its own, queued, not dropped (a 5 s
        queue: the bytes keep trickling, so no request to it times out), while its heartbeats and etcd
        leases keep the host's rate (it stays in the map, and its records say what it holds)."""

        def on_host(line: str, *more: str) -> None:
            tc("-n", self.names[k], *line.split(), *more)

        on_host("qdisc del dev eth0 root")
        on_host("qdisc add dev eth0 root handle 1: htb default 2")
        on_host(f"class add dev eth0 parent 1: classid 1:1 htb rate {rate} ceil {rate}")
        on_host(f"class add dev eth0 parent 1: classid 1:2 htb rate {self.rate} ceil {self.rate}")
        on_host("qdisc add dev eth0 parent 1:1", *self.shape(rate, "5s"))
        on_host(f"filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip sport {NODE_PORT} 0xffff flowid 1:1")

    def restore_serving(self, k: int) -> None:
        """Undo ``crawl_serving``: host ``k``'s uplink is one link of the testbed's rate again."""
        tc("-n", self.names[k], "qdisc", "del", "dev", "eth0", "root")
        tc("-n", self.names[k], "qdisc", "add", "dev", "eth0", "root", *self.shape())

    def drop_caches(self) -> None:
        """Forget the kernel's page cache of the mounts (a second copy must read through the mount)."""
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("1")

    def close(self) -> None:
        for mount in self.mounts:
            with contextlib.suppress(Exception):
                if mount.proc is not None and mount.proc.poll() is None:
                    mount.stop()
        for node in self.nodes:
            node.kill()
        if self.etcd_proc is not None:
            kill_process(self.etcd_proc)
        shutil.rmtree(self.etcd_dir, ignore_errors=True)
        time.sleep(0.2)
        for args in reversed(self.undo):
            ip(*args, check=False)
