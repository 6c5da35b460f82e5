"""Membership: each node registers itself in etcd under a lease and keeps the lease alive.

A node's record lives at ``/mooncakefs/<cluster>/nodes/<node id>`` (JSON: endpoints, tier
capacities, start time, and ``stint``: its lease's id, which changes every time it joins again).  It is
written once per (re)grant of the lease, never per object: the only steady etcd load of a node is one
lease refresh every ``ttl / 3`` seconds.  A node that stops cleanly deletes its record and revokes its
lease; one that dies disappears when the lease expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mooncakefs.cluster.etcd import Etcd, Lease
from mooncakefs.datadir import private_file, tighten
from mooncakefs.errors import Unavailable

log = logging.getLogger("mooncakefs.cluster")

DEFAULT_TTL = 10


def cluster_prefix(cluster: str) -> str:
    """Where a cluster keeps its state in etcd: nodes/, controller, placement."""
    if not cluster or "/" in cluster:
        raise ValueError(f"cluster name must be non-empty and have no '/', got {cluster!r}")
    return f"/mooncakefs/{cluster}/"


def nodes_prefix(cluster: str) -> str:
    return cluster_prefix(cluster) + "nodes/"


def host_id() -> str:
    """This host's name in node records: clients on the same host use the node's Unix socket.
    $MOONCAKEFS_HOST overrides it (tests simulate hosts with network namespaces on one machine)."""
    return os.environ.get("MOONCAKEFS_HOST") or socket.gethostname()


def node_id(data_dir: Path) -> str:
    """The node's identity, kept in its data dir so that a restarted node is the same member; written
    0600 whatever the umask, as every file of a data dir is (docs/security.md); an older looser one is
    tightened."""
    path = data_dir / "node-id"
    tighten(path)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        ident = uuid.uuid4().hex[:12]
        fd = private_file(path, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(ident + "\n")
        return ident


def connect_etcd(url: str, timeout: float = 5.0) -> Etcd:
    """A client of the etcd cluster at ``url``.  With several members, gRPC balances requests over the
    ones it can reach, so losing a member (but not the quorum) goes unnoticed."""
    return Etcd(url, timeout=timeout)


class Membership:
    """Keep a record in etcd alive until ``stop()``: a node's (under its cluster's ``nodes/``), or another
    key's (``key``: a transfer engine's segment descriptor, see ``transfer/metadata.py``)."""

    def __init__(
        self,
        etcd_url: str,
        cluster: str,
        ident: str,
        record: dict[str, Any],
        *,
        ttl: int = DEFAULT_TTL,
        key: str | None = None,
        client: Etcd | None = None,
    ) -> None:
        self.key = key if key is not None else nodes_prefix(cluster) + ident
        self.record = {"id": ident, **record}
        self.ttl = ttl
        self._client = client if client is not None else connect_etcd(etcd_url)  # stop() closes it
        self._lease: Lease | None = None
        self.confirmed = 0.0  # monotonic time a request that etcd then confirmed our lease with was sent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Membership:
        try:
            self._register()
        except Exception as exc:
            raise Unavailable(f"cannot register in etcd at {self.key}: {exc}") from exc
        self._thread = threading.Thread(target=self._keep_alive, name="mooncakefs-membership", daemon=True)
        self._thread.start()
        return self

    def _register(self) -> None:
        sent = time.monotonic()
        self._lease = self._client.lease(self.ttl)
        self.record["stint"] = self._lease.id  # a new one each time the node (re)joins: see NodeAgent._adopt
        self._client.put(self.key, json.dumps(self.record), lease=self._lease)
        self.confirmed = sent
        log.info("registered", extra={"key": self.key, "ttl": self.ttl})

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                sent = time.monotonic()
                assert self._lease is not None
                left = self._lease.refresh()
                if left <= 0:  # it expired while etcd was out of reach: join again
                    self._register()
                else:
                    self.confirmed = sent
            except Exception as exc:  # etcd down: keep trying; the record returns when etcd does
                log.warning("lease refresh failed", extra={"key": self.key, "why": str(exc)})

    def update(self, record: dict[str, Any]) -> None:
        """Write a new record under the same lease (EtcdError / EtcdUnavailable if etcd refuses)."""
        self.record = {"id": self.record["id"], **record, "stint": self.record.get("stint")}
        self._client.put(self.key, json.dumps(self.record), lease=self._lease)

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def client(self) -> Etcd:
        return self._client

    def stop(self) -> None:
        """Leave the cluster: delete the record and revoke the lease (best effort if etcd is down)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._client.delete(self.key)
            if self._lease is not None:
                self._lease.revoke()
        self._client.close()


def list_nodes(etcd_url: str, cluster: str) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """The records of the nodes alive in ``cluster`` (by id), the controller's id, and the placement
    map's JSON (None while there is none)."""
    client = connect_etcd(etcd_url)
    prefix = cluster_prefix(cluster)
    try:
        records = [json.loads(kv.value) for kv in client.get_prefix(nodes_prefix(cluster))]
        controller = client.get(prefix + "controller")
        placement = client.get(prefix + "placement")
    except Exception as exc:
        raise Unavailable(f"cannot read the cluster from etcd at {etcd_url}: {exc}") from exc
    finally:
        client.close()
    return (
        sorted(records, key=lambda r: r["id"]),
        controller.value.decode() if controller else None,
        placement.value.decode() if placement else None,
    )


def uptime(record: dict[str, Any]) -> float:
    return time.time() - record.get("started", time.time())
