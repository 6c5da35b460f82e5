"""Choosing a path: which NICs exist, where they sit, and which one a transfer should use.

Everything is read from sysfs (``/sys/class/infiniband`` for RDMA devices, ``/sys/class/net`` for
the interfaces behind them and for plain NICs), under a root the tests can point at a tree of their
own.  A device's NUMA node comes from its PCI device's ``numa_node``; the memory's from the kernel
(``move_pages`` with no target asks where each page is).  ``rank`` orders the devices for a buffer:
the ones on its NUMA node first, then the rest, each group rotated so that a batch spreads over
every NIC of the group; a transfer that fails on one device is retried on the next in that order.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mooncakefs.errors import MooncakeError

SYSFS = "/sys"  # read at each call: a test points it at a tree of its own


class DeviceNotFound(MooncakeError):
    """RDMA was asked for, and no usable device (or no verbs library) is there."""


@dataclass(frozen=True, slots=True)
class Device:
    """An RDMA device (``mlx5_0``, ``rxe0``), or a plain NIC (``eth0``) when ``rdma`` is False."""

    name: str
    numa: int  # -1 when unknown (no NUMA, a virtual device)
    rdma: bool = False
    ports: tuple[int, ...] = ()
    active_ports: tuple[int, ...] = ()
    link_layer: str = ""  # InfiniBand / Ethernet (RoCE)
    netdev: str = ""  # the interface an RDMA device sits on
    pci: str = ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _numa(device_dir: str) -> int:
    text = _read(os.path.join(device_dir, "device", "numa_node"))
    try:
        return int(text)
    except ValueError:
        return -1


def _class_dir(kind: str, root: str | None) -> str:
    """``<root>/class/<kind>``: where sysfs (``SYSFS``, or the tree at ``root``) lists the devices of a kind."""
    return os.path.join(SYSFS if root is None else root, "class", kind)


def _names(directory: str) -> list[str] | None:
    """The entries of ``directory``, sorted; None when it cannot be read (no such class on this host)."""
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return None


def _pci(device_dir: str) -> str:
    try:
        return os.path.basename(os.path.realpath(os.path.join(device_dir, "device")))
    except OSError:
        return ""


def rdma_devices(filter_: str = "", root: str | None = None) -> list[Device]:
    """The RDMA devices with at least one active port, named in ``filter_`` (comma-separated) if given."""
    base = _class_dir("infiniband", root)
    names = _names(base)
    if names is None:
        return []
    wanted = {n.strip() for n in filter_.split(",") if n.strip()} if filter_ else None
    found = []
    for name in names:
        if wanted is not None and name not in wanted:
            continue
        d = os.path.join(base, name)
        try:
            ports = sorted(int(p) for p in os.listdir(os.path.join(d, "ports")) if p.isdigit())
        except OSError:
            ports = []
        active = tuple(p for p in ports if "ACTIVE" in _read(os.path.join(d, "ports", str(p), "state")))
        link = _read(os.path.join(d, "ports", str(ports[0]), "link_layer")) if ports else ""
        netdev = ""
        try:
            nets = os.listdir(os.path.join(d, "device", "net"))
            netdev = sorted(nets)[0] if nets else ""
        except OSError:
            pass
        if not active:
            continue
        found.append(Device(name, _numa(d), True, tuple(ports), active, link, netdev, _pci(d)))
    return found


def no_rdma_reason(filter_: str = "", root: str | None = None) -> str:
    """Why ``rdma_devices`` came back empty, in words for the one log line."""
    base = _class_dir("infiniband", root)
    names = _names(base)
    if names is None:
        return f"no RDMA device ({base} does not exist)"
    if not names:
        return f"no RDMA device ({base} is empty)"
    if filter_:
        return f"no active RDMA device among {filter_!r} (found: {', '.join(names)})"
    return f"no RDMA device has an active port (found: {', '.join(names)})"


def nics(root: str | None = None) -> list[Device]:
    """Plain network interfaces (not loopback), with their NUMA node where the kernel knows it."""
    base = _class_dir("net", root)
    return [
        Device(n, _numa(os.path.join(base, n)), pci=_pci(os.path.join(base, n)))
        for n in _names(base) or []
        if n != "lo"
    ]


_MPOL_F_NODE, _MPOL_F_ADDR = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def memory_node(addr: int) -> int:
    """The NUMA node the page at ``addr`` lives on (-1 if the kernel cannot say: not touched yet, no NUMA)."""
    if not addr:
        return -1
    node = ctypes.c_int(-1)
    try:
        rc = _libc.syscall(
            239, None, 1, ctypes.byref(ctypes.c_void_p(addr & ~4095)), None, ctypes.byref(node), 0
        )  # move_pages(0, 1, pages, NULL, status, 0)
    except (AttributeError, OSError):
        return -1
    return node.value if rc == 0 and node.value >= 0 else -1


def rank_nodes(nodes: Sequence[int], numa: int, spread: int = 0) -> list[int]:
    """Indexes into ``nodes`` (each device's NUMA node) in the order a transfer from memory on ``numa``
    should try them: same NUMA node first (all of them when either node is unknown), then the others;
    ``spread`` rotates each group, so the transfers of a batch (spread = their index) land on every
    nearby device in turn."""
    near = [i for i, n in enumerate(nodes) if numa < 0 or n < 0 or n == numa]
    far = [i for i in range(len(nodes)) if i not in near]
    out = []
    for group in (near, far):
        if group:
            k = spread % len(group)
            out.extend(group[k:] + group[:k])
    return out


def rank(devices: list[Device], numa: int, spread: int = 0) -> list[Device]:
    """``rank_nodes`` for devices: the devices themselves, in order."""
    return [devices[i] for i in rank_nodes([d.numa for d in devices], numa, spread)]


def nic(name: str, root: str | None = None) -> Device:
    """The network interface ``name`` with its NUMA node (-1 for loopback, virtual or unknown ones)."""
    d = os.path.join(_class_dir("net", root), name)
    return Device(name, _numa(d), pci=_pci(d) if os.path.exists(os.path.join(d, "device")) else "")


_SIOCGIFADDR = 0x8915


def interface_of(address: str) -> str:
    """The local interface the kernel routes to ``address`` through ("" when it cannot say: IPv6, no
    route): the source address the kernel picks, matched against each interface's IPv4 address."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))  # a UDP "connect" sends nothing: it only picks the route
            source = probe.getsockname()[0]
        if family != socket.AF_INET:
            return ""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _index, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                if socket.inet_ntoa(raw[20:24]) == source:
                    return name
    except OSError:
        return ""
    return ""


def route_device(address: str, root: str | None = None) -> Device:
    """The NIC a connection to ``address`` leaves through, with its NUMA node."""
    name = interface_of(address)
    return nic(name, root) if name else Device("", -1)


def numa_matters(nodes: Sequence[int]) -> bool:
    """Whether devices on these NUMA nodes differ in distance to any memory (two known nodes or more):
    only then is a buffer's node worth a system call."""
    return len({n for n in nodes if n >= 0}) > 1


def buffer_node(address: int) -> int:
    """The NUMA node of the memory at ``address``: where its page is, or for a page not touched yet the
    node of the CPU this thread runs on (where the first touch will put it); -1 if unknown."""
    node = memory_node(address)
    return node if node >= 0 else _cpu_node()


def _cpu_node() -> int:
    """The NUMA node of the CPU this thread runs on (-1 if unknown): where an untouched page will land."""
    cpu, node = ctypes.c_uint(0), ctypes.c_uint(0)
    try:
        rc = _libc.getcpu(ctypes.byref(cpu), ctypes.byref(node))
    except AttributeError:
        return -1
    return node.value if rc == 0 else -1


def topology(filter_: str = "", root: str | None = None) -> str:
    """The local topology as JSON, Mooncake's ``get_local_topology`` shape: per NUMA node, the
    preferred devices and the others."""
    devices = rdma_devices(filter_, root)
    nodes = sorted({d.numa for d in devices} | {0})
    matrix = {}
    for n in nodes:
        near = [d.name for d in devices if d.numa in (n, -1)]
        matrix[f"cpu:{n}"] = [near, [d.name for d in devices if d.name not in near]]
    return json.dumps(
        {"matrix": matrix, "devices": [asdict(d) for d in devices], "nics": [asdict(d) for d in nics(root)]}
    )
