"""What ``mooncakefs watch`` shows of a distribution: for each file of a cluster mount being copied out,
which hosts hold how much of it and who served whom, from the readers' own records in etcd
(``fs/p2p/<ino>/<mount>``, see ``mooncakefs.p2p.swarm``) and the nodes' byte counters.

The records are followed with an etcd watch (``Mirror`` of ``fs/p2p/``), so a live view costs etcd
nothing while nothing changes; the nodes' counters are asked at each redraw.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mooncakefs.cluster.etcd import KV, Etcd
from mooncakefs.cluster.membership import cluster_prefix
from mooncakefs.errors import InvalidArgument, KeyNotFound

ROOT_INO = 1  # the filesystem's root (pyfuse3.ROOT_INODE)
MOUNT_STATS = Path(".mooncakefs") / "stats.json"  # what marks the root of a mooncakefs mount


@dataclass
class Reader:
    """One mount reading (or having read) a file: its node, what it holds, where it took it from."""

    mount: str
    node: str
    chunks: int  # how many chunks of the file its node keeps
    reading: bool
    current: bool  # it read the file's current version (False: an older one, whose copies are useless)
    took_from: dict[str, int] = field(default_factory=dict)  # node (or "replicas") -> bytes


@dataclass
class FileReport:
    path: str
    ino: int
    size: int
    chunks: int
    chunk_size: int
    readers: list[Reader] = field(default_factory=list)

    def served(self) -> dict[str, int]:
        """Bytes each node (or "replicas") served to this file's current readers."""
        out: dict[str, int] = {}
        for r in self.readers:
            if r.current:
                for source, n in r.took_from.items():
                    out[source] = out.get(source, 0) + n
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ino": self.ino,
            "size": self.size,
            "chunks": self.chunks,
            "chunk_size": self.chunk_size,
            "readers": [r.__dict__ for r in sorted(self.readers, key=lambda r: (r.node, r.mount))],
            "served": self.served(),
        }


# why a path is a KeyNotFound: "key '/models/x': no such file or directory in the cluster's filesystem"
NO_SUCH_PATH = "no such file or directory in the cluster's filesystem"


def namespace_path(path: str) -> str:
    """The path inside the cluster's filesystem: ``path`` itself, or, for a path on a mounted cluster
    filesystem on this host, its part below the mount's root."""
    local = Path(path)
    if local.exists():
        here = local.resolve()
        for root in (here, *here.parents):
            if (root / MOUNT_STATS).is_file():
                inside = str(here.relative_to(root))
                return "/" if inside == "." else "/" + inside
        raise InvalidArgument(f"{path} is not on a mooncakefs mount (no {MOUNT_STATS} above it)")
    return "/" + path.strip("/")


class Distribution:
    """The files under a path of a cluster's filesystem and what their readers recorded."""

    def __init__(self, client: Etcd, cluster: str) -> None:
        self.client = client
        self.fs = cluster_prefix(cluster) + "fs/"
        self.records_prefix = self.fs + "p2p/"

    def _inode(self, ino: int) -> dict[str, Any] | None:
        kv = self.client.get(f"{self.fs}i/{ino}")
        return None if kv is None else json.loads(kv.value)

    def chunk_size(self) -> int:
        kv = self.client.get(self.fs + "settings")
        if kv is None:
            raise KeyNotFound(self.fs + "settings", "the cluster has no filesystem yet (no mount ever started)")
        return int(json.loads(kv.value)["chunk_size"])

    def files(self, path: str) -> list[tuple[str, int, dict[str, Any]]]:
        """(path, inode number, inode record) of the file at ``path``, or of every file below it."""
        ino = ROOT_INO
        for name in [p for p in path.split("/") if p]:
            kv = self.client.get(f"{self.fs}d/{ino}/{name.encode().hex()}")
            if kv is None:
                raise KeyNotFound(path, NO_SUCH_PATH)
            ino = int(kv.value)
        record = self._inode(ino)
        if record is None:
            raise KeyNotFound(path, NO_SUCH_PATH)
        return list(self._walk(path.rstrip("/") or "/", ino, record))

    def _walk(self, path: str, ino: int, record: dict[str, Any]) -> Iterable[tuple[str, int, dict[str, Any]]]:
        if stat.S_ISREG(record["mode"]):
            yield path, ino, record
        elif stat.S_ISDIR(record["mode"]):
            for kv in self.client.get_prefix(f"{self.fs}d/{ino}/"):
                name = bytes.fromhex(kv.key.decode().rsplit("/", 1)[1]).decode(errors="replace")
                child = int(kv.value)
                child_record = self._inode(child)
                if child_record is not None:
                    yield from self._walk(os.path.join(path, name), child, child_record)

    def report(
        self, files: list[tuple[str, int, dict[str, Any]]], records: dict[bytes, KV], chunk_size: int
    ) -> list[FileReport]:
        """One report per file, from the readers' records (all of ``fs/p2p/``, as a ``Mirror`` holds them)."""
        by_ino: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for key, kv in records.items():
            try:
                ino_text, mount = key.decode()[len(self.records_prefix) :].split("/", 1)
                by_ino.setdefault(int(ino_text), []).append((mount, json.loads(kv.value)))
            except (ValueError, UnicodeDecodeError):
                continue
        out = []
        for path, ino, inode in files:
            size = int(inode["size"])
            report = FileReport(path, ino, size, -(-size // chunk_size), chunk_size)
            current = [inode["mtime"], size]
            for mount, record in by_ino.get(ino, []):
                try:
                    held = sum(b - a for a, b in record["have"])
                    report.readers.append(
                        Reader(
                            mount,
                            str(record["node"]),
                            held,
                            bool(record["reading"]),
                            list(record["gen"]) == current,
                            {str(k): int(v) for k, v in record.get("from", {}).items()},
                        )
                    )
                except (KeyError, TypeError, ValueError):
                    continue
            out.append(report)
        return out
