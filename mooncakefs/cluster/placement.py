"""The placement map: which nodes hold the keys of each placement group, under which epoch.

Keys hash to one of ``groups`` placement groups (BLAKE2b of the key, so every client and node agrees
without asking anyone).  Each group has an ordered list of up to ``width`` nodes, chosen by rendezvous
hashing: each node scores each group and the highest scores win.  A key put with ``replicas=R`` lives
on the first R nodes of its group's list.  Rendezvous hashing moves little when membership changes:
a node that leaves is replaced in its groups by the next-best node, and the others keep their places.

The controller writes the map to etcd as JSON; every change bumps ``epoch``, which nodes use to refuse
requests routed by an older map.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass, field
from typing import Any

from mooncakefs.keys import INTERNAL_PREFIX, InternalKey, key_digest

DEFAULT_GROUPS = 256
DEFAULT_WIDTH = 3  # the most replicas a put may ask for


_POINTER = INTERNAL_PREFIX + b"at/"


def _placement_hash(raw_key: bytes) -> bytes:
    if raw_key.startswith(_POINTER):  # a pointer carries its key's hash, so it lives in the key's group
        return raw_key[len(_POINTER) : len(_POINTER) + 8]
    return hashlib.blake2b(raw_key, digest_size=8).digest()


def group_of(raw_key: bytes, groups: int) -> int:
    """The placement group of a key (its canonical bytes)."""
    return int.from_bytes(_placement_hash(raw_key), "little") % groups


def pointer_key(raw_key: bytes) -> InternalKey:
    """Where a group's owners note which node holds a value put with placement="local": an internal key
    in the same group as the key itself (so repair keeps it with the key's owners)."""
    return InternalKey(b"at/" + _placement_hash(raw_key) + key_digest(raw_key))


def _score(group: int, node: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{group}/{node}".encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class PlacementMap:
    epoch: int
    groups: int
    width: int
    replicas: list[list[str]]  # per group: node ids, best first
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> its membership record

    @classmethod
    def compute(
        cls, epoch: int, nodes: dict[str, dict[str, Any]], *, groups: int = DEFAULT_GROUPS, width: int = DEFAULT_WIDTH
    ) -> PlacementMap:
        """The map for this membership: every group ordered by rendezvous score."""
        ids = sorted(nodes)
        n = min(width, len(ids))
        replicas = [heapq.nlargest(n, ids, key=lambda node, g=g: _score(g, node)) for g in range(groups)]
        return cls(epoch, groups, width, replicas, dict(nodes))

    def group(self, raw_key: bytes) -> int:
        return group_of(raw_key, self.groups)

    def owners(self, raw_key: bytes) -> list[str]:
        """The nodes of a key's group, best first."""
        return self.replicas[self.group(raw_key)]

    def members(self) -> set[str]:
        return set(self.nodes)

    def groups_of(self, node: str) -> int:
        """How many groups list ``node`` (for status)."""
        return sum(node in r for r in self.replicas)

    def to_json(self) -> str:
        return json.dumps(
            {
                "epoch": self.epoch,
                "groups": self.groups,
                "width": self.width,
                "replicas": self.replicas,
                "nodes": self.nodes,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: bytes | str) -> PlacementMap:
        d = json.loads(text)
        return cls(d["epoch"], d["groups"], d["width"], d["replicas"], d["nodes"])
