"""The rdma transport on a real device: two processes, queue pairs connected through the handshake, RDMA
WRITE and READ checked byte for byte on both sides, and the refusals (out of bounds, unregistered) made
before anything is posted.  These run only where /sys/class/infiniband lists an active device (a real NIC,
or soft-RoCE: ``rdma link add rxe0 type rxe netdev eth0``) and the rdma transport can run (its Cython hot
path built, pyverbs loaded); elsewhere they are skipped with that reason.  Nothing here is simulated."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from te_peer import SIZE, pattern
from test_transfer_engine import Peer

from mooncakefs import _engine
from mooncakefs.errors import AddressNotRegistered, OutOfBounds
from mooncakefs.transfer import Engine, paths, rdma

MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(
        not paths.rdma_devices(),
        reason="no RDMA device in /sys/class/infiniband (soft-RoCE: rdma link add rxe0 type rxe netdev eth0)",
    ),
    pytest.mark.skipif(not rdma.available(), reason=f"the rdma transport cannot run here: {rdma.unavailable_reason()}"),
]


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(protocol="rdma")
    yield p
    p.kill()


@pytest.fixture
def initiator() -> Iterator[Engine]:
    """An engine that must use rdma towards other processes (same_host=False: no memfd shortcut)."""
    with Engine("127.0.0.1", protocol="rdma", same_host=False) as e:
        yield e


def rdma_path(engine: Engine, session: str) -> rdma.RdmaTransport:
    transports = engine._peer(session).transports
    assert transports[0].name == "rdma", engine.routes(session)
    path = transports[0]
    assert isinstance(path, rdma.RdmaTransport)
    return path


def test_two_processes_write_and_read_over_rdma(peer: Peer, initiator: Engine) -> None:
    assert peer.protocol == "rdma" and initiator.protocol == "rdma"
    path = rdma_path(initiator, peer.session)
    n = 8 * MiB + 4096 + 13  # several slices on every queue pair, and an odd tail
    local = pattern(n, seed=11)
    initiator.register(local)
    assert initiator.write(peer.session, local.ctypes.data, peer.managed, n) == n
    expected = np.zeros(SIZE, dtype=np.uint8)
    expected[:n] = local
    assert peer.crc()["managed"] == _engine.crc32c(expected)
    back = np.zeros(n, dtype=np.uint8)
    initiator.register(back)
    assert initiator.read(peer.session, back.ctypes.data, peer.addr + 4096, n) == n
    assert np.array_equal(back, pattern(SIZE)[4096 : 4096 + n])
    assert path.moved == 2 * n and path.posted >= 2 * n // rdma.SLICE  # the bytes went by rdma, not tcp
    # a batch of small transfers in one post/poll round
    blocks = [initiator.view(back.ctypes.data + i * 4096, 4096) for i in range(32)]
    initiator.transfer(peer.session, "write", blocks, [peer.managed + i * 8192 for i in range(32)])
    got = np.zeros(32 * 4096, dtype=np.uint8)
    initiator.register(got)
    initiator.transfer(
        peer.session,
        "read",
        [got.ctypes.data + i * 4096 for i in range(32)],
        [peer.managed + i * 8192 for i in range(32)],
        [4096] * 32,
    )
    assert np.array_equal(got, back[: 32 * 4096])
    assert path.moved == 2 * n + 2 * 32 * 4096


def test_out_of_bounds_and_unregistered_are_refused_before_posting(peer: Peer, initiator: Engine) -> None:
    path = rdma_path(initiator, peer.session)
    local = pattern(2 * MiB, seed=5)
    initiator.register(local)
    assert initiator.write(peer.session, local.ctypes.data, peer.managed, 4096) == 4096  # connected now
    posted, before = path.posted, peer.crc()["managed"]
    with pytest.raises(OutOfBounds, match="run past the end"):
        initiator.write(peer.session, local.ctypes.data, peer.managed + SIZE - 4096, 8192)
    with pytest.raises(AddressNotRegistered, match="not in memory the peer registered"):
        initiator.read(peer.session, local.ctypes.data, peer.managed + SIZE + 64 * MiB, 4096)
    assert path.posted == posted and peer.crc()["managed"] == before  # nothing posted, nothing touched
    # memory the peer unregistered is refused too: the cached table still lists it, so the write is
    # posted, and the peer's NIC refuses it (its memory region is gone: a remote access error)
    extra = peer.ask(f"register {MiB}")["addr"]
    assert initiator.write(peer.session, local.ctypes.data, extra, MiB) == MiB
    assert peer.ask(f"unregister {extra}")["rc"] == 0
    with pytest.raises(AddressNotRegistered):
        initiator.write(peer.session, local.ctypes.data, extra, MiB)


def test_an_unregistered_local_buffer_goes_by_tcp(peer: Peer, initiator: Engine) -> None:
    """rdma moves only registered memory (its lkey): a plain bytes object is carried by the tcp path."""
    path = rdma_path(initiator, peer.session)
    data = bytes(pattern(MiB, seed=9))
    assert initiator.write(peer.session, data, peer.managed) == MiB
    assert path.moved == 0
    expected = np.zeros(SIZE, dtype=np.uint8)
    expected[:MiB] = np.frombuffer(data, dtype=np.uint8)
    assert peer.crc()["managed"] == _engine.crc32c(expected)
