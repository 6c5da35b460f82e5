"""The ``rdma`` transport: libibverbs, planned and driven here, posted and polled in Cython (``_rdma.pyx``).

A path is one local device towards one device of the peer.  On first use it opens an authenticated
control connection to the peer (the same handshake, and cluster secret, as tcp), creates a completion
queue and ``QPS_PER_PATH`` RC queue pairs, and sends ``RDMA_CONNECT`` with its *endpoint description*
(``Endpoint``: the device's port, LID, GID and MTU, each queue pair's number and starting PSN; versioned,
validated, bounded: ``BadEndpoint`` otherwise).  The peer's server makes as many queue pairs on the
named device, takes them to RTR and RTS towards ours, and answers with its own endpoint, which adds
every region it registered, with the rkey of its memory region on that device.  We take ours to RTR and
RTS; the peer's queue pairs live as long as that control connection.

A batch: each transfer's local range must lie in memory registered here (its lkey; a buffer that is
not registered is left to the next path, tcp), and its remote range inside a region the peer advertised
(checked before anything is posted: ``AddressNotRegistered`` / ``OutOfBounds``, the table asked afresh
once if the peer may have registered since).  ``plan`` cuts the batch into work requests (slices of at
most ``slice_size``, round-robin over the queue pairs, chains of ``max_chain``, every ``signal_every``-th
and the last of each chain signalled); ``run_plan`` posts chains as the send queues have room and polls
the completion queue (GIL released) until every signalled completion came.  A failed completion names
its request (``completion_error``): a protection or access error is a refusal, anything else a failure
of the path, which the router retries on the next path (another device, then tcp); the queue pairs of
a path that failed or timed out are destroyed before the batch is told, so no late DMA touches memory
the caller got back.

Set-up goes through pyverbs (``load_pyverbs``: the ``pyverbs`` package, or Debian's ``python3-pyverbs``
where its extension modules fit this interpreter): ``VerbsDevice`` opens a device's context, allocates a
protection domain, registers memory regions and reads the port.  pyverbs does not hand out a queue
pair's pointer, so completion queues and queue pairs are made in ``_rdma.pyx`` on pyverbs' protection
domain.  ``RdmaService`` is one engine's set of devices: it registers every registered range with each,
advertises the ports in the ``MAP`` reply and the etcd descriptor, and answers ``RDMA_CONNECT``.

Nothing here has run on an RDMA device (there is none where it was written): the device-free parts
(endpoints, plans, the chains ``_rdma.build_chain`` fills, the completion bookkeeping, bounds, fallback)
are tested, and tests/test_rdma_device.py runs two processes over a device where one exists.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import queue
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from mooncakefs import _engine
from mooncakefs.errors import (
    AddressNotRegistered,
    BadEndpoint,
    InvalidArgument,
    MooncakeError,
    PathFailed,
    TransferError,
    Unavailable,
)
from mooncakefs.transfer.core import WRITE, Progress, Transfer
from mooncakefs.transfer.memory import PeerTable, Registry
from mooncakefs.transfer.paths import Device, DeviceNotFound
from mooncakefs.wire import Channel, Op

log = logging.getLogger("mooncakefs.transfer")

DEBIAN_PYVERBS = "/usr/lib/python3/dist-packages/pyverbs"  # apt install python3-pyverbs

SLICE = 64 << 10  # Mooncake's MC_SLICE_SIZE: large transfers are cut so every queue pair and NIC gets a share
MAX_CHAIN = 32  # work requests per ibv_post_send
SIGNAL_EVERY = 16  # one signalled work request per this many (and the last of every chain)
QPS_PER_PATH = 2  # Mooncake's MC_NUM_QP_PER_EP
QP_DEPTH = 256  # Mooncake's MC_MAX_WR: work requests outstanding per queue pair
RD_ATOMIC = 16  # RDMA READs in flight per queue pair (as initiator, and served as responder), device allowing

ENDPOINT_VERSION = 1
MAX_QPS = 64  # queue pairs in one endpoint description
MAX_REGIONS = 65536  # registered regions in one (about 2 MiB of msgpack: under the frame's meta limit)
MAX_DEVICES = 64  # devices one engine advertises
MAX_NAME = 64  # characters of a device name
LINK_LAYERS = ("InfiniBand", "Ethernet")


@dataclass(frozen=True, slots=True)
class Request:
    """One transfer as the rdma transport sees it: local (address, lkey), remote (address, rkey), length."""

    laddr: int
    lkey: int
    raddr: int
    rkey: int
    length: int


WorkRequest = tuple[int, int, int, int, int, int, bool]  # wr_id, laddr, lkey, raddr, rkey, length, signalled


@dataclass(slots=True)
class Plan:
    """Per queue pair, its chains of work requests; ``covers[wr_id]``: the (request index, bytes) of each
    slice a signalled completion vouches for; ``slices[wr_id]``: the (request index, bytes) of every work
    request, so a failed completion names its request."""

    chains: list[list[list[WorkRequest]]]
    covers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    slices: dict[int, tuple[int, int]] = field(default_factory=dict)

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
    out = Plan([[] for _ in range(qps)], slices=slices)
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


# -- the endpoint description: what two engines exchange to connect queue pairs ---------------------------


@dataclass(frozen=True, slots=True)
class PortInfo:
    """What a peer needs to reach one device's port: advertised in ``MAP`` and the etcd descriptor."""

    device: str
    port: int
    lid: int
    gid: str  # 32 hex digits once encoded (pyverbs writes it as eight colon-separated groups)
    gid_index: int
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    mtu: int  # the active MTU enum (1: 256 B ... 5: 4096 B)

    def encode(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "port": self.port,
            "lid": self.lid,
            "gid": gid_bytes(self.gid).hex(),
            "gid_index": self.gid_index,
            "link_layer": self.link_layer,
            "mtu": self.mtu,
        }

    @classmethod
    def decode(cls, record: Any, where: str) -> PortInfo:
        record = _record(record, where, ("device", "port", "lid", "gid", "gid_index", "link_layer", "mtu"))
        device = _text(record, "device", where)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", device):
            raise BadEndpoint(f"{where}: device name {device!r:.80} is not a device name")
        link = _text(record, "link_layer", where)
        if link not in LINK_LAYERS:
            raise BadEndpoint(f"{where}: link layer {link!r:.40} is neither of {', '.join(LINK_LAYERS)}")
        gid = _text(record, "gid", where)
        gid_bytes(gid, where)
        return cls(
            device,
            _int(record, "port", where, 1, 255),
            _int(record, "lid", where, 0, 0xFFFF),
            gid.lower(),
            _int(record, "gid_index", where, 0, 255),
            link,
            _int(record, "mtu", where, 1, 5),
        )


@dataclass(frozen=True, slots=True)
class QpInfo:
    """One queue pair as its peer connects to it: its number and the packet sequence number it starts at."""

    qp_num: int
    psn: int


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """Memory the peer registered: where, how long, whether it may be written, and its rkey on the device."""

    addr: int
    length: int
    writable: bool
    rkey: int

    def row(self) -> list[int]:
        """As ``memory.PeerTable`` rows it: [addr, length, writable, rkey]."""
        return [self.addr, self.length, int(self.writable), self.rkey]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of one rdma path: its device's port, its queue pairs, and (the passive side's) regions."""

    port: PortInfo
    qps: tuple[QpInfo, ...]
    regions: tuple[RemoteRegion, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {
            "v": ENDPOINT_VERSION,
            "port": self.port.encode(),
            "qps": [[q.qp_num, q.psn] for q in self.qps],
            "regions": encode_regions(self.regions),
        }

    @classmethod
    def decode(cls, record: Any, where: str) -> Endpoint:
        """A peer's endpoint, every field checked: BadEndpoint saying what is wrong, never a KeyError."""
        record = _record(record, where, ("v", "port", "qps", "regions"))
        if record["v"] != ENDPOINT_VERSION:
            raise BadEndpoint(f"{where}: endpoint version {record['v']!r:.20}, this engine reads {ENDPOINT_VERSION}")
        qps = record["qps"]
        if not isinstance(qps, list) or not 1 <= len(qps) <= MAX_QPS:
            raise BadEndpoint(f"{where}: an endpoint has 1 to {MAX_QPS} queue pairs, not {_size(qps)}")
        infos = []
        for i, q in enumerate(qps):
            if not isinstance(q, list) or len(q) != 2 or not all(type(x) is int for x in q):
                raise BadEndpoint(f"{where}: queue pair {i} is not [qp number, psn]: {q!r:.60}")
            if not 0 < q[0] < 1 << 24 or not 0 <= q[1] < 1 << 24:
                raise BadEndpoint(f"{where}: queue pair {i}: number {q[0]} or psn {q[1]} is not 24 bits")
            infos.append(QpInfo(q[0], q[1]))
        return cls(
            PortInfo.decode(record["port"], f"{where} port"), tuple(infos), decode_regions(record["regions"], where)
        )


class RemoteRegions:
    """The regions a peer advertised, which every remote range is checked against before anything is
    posted: inside one, writable for a write, else refused.  A refused range asks the peer afresh
    (``fetch``) once, since it may have registered since we connected."""

    def __init__(self, regions: Iterable[RemoteRegion], fetch: Callable[[], Iterable[RemoteRegion]]) -> None:
        self._fetch = fetch
        self._table = PeerTable([r.row() for r in regions], 0)

    def rkey(self, addr: int, length: int, write: bool) -> int:
        """The rkey for ``[addr, addr + length)``; AddressNotRegistered or OutOfBounds (never posted)."""
        try:
            return self._table.find(addr, length, write)[3]
        except AddressNotRegistered:
            pass  # the peer may have registered (or registered again, larger or writable) since
        self._table = PeerTable([r.row() for r in self._fetch()], 0)
        return self._table.find(addr, length, write)[3]


def encode_regions(regions: Iterable[RemoteRegion]) -> list[list[int]]:
    return [r.row() for r in regions]


def decode_regions(rows: Any, where: str) -> tuple[RemoteRegion, ...]:
    """[[addr, length, writable, rkey], ...] as a peer advertises them, each checked."""
    if not isinstance(rows, list) or len(rows) > MAX_REGIONS:
        raise BadEndpoint(f"{where}: regions are a list of at most {MAX_REGIONS}, not {_size(rows)}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 4 or not all(type(x) is int for x in row):
            raise BadEndpoint(f"{where}: region {i} is not [addr, length, writable, rkey]: {row!r:.80}")
        addr, length, writable, rkey = row
        if not 0 < addr < 1 << 64 or not 0 < length <= (1 << 64) - addr:
            raise BadEndpoint(f"{where}: region {i} ({addr:#x}, +{length}) is not a range of memory")
        if writable not in (0, 1) or not 0 <= rkey < 1 << 32:
            raise BadEndpoint(f"{where}: region {i}: writable {writable} or rkey {rkey} out of range")
        out.append(RemoteRegion(addr, length, bool(writable), rkey))
    return tuple(out)


def encode_ports(ports: Iterable[PortInfo]) -> list[dict[str, Any]]:
    """An engine's devices as it advertises them (the ``MAP`` reply's ``rdma`` section, the descriptor's)."""
    return [{"v": ENDPOINT_VERSION, **p.encode()} for p in ports]


def decode_ports(records: Any, where: str) -> list[PortInfo]:
    if not isinstance(records, list) or len(records) > MAX_DEVICES:
        raise BadEndpoint(f"{where}: the rdma devices are a list of at most {MAX_DEVICES}, not {_size(records)}")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or r.get("v") != ENDPOINT_VERSION:
            raise BadEndpoint(f"{where}: rdma device {i} is not a version {ENDPOINT_VERSION} description: {r!r:.80}")
        out.append(PortInfo.decode({k: v for k, v in r.items() if k != "v"}, f"{where} device {i}"))
    return out


def gid_bytes(gid: str, where: str = "gid") -> bytes:
    """A GID's 16 bytes, from 32 hex digits with or without pyverbs' colons."""
    digits = gid.replace(":", "") if isinstance(gid, str) else ""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", digits):
        raise BadEndpoint(f"{where}: a GID is 16 bytes in hex, not {gid!r:.60}")
    return bytes.fromhex(digits)


def _record(record: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadEndpoint(f"{where}: expected a description (a map), got {type(record).__name__}")
    if set(record) != set(keys):
        missing, extra = set(keys) - set(record), set(record) - set(keys)
        raise BadEndpoint(
            f"{where}: the description's fields differ from {', '.join(keys)}"
            + (f"; missing {', '.join(sorted(map(str, missing)))}" if missing else "")
            + (f"; unknown {', '.join(sorted(map(str, extra)))[:80]}" if extra else "")
        )
    return record


def _int(record: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = record[key]
    if type(value) is not int or not low <= value <= high:
        raise BadEndpoint(f"{where}: {key} must be an int from {low} to {high}, not {value!r:.40}")
    return value


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise BadEndpoint(f"{where}: {key} must be a str of 1 to {MAX_NAME} characters, not {value!r:.80}")
    return value


def _size(value: Any) -> str:
    return f"{len(value)} entries" if isinstance(value, list) else type(value).__name__


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
            limits = self.context.query_device()
        except PyverbsError as exc:
            self.context.close()
            raise DeviceNotFound(f"RDMA device {name!r} port {port}: {exc}") from None
        # READs in flight per queue pair, within what the device allows (more and ibv_modify_qp fails)
        self.rd_atomic = max(1, min(RD_ATOMIC, limits.max_qp_init_rd_atom))
        self.dest_rd_atomic = max(1, min(RD_ATOMIC, limits.max_qp_rd_atom))
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
        access = enums.IBV_ACCESS_REMOTE_READ
        if writable:  # read-only pages cannot be pinned for local write, which remote write needs
            access |= enums.IBV_ACCESS_LOCAL_WRITE | enums.IBV_ACCESS_REMOTE_WRITE
        try:
            mr = MR(self.pd, length, access, address=addr)
        except PyverbsError as exc:
            raise MooncakeError(f"{self.name} could not register {length} bytes at {addr:#x}: {exc}") from None
        self._mrs[addr] = mr
        return mr.lkey, mr.rkey

    def keys(self, addr: int) -> tuple[int, int] | None:
        """(lkey, rkey) of the memory region registered at ``addr``; None if there is none."""
        mr = self._mrs.get(addr)
        return (mr.lkey, mr.rkey) if mr is not None else None

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


# -- completions: what a failed one means -----------------------------------------------------------------

# The request itself is wrong (memory not registered, a stale rkey, a bad length): no other path helps.
REFUSED = frozenset(
    {
        "IBV_WC_REM_ACCESS_ERR",
        "IBV_WC_REM_INV_REQ_ERR",
        "IBV_WC_LOC_PROT_ERR",
        "IBV_WC_LOC_ACCESS_ERR",
        "IBV_WC_LOC_LEN_ERR",
    }
)
FLUSHED = "IBV_WC_WR_FLUSH_ERR"  # posted behind a failed request on the same queue pair: not the cause


def completion_error(
    status: str, text: str, vendor_err: int, wr_id: int, p: Plan, requests: Sequence[Request], write: bool, peer: str
) -> MooncakeError:
    """The failure of the request a failed completion belongs to, in words: ``AddressNotRegistered`` for
    an access or protection error (the request is refused), ``TransferError`` for another refusal,
    ``PathFailed`` otherwise (retry exceeded, a flushed queue, a fatal error: the router tries the next path)."""
    index, _nbytes = p.slices.get(wr_id, (-1, 0))
    op = "write" if write else "read"
    if 0 <= index < len(requests):
        r = requests[index]
        what = f"rdma {op} of {r.length} bytes (request {index} of the batch: local {r.laddr:#x}, {peer} {r.raddr:#x})"
    else:
        what = f"rdma {op} (work request {wr_id}, not one of this batch's)"
    message = f"{what} failed: {text} ({status}, vendor error {vendor_err:#x})"
    if status in ("IBV_WC_REM_ACCESS_ERR", "IBV_WC_LOC_PROT_ERR", "IBV_WC_LOC_ACCESS_ERR"):
        side = "the peer's" if status == "IBV_WC_REM_ACCESS_ERR" else "this engine's"
        return AddressNotRegistered(f"{message}: {side} device refused the memory (not registered with that key now)")
    if status in REFUSED:
        return TransferError(message)
    if status == FLUSHED:
        return PathFailed(f"{message}: an earlier request on its queue pair failed, or the queue pair was reset")
    return PathFailed(message)


Post = Callable[[int, bool, list[WorkRequest]], int]
Poll = Callable[[int, int, float], list[tuple[int, int, int, int]]]


def run_plan(
    p: Plan,
    write: bool,
    qps: Sequence[int],
    cq: int,
    *,
    depth: int,
    deadline: float,
    post: Post,
    poll: Poll,
    covered: Callable[[int, int], None],
    success: int = 0,
    cancelled: Callable[[], bool] = lambda: False,
) -> tuple[int, int, int] | None:
    """Post the plan's chains, each when its queue pair has room for it among ``depth`` outstanding work
    requests, and poll ``cq`` until every signalled completion came; ``covered(request index, bytes)`` for
    each slice a successful one vouches for.  Returns the first failed completion (wr_id, status, vendor
    error), None when all succeeded; TimeoutError past ``deadline`` (time.monotonic()), InterruptedError
    once ``cancelled()`` (checked at least every second: the transport is closing, and its queues are
    about to go).  ``post`` and ``poll`` are ``_rdma.post_chain`` and ``_rdma.poll``."""
    if len(qps) != len(p.chains):
        raise ValueError(f"the plan is for {len(p.chains)} queue pairs, {len(qps)} given")
    pending = [collections.deque(chains) for chains in p.chains]
    if any(len(c) > depth for chains in p.chains for c in chains):
        raise ValueError(f"a chain is longer than the send queue ({depth})")
    outstanding = [0] * len(qps)
    qp_of = {wr[0]: q for q, chains in enumerate(p.chains) for chain in chains for wr in chain if wr[6]}
    left = len(p.covers)
    while left:
        for q, chains in enumerate(pending):
            while chains and outstanding[q] + len(chains[0]) <= depth:
                chain = chains.popleft()
                post(qps[q], write, chain)
                outstanding[q] += len(chain)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{left} signalled work requests had not completed by the deadline")
        if cancelled():
            raise InterruptedError(f"the transport closed with {left} signalled work requests outstanding")
        for wr_id, status, vendor_err, _nbytes in poll(cq, 64, min(remaining, 1.0)):
            if status != success:
                return wr_id, status, vendor_err
            covers = p.covers.get(wr_id)
            if covers is None:
                continue  # not one of this plan's signalled requests
            outstanding[qp_of[wr_id]] -= len(covers)
            left -= 1
            for index, nbytes in covers:
                covered(index, nbytes)
    return None


# -- the devices of one engine, and the passive side of a path ----------------------------------------------


def _hot_path() -> ModuleType | None:
    try:
        return importlib.import_module("mooncakefs.transfer._rdma")
    except ImportError:
        return None


@dataclass(slots=True)
class Link:
    """Queue pairs and their completion queue, destroyed together (queue pairs first)."""

    cq: int
    qps: list[int]

    def close(self) -> None:
        _rdma = _hot_path()
        if _rdma is None:
            return
        for qp in self.qps:
            with contextlib.suppress(OSError):
                _rdma.destroy_qp(qp)
        self.qps = []
        if self.cq:
            with contextlib.suppress(OSError):
                _rdma.destroy_cq(self.cq)
            self.cq = 0


def new_psn() -> int:
    return secrets.randbits(24)


def connect_link(link: Link, device: VerbsDevice, mine: Sequence[QpInfo], theirs: Endpoint) -> None:
    """Take each of ``link``'s queue pairs on ``device`` to RTS towards the peer's queue pair of the same rank."""
    _rdma = _hot_path()
    assert _rdma is not None
    port = device.info
    mtu = min(port.mtu, theirs.port.mtu)
    gid = gid_bytes(theirs.port.gid)
    for qp, own, peer in zip(link.qps, mine, theirs.qps, strict=True):
        _rdma.connect_rc_qp(
            qp, port.port, port.gid_index, mtu, peer.qp_num, theirs.port.lid, gid, own.psn, peer.psn,
            rd_atomic=device.rd_atomic, dest_rd_atomic=device.dest_rd_atomic,
        )  # fmt: skip


class RdmaService:
    """One engine's RDMA devices: every range the engine registers is registered with each (``register``),
    their ports are advertised to peers (``ports``), and a peer's ``RDMA_CONNECT`` gets queue pairs of its
    own on the device it names (``accept``)."""

    def __init__(self, devices: Sequence[Device]) -> None:
        if _hot_path() is None or load_pyverbs() is None:
            raise DeviceNotFound(unavailable_reason())
        self.devices: list[tuple[Device, VerbsDevice]] = []
        try:
            for d in devices:
                port = d.active_ports[0] if d.active_ports else 1
                self.devices.append((d, VerbsDevice(d.name, port)))
        except BaseException:
            self.close()
            raise
        self._by_name = {v.name: v for _d, v in self.devices}
        self._lock = threading.Lock()

    def ports(self) -> list[PortInfo]:
        return [v.info for _d, v in self.devices]

    def register(self, addr: int, length: int, writable: bool) -> None:
        """A memory region on every device; on a failure, none (MooncakeError saying which device refused)."""
        done = []
        try:
            for _d, v in self.devices:
                v.register(addr, length, writable)
                done.append(v)
        except BaseException:
            for v in done:
                v.unregister(addr)
            raise

    def unregister(self, addr: int) -> None:
        for _d, v in self.devices:
            with contextlib.suppress(AddressNotRegistered):
                v.unregister(addr)

    def regions(self, device: VerbsDevice, registry: Registry) -> list[RemoteRegion]:
        """The registered ranges with their rkey on ``device`` (a range being registered right now, with no
        memory region yet, is left out)."""
        out = []
        for addr, length, writable, _memfd in registry.table():
            keys = device.keys(addr)
            if keys is not None:
                out.append(RemoteRegion(addr, length, bool(writable), keys[1]))
        return out

    def device(self, name: Any) -> VerbsDevice:
        if not isinstance(name, str) or name not in self._by_name:
            raise BadEndpoint(f"this engine has no rdma device named {name!r:.60} (it has {', '.join(self._by_name)})")
        return self._by_name[name]

    def accept(self, device_name: Any, record: Any, registry: Registry, peer: str) -> tuple[dict[str, Any], Link]:
        """The passive side of a path: queue pairs on ``device_name`` connected to the peer's, and the
        endpoint to answer with (this device's port, the queue pairs, the regions and their rkeys)."""
        device = self.device(device_name)
        theirs = Endpoint.decode(record, f"rdma endpoint from {peer}")
        _rdma = _hot_path()
        assert _rdma is not None
        link = Link(0, [])
        try:
            link.cq = _rdma.create_cq(device.pd_pointer, len(theirs.qps) + 1)
            mine = []
            for _q in theirs.qps:
                qp, number = _rdma.create_rc_qp(device.pd_pointer, link.cq, 1)
                link.qps.append(qp)
                mine.append(QpInfo(number, new_psn()))
            connect_link(link, device, mine, theirs)
        except OSError as exc:
            link.close()
            raise PathFailed(f"{device.name}: queue pairs for {peer} failed: {exc.strerror or exc}") from None
        except BaseException:
            link.close()
            raise
        reply = Endpoint(device.info, tuple(mine), tuple(self.regions(device, registry)))
        return reply.encode(), link

    def close(self) -> None:
        for _d, v in self.devices:
            with contextlib.suppress(Exception):
                v.close()
        self.devices = []


# -- the active side: a path that moves bytes ---------------------------------------------------------------


class RdmaTransport:
    """One path: this engine's ``device`` towards the peer's ``remote`` port, ``qps`` queue pairs of
    ``depth`` work requests each, connected on first use through ``connect`` (an authenticated control
    connection to the peer).  One worker thread runs the batches, one at a time."""

    name = "rdma"

    def __init__(
        self,
        device: VerbsDevice,
        registry: Registry,
        connect: Callable[[], Channel],
        remote: PortInfo,
        *,
        peer: str,
        numa: int = -1,
        qps: int = QPS_PER_PATH,
        depth: int = QP_DEPTH,
        deadline_for: Callable[[int], float] = lambda nbytes: 30.0 + nbytes / (1 << 30),
        label: str = "",
    ) -> None:
        if not 1 <= qps <= MAX_QPS or depth < MAX_CHAIN:
            raise ValueError(f"qps must be 1 to {MAX_QPS} and depth at least a chain ({MAX_CHAIN})")
        self.device, self.registry, self.remote, self.peer = device, registry, remote, peer
        self.numa = numa  # the device's NUMA node: the router prefers it for memory on that node
        self._connect = connect
        self.qps, self.depth = qps, depth
        self._deadline_for = deadline_for
        self.label = label or f"rdma {device.name} to {peer} {remote.device}"
        self._channel: Channel | None = None
        self._link: Link | None = None
        self._regions: RemoteRegions | None = None
        self._next_id = 1
        self.posted = self.moved = 0  # work requests posted, bytes completed: what this path carried
        self._jobs: queue.SimpleQueue[tuple[list[Transfer], Progress] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()  # close(): the worker stops polling within a second

    def accepts(self, transfer: Transfer) -> bool:
        """Only a transfer whose local buffer is registered (with this device) can be posted, and a read
        only into one registered writable: the NIC writes it, which a memory region without local write
        access refuses (tcp, which writes it from this process, takes those)."""
        buffer = transfer.buffer
        return self._lkey(_engine.address(buffer), len(buffer), transfer.op != WRITE) is not None

    def parts(self, transfer: Transfer) -> int:
        return 1

    def _lkey(self, addr: int, length: int, local_write: bool) -> int | None:
        """The lkey of the memory region holding the range (``local_write``: one the NIC may write)."""
        try:
            entry = self.registry.find(addr, length, local_write)
        except MooncakeError:
            return None
        keys = self.device.keys(entry.addr)
        return keys[0] if keys is not None else None

    def submit(self, transfers: list[Transfer], batch: Progress) -> None:
        with self._lock:
            if self._closed:
                raise TransferError(f"{self.label}: the transport is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mooncakefs-rdma", daemon=True)
                self._worker.start()
        self._jobs.put((transfers, batch))

    def _work(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                transfers, batch = job
                if self._stop.is_set():
                    batch.fail(PathFailed(f"{self.label}: the transport closed before the batch started"))
                elif batch.error is None:
                    self._run(transfers, batch)
        finally:
            self._disconnect()

    def _run(self, transfers: list[Transfer], batch: Progress) -> None:
        try:
            self._ensure_connected()
            for write in (True, False):
                group = [t for t in transfers if (t.op == WRITE) == write]
                if group:
                    self._move(group, write, batch)
        except (MooncakeError, ValueError, TypeError, OSError, TimeoutError) as exc:
            if path_failed(exc):
                self._disconnect()  # no late completion may touch memory once the batch is told
                exc = exc if isinstance(exc, MooncakeError) else PathFailed(f"{self.label}: {exc}")
            batch.fail(exc)
        except BaseException as exc:
            self._disconnect()
            batch.fail(exc)
            raise

    def requests(self, transfers: Sequence[Transfer], write: bool) -> list[Request]:
        """Each transfer as a work request's keys: its local lkey, its remote rkey, both ranges checked
        (AddressNotRegistered / OutOfBounds) before anything is posted."""
        out = []
        for t in transfers:
            laddr, n = _engine.address(t.buffer), len(t.buffer)
            lkey = self._lkey(laddr, n, not write)
            if lkey is None:
                raise AddressNotRegistered(
                    f"{self.label}: local memory {laddr:#x} (+{n}) is not registered with this engine's "
                    f"{self.device.name}{'' if write else ' as writable'}: rdma moves only registered memory"
                )
            assert self._regions is not None
            raddr = t.region.handle + t.offset
            out.append(Request(laddr, lkey, raddr, self._regions.rkey(raddr, n, write), n))
        return out

    def _move(self, transfers: list[Transfer], write: bool, batch: Progress) -> None:
        requests = self.requests(transfers, write)
        p = plan(requests, self.qps, first_id=self._next_id)
        self._next_id += p.work_requests
        link = self._link
        assert link is not None
        left = [r.length for r in requests]

        def covered(index: int, nbytes: int) -> None:
            left[index] -= nbytes
            self.moved += nbytes
            if left[index] == 0:
                batch.part_done(requests[index].length)

        _rdma = _hot_path()
        assert _rdma is not None
        nbytes = sum(r.length for r in requests)
        try:
            failed = run_plan(
                p,
                write,
                link.qps,
                link.cq,
                depth=self.depth,
                deadline=time.monotonic() + self._deadline_for(nbytes),
                post=self._post,
                poll=_rdma.poll,
                covered=covered,
                success=_rdma.WC_STATUS["IBV_WC_SUCCESS"],
                cancelled=self._stop.is_set,
            )
        except TimeoutError as exc:
            raise PathFailed(f"{self.label}: {exc}") from None
        except OSError as exc:
            raise PathFailed(f"{self.label}: {exc.strerror or exc}") from None
        if failed is not None:
            wr_id, status, vendor_err = failed
            names = {v: k for k, v in _rdma.WC_STATUS.items()}
            error = completion_error(
                names.get(status, f"status {status}"),
                _rdma.status_text(status),
                vendor_err,
                wr_id,
                p,
                requests,
                write,
                self.peer,
            )
            self._disconnect()  # the queue pairs are in the error state now; the next batch connects again
            raise error

    def _post(self, qp: int, write: bool, chain: list[WorkRequest]) -> int:
        _rdma = _hot_path()
        assert _rdma is not None
        n = _rdma.post_chain(qp, write, chain)
        self.posted += n
        return n

    # -- connecting ----------------------------------------------------------------------------------

    def _ensure_connected(self) -> None:
        if self._link is not None:
            return
        _rdma = _hot_path()
        if _rdma is None:
            raise PathFailed(f"{self.label}: {unavailable_reason()}")
        channel = self._connect()
        link = Link(0, [])
        try:
            link.cq = _rdma.create_cq(self.device.pd_pointer, self.qps * self.depth)
            mine = []
            for _q in range(self.qps):
                qp, number = _rdma.create_rc_qp(self.device.pd_pointer, link.cq, self.depth)
                link.qps.append(qp)
                mine.append(QpInfo(number, new_psn()))
            channel.send(Op.RDMA_CONNECT, [self.remote.device, Endpoint(self.device.info, tuple(mine)).encode()])
            reply, _n = channel.read_reply()
            theirs = Endpoint.decode(_only(reply, self.peer), f"rdma endpoint from {self.peer}")
            if len(theirs.qps) != len(mine) or theirs.port.device != self.remote.device:
                raise BadEndpoint(
                    f"rdma endpoint from {self.peer}: {len(theirs.qps)} queue pairs on {theirs.port.device}, "
                    f"asked for {len(mine)} on {self.remote.device}"
                )
            connect_link(link, self.device, mine, theirs)
        except OSError as exc:
            link.close()
            channel.close()
            raise PathFailed(f"{self.label}: setting up queue pairs failed: {exc.strerror or exc}") from None
        except BaseException:
            link.close()
            channel.close()
            raise
        self._channel, self._link = channel, link
        self._regions = RemoteRegions(theirs.regions, self._fetch_regions)

    def _fetch_regions(self) -> tuple[RemoteRegion, ...]:
        assert self._channel is not None
        self._channel.send(Op.RDMA_REGIONS, [])
        reply, _n = self._channel.read_reply()
        return decode_regions(_only(reply, self.peer), f"rdma regions of {self.peer}")

    def _disconnect(self) -> None:
        link, self._link = self._link, None
        channel, self._channel = self._channel, None
        if link is not None:
            link.close()
        if channel is not None:
            channel.close()  # the peer destroys its queue pairs of this path with it
        self._regions = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
        self._stop.set()
        if worker is None:
            self._disconnect()
            return
        self._jobs.put(None)
        worker.join(timeout=10)  # the worker destroys the queue pairs as it leaves


def path_failed(exc: BaseException) -> bool:
    """As ``core.path_failure``, plus a device's OSError and a timeout: the path, not the request."""
    return isinstance(exc, PathFailed | Unavailable | ConnectionError | TimeoutError) or (
        isinstance(exc, OSError) and not isinstance(exc, MooncakeError)
    )


def _only(reply: Any, peer: str) -> Any:
    if not isinstance(reply, list) or len(reply) != 1:
        raise BadEndpoint(f"{peer} answered the rdma request with {reply!r:.80}")
    return reply[0]


def unavailable_reason() -> str:
    """Why this engine cannot use rdma even with a device: the hot path is not built, or pyverbs is missing."""
    if _hot_path() is None:
        return (
            "mooncakefs.transfer._rdma is not built (it needs <infiniband/verbs.h>: apt install libibverbs-dev, "
            "then python3 setup.py build_ext)"
        )
    if load_pyverbs() is None:
        return pyverbs_status()
    return ""


def available() -> bool:
    """Whether the rdma transport can run here, device aside: its hot path built and pyverbs loaded."""
    return not unavailable_reason()
