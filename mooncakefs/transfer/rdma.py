"""The ``rdma`` transport: libibverbs, planned here, posted and polled in Cython (``_rdma.pyx``).

What exists: ``plan`` cuts a batch into work requests (slices of at most ``slice_size``, spread round-robin
over queue pairs, chained ``max_chain`` to a post, every ``signal_every``-th and the last of each chain
signalled), and says which transfer bytes each signalled completion vouches for (a queue pair completes
in order, so one signalled completion covers the unsignalled ones before it).  ``_rdma.post_chain``
posts such a chain with one ``ibv_post_send``; ``_rdma.poll`` polls a completion queue with the GIL
released.  Both build against Debian's libibverbs-dev; without a device only their refusals of
missing queues are tested.

The set-up goes through pyverbs (``load_pyverbs``: the ``pyverbs`` package, or Debian's
``python3-pyverbs`` where its extension modules fit this interpreter): ``VerbsDevice`` opens a device's
context, allocates a protection domain, registers memory regions (their lkey and rkey) and reads the
port's LID and GID, which is what a peer needs in the segment descriptor.  pyverbs exposes the
protection domain's pointer (``PD.pd``) but not a queue pair's, so the completion queues and RC queue
pairs the hot path posts on are made in ``_rdma.pyx`` on that protection domain (``create_cq``,
``create_rc_qp``) and taken through INIT, RTR and RTS with the peer's numbers (``connect_rc_qp``).

None of that has run on an RDMA device (there is none here): the verbs calls are checked by the compiler
against verbs.h, and their argument checks by the tests.  What does not exist yet: publishing each
device's queue-pair numbers and rkeys in the segment descriptor (its ``rdma`` field), and the transport
that drives ``plan``/``post_chain``/``poll``.  Until then ``available()`` is False and
``protocol="auto"`` uses tcp, saying why; ``protocol="rdma"`` is refused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from mooncakefs.errors import AddressNotRegistered, InvalidArgument, MooncakeError
from mooncakefs.transfer.paths import DeviceNotFound

DEBIAN_PYVERBS = "/usr/lib/python3/dist-packages/pyverbs"  # apt install python3-pyverbs

SLICE = 64 << 10  # Mooncake's MC_SLICE_SIZE: large transfers are cut so every queue pair and NIC gets a share
MAX_CHAIN = 32  # work requests per ibv_post_send
SIGNAL_EVERY = 16  # one signalled work request per this many (and the last of every chain)


@dataclass(frozen=True, slots=True)
class Request:
    """One transfer as the rdma transport sees it: local (address, lkey), remote (address, rkey), length."""

    laddr: int
    lkey: int
    raddr: int
    rkey: int
    length: int


@dataclass(slots=True)
class Plan:
    """Per queue pair, its chains of work requests ``(wr_id, laddr, lkey, raddr, rkey, length, signalled)``;
    ``covers[wr_id]``: the (request index, bytes) a signalled completion vouches for."""

    chains: list[list[list[tuple[int, int, int, int, int, int, bool]]]]
    covers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def work_requests(self) -> int:
        return sum(len(c) for qp in self.chains for c in qp)


def plan(
    requests: Sequence[Request],
    qps: int,
    *,
    slice_size: int = SLICE,
    max_chain: int = MAX_CHAIN,
    signal_every: int = SIGNAL_EVERY,
    first_id: int = 1,
) -> Plan:
    """Work requests for a batch.  Slices go round-robin over ``qps`` queue pairs, so one large transfer
    is split across every queue pair (and the NICs behind them)."""
    if qps < 1 or slice_size < 1 or max_chain < 1 or signal_every < 1:
        raise ValueError("qps, slice_size, max_chain and signal_every must be positive")
    per_qp: list[list[tuple[int, int, int, int, int, int]]] = [[] for _ in range(qps)]
    slices: dict[int, tuple[int, int]] = {}
    wr_id, turn = first_id, 0
    for index, r in enumerate(requests):
        if r.length < 0:
            raise ValueError(f"request {index} has a negative length")
        for off in range(0, r.length, slice_size):
            n = min(slice_size, r.length - off)
            per_qp[turn % qps].append((wr_id, r.laddr + off, r.lkey, r.raddr + off, r.rkey, n))
            slices[wr_id] = (index, n)
            wr_id += 1
            turn += 1
    out = Plan([[] for _ in range(qps)])
    for q, wrs in enumerate(per_qp):
        pending: list[tuple[int, int]] = []
        for start in range(0, len(wrs), max_chain):
            chain = []
            part = wrs[start : start + max_chain]
            for i, wr in enumerate(part):
                pending.append(slices[wr[0]])
                signalled = i == len(part) - 1 or (start + i + 1) % signal_every == 0
                chain.append((*wr, signalled))
                if signalled:
                    out.covers[wr[0]] = pending
                    pending = []
            out.chains[q].append(chain)
    return out


# -- set-up through pyverbs ------------------------------------------------------------------------------


@functools.cache
def load_pyverbs() -> ModuleType | None:
    """pyverbs, imported: the installed package, or else Debian's ``python3-pyverbs`` loaded from where
    apt puts it, when its extension modules were built for this interpreter's ABI (Debian's python3 and
    another CPython of the same minor version share it).  None when neither is there."""
    with contextlib.suppress(ImportError):
        return importlib.import_module("pyverbs")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]  # ".cpython-311-x86_64-linux-gnu.so"
    init = os.path.join(DEBIAN_PYVERBS, "__init__.py")
    if not os.path.exists(os.path.join(DEBIAN_PYVERBS, "device" + suffix)) or not os.path.exists(init):
        return None
    spec = importlib.util.spec_from_file_location("pyverbs", init, submodule_search_locations=[DEBIAN_PYVERBS])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyverbs"] = module  # its submodules (pyverbs.device, ...) resolve through its path
    try:
        spec.loader.exec_module(module)
        importlib.import_module("pyverbs.device")
    except ImportError:
        sys.modules.pop("pyverbs", None)
        return None
    return module


def pyverbs_status() -> str:
    """Where pyverbs comes from here, or why there is none, in words."""
    module = load_pyverbs()
    if module is None:
        return (
            "pyverbs is not installed (apt install python3-pyverbs where Debian's python is "
            f"{sys.version_info.major}.{sys.version_info.minor}, as tools/install-deps.sh does; PyPI's pyverbs "
            "did not build here, see docs/architecture.md)"
        )
    return f"pyverbs from {os.path.dirname(module.__file__ or '?')}"


@dataclass(frozen=True, slots=True)
class PortInfo:
    """What a peer needs to reach one device's port: published in the segment descriptor's ``rdma``."""

    device: str
    port: int
    lid: int
    gid: str
    gid_index: int
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    mtu: int  # the active MTU enum (1: 256 B ... 5: 4096 B)


class VerbsDevice:
    """One RDMA device opened with pyverbs: its context, a protection domain, and a memory region per
    registered range (``register`` gives its lkey and rkey).  ``pd_pointer`` is the ``ibv_pd *`` the
    queue pairs of the hot path are to be created on."""

    def __init__(self, name: str, port: int = 1, gid_index: int | None = None) -> None:
        if load_pyverbs() is None:
            raise DeviceNotFound(f"cannot open RDMA device {name!r}: {pyverbs_status()}")
        from pyverbs.device import Context
        from pyverbs.pd import PD
        from pyverbs.pyverbs_error import PyverbsError

        self.name, self.port = name, port
        self.gid_index = gid_index if gid_index is not None else int(os.environ.get("MC_GID_INDEX", "0"))
        self._mrs: dict[int, Any] = {}
        try:
            self.context = Context(name=name)
        except PyverbsError as exc:
            raise DeviceNotFound(f"cannot open RDMA device {name!r}: {exc}") from None
        try:
            self.pd = PD(self.context)
            attr = self.context.query_port(port)
            gid = self.context.query_gid(port, self.gid_index)
        except PyverbsError as exc:
            self.context.close()
            raise DeviceNotFound(f"RDMA device {name!r} port {port}: {exc}") from None
        link = "Ethernet" if getattr(attr, "link_layer", 0) == 2 else "InfiniBand"  # IBV_LINK_LAYER_ETHERNET
        self.info = PortInfo(name, port, attr.lid, str(gid), self.gid_index, link, attr.active_mtu)

    @property
    def pd_pointer(self) -> int:
        return int(self.pd.pd)

    def register(self, addr: int, length: int, writable: bool = True) -> tuple[int, int]:
        """Register ``[addr, addr + length)`` as a memory region peers may read (and write); (lkey, rkey)."""
        from pyverbs import enums
        from pyverbs.mr import MR
        from pyverbs.pyverbs_error import PyverbsError

        if addr in self._mrs:
            raise InvalidArgument(f"{addr:#x} is registered with {self.name} already")
        access = enums.IBV_ACCESS_LOCAL_WRITE | enums.IBV_ACCESS_REMOTE_READ
        if writable:
            access |= enums.IBV_ACCESS_REMOTE_WRITE
        try:
            mr = MR(self.pd, length, access, address=addr)
        except PyverbsError as exc:
            raise MooncakeError(f"{self.name} could not register {length} bytes at {addr:#x}: {exc}") from None
        self._mrs[addr] = mr
        return mr.lkey, mr.rkey

    def unregister(self, addr: int) -> None:
        mr = self._mrs.pop(addr, None)
        if mr is None:
            raise AddressNotRegistered(f"no memory region at {addr:#x} on {self.name}")
        mr.close()

    def close(self) -> None:
        for mr in self._mrs.values():
            mr.close()
        self._mrs.clear()
        self.pd.close()
        self.context.close()


def unavailable_reason() -> str:
    return (
        "mooncakefs's rdma transport has its posting, polling and set-up (pyverbs context, protection domain "
        f"and memory regions, {pyverbs_status()}; RC queue pairs) but not yet the queue-pair exchange and "
        "the transport that drives them"
    )


def available() -> bool:
    return False
