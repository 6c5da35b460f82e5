"""The transfer engine's paths between two hosts (network namespaces): a peer serving on two links, one
link cut mid-use, then both."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import pytest
from te_peer import SIZE, pattern
from test_cluster_netns import _free_subnet, ip
from test_transfer_engine import Peer

from mooncakefs.errors import PathFailed
from mooncakefs.transfer import Engine


@dataclass
class TwoLinks:
    """A namespace (the other host) joined to the root one by two veth pairs: two NICs each side."""

    ns: str
    root_ifs: list[str]
    subnets: list[str]
    undo: list[list[str]]

    def root_ip(self, k: int) -> str:
        return f"{self.subnets[k]}.1"

    def iso_ip(self, k: int) -> str:
        return f"{self.subnets[k]}.2"

    def cut(self, k: int) -> None:
        ip("link", "set", self.root_ifs[k], "down")


@pytest.fixture
def two_links():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    pid = os.getpid() % 100000
    ns = f"mcfs-te-{pid}"
    if ip("netns", "add", ns, check=False).returncode != 0:
        pytest.skip(f"cannot create the network namespace {ns}")
    links = TwoLinks(ns, [], [], [["netns", "del", ns]])
    try:
        for k in range(2):
            root_if, iso_if = f"mte{pid}{k}r", f"mte{pid}{k}i"
            subnet = _free_subnet()
            ip("link", "add", root_if, "type", "veth", "peer", "name", iso_if)
            links.undo.append(["link", "del", root_if])
            ip("link", "set", iso_if, "netns", ns)
            ip("addr", "add", f"{subnet}.1/24", "dev", root_if)
            ip("link", "set", root_if, "up")
            unreachable = ["unreachable", f"{subnet}.0/24", "metric", "4000"]  # a cut link fails at once
            ip("route", "add", *unreachable)
            links.undo.append(["route", "del", *unreachable])
            ip("-n", ns, "addr", "add", f"{subnet}.2/24", "dev", iso_if)
            ip("-n", ns, "link", "set", iso_if, "up")
            links.root_ifs.append(root_if)
            links.subnets.append(subnet)
        ip("-n", ns, "link", "set", "lo", "up")
        yield links
    finally:
        for args in reversed(links.undo):
            ip(*args, check=False)


@pytest.mark.slow
def test_a_cut_link_fails_over_to_the_other(two_links: TwoLinks, caplog: pytest.LogCaptureFixture) -> None:
    """A peer in another namespace serving on both of its links: a batch spreads over both paths; with one
    link cut the batch still completes, byte-exact, on the other; with both cut, PathFailed names both."""
    peer = Peer(two_links.iso_ip(0), argv_prefix=["ip", "netns", "exec", two_links.ns], also=(two_links.iso_ip(1),))
    want = pattern(SIZE)
    try:
        with Engine(two_links.root_ip(0), connections=2, stripe=1 << 20, io_timeout=2) as engine:
            routes = engine.routes(peer.session)
            assert [r.split(" via ")[1] for r in routes] == two_links.root_ifs

            def read_batch() -> bytes:
                out = bytearray(16 << 20)
                views = [memoryview(out)[i << 20 : (i + 1) << 20] for i in range(16)]
                engine.transfer(peer.session, "read", views, [peer.addr + (i << 20) for i in range(16)])
                return bytes(out)

            assert read_batch() == want[: 16 << 20].tobytes()
            two_links.cut(0)
            started = time.monotonic()
            assert read_batch() == want[: 16 << 20].tobytes()
            assert time.monotonic() - started < 60  # a few io timeouts, then the other path
            moved = [r.getMessage() for r in caplog.records if "go to the next path" in r.getMessage()]
            assert moved and routes[0] in moved[0]  # half the batch was on the cut link, and moved
            two_links.cut(1)
            with pytest.raises(PathFailed, match="every path") as failed:
                read_batch()
            assert routes[0] in str(failed.value) and routes[1] in str(failed.value)
    finally:
        peer.kill()
