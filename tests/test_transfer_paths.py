"""Path choice and the rdma transport's device-free logic: NICs read from a sysfs-shaped tree, the order a
buffer's transfers try them, work-request planning (slices, chains, selective signalling), the fallback
to tcp with its reason; and the tests that need an RDMA device, skipped where there is none."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from mooncakefs.transfer import Engine, TransferEngine, paths, rdma


def fake_sysfs(root: Path, devices: dict[str, tuple[int, str]]) -> str:
    """A sysfs-shaped tree: ``devices`` maps an RDMA device name to (numa node, port state)."""
    for name, (numa, state) in devices.items():
        d = root / "class" / "infiniband" / name
        (d / "ports" / "1").mkdir(parents=True)
        (d / "ports" / "1" / "state").write_text(f"{4 if 'ACTIVE' in state else 1}: {state}\n")
        (d / "ports" / "1" / "link_layer").write_text("Ethernet\n")
        pci = root / "devices" / f"pci-{name}"
        (pci / "net" / f"eth-{name}").mkdir(parents=True)
        (pci / "numa_node").write_text(f"{numa}\n")
        (d / "device").symlink_to(pci)
    return str(root)


def test_rdma_devices_from_sysfs(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {"mlx5_0": (0, "ACTIVE"), "mlx5_1": (1, "ACTIVE"), "mlx5_2": (1, "DOWN")})
    found = paths.rdma_devices(root=root)
    assert [(d.name, d.numa, d.netdev, d.link_layer) for d in found] == [
        ("mlx5_0", 0, "eth-mlx5_0", "Ethernet"),
        ("mlx5_1", 1, "eth-mlx5_1", "Ethernet"),
    ]
    assert [d.name for d in paths.rdma_devices("mlx5_1,mlx5_2", root=root)] == ["mlx5_1"]
    assert "no active RDMA device among" in paths.no_rdma_reason("mlx5_2", root=root)
    assert "does not exist" in paths.no_rdma_reason(root=str(tmp_path / "none"))
    matrix = json.loads(paths.topology(root=root))["matrix"]
    assert matrix["cpu:1"] == [["mlx5_1"], ["mlx5_0"]]


def test_rank_prefers_the_buffers_numa_node_and_spreads() -> None:
    devs = [
        paths.Device("a", 0, True),
        paths.Device("b", 1, True),
        paths.Device("c", 1, True),
        paths.Device("d", 0, True),
    ]
    assert [d.name for d in paths.rank(devs, 1)] == ["b", "c", "a", "d"]
    assert [d.name for d in paths.rank(devs, 1, spread=1)] == ["c", "b", "d", "a"]
    assert [d.name for d in paths.rank(devs, -1, spread=2)] == ["c", "d", "a", "b"]  # unknown: all near


def test_memory_node_of_a_touched_page() -> None:
    buf = np.ones(1 << 20, dtype=np.uint8)
    node = paths.memory_node(buf.ctypes.data)
    assert node == -1 or os.path.exists(f"/sys/devices/system/node/node{node}")


def test_plan_splits_spreads_chains_and_signals() -> None:
    reqs = [rdma.Request(0x1000, 7, 0x9000, 9, 300), rdma.Request(0x5000, 7, 0xA000, 9, 50)]
    p = rdma.plan(reqs, qps=2, slice_size=100, max_chain=2, signal_every=3)
    # 300 bytes -> 3 slices, 50 -> 1: four work requests, alternating over two queue pairs
    assert p.work_requests == 4
    assert [[[wr[0] for wr in c] for c in qp] for qp in p.chains] == [[[1, 3]], [[2, 4]]]
    assert p.chains[0][0][0] == (1, 0x1000, 7, 0x9000, 9, 100, False)
    assert p.chains[0][0][1] == (3, 0x1000 + 200, 7, 0x9000 + 200, 9, 100, True)  # last of its chain
    # every byte of every request is vouched for by exactly one signalled completion
    got = [0, 0]
    for covered in p.covers.values():
        for index, n in covered:
            got[index] += n
    assert got == [300, 50]
    assert all(wr[6] for qp in p.chains for c in qp for wr in c if wr[0] in p.covers)


def test_plan_selective_signalling_in_long_chains() -> None:
    reqs = [rdma.Request(0, 1, 0, 2, 64 * 40)]
    p = rdma.plan(reqs, qps=1, slice_size=64, max_chain=32, signal_every=16)
    flags = [wr[6] for c in p.chains[0] for wr in c]
    assert len(flags) == 40 and [i + 1 for i, f in enumerate(flags) if f] == [16, 32, 40]
    assert sum(n for c in p.covers.values() for _i, n in c) == 64 * 40
    with pytest.raises(ValueError):
        rdma.plan(reqs, qps=0)


def test_rdma_hot_path_is_built() -> None:
    """The Cython posting/polling module compiled against infiniband/verbs.h; with no queue pair it refuses."""
    _rdma = pytest.importorskip(
        "mooncakefs.transfer._rdma", reason="built only where infiniband/verbs.h exists (apt install libibverbs-dev)"
    )
    assert _rdma.post_chain(1, True, []) == 0
    with pytest.raises(ValueError):
        _rdma.post_chain(0, True, [(1, 0, 0, 0, 0, 1, True)])
    with pytest.raises(ValueError):
        _rdma.poll(0, 16, 0.0)


def test_auto_falls_back_to_tcp_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mooncakefs.transfer")
    with Engine("127.0.0.1", protocol="auto") as e:
        assert e.protocol == "tcp"
    lines = [r.getMessage() for r in caplog.records if "using tcp" in r.getMessage()]
    assert len(lines) == 1 and ("RDMA" in lines[0] or "rdma" in lines[0])


@pytest.mark.skipif(bool(paths.rdma_devices()), reason="an RDMA device exists here: nothing to fall back from")
def test_rdma_without_a_usable_device_falls_back_to_tcp_in_mooncakes_api(caplog: pytest.LogCaptureFixture) -> None:
    """SGLang's disaggregation hard-codes "rdma": Mooncake's API falls back to tcp with one line saying
    why, and the engine then moves bytes; the Pythonic ``Engine(protocol="rdma")`` stays strict."""
    caplog.set_level(logging.INFO, logger="mooncakefs.transfer")
    target, initiator = TransferEngine(), TransferEngine()
    try:
        assert target.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0, target.last_error
        assert initiator.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "mlx5_0") == 0, initiator.last_error
        assert target.get_engine().protocol == initiator.get_engine().protocol == "tcp"
        lines = [r for r in caplog.records if "falling back to tcp" in r.getMessage()]
        assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
        assert "no RDMA device" in lines[0].getMessage() or "found, but" in lines[0].getMessage()
        addr = target.allocate_managed_buffer(4096)
        src = bytearray(b"x" * 4096)
        assert initiator.register_memory(src) == 0
        assert initiator.transfer_sync_write(f"127.0.0.1:{target.get_rpc_port()}", src, addr, 4096) == 0
        assert target.read_bytes_from_buffer(addr, 4096) == bytes(src)
    finally:
        target.close()
        initiator.close()
    with pytest.raises(paths.DeviceNotFound, match="rdma"):
        Engine("127.0.0.1", protocol="rdma")


@pytest.mark.skipif(
    not paths.rdma_devices(),
    reason="no RDMA device in /sys/class/infiniband (soft-RoCE: "
    "rdma link add rxe0 type rxe netdev eth0): the device tests cannot run here",
)
def test_an_rdma_device_is_seen() -> None:
    """Where a device exists, auto picks rdma or says exactly why not (the transport is not set up yet)."""
    with Engine("127.0.0.1", protocol="auto") as e:
        assert e.protocol == "rdma" or "not yet" in e.why


def test_first_buffer_is_the_first_registered_not_the_lowest() -> None:
    """Mooncake's getFirstBufferAddress is the segment's first buffer in registration order, asked
    afresh of a peer each time (it registers and unregisters at will)."""
    with Engine("127.0.0.1", protocol="tcp") as target, Engine("127.0.0.1", protocol="tcp") as initiator:
        assert initiator.first_buffer(target.session_id) == 0
        one, two = bytearray(8192), bytearray(8192)
        (low, low_buf), (high, high_buf) = sorted([(target.register(one), one), (target.register(two), two)])
        target.unregister(low)
        target.unregister(high)
        target.register(high_buf)
        target.register(low_buf)
        assert initiator.first_buffer(target.session_id) == high == target.first_buffer(target.session_id)
        target.unregister(high)
        assert initiator.first_buffer(target.session_id) == low
