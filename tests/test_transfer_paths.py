"""Path choice and the rdma transport's device-free logic: NICs read from a sysfs-shaped tree, the order a
buffer's transfers try them, work-request planning (slices, chains, selective signalling), the fallback
to tcp with its reason; and the tests that need an RDMA device, skipped where there is none."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mooncakefs.errors import AddressNotRegistered, PathFailed, Unavailable
from mooncakefs.transfer import READ, WRITE, Engine, Region, Router, Transfer, TransferEngine, paths, rdma


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
    # the queue-pair set-up refuses what cannot be verbs objects before it calls the library
    with pytest.raises(ValueError, match="protection domain"):
        _rdma.create_cq(0, 16)
    with pytest.raises(ValueError, match="completion queue"):
        _rdma.create_rc_qp(1, 0, 64)
    with pytest.raises(ValueError, match="no queue pair"):
        _rdma.connect_rc_qp(0, 1, 0, 5, 7, 1, bytes(16))
    with pytest.raises(ValueError, match="16 bytes"):
        _rdma.connect_rc_qp(1, 1, 0, 5, 7, 1, b"short")
    with pytest.raises(ValueError, match="mtu"):
        _rdma.connect_rc_qp(1, 1, 0, 9, 7, 1, bytes(16))
    with pytest.raises(ValueError, match="rd_atomic"):  # READs in flight: what the device allows, at least one
        _rdma.connect_rc_qp(1, 1, 0, 5, 7, 1, bytes(16), rd_atomic=0)
    _rdma.destroy_qp(0)  # nothing to destroy: a no-op, as closing twice is
    _rdma.destroy_cq(0)


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


@pytest.mark.skipif(not paths.rdma_devices(), reason="no RDMA device in /sys/class/infiniband")
def test_an_rdma_device_is_seen() -> None:
    """Where a device exists (a real one, or soft-RoCE: ``rdma link add rxe0 type rxe netdev eth0``), auto
    picks rdma, or says exactly why not (the hot path is not built, pyverbs is missing, the device did
    not open)."""
    with Engine("127.0.0.1", protocol="auto") as e:
        assert e.protocol == "rdma" or "found, but" in e.why


def test_pyverbs_set_up_without_a_device() -> None:
    """pyverbs loads (the package, or Debian's python3-pyverbs by its path) and opening a device that is
    not there is a DeviceNotFound naming it, not a crash."""
    if rdma.load_pyverbs() is None:
        pytest.skip(rdma.pyverbs_status())
    import pyverbs.device

    assert "pyverbs from" in rdma.pyverbs_status() and hasattr(pyverbs.device, "Context")
    with pytest.raises(paths.DeviceNotFound, match="cannot open RDMA device 'mc-no-such-device'"):
        rdma.VerbsDevice("mc-no-such-device")
    assert rdma.unavailable_reason() == "" or "_rdma is not built" in rdma.unavailable_reason()


@pytest.mark.skipif(not paths.rdma_devices(), reason="no RDMA device in /sys/class/infiniband")
def test_verbs_device_registers_memory() -> None:
    """On a device: context, protection domain, a memory region with its keys, the port's GID for peers."""
    if rdma.load_pyverbs() is None:
        pytest.skip(rdma.pyverbs_status())
    from mooncakefs.transfer import _rdma

    device = rdma.VerbsDevice(paths.rdma_devices()[0].name)
    try:
        buf = np.zeros(1 << 20, dtype=np.uint8)
        lkey, rkey = device.register(buf.ctypes.data, buf.nbytes)
        assert lkey and rkey and device.pd_pointer and device.info.gid
        # two RC queue pairs of this device connected to each other (loopback), then torn down
        cq = _rdma.create_cq(device.pd_pointer, 256)
        (qp_a, num_a), (qp_b, num_b) = (_rdma.create_rc_qp(device.pd_pointer, cq, 64) for _ in range(2))
        gid = bytes.fromhex(device.info.gid.replace(":", ""))
        info = device.info
        _rdma.connect_rc_qp(qp_a, info.port, info.gid_index, info.mtu, num_b, info.lid, gid)
        _rdma.connect_rc_qp(qp_b, info.port, info.gid_index, info.mtu, num_a, info.lid, gid)
        _rdma.destroy_qp(qp_a)
        _rdma.destroy_qp(qp_b)
        _rdma.destroy_cq(cq)
        device.unregister(buf.ctypes.data)
    finally:
        device.close()


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


# ------------------------------------------------------------------------ choosing and changing paths


def fake_nics(root: Path, nics: dict[str, int]) -> str:
    """A sysfs-shaped /class/net: ``nics`` maps an interface to its NUMA node (-1: a virtual one, no device)."""
    for name, numa in nics.items():
        d = root / "class" / "net" / name
        d.mkdir(parents=True)
        if numa >= 0:
            pci = root / "devices" / f"pci-{name}"
            pci.mkdir(parents=True)
            (pci / "numa_node").write_text(f"{numa}\n")
            (d / "device").symlink_to(pci)
    return str(root)


def test_nics_and_their_numa_nodes_from_sysfs(tmp_path: Path) -> None:
    root = fake_nics(tmp_path, {"eth0": 0, "eth1": 1, "veth7": -1})
    assert [(n.name, n.numa, n.pci) for n in map(lambda i: paths.nic(i, root), ["eth0", "eth1", "veth7"])] == [
        ("eth0", 0, "pci-eth0"),
        ("eth1", 1, "pci-eth1"),
        ("veth7", -1, ""),
    ]
    assert paths.nic("missing", root).numa == -1
    assert paths.route_device("127.0.0.1").name == "lo"  # the kernel's route, the fake tree's node


def test_rank_nodes_and_when_numa_matters() -> None:
    assert paths.rank_nodes([0, 1, 1, 0], 1) == [1, 2, 0, 3]
    assert paths.rank_nodes([0, 1, 1, 0], 1, spread=1) == [2, 1, 3, 0]
    assert paths.rank_nodes([-1, 0], 1) == [0, 1]  # a NIC of unknown placement is near to everything
    assert paths.rank_nodes([0, 0, 0], -1, spread=4) == [1, 2, 0]  # unknown memory: spread over all
    assert not paths.numa_matters([-1, -1]) and not paths.numa_matters([0, 0, -1])
    assert paths.numa_matters([0, 1])
    buf = np.ones(1 << 16, dtype=np.uint8)
    assert paths.buffer_node(buf.ctypes.data) >= 0 or not os.path.exists("/sys/devices/system/node")


class FakePath:
    """An in-memory transport for the router's unit tests: copies between buffers and a dict of regions,
    or fails every transfer with ``failure`` (from another thread, as a network transport would)."""

    name = "fake"

    def __init__(self, label: str, memory: dict[int, bytearray], failure: BaseException | None = None) -> None:
        self.label, self.memory, self.failure = label, memory, failure
        self.carried = 0

    def accepts(self, transfer: Transfer) -> bool:
        return True

    def parts(self, transfer: Transfer) -> int:
        return 1

    def submit(self, transfers: list[Transfer], batch: Any) -> None:
        def run() -> None:
            for t in transfers:
                if self.failure is not None:
                    batch.fail(self.failure)
                    return
                region = self.memory[t.region.handle]
                if t.op == READ:
                    t.buffer[:] = region[t.offset : t.offset + len(t.buffer)]
                else:
                    region[t.offset : t.offset + len(t.buffer)] = t.buffer
                self.carried += 1
                batch.part_done(len(t.buffer))

        threading.Thread(target=run).start()

    def close(self) -> None:
        pass


def writes(n: int) -> list[Transfer]:
    return [Transfer(WRITE, memoryview(bytes([i]) * 10), Region(1, 100), offset=i * 10) for i in range(n)]


def test_router_moves_a_failed_paths_transfers_to_the_next() -> None:
    memory = {1: bytearray(100)}
    broken = FakePath("tcp A", memory, PathFailed("connection refused"))
    good = FakePath("tcp B", memory)
    router = Router([broken, good], order=lambda t, i: paths.rank_nodes([-1, -1], -1, i), peer="peer:1")
    assert router.run(writes(6), timeout=10) == 60
    assert memory[1][:60] == b"".join(bytes([i]) * 10 for i in range(6)) and good.carried == 6
    # the failed path is tried last for a while: the next batch goes to the good one straight away
    good.carried = 0
    assert router.run(writes(4), timeout=10) == 40 and good.carried == 4
    broken.failure = None
    assert broken.carried == 0


def test_router_fails_only_when_every_path_failed_and_never_retries_a_refusal() -> None:
    memory = {1: bytearray(100)}
    router = Router(
        [FakePath("tcp A via eth0", memory, PathFailed("reset")), FakePath("tcp B via eth1", memory, Unavailable("x"))]
    )
    with pytest.raises(PathFailed, match="every path failed") as failed:
        router.run(writes(3), timeout=10)
    assert "tcp A via eth0: reset" in str(failed.value) and "tcp B via eth1: x" in str(failed.value)
    refusing = FakePath("tcp A", memory, AddressNotRegistered("not registered"))
    spare = FakePath("tcp B", memory)
    with pytest.raises(AddressNotRegistered):
        Router([refusing, spare]).run(writes(2), timeout=10)
    assert spare.carried == 0


def test_engine_offers_a_path_per_address() -> None:
    """A peer serving on two loopback addresses: two tcp paths, the batch spread over both, bytes exact."""
    with Engine("127.0.0.1", addresses=["127.0.0.2"]) as target, Engine("127.0.0.1", same_host=False) as initiator:
        assert len(target.server.served()) == 2
        assert initiator.paths(target.session_id) == ["tcp", "tcp"]
        routes = initiator.routes(target.session_id)
        assert routes[0].startswith(f"tcp {target.session_id} via lo") and "127.0.0.2" in routes[1]
        buf = target.allocate(1 << 20)
        data = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        chunks = [memoryview(data)[i : i + 65536] for i in range(0, len(data), 65536)]
        initiator.transfer(target.session_id, "write", chunks, [buf + i * 65536 for i in range(len(chunks))])
        assert bytes(target.view(buf, len(data))) == data
        peer = initiator._peer(target.session_id)
        assert all(t._workers for t in peer.transports)  # both paths carried some of it
