"""Prometheus metrics for the node.

The metrics are gathered when Prometheus scrapes, from counters the node keeps anyway, so serving a
request costs nothing extra for them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mooncakefs.tiers.base import TIER_ORDER

if TYPE_CHECKING:
    from mooncakefs.node.server import Node


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        try:
            stats = node.store.stats()
        except Exception:  # closing: report what does not need the store
            stats = {}
        capacity = GaugeMetricFamily("mooncakefs_tier_capacity_bytes", "Capacity of each tier", labels=["tier"])
        used = GaugeMetricFamily("mooncakefs_tier_used_bytes", "Bytes in use in each tier", labels=["tier"])
        objects = GaugeMetricFamily("mooncakefs_tier_objects", "Objects held by each tier", labels=["tier"])
        events = {
            name: CounterMetricFamily(f"mooncakefs_tier_{name}", f"Tier {name}", labels=["tier"])
            for name in ("hits", "misses", "evictions", "promotions")
        }
        for tier in TIER_ORDER:
            t = stats.get(tier)
            if t is None:
                continue
            capacity.add_metric([tier], t["capacity"])
            used.add_metric([tier], t["used"])
            objects.add_metric([tier], t["objects"])
            for name, family in events.items():
                family.add_metric([tier], t[name])
        yield from (capacity, used, objects, *events.values())
        yield GaugeMetricFamily("mooncakefs_objects", "Objects in the store", value=stats.get("objects", 0))
        requests = CounterMetricFamily("mooncakefs_requests", "Requests served, by operation", labels=["op"])
        for op, n in list(node.requests.items()):
            requests.add_metric([op], n)
        yield requests
        errors = CounterMetricFamily("mooncakefs_request_errors", "Requests refused, by error", labels=["error"])
        for name, n in list(node.errors.items()):
            errors.add_metric([name], n)
        yield errors
        yield CounterMetricFamily("mooncakefs_received_bytes", "Value bytes received over sockets", value=node.bytes_in)
        yield CounterMetricFamily("mooncakefs_sent_bytes", "Value bytes sent over sockets", value=node.bytes_out)
        yield GaugeMetricFamily("mooncakefs_clients", "Connected client connections", value=node.clients)
        yield GaugeMetricFamily("mooncakefs_read_leases", "Values held for clients' reads", value=len(node._leases))
        yield GaugeMetricFamily(
            "mooncakefs_pending_puts", "Puts reserved but not yet published", value=len(node._pending)
        )
        yield GaugeMetricFamily(
            "mooncakefs_uptime_seconds", "Seconds since the node started", value=time.time() - node.started
        )
        agent = node.cluster
        if agent is not None:
            yield GaugeMetricFamily("mooncakefs_cluster_epoch", "Placement epoch this node serves", value=agent.epoch)
            yield GaugeMetricFamily(
                "mooncakefs_cluster_fenced", "1 while etcd has not confirmed the lease lately", value=int(agent.fenced)
            )
            yield GaugeMetricFamily(
                "mooncakefs_cluster_controller", "1 on the elected controller", value=int(agent.is_controller)
            )
            yield CounterMetricFamily(
                "mooncakefs_repair_pushed", "Values copied to other nodes by repair", value=agent.repairs
            )
            yield CounterMetricFamily("mooncakefs_repair_passes", "Completed repair passes", value=agent.repair_passes)
            yield GaugeMetricFamily(
                "mooncakefs_cluster_rejoining", "1 while catching up after an absence", value=int(agent.rejoining)
            )
            yield CounterMetricFamily(
                "mooncakefs_rejoin_pulled", "Newer values fetched from other nodes on rejoining", value=agent.pulls
            )


def serve_metrics(node: Node, host: str, port: int) -> tuple[str, int]:
    """Serve /metrics over HTTP in a background thread; returns the address bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[0], server.server_address[1]
