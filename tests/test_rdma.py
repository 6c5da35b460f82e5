"""The rdma transport's device-free logic, for real: endpoint descriptions (encoded, decoded, refused when
malformed or oversized), the ``ibv_send_wr``/``ibv_sge`` chains the Cython hot path fills for a plan (read
back from the C structs, never posted), selective signalling, batch splitting over queue pairs, the
completion bookkeeping, the bounds checked before posting, the meaning of each completion status, and the
fallback to tcp with its one line.  Nothing here touches an RDMA device; tests/test_rdma_device.py does,
where one exists."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mooncakefs.errors import (
    AddressNotRegistered,
    BadEndpoint,
    EtcdError,
    InvalidArgument,
    OutOfBounds,
    PathFailed,
    TransferError,
    Unavailable,
)
from mooncakefs.transfer import READ, WRITE, Engine, Region, Router, Transfer, paths, rdma
from mooncakefs.transfer.core import path_failure
from mooncakefs.transfer.metadata import SegmentDescriptor
from mooncakefs.transfer.tcp import TcpTransport
from mooncakefs.wire import Op

PORT = rdma.PortInfo("mlx5_0", 1, 7, "fe80:0000:0000:0000:0202:c9ff:fe00:0001", 3, "Ethernet", 5)


def hot_path() -> Any:
    return pytest.importorskip(
        "mooncakefs.transfer._rdma", reason="built only where infiniband/verbs.h exists (apt install libibverbs-dev)"
    )


def endpoint(**changes: Any) -> dict[str, Any]:
    """A valid encoded endpoint, with top-level fields replaced."""
    record = rdma.Endpoint(
        PORT, (rdma.QpInfo(0x11, 5), rdma.QpInfo(0x12, 0xFFFFFF)), (rdma.RemoteRegion(0x10000, 4096, True, 77),)
    ).encode()
    record.update(changes)
    return record


# ------------------------------------------------------------------------------ endpoint descriptions


def test_endpoint_round_trips_through_msgpack_and_json() -> None:
    ep = rdma.Endpoint(
        PORT,
        (rdma.QpInfo(0x11, 5), rdma.QpInfo(0x12, 0xFFFFFF)),
        (rdma.RemoteRegion(0x10000, 4096, True, 77), rdma.RemoteRegion(0x7F0000000000, 1 << 30, False, 0xFFFFFFFF)),
    )
    record = ep.encode()
    assert record["v"] == rdma.ENDPOINT_VERSION and record["port"]["gid"] == "fe800000000000000202c9fffe000001"
    for wire in (msgpack.unpackb(msgpack.packb(record)), json.loads(json.dumps(record))):
        back = rdma.Endpoint.decode(wire, "peer")
        assert back.qps == ep.qps and back.regions == ep.regions
        assert back.port == rdma.PortInfo("mlx5_0", 1, 7, "fe800000000000000202c9fffe000001", 3, "Ethernet", 5)
    assert rdma.gid_bytes(PORT.gid) == bytes.fromhex("fe800000000000000202c9fffe000001")


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ("not a map", "expected a description"),
        (endpoint(v=2), "endpoint version 2, this engine reads 1"),
        ({k: v for k, v in endpoint().items() if k != "qps"}, "missing qps"),
        (endpoint(extra=1), "unknown extra"),
        (endpoint(qps=[]), "1 to 64 queue pairs, not 0 entries"),
        (endpoint(qps=[[1, 2]] * (rdma.MAX_QPS + 1)), "1 to 64 queue pairs, not 65 entries"),
        (endpoint(qps=[[1 << 24, 0]]), "is not 24 bits"),
        (endpoint(qps=[[0, 0]]), "is not 24 bits"),  # qp number 0 is the subnet manager's
        (endpoint(qps=[["1", 2]]), "is not [qp number, psn]"),
        (endpoint(regions=[[1, 2, 1, 3]] * (rdma.MAX_REGIONS + 1)), "at most 65536, not 65537 entries"),
        (endpoint(regions=[[0, 4096, 1, 3]]), "is not a range of memory"),
        (endpoint(regions=[[(1 << 64) - 4096, 8192, 1, 3]]), "is not a range of memory"),
        (endpoint(regions=[[4096, 4096, 2, 3]]), "writable 2 or rkey 3 out of range"),
        (endpoint(regions=[[4096, 4096, 1, 1 << 32]]), "out of range"),
        (endpoint(regions={"a": 1}), "regions are a list"),
        (endpoint(port={**PORT.encode(), "gid": "fe80::1"}), "a GID is 16 bytes in hex"),
        (endpoint(port={**PORT.encode(), "mtu": 6}), "mtu must be an int from 1 to 5"),
        (endpoint(port={**PORT.encode(), "lid": -1}), "lid must be an int from 0 to 65535"),
        (endpoint(port={**PORT.encode(), "port": True}), "port must be an int"),
        (endpoint(port={**PORT.encode(), "link_layer": "iWARP"}), "neither of InfiniBand, Ethernet"),
        (endpoint(port={**PORT.encode(), "device": "x" * 65}), "1 to 64 characters"),
        (endpoint(port={**PORT.encode(), "device": "../mlx5"}), "is not a device name"),
    ],
)
def test_malformed_or_oversized_endpoints_are_refused_saying_what(record: Any, says: str) -> None:
    with pytest.raises(BadEndpoint, match=r"rdma endpoint from 10\.0\.0\.5:7000") as refused:
        rdma.Endpoint.decode(record, "rdma endpoint from 10.0.0.5:7000")
    assert says in str(refused.value)
    assert isinstance(refused.value, InvalidArgument)  # a refusal: no other path is tried with it


def test_an_oversized_endpoint_still_fits_one_frame() -> None:
    """The limits keep the largest valid endpoint under the wire's meta limit, so a peer at the limit is
    refused by BadEndpoint's clear message, never by a frame error."""
    from mooncakefs.wire import MAX_META

    big = endpoint(
        qps=[[(1 << 24) - 1, (1 << 24) - 1]] * rdma.MAX_QPS,
        regions=[[(1 << 63) + i * 4096, 4096, 1, 0xFFFFFFFF] for i in range(rdma.MAX_REGIONS)],
    )
    assert len(msgpack.packb(["mlx5_0", big])) < MAX_META
    assert len(rdma.Endpoint.decode(big, "peer").regions) == rdma.MAX_REGIONS


def test_advertised_ports_are_versioned_and_checked() -> None:
    records = rdma.encode_ports([PORT])
    assert records[0]["v"] == 1 and rdma.decode_ports(records, "peer")[0].device == "mlx5_0"
    with pytest.raises(BadEndpoint, match="not a version 1 description"):
        rdma.decode_ports([{**records[0], "v": 9}], "peer")
    with pytest.raises(BadEndpoint, match="at most 64"):
        rdma.decode_ports(records * 65, "peer")
    # the etcd descriptor carries them too: a malformed one makes the descriptor unreadable, clearly
    good = SegmentDescriptor("a:1", "rdma", ["a:1"], [], records).encode()
    assert SegmentDescriptor.decode("a:1", json.dumps(good).encode()).rdma == records
    bad = {**good, "rdma": [{**records[0], "mtu": 0}]}
    with pytest.raises(EtcdError, match="mtu must be an int from 1 to 5"):
        SegmentDescriptor.decode("a:1", json.dumps(bad).encode())


# ------------------------------------------------------------------------------ plans and chains


def test_a_large_transfer_is_split_across_queue_pairs() -> None:
    reqs = [rdma.Request(0x100000, 7, 0x900000, 9, 1 << 20), rdma.Request(0x300000, 7, 0xA00000, 9, 100)]
    p = rdma.plan(reqs, qps=4, slice_size=64 << 10)
    per_qp = [sum(wr[5] for chain in qp for wr in chain) for qp in p.chains]
    assert per_qp == [4 * 65536 + 100, 4 * 65536, 4 * 65536, 4 * 65536]  # 17 slices dealt out in turn
    slices = sorted((wr[1], wr[3], wr[5]) for qp in p.chains for chain in qp for wr in chain)
    assert slices[:2] == [(0x100000, 0x900000, 65536), (0x110000, 0x910000, 65536)]
    assert slices[-1] == (0x300000, 0xA00000, 100)  # addresses advance together: local and remote offsets match
    assert sum(n for covers in p.covers.values() for _i, n in covers) == (1 << 20) + 100
    assert len(p.slices) == p.work_requests == 17


def test_signalling_every_k_and_the_last_of_each_chain() -> None:
    reqs = [rdma.Request(0, 1, 0, 2, 64 * 45)]
    p = rdma.plan(reqs, qps=1, slice_size=64, max_chain=20, signal_every=8)
    flags = [[wr[6] for wr in chain] for chain in p.chains[0]]
    assert [len(c) for c in flags] == [20, 20, 5]
    signalled = [i for i, f in enumerate(f for chain in flags for f in chain) if f]
    assert signalled == [7, 15, 19, 23, 31, 39, 44]  # every 8th of the queue pair, and each chain's last
    # each signalled completion vouches for the slices since the previous one: all 45, once each
    assert [len(p.covers[i + 1]) for i in signalled] == [8, 8, 4, 4, 8, 8, 5]


def test_chains_are_built_as_verbs_structs_without_posting() -> None:
    """The C structs ``post_chain`` would hand to ``ibv_post_send``, read back: linked in order, one sge
    each with the local address, length and lkey, the remote address and rkey, the opcode, and
    IBV_SEND_SIGNALED exactly where the plan signals."""
    _rdma = hot_path()
    reqs = [
        rdma.Request(0x7000_0000, 0x11, 0x5000_0000, 0x22, 300),
        rdma.Request(0x7100_0000, 0x11, 0x5100_0000, 0x33, 50),
    ]
    p = rdma.plan(reqs, qps=2, slice_size=100, max_chain=2, signal_every=3)
    for write, opcode in ((True, _rdma.OPCODES["IBV_WR_RDMA_WRITE"]), (False, _rdma.OPCODES["IBV_WR_RDMA_READ"])):
        for qp in p.chains:
            for chain in qp:
                built = _rdma.build_chain(write, chain)
                assert [w["next"] for w in built] == [*range(1, len(chain)), -1]
                for i, (w, planned) in enumerate(zip(built, chain, strict=True)):
                    wr_id, laddr, lkey, raddr, rkey, length, signalled = planned
                    assert (w["wr_id"], w["addr"], w["lkey"], w["remote_addr"], w["rkey"], w["length"]) == (
                        wr_id, laddr, lkey, raddr, rkey, length
                    )  # fmt: skip
                    assert w["opcode"] == opcode and w["num_sge"] == 1 and w["sg_list"] == i
                    assert w["send_flags"] == (_rdma.SEND_SIGNALED if signalled else 0)
    first = _rdma.build_chain(True, p.chains[0][0])
    assert [(w["addr"], w["length"], w["rkey"]) for w in first] == [(0x7000_0000, 100, 0x22), (0x7000_00C8, 100, 0x22)]
    assert _rdma.build_chain(True, []) == []
    with pytest.raises(ValueError, match="does not fit one ibv_sge"):
        _rdma.build_chain(True, [(1, 0x1000, 1, 0x2000, 2, 1 << 32, True)])
    with pytest.raises(ValueError, match="does not fit one ibv_sge"):
        _rdma.build_chain(False, [(1, 0x1000, 1, 0x2000, 2, 0, True)])


class ScriptedQueuePairs:
    """Stands in for posting and polling so ``run_plan``'s bookkeeping can be checked: it records what is
    posted and completes each signalled work request (in order per queue pair) on the next poll, or fails
    the one named ``fail``.  It moves no bytes and proves nothing about a device."""

    def __init__(self, fail: int = -1, fail_status: int = 12) -> None:
        self.posted: list[tuple[int, list[rdma.WorkRequest]]] = []
        self.outstanding: dict[int, int] = {}
        self.most: dict[int, int] = {}
        self.queued: list[tuple[int, int, int, int]] = []
        self.fail, self.fail_status = fail, fail_status

    def post(self, qp: int, write: bool, chain: list[rdma.WorkRequest]) -> int:
        self.posted.append((qp, chain))
        self.outstanding[qp] = self.outstanding.get(qp, 0) + len(chain)
        self.most[qp] = max(self.most.get(qp, 0), self.outstanding[qp])
        unsignalled = 0
        for wr in chain:
            unsignalled += 1
            if wr[0] == self.fail:
                self.queued.append((wr[0], self.fail_status, 0x81, 0))
            elif wr[6]:
                self.queued.append((wr[0], 0, qp, unsignalled))  # (status 0, and how many it frees)
                unsignalled = 0
        return len(chain)

    def poll(self, cq: int, max_entries: int, timeout: float) -> list[tuple[int, int, int, int]]:
        out, self.queued = self.queued[:max_entries], self.queued[max_entries:]
        for _wr, status, qp, freed in out:
            if status == 0:
                self.outstanding[qp] -= freed
        return out


def run(p: rdma.Plan, qps: ScriptedQueuePairs, depth: int, covered: Callable[[int, int], None]) -> Any:
    return rdma.run_plan(
        p, True, [101, 102], 9, depth=depth, deadline=float("inf"), post=qps.post, poll=qps.poll, covered=covered
    )


def test_run_plan_keeps_each_send_queue_within_its_depth_and_covers_every_byte_once() -> None:
    reqs = [rdma.Request(0x1000 * (i + 1), 1, 0x9000 * (i + 1), 2, 64 * 37) for i in range(3)]
    p = rdma.plan(reqs, qps=2, slice_size=64, max_chain=8, signal_every=4)
    qps, done = ScriptedQueuePairs(), [0, 0, 0]
    assert run(p, qps, 16, lambda i, n: done.__setitem__(i, done[i] + n)) is None
    assert done == [64 * 37] * 3
    assert sorted(wr[0] for _qp, chain in qps.posted for wr in chain) == sorted(p.slices)
    assert max(qps.most.values()) <= 16
    with pytest.raises(ValueError, match="longer than the send queue"):
        run(p, ScriptedQueuePairs(), 4, lambda i, n: None)


def test_run_plan_stops_at_its_deadline_or_when_cancelled() -> None:
    """A completion that never comes ends in TimeoutError at the deadline, or InterruptedError once the
    transport is closing: the caller then destroys the queue pairs before telling the batch."""
    p = rdma.plan([rdma.Request(0x1000, 1, 0x9000, 2, 640)], qps=2, slice_size=64)
    silent = ScriptedQueuePairs()
    silent.poll = lambda cq, n, timeout: []  # type: ignore[method-assign]
    with pytest.raises(TimeoutError, match="had not completed by the deadline"):
        rdma.run_plan(p, True, [1, 2], 9, depth=64, deadline=0.0, post=silent.post, poll=silent.poll, covered=print)
    with pytest.raises(InterruptedError, match="the transport closed with 2 signalled work requests outstanding"):
        rdma.run_plan(
            p,
            False,
            [1, 2],
            9,
            depth=64,
            deadline=float("inf"),
            post=silent.post,
            poll=silent.poll,
            covered=print,
            cancelled=lambda: True,
        )


def test_a_failed_completion_names_its_request() -> None:
    _rdma = hot_path()
    reqs = [rdma.Request(0x1000, 1, 0x9000, 2, 640), rdma.Request(0x5000, 1, 0xD000, 2, 640)]
    p = rdma.plan(reqs, qps=2, slice_size=64, max_chain=4, signal_every=2)
    victim = next(wr_id for wr_id, (index, _n) in sorted(p.slices.items()) if index == 1)
    status = _rdma.WC_STATUS["IBV_WC_RETRY_EXC_ERR"]
    failed = run(p, ScriptedQueuePairs(fail=victim, fail_status=status), 64, lambda i, n: None)
    assert failed == (victim, status, 0x81)
    error = rdma.completion_error(
        "IBV_WC_RETRY_EXC_ERR", _rdma.status_text(status), 0x81, victim, p, reqs, True, "10.0.0.5:7000"
    )
    assert isinstance(error, PathFailed) and path_failure(error)
    assert "rdma write of 640 bytes (request 1 of the batch: local 0x5000, 10.0.0.5:7000 0xd000)" in str(error)
    assert "transport retry counter exceeded (IBV_WC_RETRY_EXC_ERR, vendor error 0x81)" in str(error)


def test_completion_statuses_split_into_refusals_and_path_failures() -> None:
    """libibverbs' own status values and words (ibv_wc_status_str needs no device): an access or protection
    error refuses the request (no other path is tried); retries exhausted, a flush or a fatal error fail
    the path, and the router moves the transfer to the next one."""
    _rdma = hot_path()
    assert _rdma.WC_STATUS["IBV_WC_SUCCESS"] == 0 and _rdma.status_text(_rdma.WC_STATUS["IBV_WC_SUCCESS"]) == "success"
    p = rdma.plan([rdma.Request(0x1000, 1, 0x9000, 2, 64)], qps=1)
    reqs = [rdma.Request(0x1000, 1, 0x9000, 2, 64)]

    def error(name: str) -> Exception:
        return rdma.completion_error(name, _rdma.status_text(_rdma.WC_STATUS[name]), 0, 1, p, reqs, False, "peer:1")

    assert set(rdma.REFUSED) <= set(_rdma.WC_STATUS)
    remote = error("IBV_WC_REM_ACCESS_ERR")
    assert isinstance(remote, AddressNotRegistered) and not path_failure(remote)
    assert "the peer's device refused the memory" in str(remote) and "remote access error" in str(remote)
    assert "this engine's device" in str(error("IBV_WC_LOC_PROT_ERR"))
    assert type(error("IBV_WC_REM_INV_REQ_ERR")) is TransferError
    for name in ("IBV_WC_RETRY_EXC_ERR", "IBV_WC_RNR_RETRY_EXC_ERR", "IBV_WC_FATAL_ERR", "IBV_WC_WR_FLUSH_ERR"):
        assert path_failure(error(name)), name
    assert "an earlier request on its queue pair failed" in str(error("IBV_WC_WR_FLUSH_ERR"))
    stray = rdma.completion_error("IBV_WC_FATAL_ERR", "fatal", 0, 999, p, reqs, True, "peer:1")
    assert "work request 999, not one of this batch's" in str(stray)


# ------------------------------------------------------------------------------ bounds, before posting


def test_remote_ranges_are_checked_against_the_advertised_regions() -> None:
    fetched: list[int] = []
    later = [rdma.RemoteRegion(0x10000, 4096, True, 5), rdma.RemoteRegion(0x40000, 8192, True, 9)]

    def fetch() -> list[rdma.RemoteRegion]:
        fetched.append(1)
        return later

    regions = rdma.RemoteRegions(
        [rdma.RemoteRegion(0x10000, 4096, True, 5), rdma.RemoteRegion(0x20000, 4096, False, 6)], fetch
    )
    assert regions.rkey(0x10000, 4096, True) == 5 and regions.rkey(0x20800, 100, False) == 6
    assert not fetched
    with pytest.raises(OutOfBounds, match="run past the end of the peer's registered 0x10000"):
        regions.rkey(0x10F00, 0x200, False)
    # a refusal asks the peer once more first: here it registered 0x40000 since, and dropped 0x20000
    assert len(fetched) == 1
    assert regions.rkey(0x40000, 8192, True) == 9 and len(fetched) == 1
    with pytest.raises(AddressNotRegistered, match="not in memory the peer registered"):
        regions.rkey(0x20000, 16, False)
    assert len(fetched) == 2
    regions = rdma.RemoteRegions(
        [rdma.RemoteRegion(0x20000, 4096, False, 6)], lambda: [rdma.RemoteRegion(0x20000, 4096, False, 6)]
    )
    with pytest.raises(AddressNotRegistered, match="read-only"):
        regions.rkey(0x20000, 16, True)


# ------------------------------------------------------------------------------ choosing rdma, or not


def fake_device(root: Path, name: str) -> str:
    """A sysfs-shaped tree listing an active RDMA device that libibverbs cannot open (it is not there):
    what the engine sees when the kernel lists a device its verbs library has no provider for."""
    port = root / "class" / "infiniband" / name / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "link_layer").write_text("Ethernet\n")
    return str(root)


def test_auto_falls_back_to_tcp_saying_why_when_a_listed_device_does_not_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device in sysfs that pyverbs (really) fails to open: ``auto`` uses tcp with one line naming the
    device and the reason, ``rdma`` is refused with the same reason."""
    monkeypatch.setattr(paths, "SYSFS", fake_device(tmp_path, "mcfake0"))
    caplog.set_level(logging.INFO, logger="mooncakefs.transfer")
    with Engine("127.0.0.1", protocol="auto") as e:
        assert e.protocol == "tcp" and e._rdma is None
    lines = [r.getMessage() for r in caplog.records if "using tcp" in r.getMessage()]
    assert len(lines) == 1
    assert "RDMA devices mcfake0 found, but" in lines[0]
    assert "cannot open RDMA device 'mcfake0'" in lines[0] or not rdma.available()
    with pytest.raises(paths.DeviceNotFound, match="RDMA devices mcfake0 found, but"):
        Engine("127.0.0.1", protocol="rdma")


def test_a_tcp_engine_advertises_no_rdma_and_refuses_rdma_set_up() -> None:
    """The MAP reply's rdma section is empty without a device, and RDMA_CONNECT gets a clear refusal on
    the same authenticated connection (which stays usable)."""
    with Engine("127.0.0.1", protocol="tcp") as target, Engine("127.0.0.1", protocol="tcp") as initiator:
        channel = initiator._connect(target.session_id)
        try:
            channel.send(Op.MAP)
            info, _n = channel.read_reply()
            assert len(info) == 9 and info[8] is None
            channel.send(Op.RDMA_CONNECT, ["mlx5_0", endpoint()])
            with pytest.raises(InvalidArgument, match="has no rdma device: use tcp"):
                channel.read_reply()
            channel.send(Op.RDMA_REGIONS, [])
            with pytest.raises(InvalidArgument, match="RDMA_REGIONS before RDMA_CONNECT"):
                channel.read_reply()
            channel.send(Op.PING)
            assert channel.read_reply()[0] == []
        finally:
            channel.close()
        assert initiator.paths(target.session_id) == ["local", "tcp"]


class KeysOnly:
    """Stands in for a ``VerbsDevice`` in a test that never reaches a verbs call: a name, a port, and an
    (lkey, rkey) for whatever the engine registered.  It proves nothing about RDMA; it lets the real
    transport decide which transfers it accepts and fail its path before touching a device."""

    name = "standin0"
    info = PORT

    def keys(self, addr: int) -> tuple[int, int]:
        return 1, 2


def test_a_failed_rdma_path_hands_its_transfers_to_tcp(caplog: pytest.LogCaptureFixture) -> None:
    """The rdma path cannot reach the peer (its control connection is refused): the router moves the
    transfer to the tcp path, which delivers it, with one line naming the failed path."""
    caplog.set_level(logging.WARNING, logger="mooncakefs.transfer")
    with Engine("127.0.0.1", protocol="tcp") as target, Engine("127.0.0.1", protocol="tcp") as initiator:
        remote = target.allocate(1 << 16)
        local = bytearray(b"r" * (1 << 16))
        initiator.register(local)

        def refused() -> Any:
            raise Unavailable("connection refused (on purpose)")

        path = rdma.RdmaTransport(KeysOnly(), initiator.registry, refused, PORT, peer=target.session_id)  # type: ignore[arg-type]
        tcp = TcpTransport(lambda: initiator._connect(target.session_id), connections=1)
        router = Router([path, tcp], peer=target.session_id)
        try:
            assert router.run([Transfer(WRITE, memoryview(local), Region(remote, len(local)))], timeout=60) == len(
                local
            )
            assert bytes(target.view(remote, len(local))) == bytes(local) and path.posted == path.moved == 0
            # a buffer not registered here is not even offered to the rdma path
            assert not path.accepts(Transfer(WRITE, memoryview(bytearray(16)), Region(remote, 16)))
        finally:
            router.close()
    lines = [r.getMessage() for r in caplog.records if "go to the next path" in r.getMessage()]
    assert len(lines) == 1 and "rdma standin0 to" in lines[0] and "connection refused (on purpose)" in lines[0]


def test_a_read_goes_by_rdma_only_into_memory_registered_writable() -> None:
    """An rdma read lands in local memory by the NIC, which a memory region registered read-only (no local
    write access) refuses: such a read is left to tcp, while a write from that memory still goes by rdma."""
    with Engine("127.0.0.1", protocol="tcp") as engine:
        read_only, writable = bytearray(4096), bytearray(4096)
        engine.register(read_only, writable=False)
        engine.register(writable)
        path = rdma.RdmaTransport(KeysOnly(), engine.registry, lambda: None, PORT, peer="peer")  # type: ignore[arg-type]
        remote = Region(0x7F0000000000, 4096)
        try:
            assert not path.accepts(Transfer(READ, memoryview(read_only), remote))
            assert path.accepts(Transfer(WRITE, memoryview(read_only), remote))
            assert path.accepts(Transfer(READ, memoryview(writable), remote))
        finally:
            path.close()
