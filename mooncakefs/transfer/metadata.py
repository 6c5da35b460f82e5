"""Where a transfer engine finds its peers: the direct handshake, or segment descriptors in etcd.

``P2PHANDSHAKE``: a peer is named ``host:port`` and everything else is asked of it on first contact.

``etcd://host:2379[,host2:2379][/prefix]``: each engine publishes a *segment descriptor* under
``mooncake/[<prefix>/]ram/<segment name>`` (Mooncake's key layout; ``MC_METADATA_CLUSTER_ID`` is the
prefix when the URL has none), written under a lease that the engine keeps alive, so an engine that dies
disappears from etcd within the lease's ttl and one that closes disappears at once.  The descriptor is
what a peer needs before it sends a byte: the addresses the engine serves on (one per NIC it listens
on), the memory it registered (address, length, writable, in registration order), its transport, and,
with rdma, its devices' ports (name, port, LID, GID, MTU, link layer: ``rdma.encode_ports``, validated on
reading).  Queue-pair numbers and rkeys are not in it: they belong to one connection, and are exchanged
on the control connection (``RDMA_CONNECT``, see ``rdma.py``).  The engine writes it again on every
registration change, before ``register`` returns, so a peer that resolves the name afterwards sees it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mooncakefs.cluster.etcd import Etcd
from mooncakefs.cluster.membership import Membership
from mooncakefs.errors import (
    EtcdError,
    InvalidArgument,
    MetadataUnavailable,
    SegmentNameTaken,
    SegmentNotFound,
    Unavailable,
)

P2P = "P2PHANDSHAKE"
DEFAULT_LEASE_TTL = 10  # seconds a dead engine's descriptor outlives it
DESCRIPTOR_VERSION = 1


@dataclass(frozen=True, slots=True)
class MetadataSpec:
    """What ``initialize``'s metadata argument names: the handshake (``url`` empty) or an etcd cluster."""

    url: str = ""  # "http://h:2379,http://h2:2379", as mooncakefs's etcd client takes it
    prefix: str = ""  # "mooncake/" or "mooncake/<cluster id>/"

    @property
    def p2p(self) -> bool:
        return not self.url


def parse_metadata(text: str | None) -> MetadataSpec:
    """``P2PHANDSHAKE`` (also "" or None) or ``etcd://h:p[,h2:p2][/prefix]``; InvalidArgument otherwise."""
    if text in (P2P, "p2p", "", None):
        return MetadataSpec()
    if not isinstance(text, str):
        raise InvalidArgument(f"metadata server must be a str, got {type(text).__name__}")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "etcd":
        raise InvalidArgument(
            f"metadata server {text!r:.80}: use P2PHANDSHAKE or etcd://host:2379[/prefix] "
            "(Mooncake's http:// and redis:// metadata servers are not supported)"
        )
    hosts, _slash, path = rest.partition("/")
    members = []
    for one in hosts.split(","):
        parts = urlsplit(f"http://{one}")
        try:
            port = parts.port or 2379
        except ValueError:
            port = -1
        if not parts.hostname or port < 1:
            raise InvalidArgument(f"metadata server {text!r:.80}: {one!r:.40} is not host[:port]")
        members.append(f"http://{parts.hostname}:{port}")
    cluster = path.strip("/") or os.environ.get("MC_METADATA_CLUSTER_ID", "").strip("/")
    return MetadataSpec(",".join(members), "mooncake/" + (f"{cluster}/" if cluster else ""))


@dataclass(slots=True)
class SegmentDescriptor:
    """One engine's segment as peers see it in etcd."""

    name: str
    protocol: str
    addresses: list[str]  # "host:port" the engine serves on, the first one its main address
    buffers: list[list[int]] = field(default_factory=list)  # [addr, length, writable], registration order
    rdma: list[dict[str, Any]] = field(default_factory=list)  # per device: its port (rdma.encode_ports)

    def encode(self) -> dict[str, Any]:
        return {"v": DESCRIPTOR_VERSION, **asdict(self)}

    @classmethod
    def decode(cls, name: str, raw: bytes) -> SegmentDescriptor:
        try:
            record = json.loads(raw)
            if record.get("v") != DESCRIPTOR_VERSION:
                raise ValueError(f"descriptor version {record.get('v')!r}, this engine reads {DESCRIPTOR_VERSION}")
            return cls(
                record["name"],
                record["protocol"],
                [str(a) for a in record["addresses"]],
                [[int(x) for x in b[:3]] for b in record["buffers"]],
                _ports(record.get("rdma", []), name),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise EtcdError(f"the segment descriptor of {name!r} in etcd is not one this engine reads: {exc}") from None

    def first_buffer(self) -> int:
        return self.buffers[0][0] if self.buffers else 0


class EtcdMetadata:
    """This engine's descriptor in etcd (kept alive under a lease) and the lookup of its peers'."""

    def __init__(self, spec: MetadataSpec, ttl: int | None = None) -> None:
        if spec.p2p:
            raise ValueError("EtcdMetadata needs an etcd:// metadata server")
        self.spec = spec
        self.ttl = ttl if ttl is not None else _lease_ttl()
        self.client = Etcd(spec.url)
        self._member: Membership | None = None

    def key(self, name: str) -> str:
        """Mooncake's layout: a name without '/' is a RAM segment (``ram/<name>``)."""
        return f"{self.spec.prefix}{name if '/' in name else 'ram/' + name}"

    def where(self) -> str:
        return f"etcd {self.spec.url} under {self.spec.prefix!r}"

    def publish(self, descriptor: SegmentDescriptor) -> None:
        """Publish under a new lease, kept alive until ``close``.  SegmentNameTaken when a live engine
        holds the name already; Unavailable when etcd cannot be reached."""
        key = self.key(descriptor.name)
        try:
            held = self.client.get(key)
        except EtcdError as exc:
            raise MetadataUnavailable(f"cannot reach the metadata server ({self.where()}): {exc}") from None
        if held is not None:
            other = _addresses(held.value)
            raise SegmentNameTaken(
                f"segment name {descriptor.name!r} is already published in {self.where()} by a live engine "
                f"(serving on {other}): give each engine its own name, e.g. host:port"
            )
        member = Membership(
            self.spec.url, "", descriptor.name, descriptor.encode(), ttl=self.ttl, key=key, client=self.client
        )
        try:
            member.start()
        except Unavailable as exc:
            raise MetadataUnavailable(f"cannot publish segment {descriptor.name!r} in {self.where()}: {exc}") from None
        self._member = member

    def update(self, descriptor: SegmentDescriptor) -> None:
        if self._member is None:
            raise ValueError("publish() first")
        try:
            self._member.update(descriptor.encode())
        except EtcdError as exc:
            raise MetadataUnavailable(f"cannot update this engine's segment in {self.where()}: {exc}") from None

    def resolve(self, name: str) -> SegmentDescriptor:
        """A peer's descriptor as published now: SegmentNotFound if none is, Unavailable if etcd is out of reach."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"a segment name is a non-empty str, got {name!r:.60}")
        try:
            kv = self.client.get(self.key(name))
        except EtcdError as exc:
            raise MetadataUnavailable(f"cannot look up segment {name!r} in {self.where()}: {exc}") from None
        if kv is None:
            raise SegmentNotFound(
                f"no segment named {name!r} in {self.where()}: it was never published, or its engine "
                "closed, or died and its lease expired"
            )
        return SegmentDescriptor.decode(name, kv.value)

    def close(self) -> None:
        """Delete the descriptor and revoke its lease: peers stop finding this engine at once."""
        member, self._member = self._member, None
        if member is not None:
            member.stop()  # closes the client too
        else:
            with contextlib.suppress(Exception):
                self.client.close()


def _ports(records: Any, name: str) -> list[dict[str, Any]]:
    """The descriptor's rdma ports, checked (BadEndpoint is a ValueError: the descriptor is refused)."""
    from mooncakefs.transfer.rdma import decode_ports, encode_ports

    return encode_ports(decode_ports(records, f"the rdma devices of segment {name!r}"))


def _lease_ttl() -> int:
    try:
        return max(1, int(os.environ.get("MOONCAKEFS_TE_LEASE_TTL", DEFAULT_LEASE_TTL)))
    except ValueError:
        return DEFAULT_LEASE_TTL


def _addresses(raw: bytes) -> str:
    try:
        return ", ".join(json.loads(raw)["addresses"]) or "?"
    except (ValueError, KeyError, TypeError):
        return "?"
