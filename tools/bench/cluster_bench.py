#!/usr/bin/env python3
"""What a mooncakefs cluster costs and delivers, all in one run: aggregate throughput, repair after a node
loss, how long a restarted node takes to rejoin, and the load the cluster puts on etcd.

The benchmark starts its own single-member etcd (on /dev/shm, free loopback ports) and ``--nodes`` node
processes (``python -m mooncakefs.cli node --etcd ... --cluster ... --lease-ttl 3``, DRAM + SSD tier,
no metrics endpoint, no prefault; the rejoin phase restarts one with a metrics endpoint), waits until the
controller has published a placement map naming every node, and then measures:

1. **Throughput.**  ``--clients`` client processes (multiprocessing, spawned), each with its own
   ``mooncakefs.connect("etcd://...")`` and its own keys, run the same op at the same time; the row is
   the sum of their rates (keys/s; GB/s = 1e9 B/s of values; "wire" counts every copy a put sends).
   For replicas 1 and 2: put, batch_put (32 keys a call), get and batch_get of 4 KiB values, and put and
   get_into of ``--value-size`` values.  With ``--via tcp`` (default) the clients claim another host
   name ($MOONCAKEFS_HOST), so every value crosses loopback TCP as it would from a remote client;
   ``--via unix`` lets them use the nodes' Unix sockets and shared pools.
   Physical reference, in the same client processes: each client process asks its own server process
   for ``--value-size`` messages, one 1-byte request each, over loopback TCP (``sendall`` ->
   ``recv_into(MSG_WAITALL)``: the reference of get, which pays a round trip per value as a get does),
   or sends them to its own sink process that acks each with one byte (the reference of put), all client
   processes at once, summed.  The messages rotate through as much memory as the row's values fill
   (``--large-data``) on the peer's side and, for put, on the client's: the caches do not hold them,
   as they do not hold the values.  One repetition of the reference runs right before each repetition of a
   large-value row, so drift on a noisy host reaches both sides of the ratio.  Get rows also show the
   ratio to a stream with no requests (a sender process that sends messages back to back: ``x stream``),
   a bound no request/reply protocol reaches.
2. **Repair.**  ``--repair-data`` of ``--value-size`` values are written with replicas=2, then a node is
   SIGKILLed (``--kill``: a node that is not the controller, then the controller).  From the kill on, a
   thread polls etcd (is the node's record gone: its lease expired; is there a map without it) and the
   benchmark asks every surviving node directly (``tcp://``, ``batch_exists``) which keys it holds,
   until every key is on 2 live nodes.  Reported: seconds to repair, seconds per GiB of the dead node's
   share (the bytes that had to be copied again), and the split between detection (kill -> new map:
   lease expiry plus the controller's reaction) and copying (new map -> repaired, which includes the
   nodes picking up the map).
3. **etcd load.**  etcd's own Prometheus counters (``grpc_server_handled_total``: one per gRPC request,
   by service and method; bytes sent to clients) are read at the start and end of each window: the
   cluster at rest (``--idle-seconds``), the throughput phase (the cluster under load), the rejoin phase,
   and each repair.
   Also the size of the placement map value in etcd.
4. **Rejoin.**  A node that comes back with data catches up before it serves the new map: it asks every
   other node for the versions of all the keys it holds (512 a request) and fetches newer ones.  One
   node that is not the controller is made to hold K small keys (``--rejoin-keys``: 4 KiB values, put
   with replicas=1 and durable=True, their keys chosen so that it is their owner), then it is SIGKILLed
   and restarted on the same data dir, with a metrics endpoint and JSON logs (``--rejoin-restart``:
   after the map has dropped it, or at once), ``--rejoin-reps`` times per K.  Reported: process start
   -> its ready line (store opened, registered), -> a map naming it in etcd, -> serving that map (its
   metrics say ``mooncakefs_cluster_rejoining`` 0 and the map's epoch), and the catch-up itself (its log:
   "rejoining" -> "placement" of that epoch); keys x other nodes / catch-up = versions checked per
   second; ``mooncakefs_rejoin_pulled`` (0 expected: nothing changed while it was away).  A first row,
   before any of these keys are put, is the same restart without a catch-up.  The nodes' SSD is raised
   to hold the keys if ``--ssd`` is too small.

``--phases`` picks the phases (the at-rest etcd window always runs); they run in the order throughput,
rejoin, repair; ``--rows`` picks the throughput rows (small: the 4 KiB ones, large: ``--value-size``).

Method, for small noisy VMs: buffers are allocated and written before timing and reused; each row runs
one untimed warm-up pass over its keys (which also checks what it reads), then ``--reps`` repetitions of
``--seconds``, and the median is reported.  Every process the benchmark starts (etcd, nodes, clients,
reference peers) is stopped and its temporary directory removed on exit, on Ctrl-C and on SIGTERM; they
also get SIGTERM if the benchmark is killed.

Output: a plain table on stdout (progress on stderr) and JSON at --json.

Examples::

    python tools/bench/cluster_bench.py
    python tools/bench/cluster_bench.py --nodes 12 --value-size 4MiB --seconds 2 --json bench-results/c.json
    python tools/bench/cluster_bench.py --phases rejoin --rejoin-keys 20000,100000 --idle-seconds 2
    python tools/bench/cluster_bench.py --phases throughput --rows large --replicas 1 --idle-seconds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    GB,
    GiB,
    KiB,
    KVWorkload,
    LocalCluster,
    MiB,
    NodeProcess,
    Reference,
    Runner,
    Workers,
    WorkersLost,
    cpu_seconds,
    exit_on_sigterm,
    format_number,
    format_seconds,
    format_size,
    format_table,
    free_port,
    machine_info,
    measure,
    median,
    peer,
    prefaulted,
    progress,
    raise_batch_errors,
    scrape,
    stream_reference,
    write_json,
)

import mooncakefs
from mooncakefs.cluster.placement import PlacementMap
from mooncakefs.keys import encode_key
from mooncakefs.units import parse_size

SMALL = 4 * KiB
READY_TIMEOUT = 90.0  # a node process printing its ready line (8 Python processes start on 2 cores)
MAP_TIMEOUT = 60.0  # the controller publishing a map with every node
WORKER_TIMEOUT = 300.0  # one request to a client process (a warm-up of a slow row included)
STOP_TIMEOUT = 15.0
REPAIR_REPLICAS = 2
ETCD_POLL_S = 0.02
PHASES = ("throughput", "rejoin", "repair")
REJOIN_TIMEOUT = 120.0  # one restart: kill -> (map without it) -> serving again
REJOIN_POLL_S = 0.1  # etcd, the log; metrics every other poll until the map names it (a scrape counts objects)
REJOIN_BATCH = 2048  # keys per batch_put while filling the node


# ------------------------------------------------------------------------------------------- etcd load


@dataclass
class EtcdSample:
    t: float
    handled: dict[str, float]  # "Service.Method" -> gRPC requests handled
    sent_bytes: float
    received_bytes: float
    cpu_s: float
    nodes_cpu_s: dict[int, float]  # node pid -> CPU seconds


def sample_etcd(cluster: LocalCluster) -> EtcdSample:
    assert cluster.etcd is not None
    handled: Counter[str] = Counter()
    totals = {"etcd_network_client_grpc_sent_bytes_total": 0.0, "etcd_network_client_grpc_received_bytes_total": 0.0}
    for sample in cluster.etcd.metrics():
        if sample.name == "grpc_server_handled_total":
            service, method = sample.labels["grpc_service"].rsplit(".", 1)[-1], sample.labels["grpc_method"]
            handled[f"{service}.{method}"] += sample.value
        elif sample.name in totals and not sample.labels:
            totals[sample.name] = sample.value
    nodes_cpu = {n.pid: cpu_seconds(n.pid) for n in cluster.nodes if n.alive()}
    return EtcdSample(
        time.perf_counter(),
        dict(handled),
        totals["etcd_network_client_grpc_sent_bytes_total"],
        totals["etcd_network_client_grpc_received_bytes_total"],
        cpu_seconds(cluster.etcd.proc.pid),
        nodes_cpu,
    )


@dataclass
class EtcdWindow:
    """etcd requests per second over one window, by method."""

    phase: str
    seconds: float
    ops_per_s: float
    by_method: dict[str, float]  # "Service.Method" -> requests/s
    sent_bytes_per_s: float
    received_bytes_per_s: float
    etcd_cpu: float  # cores etcd used
    nodes_cpu: float  # cores the nodes alive at both ends used together
    own_requests: dict[str, float] = field(default_factory=dict)  # the benchmark's own, subtracted above


def etcd_window(phase: str, a: EtcdSample, b: EtcdSample, own: dict[str, int] | None = None) -> EtcdWindow:
    """Rates between two samples; ``own``: requests the benchmark itself made meanwhile ("KV.Range": n),
    taken out of the counts (their bytes stay in sent/received)."""
    dt, own = b.t - a.t, own or {}
    by = {
        m: (b.handled.get(m, 0) - a.handled.get(m, 0) - own.get(m, 0)) / dt
        for m in sorted(set(a.handled) | set(b.handled))
    }
    by = {m: v for m, v in by.items() if v > 0}
    nodes_cpu = sum(b.nodes_cpu_s[pid] - a.nodes_cpu_s[pid] for pid in set(a.nodes_cpu_s) & set(b.nodes_cpu_s))
    return EtcdWindow(
        phase,
        dt,
        sum(by.values()),
        by,
        (b.sent_bytes - a.sent_bytes) / dt,
        (b.received_bytes - a.received_bytes) / dt,
        (b.cpu_s - a.cpu_s) / dt,
        nodes_cpu / dt,
        {m: n / dt for m, n in own.items()},
    )


# ---------------------------------------------------------------------------------------- client processes


@dataclass(frozen=True)
class Spec:
    """One row's op: ``op`` of ``size`` values with ``replicas``, ``batch`` keys a call; or a reference
    (op "loop-recv" / "loop-req" / "loop-send")."""

    op: str
    size: int
    replicas: int = 0
    batch: int = 1

    @property
    def name(self) -> str:
        size = format_size(self.size) if self.batch == 1 else f"{self.batch}x{format_size(self.size)}"
        return f"{self.op} {size}" + (f" r{self.replicas}" if self.replicas else "")

    @property
    def is_reference(self) -> bool:
        return self.op.startswith("loop")


class ClientSide:
    """What one client process runs: the rows' ops on its own keys, and the socket references."""

    def __init__(self, wid: int, store: Any, cfg: dict[str, Any], refs: dict[str, Reference]) -> None:
        self.wid, self.store, self.cfg = wid, store, cfg
        self.src = prefaulted(max(cfg["small_keys"] * SMALL, cfg["large_keys"] * cfg["value_size"]))
        self.dst = prefaulted(max(cfg["batch"] * SMALL, cfg["value_size"]))
        self.refs = refs
        self.runners: dict[str, tuple[Runner, int, float]] = {}  # name -> (run, period, scale)
        self.info = {"pid": os.getpid(), "via": cfg["via"], "epoch": store.map.epoch}

    def prepare(self, spec: Spec) -> None:
        """Build the row's runner, write its keys if it reads, run one untimed pass and check a result."""
        if spec.is_reference:
            ref = self.refs[spec.op]
            ref.run(0, 2)
            self.runners[spec.name] = (ref.run, ref.period, ref.scale)  # GB/s
            return
        count = self.cfg["small_keys"] if spec.size == SMALL else self.cfg["large_keys"]
        w = KVWorkload.carve(f"tp/w{self.wid}/r{spec.replicas}", spec.size, count, spec.batch, self.src, self.dst)
        if spec.op in ("get", "batch_get", "get_into"):
            put_many(self.store, list(zip(w.keys, w.values, strict=True)), spec.replicas)
        run, period, per_call = w.runner(self.store, spec.op, strict=True, replicas=spec.replicas)
        run(0, period)  # warm-up: every key and page touched once
        w.check(self.store, spec.op, replicas=spec.replicas)
        self.runners[spec.name] = (run, period, per_call)  # keys/s

    def rep(self, name: str, seconds: float) -> float:
        """Keys per second (GB/s for a reference) of one timed repetition."""
        run, period, scale = self.runners[name]
        return measure(run, period=period, reps=1, rep_seconds=seconds, warmup=False)[0] * scale


def put_many(store: Any, pairs: list[tuple[str, Any]], replicas: int) -> None:
    """Untimed writes, all in one ``batch_put`` (the client sends each node its share)."""
    raise_batch_errors(store.batch_put(pairs, replicas=replicas))


def client_setup(wid: int, cfg: dict[str, Any], stack: contextlib.ExitStack) -> ClientSide:
    """A client process (see ``Workers``): its reference peers, then its own cluster client."""
    if cfg["via"] == "tcp":  # another host than the nodes': the cluster client reaches them over TCP
        os.environ["MOONCAKEFS_HOST"] = f"cluster-bench-client-{wid}"
    # The reference peers first: they are started with a preexec_fn, unsafe once gRPC threads run.
    root, size = Path(cfg["root"]), cfg["value_size"]
    # The messages rotate through as much memory as a row's values fill (a put reads them from the
    # client's and writes them into the nodes' memory, a get reads them from the nodes'), not one buffer
    # the caches keep; a get lands in one buffer on the client, as the get_into row's does.
    spread = cfg["large_keys"] * size
    sender, server, sink = (
        stack.enter_context(peer(mode, "tcp", size, root, spread=spread)) for mode in ("send", "serve", "sink")
    )
    refs = {
        "loop-recv": stream_reference("loop-recv", sender, size, inbound=True),
        "loop-req": stream_reference("loop-req", server, size, inbound=True, requested=True),
        "loop-send": stream_reference("loop-send", sink, size, inbound=False, spread=spread),
    }
    store = mooncakefs.connect(cfg["url"])
    stack.callback(store.close)
    deadline = time.monotonic() + MAP_TIMEOUT
    while len(store.map.nodes) < cfg["nodes"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"map has {len(store.map.nodes)} nodes, not {cfg['nodes']}")
        time.sleep(0.1)
        store._refresh(store.map)
    return ClientSide(wid, store, cfg, refs)


# ---------------------------------------------------------------------------------------------- throughput


@dataclass
class Row:
    op: str
    size: int
    replicas: int
    batch: int
    reps_keys_per_s: list[float] = field(default_factory=list)  # the clients' sum, per repetition
    keys_per_s: float = 0.0
    gbps: float = 0.0  # value bytes
    wire_gbps: float = 0.0  # bytes sent to or received from nodes: a put with replicas=R sends R copies
    reference: str | None = None
    reference_reps: list[float] = field(default_factory=list)  # GB/s, one right before each repetition
    reference_gbps: float | None = None
    x_ref: float | None = None  # wire GB/s over the reference's GB/s
    stream_reps: list[float] = field(default_factory=list)  # get rows: the loop-recv stream, GB/s
    x_stream: float | None = None  # get rows: GB/s over the stream's GB/s
    error: str | None = None


def row_specs(args: argparse.Namespace) -> list[Spec]:
    out = []
    for r in args.replicas:
        if "small" in args.rows:
            out += [
                Spec("put", SMALL, r),
                Spec("batch_put", SMALL, r, args.batch),
                Spec("get", SMALL, r),
                Spec("batch_get", SMALL, r, args.batch),
            ]
        if "large" in args.rows:
            out += [Spec("put", args.value_size, r), Spec("get_into", args.value_size, r)]
    return out


def measure_throughput(args: argparse.Namespace, clients: Workers) -> tuple[list[Row], dict[str, list[float]]]:
    refs = {name: Spec(name, args.value_size) for name in ("loop-recv", "loop-req", "loop-send")}
    for ref in refs.values():
        clients.ask("prepare", ref)
    ref_samples: dict[str, list[float]] = {name: [] for name in refs}
    rows = []
    for spec in row_specs(args):
        row = Row(spec.op, spec.size, spec.replicas, spec.batch)
        ref = stream = None
        if spec.size != SMALL:
            ref = refs["loop-send" if spec.op == "put" else "loop-req"]
            stream = None if spec.op == "put" else refs["loop-recv"]
            row.reference = ref.op
        try:
            clients.ask("prepare", spec)
            for _ in range(args.reps):
                if ref is not None:
                    gbps = sum(clients.ask("rep", ref.name, args.seconds))
                    row.reference_reps.append(gbps)
                    ref_samples[ref.op].append(gbps)
                if stream is not None:
                    gbps = sum(clients.ask("rep", stream.name, args.seconds))
                    row.stream_reps.append(gbps)
                    ref_samples[stream.op].append(gbps)
                row.reps_keys_per_s.append(sum(clients.ask("rep", spec.name, args.seconds)))
            row.keys_per_s = median(row.reps_keys_per_s) or 0.0
            row.gbps = row.keys_per_s * spec.size / GB
            row.wire_gbps = row.gbps * (spec.replicas if spec.op.endswith("put") else 1)
            if row.reference_reps:
                row.reference_gbps = median(row.reference_reps)
                row.x_ref = row.wire_gbps / row.reference_gbps if row.reference_gbps else None
            if row.stream_reps and (stream_gbps := median(row.stream_reps)):
                row.x_stream = row.wire_gbps / stream_gbps
            progress(
                f"{spec.name}: {row.keys_per_s:,.0f} keys/s {row.gbps:.3f} GB/s"
                + (f" (ref {row.reference_gbps:.3f} GB/s)" if row.reference_gbps else "")
            )
        except WorkersLost:
            raise
        except Exception as exc:  # one failing row must not hide the others
            row.error = str(exc).splitlines()[0][:300]
            progress(f"{spec.name}: FAILED {exc}")
        rows.append(row)
    return rows, ref_samples


# -------------------------------------------------------------------------------------------------- repair


@dataclass
class Repair:
    kill: str  # "node" (not the controller) or "controller"
    victim: str = ""
    victim_pid: int = 0
    nodes_before: int = 0
    keys: int = 0
    keys_on_victim: int = 0  # its share: what has to be copied again
    share_bytes: int = 0
    under_at_kill: int = 0  # keys with fewer than 2 live copies right after the kill (== keys_on_victim)
    lease_s: float | None = None  # kill -> its record gone from etcd (lease expired)
    new_controller_s: float | None = None  # kill -> another node is the controller (controller kills)
    map_s: float | None = None  # kill -> a map without it in etcd
    new_epoch: int | None = None
    first_copy_s: float | None = None  # kill -> the first poll that found fewer under-replicated keys
    repaired_s: float | None = None  # kill -> every key on 2 live nodes
    copy_s: float | None = None  # repaired_s - map_s
    s_per_gib: float | None = None
    copy_s_per_gib: float | None = None
    copy_gbps: float | None = None
    on_new_owners: int | None = None  # keys on the first 2 owners of the new map when repaired
    extra_copies: int | None = None  # keys on more than 2 live nodes when repaired
    values_checked: int = 0
    etcd_reads: int = 0  # the benchmark's own etcd reads while it watched (KV.Range each)
    polls: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s since kill, keys under-replicated)
    etcd: dict[str, Any] | None = None
    error: str | None = None


def holders(links: dict[str, Any], keys: list[str]) -> list[set[str]]:
    """Per key, the nodes (of ``links``) that hold it, asked of each node directly."""
    out: list[set[str]] = [set() for _ in keys]
    for node, link in links.items():
        for i, present in enumerate(link.batch_exists(keys)):
            if present:
                out[i].add(node)
    return out


def write_repair_data(args: argparse.Namespace, store: Any) -> tuple[list[str], np.ndarray, float]:
    """Write the repair phase's keys with replicas=2; (keys, the source values, GB/s of the writes)."""
    size = args.value_size
    count = max(1, args.repair_data // size)
    src = prefaulted(min(count, max(1, 64 * MiB // size)) * size)  # values repeat every 64 MiB
    slots = len(src) // size
    keys = [f"rp/{i}" for i in range(count)]
    t0 = time.perf_counter()
    put_many(
        store, [(k, src[(i % slots) * size : (i % slots + 1) * size]) for i, k in enumerate(keys)], REPAIR_REPLICAS
    )
    return keys, src, count * size / GB / (time.perf_counter() - t0)


def watch_etcd(
    cluster: LocalCluster, victim: str, was_controller: bool, t0: float, out: Repair, stop: threading.Event
) -> None:
    """Note when the victim's record leaves etcd, when another node is controller, when a map without it
    is published: the time of the first read that saw each.  One keys-only read of the cluster's prefix
    per poll (and one of the map when its revision moves), so the benchmark adds little to what it measures."""
    client = cluster.etcd_client()
    prefix = f"/mooncakefs/{cluster.name}/"
    record_key, controller_key = f"{prefix}nodes/{victim}".encode(), f"{prefix}controller".encode()

    def revisions() -> dict[bytes, int]:
        out.etcd_reads += 1
        return {kv.key: kv.mod_revision for kv in client.range(prefix, prefix=True, keys_only=True).kvs}

    first = revisions()
    old_controller, map_revision = first.get(controller_key), first.get(cluster.map_key.encode())
    while not stop.is_set() and (
        out.lease_s is None or out.map_s is None or (was_controller and out.new_controller_s is None)
    ):
        with contextlib.suppress(Exception):
            now = revisions()
            t = time.perf_counter() - t0
            if out.lease_s is None and record_key not in now:
                out.lease_s = t
            taken = now.get(controller_key, old_controller) != old_controller  # a new controller key
            if was_controller and out.new_controller_s is None and taken:
                out.new_controller_s = t
            if out.map_s is None and now.get(cluster.map_key.encode()) != map_revision:
                map_revision = now.get(cluster.map_key.encode())
                out.etcd_reads += 1
                kv = client.get(cluster.map_key)
                pmap = PlacementMap.from_json(kv.value)
                if victim not in pmap.nodes:
                    out.map_s, out.new_epoch = t, pmap.epoch
        stop.wait(ETCD_POLL_S)


def measure_repair(
    args: argparse.Namespace, cluster: LocalCluster, keys: list[str], src: np.ndarray, kill: str
) -> Repair:
    res = Repair(kill)
    size = args.value_size
    live = [n for n in cluster.nodes if n.alive()]
    controller = cluster.controller()
    if kill == "controller":
        victim = cluster.by_id(controller) if controller else None
    else:
        victim = next((n for n in sorted(live, key=lambda n: n.ident) if n.ident != controller), None)
    if victim is None or len(live) - 1 < REPAIR_REPLICAS:
        res.error = f"skipped: {len(live)} live nodes, controller {controller}"
        return res
    res.victim, res.victim_pid, res.nodes_before, res.keys = victim.ident, victim.pid, len(live), len(keys)
    links = {n.ident: mooncakefs.connect("tcp://" + n.tcp) for n in live}
    try:
        before = holders(links, keys)
        short = sum(len(h) < REPAIR_REPLICAS for h in before)
        if short:
            raise RuntimeError(f"{short} of {len(keys)} keys had fewer than {REPAIR_REPLICAS} copies before the kill")
        res.keys_on_victim = sum(victim.ident in h for h in before)
        res.share_bytes = res.keys_on_victim * size
        links.pop(victim.ident).close()
        progress(
            f"repair ({kill}): SIGKILL node {victim.ident} (pid {victim.pid}), which holds "
            f"{res.keys_on_victim} of {len(keys)} keys ({format_size(res.share_bytes)})"
        )
        etcd_before = sample_etcd(cluster)
        stop = threading.Event()
        t0 = time.perf_counter()
        victim.kill()
        watcher = threading.Thread(
            target=watch_etcd, args=(cluster, victim.ident, kill == "controller", t0, res, stop), daemon=True
        )
        watcher.start()
        victim.proc.wait()
        try:
            while True:
                now = holders(links, keys)
                t = time.perf_counter() - t0
                under = sum(len(h) < REPAIR_REPLICAS for h in now)
                res.timeline.append((round(t, 3), under))
                res.polls += 1
                if res.polls == 1:
                    res.under_at_kill = under
                elif res.first_copy_s is None and under < res.under_at_kill:
                    res.first_copy_s = t
                if under == 0:
                    res.repaired_s = t
                    break
                if t > args.repair_timeout:
                    raise TimeoutError(
                        f"{under} keys still had fewer than {REPAIR_REPLICAS} live copies "
                        f"{args.repair_timeout:.0f}s after the kill"
                    )
                time.sleep(args.poll)
            res.extra_copies = sum(len(h) > REPAIR_REPLICAS for h in now)
            watcher.join(timeout=10)
        finally:
            stop.set()
        res.etcd = asdict(
            etcd_window(f"repair ({kill})", etcd_before, sample_etcd(cluster), own={"KV.Range": res.etcd_reads})
        )
        with cluster.connect() as fresh:  # a client whose map lacks the victim
            res.on_new_owners = sum(
                set(fresh.map.owners(encode_key(k))[:REPAIR_REPLICAS]) <= h for k, h in zip(keys, now, strict=True)
            )
            slots = len(src) // size
            for i in range(0, len(keys), max(1, len(keys) // 16)):  # 16 values read back through the cluster
                j = i % slots
                got = np.frombuffer(fresh.get(keys[i]), dtype=np.uint8)
                if not np.array_equal(got, src[j * size : (j + 1) * size]):
                    raise AssertionError(f"{keys[i]} reads back different bytes after the repair")
                res.values_checked += 1
        if res.map_s is not None and res.repaired_s is not None:
            res.copy_s = res.repaired_s - res.map_s
        if res.share_bytes and res.repaired_s is not None:
            res.s_per_gib = res.repaired_s / (res.share_bytes / GiB)
            if res.copy_s is not None and res.copy_s > 0:
                res.copy_s_per_gib = res.copy_s / (res.share_bytes / GiB)
                res.copy_gbps = res.share_bytes / GB / res.copy_s
        progress(
            f"repair ({kill}): lease gone {format_seconds(res.lease_s)}, map {format_seconds(res.map_s)}, first copy "
            f"{format_seconds(res.first_copy_s)}, repaired {format_seconds(res.repaired_s)} after the kill"
        )
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        progress(f"repair ({kill}): FAILED {res.error}")
    finally:
        for link in links.values():
            link.close()
    return res


# -------------------------------------------------------------------------------------------------- rejoin


@dataclass
class RejoinRep:
    """One restart of the node (times from the start of its new process, except drop_s)."""

    drop_s: float | None = None  # kill -> a map without the node in etcd (--rejoin-restart after-drop)
    ready_s: float | None = None  # its ready line: store opened, registered in etcd, first map read
    map_s: float | None = None  # a map in etcd naming this process (its pid in the node's record)
    serve_s: float | None = None  # serving that map: metrics say rejoining 0 and that map's epoch
    rejoin_s: float | None = None  # its log: "rejoining" -> "placement" of the epoch it serves (None: no catch-up)
    passes: int = 0  # "rejoining" lines in its log: catch-ups begun (one per map that took it back)
    rejoin_epochs: list[int] = field(default_factory=list)  # the maps they were for
    seen_rejoining: bool = False  # a metrics scrape saw mooncakefs_cluster_rejoining 1
    epoch_killed: int = 0  # the map in etcd when it was killed (naming the old process)
    epoch: int = 0  # the map it serves again
    others: int = 0  # other nodes in the map it serves
    pulled: int = 0  # mooncakefs_rejoin_pulled
    refused: dict[str, int] = field(default_factory=dict)  # request errors the restarted node answered, by name
    scrapes: int = 0


@dataclass
class Rejoin:
    """One row: the node holding ``keys`` keys, restarted ``len(reps)`` times; medians over the reps."""

    target: int  # rejoin keys put so far (0: none yet, the restart without a catch-up)
    mode: str = ""
    node: str = ""
    keys: int = 0  # objects the node held before the first kill (asked of it)
    keys_after: int | None = None  # and after the last restart
    others: int = 0
    put_s: float | None = None  # putting this row's new keys (batch_put, replicas=1, durable)
    reps: list[RejoinRep] = field(default_factory=list)
    drop_s: float | None = None
    ready_s: float | None = None
    map_s: float | None = None
    serve_s: float | None = None
    rejoin_s: float | None = None
    passes: int = 0  # the most in one restart
    keys_nodes_per_s: float | None = None  # keys x others / rejoin_s: versions checked per second
    pulled: int = 0  # the most in one restart
    refused: dict[str, int] = field(default_factory=dict)  # summed over the restarts
    values_checked: int = 0
    error: str | None = None


def rejoin_keys(pmap: PlacementMap, node: str, start: int, count: int) -> tuple[list[str], int]:
    """``count`` keys whose group's first node is ``node`` ("rj/<i>" from ``start`` on); and the next i."""
    groups = {g for g, nodes in enumerate(pmap.replicas) if nodes and nodes[0] == node}
    out, i = [], start
    while len(out) < count:
        key = f"rj/{i}"
        if pmap.group(encode_key(key)) in groups:
            out.append(key)
        i += 1
    return out, i


class RejoinRun:
    """The rejoin phase: fill one node with keys, restart it, time its way back into service."""

    def __init__(self, args: argparse.Namespace, cluster: LocalCluster, store: Any) -> None:
        self.args, self.cluster, self.store = args, cluster, store
        self.etcd_reads = 0  # this phase's own etcd reads (KV.Range each), taken out of its etcd window
        self.src = prefaulted(256 * SMALL)  # key number i holds slot i % 256
        self.keys: list[str] = []
        self._map: tuple[PlacementMap | None, int] = (None, 0)

    def map(self) -> tuple[PlacementMap | None, int]:
        """The placement map in etcd and its revision: a keys-only read, and the map itself when it moved."""
        client, key = self.cluster.etcd_client(), self.cluster.map_key
        self.etcd_reads += 1
        kvs = [kv for kv in client.range(key, prefix=True, keys_only=True).kvs if kv.key == key.encode()]
        revision = kvs[0].mod_revision if kvs else 0
        if revision and revision != self._map[1]:
            self.etcd_reads += 1
            kv = client.get(key)
            if kv is not None:
                self._map = PlacementMap.from_json(kv.value), kv.mod_revision
        return self._map

    def held(self, node: NodeProcess) -> int:
        with mooncakefs.connect("tcp://" + node.tcp) as link:
            return len(link)

    def run(self) -> list[Rejoin]:
        args, cluster = self.args, self.cluster
        rows: list[Rejoin] = []
        self.etcd_reads += 1
        controller = cluster.controller()
        live = [n for n in cluster.nodes if n.alive()]
        node = next((n for n in sorted(live, key=lambda n: n.ident, reverse=True) if n.ident != controller), None)
        if node is None:
            return [Rejoin(0, error=f"skipped: no live node but the controller {controller}")]
        progress(
            f"rejoin: node {node.ident} (pid {node.pid}); restarts {args.rejoin_restart}, {args.rejoin_reps} per row"
        )
        next_i, failed = 0, None
        for target in [0, *args.rejoin_keys]:
            row = Rejoin(target, args.rejoin_restart, node.ident)
            rows.append(row)
            if failed:
                row.error = f"skipped: {failed}"
                continue
            try:
                if target > len(self.keys):
                    next_i = self.fill(node, target, next_i, row)
                row.keys = self.held(node)
                for r in range(args.rejoin_reps):
                    rep = self.restart_once(node)
                    row.reps.append(rep)
                    progress(
                        f"rejoin ({row.keys} keys) #{r + 1}: ready {format_seconds(rep.ready_s)}, "
                        f"in map {format_seconds(rep.map_s)}, serving {format_seconds(rep.serve_s)} after start; "
                        f"catch-up {format_seconds(rep.rejoin_s)} in "
                        f"{rep.passes} pass(es), {rep.others} other nodes, pulled {rep.pulled}"
                        + (f", refused {rep.refused}" if rep.refused else "")
                    )
                row.keys_after = self.held(node)
                row.values_checked = self.check()
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                failed = f"the row of {target} keys failed"
                progress(f"rejoin ({target} keys): FAILED {row.error}")
            self.summarize(row)
        if self.keys:
            with contextlib.suppress(Exception):
                progress(f"rejoin: removed its {self.store.remove_prefix('rj/')} keys")
        return rows

    def fill(self, node: NodeProcess, target: int, next_i: int, row: Rejoin) -> int:
        """Put keys (owned by ``node``) until it has been given ``target`` of them."""
        pmap, _ = self.map()
        assert pmap is not None
        keys, next_i = rejoin_keys(pmap, node.ident, next_i, target - len(self.keys))
        self.store._refresh(self.store.map)
        t0 = time.perf_counter()
        for j in range(0, len(keys), REJOIN_BATCH):
            chunk = keys[j : j + REJOIN_BATCH]
            base = len(self.keys) + j
            pairs = [
                (k, self.src[((base + i) % 256) * SMALL : ((base + i) % 256 + 1) * SMALL]) for i, k in enumerate(chunk)
            ]
            raise_batch_errors(self.store.batch_put(pairs, replicas=1, durable=True))
        row.put_s = time.perf_counter() - t0
        self.keys += keys
        progress(f"rejoin: put {len(keys)} x 4KiB (replicas=1, durable) owned by {node.ident} in {row.put_s:.1f}s")
        return next_i

    def check(self, n: int = 64) -> int:
        """Read ``n`` of the keys back through the cluster client; the count checked."""
        if not self.keys:
            return 0
        step = max(1, len(self.keys) // n)
        picks = list(range(0, len(self.keys), step))[:n]
        self.store._refresh(self.store.map)
        got = self.store.batch_get([self.keys[i] for i in picks])
        for i, value in zip(picks, got, strict=True):
            slot = i % 256
            if value is None or not np.array_equal(
                np.frombuffer(value, dtype=np.uint8), self.src[slot * SMALL : (slot + 1) * SMALL]
            ):
                raise AssertionError(
                    f"{self.keys[i]} reads back {'nothing' if value is None else 'other bytes'} after the restarts"
                )
        return len(picks)

    def restart_once(self, node: NodeProcess) -> RejoinRep:
        cluster, rep = self.cluster, RejoinRep()
        ident = node.ident
        before, _ = self.map()
        rep.epoch_killed = before.epoch if before is not None else 0
        node.kill()
        node.proc.wait()
        t_kill = time.perf_counter()
        if self.args.rejoin_restart == "after-drop":
            while True:
                pmap, _ = self.map()
                if pmap is not None and ident not in pmap.nodes:
                    rep.drop_s = time.perf_counter() - t_kill
                    break
                if time.perf_counter() - t_kill > REJOIN_TIMEOUT:
                    raise TimeoutError(f"no map without node {ident} {REJOIN_TIMEOUT:.0f}s after the kill")
                time.sleep(ETCD_POLL_S)
        port = free_port()
        t0 = time.perf_counter()
        cluster.restart(node, metrics=f"127.0.0.1:{port}")
        polls = 0
        while True:
            now = time.perf_counter() - t0
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"restarted node {ident} exited with {node.proc.returncode}:\n{node.output()[-3000:]}"
                )
            if rep.ready_s is None and node.ready():
                rep.ready_s = now
            pmap, _ = self.map()
            record = pmap.nodes.get(ident) if pmap is not None else None
            in_map = record is not None and record.get("pid") == node.pid
            if in_map and rep.map_s is None:
                rep.map_s = now
            if rep.ready_s is not None and (polls % 2 == 0 or in_map):
                samples = scrape(f"http://127.0.0.1:{port}/metrics")
                m = {s.name: s.value for s in samples if not s.labels}
                rep.scrapes += 1
                rejoining = m.get("mooncakefs_cluster_rejoining")
                rep.seen_rejoining |= rejoining == 1
                if in_map and pmap is not None and rejoining == 0 and m.get("mooncakefs_cluster_epoch") == pmap.epoch:
                    rep.serve_s, rep.epoch, rep.others = now, pmap.epoch, len(pmap.nodes) - 1
                    rep.pulled = int(m.get("mooncakefs_rejoin_pulled_total", m.get("mooncakefs_rejoin_pulled", 0)))
                    rep.refused = {
                        s.labels.get("error", ""): int(s.value)
                        for s in samples
                        if s.name == "mooncakefs_request_errors_total" and s.value
                    }
                    break
            if now > REJOIN_TIMEOUT:
                raise TimeoutError(
                    f"node {ident} not serving {REJOIN_TIMEOUT:.0f}s after its restart (ready "
                    f"{format_seconds(rep.ready_s)}, in map {format_seconds(rep.map_s)}, scrapes {rep.scrapes})"
                )
            polls += 1
            time.sleep(REJOIN_POLL_S)
        events = []
        for line in node.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        rejoins = [e for e in events if e.get("msg") == "rejoining"]
        rep.passes = len(rejoins)
        rep.rejoin_epochs = [e.get("epoch", 0) for e in rejoins]
        began = next((e["ts"] for e in rejoins if e.get("epoch") == rep.epoch), None)
        served = next((e["ts"] for e in events if e.get("msg") == "placement" and e.get("epoch") == rep.epoch), None)
        if began is not None and served is not None:
            rep.rejoin_s = served - began
        return rep

    def summarize(self, row: Rejoin) -> None:
        reps = row.reps
        if not reps:
            return
        row.others = reps[-1].others
        row.drop_s = median([r.drop_s for r in reps])
        row.ready_s = median([r.ready_s for r in reps])
        row.map_s = median([r.map_s for r in reps])
        row.serve_s = median([r.serve_s for r in reps])
        row.rejoin_s = median([r.rejoin_s for r in reps])
        row.passes = max(r.passes for r in reps)
        row.pulled = max(r.pulled for r in reps)
        refused: Counter[str] = Counter()
        for r in reps:
            refused.update(r.refused)
        row.refused = dict(refused)
        if row.rejoin_s and row.keys:
            row.keys_nodes_per_s = row.keys * row.others / row.rejoin_s


# -------------------------------------------------------------------------------------------------- report


def render(
    args: argparse.Namespace,
    rows: Sequence[Row],
    refs: dict[str, Any],
    windows: Sequence[EtcdWindow],
    map_info: dict[str, Any],
    repairs: Sequence[Repair],
    rejoins: Sequence[Rejoin],
    notes: Sequence[str],
) -> str:
    ssd = args.ssd if args.node_ssd == args.ssd else f"{args.node_ssd} (--ssd {args.ssd} raised for rejoin)"
    out = [
        f"cluster: {args.nodes} nodes (dram {args.dram}, ssd {ssd}, lease ttl {args.lease_ttl}s), "
        f"{args.clients} client processes via {args.via}; median of {args.reps} reps of {args.seconds:g}s; "
        f"phases {','.join(args.phases) or 'none'}"
    ]
    if "throughput" in args.phases:
        out += throughput_section(rows, refs)
    out += etcd_section(windows, map_info)
    if "rejoin" in args.phases:
        out += rejoin_section(args, rejoins)
    if "repair" in args.phases:
        out += repair_section(args, repairs)
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def throughput_section(rows: Sequence[Row], refs: dict[str, Any]) -> list[str]:
    out = ["", "physical reference (all client processes at once, summed; median of its reps):"]
    out.append(
        format_table(
            ["ref", "GB/s", "reps", "what"],
            [
                [k, format_number(v["gbps"]) if v["gbps"] else "-", str(len(v["samples"])), v["what"]]
                for k, v in refs.items()
            ],
            [False, True, True, False],
        )
    )
    body = []
    for r in rows:
        size = format_size(r.size) if r.batch == 1 else f"{r.batch}x{format_size(r.size)}"
        if r.error:
            body.append([str(r.replicas), r.op, size, "FAILED", "", "", "", "", "", r.error[:60]])
            continue
        body.append(
            [
                str(r.replicas),
                r.op,
                size,
                f"{r.keys_per_s:,.0f}",
                f"{r.gbps:.3f}",
                f"{r.wire_gbps:.3f}",
                r.reference or "",
                format_number(r.reference_gbps) if r.reference_gbps else "",
                f"{r.x_ref:.2f}" if r.x_ref is not None else "",
                f"{r.x_stream:.2f}" if r.x_stream is not None else "",
            ]
        )
    out += [
        "",
        "aggregate throughput:",
        format_table(
            ["R", "op", "size", "keys/s", "GB/s", "wire GB/s", "ref", "ref GB/s", "x ref", "x stream"],
            body,
            [True, False, True, True, True, True, False, True, True, True],
        ),
    ]
    return out


def etcd_section(windows: Sequence[EtcdWindow], map_info: dict[str, Any]) -> list[str]:
    methods = sorted({m for w in windows for m in w.by_method}, key=lambda m: m.split(".")[1])
    etcd_rows = [
        [
            w.phase,
            f"{w.seconds:.1f}",
            f"{w.ops_per_s:.1f}",
            *(f"{w.by_method[m]:.1f}" if m in w.by_method else "-" for m in methods),
            f"{w.sent_bytes_per_s / 1e3:,.1f}",
            f"{w.etcd_cpu * 100:.1f}%",
            f"{w.nodes_cpu * 100:.1f}%",
        ]
        for w in windows
    ]
    return [
        "",
        "etcd gRPC requests/s caused by the cluster (grpc_server_handled_total deltas):",
        format_table(
            ["phase", "s", "ops/s", *(m.split(".")[1] for m in methods), "sent kB/s", "etcd cpu", "nodes cpu"],
            etcd_rows,
            [False] + [True] * (len(methods) + 5),
        ),
        f"placement map in etcd ({map_info['key']}): {map_info['bytes']:,} bytes, epoch {map_info['epoch']}, "
        f"{map_info['nodes']} nodes, {map_info['groups']} groups x width {map_info['width']}",
    ]


def rejoin_section(args: argparse.Namespace, rejoins: Sequence[Rejoin]) -> list[str]:
    body = []
    for r in rejoins:
        if r.error and not r.reps:
            body.append([f"{r.target:,}", "", "", "", "", "", "", "", "", "", "", "", r.error[:70]])
            continue
        keys = f"{r.keys:,}" + ("" if r.keys_after in (None, r.keys) else f" ({r.keys_after:,} after)")
        body.append(
            [
                keys,
                str(r.others),
                str(len(r.reps)),
                format_seconds(r.drop_s),
                format_seconds(r.ready_s),
                format_seconds(r.map_s),
                format_seconds(r.serve_s),
                format_seconds(r.rejoin_s, 3),
                str(r.passes),
                f"{r.keys_nodes_per_s:,.0f}" if r.keys_nodes_per_s else "-",
                str(r.pulled),
                ",".join(f"{k}:{v}" for k, v in sorted(r.refused.items())) or "0",
                (r.error or "")[:70],
            ]
        )
    return [
        "",
        f"rejoin of one node restarted with data (SIGKILL, restart {args.rejoin_restart}; keys of "
        f"{format_size(SMALL)}, replicas=1, durable; times from the new process's start, medians):",
        format_table(
            [
                "keys held",
                "others",
                "reps",
                "dropped",
                "ready",
                "in map",
                "serving",
                "catch-up",
                "passes",
                "keys*nodes/s",
                "pulled",
                "refused",
                "",
            ],
            body,
            [True] * 11 + [False, False],
        ),
    ]


def repair_section(args: argparse.Namespace, repairs: Sequence[Repair]) -> list[str]:
    out: list[str] = []
    rep_rows = []
    for r in repairs:
        if r.error and r.repaired_s is None:
            rep_rows.append([r.kill, r.victim or "-", "", "", "", "", "", "", "", "", "", "", r.error[:70]])
            continue
        rep_rows.append(
            [
                r.kill,
                r.victim,
                f"{r.keys_on_victim}/{r.keys}",
                f"{r.share_bytes / MiB:.0f}",
                format_seconds(r.lease_s),
                format_seconds(r.new_controller_s) if r.kill == "controller" else "",
                format_seconds(r.map_s),
                format_seconds(r.first_copy_s),
                format_seconds(r.repaired_s),
                format_seconds(r.copy_s),
                format_number(r.s_per_gib) if r.s_per_gib else "-",
                format_number(r.copy_s_per_gib) if r.copy_s_per_gib else "-",
                f"{r.copy_gbps:.3f}" if r.copy_gbps else "-",
            ]
        )
    out += [
        "",
        f"repair after SIGKILL of one node ({args.repair_data // args.value_size} x "
        f"{format_size(args.value_size)}, replicas={REPAIR_REPLICAS}; times since the kill):",
        format_table(
            [
                "kill",
                "victim",
                "its keys",
                "MiB",
                "lease gone",
                "new ctrl",
                "new map",
                "1st copy",
                "repaired",
                "copying",
                "s/GiB",
                "copy s/GiB",
                "copy GB/s",
            ],
            rep_rows,
            [False, False, *[True] * 11],
        ),
    ]
    return out


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8, help="node processes, 3 to 12 (%(default)s)")
    p.add_argument("--value-size", default="1MiB", help="size of the large values (%(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="length of one timed repetition (%(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row, median reported (%(default)s)")
    p.add_argument("--clients", type=int, default=2, help="client processes loading the cluster (%(default)s)")
    p.add_argument(
        "--via",
        choices=("tcp", "unix"),
        default="tcp",
        help="how the clients reach the nodes: tcp as from another host, or unix (%(default)s)",
    )
    p.add_argument("--replicas", default="1,2", help="replica counts of the throughput rows (%(default)s)")
    p.add_argument(
        "--rows",
        default="small,large",
        help="throughput rows: small (4KiB values), large (--value-size values) (%(default)s)",
    )
    p.add_argument("--batch", type=int, default=32, help="keys per batch call (%(default)s)")
    p.add_argument("--small-keys", type=int, default=1024, help="distinct 4KiB keys per client and row (%(default)s)")
    p.add_argument("--large-data", default="32MiB", help="distinct large values per client and row (%(default)s)")
    p.add_argument("--repair-data", default="512MiB", help="data written with replicas=2 before a kill (%(default)s)")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="phases to run, of throughput, rejoin, repair (%(default)s; the at-rest etcd window always runs)",
    )
    p.add_argument(
        "--rejoin-keys", default="20000,100000", help="keys the restarted node holds, one row each (%(default)s)"
    )
    p.add_argument("--rejoin-reps", type=int, default=3, help="restarts per rejoin row, median reported (%(default)s)")
    p.add_argument(
        "--rejoin-restart",
        choices=("after-drop", "at-once"),
        default="after-drop",
        help="restart the killed node once the map has dropped it, or at once (%(default)s)",
    )
    p.add_argument(
        "--kill",
        default="node,controller",
        help="kills, in order: 'node' (one that is not the controller), 'controller' (%(default)s)",
    )
    p.add_argument("--poll", type=float, default=0.1, help="seconds between copy checks after a kill (%(default)s)")
    p.add_argument("--repair-timeout", type=float, default=120.0, help="give up on a repair after (%(default)s)s")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="the at-rest etcd window (%(default)s)")
    p.add_argument("--lease-ttl", type=int, default=3, help="the nodes' --lease-ttl (%(default)s)")
    p.add_argument("--dram", default="64MiB", help="each node's --dram (%(default)s)")
    p.add_argument("--ssd", default="256MiB", help="each node's --ssd (%(default)s)")
    p.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="parent of the temporary directory (%(default)s)",
    )
    p.add_argument("--json", default="bench-results/cluster_bench.json", help="JSON results (%(default)s)")
    args = p.parse_args(argv)
    try:
        args.value_size = parse_size(args.value_size)
        args.large_data = parse_size(args.large_data)
        args.repair_data = parse_size(args.repair_data)
        args.replicas = [int(r) for r in args.replicas.split(",") if r.strip()]
        args.rejoin_keys = sorted({int(k) for k in args.rejoin_keys.split(",") if k.strip()})
        ssd_path, _, ssd_size = args.ssd.rpartition(":")
        ssd_bytes = parse_size(ssd_size, what="--ssd")
    except ValueError as exc:
        p.error(str(exc))
    args.kill = [k.strip() for k in args.kill.split(",") if k.strip()]
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    if not phases <= set(PHASES):
        p.error(f"--phases takes {', '.join(PHASES)}")
    args.phases = [ph for ph in PHASES if ph in phases]
    args.rows = {x.strip() for x in args.rows.split(",") if x.strip()}
    if not args.rows or not args.rows <= {"small", "large"}:
        p.error("--rows takes small and large")
    if "rejoin" in args.phases and (not args.rejoin_keys or args.rejoin_keys[0] < 1 or args.rejoin_reps < 1):
        p.error("--rejoin-keys must be positive counts and --rejoin-reps at least 1")
    # The rejoin keys live on one node's SSD (4 KiB each, durable): room for them on top of --ssd.
    need = -(-max(args.rejoin_keys, default=0) * SMALL * 10 // 9 // MiB) * MiB + 128 * MiB  # + 2 segments
    if "rejoin" not in args.phases or ssd_bytes >= need:
        args.node_ssd = args.ssd
    else:
        args.node_ssd = f"{ssd_path + ':' if ssd_path else ''}{format_size(ssd_bytes + need)}"
    if not 3 <= args.nodes <= 12:
        p.error("--nodes must be from 3 to 12")
    if not set(args.kill) <= {"node", "controller"}:
        p.error("--kill takes node and controller")
    if args.reps < 1 or args.clients < 1 or args.batch < 1 or args.seconds <= 0 or args.value_size < 1:
        p.error("--reps, --clients, --batch, --seconds and --value-size must be positive")
    if not args.replicas or not all(1 <= r <= 3 for r in args.replicas):
        p.error("--replicas are from 1 to 3 (the map's width)")
    args.small_keys = max(args.batch, args.small_keys - args.small_keys % args.batch)
    args.large_keys = max(2, args.large_data // args.value_size)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started = time.perf_counter()
    notes: list[str] = []
    rows: list[Row] = []
    ref_samples: dict[str, list[float]] = {}
    repairs: list[Repair] = []
    rejoins: list[Rejoin] = []
    keys: list[str] = []
    write_gbps: float | None = None
    windows: list[EtcdWindow] = []
    root = Path(tempfile.mkdtemp(prefix="cbench-", dir=args.dir))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        cluster = LocalCluster(
            root,
            args.dram,
            "--ssd",
            args.node_ssd,
            lease_ttl=args.lease_ttl,
            map_timeout=MAP_TIMEOUT,
            stop_timeout=STOP_TIMEOUT,
        )
        stack.callback(cluster.close)
        etcd_version = cluster.start_etcd().version()
        progress(f"etcd on {cluster.etcd_url}; starting {args.nodes} nodes under {root}")
        ready_s = cluster.start_nodes(args.nodes, READY_TIMEOUT)
        t_map = time.perf_counter()
        store = cluster.connect()
        stack.callback(store.close)
        map_s = time.perf_counter() - t_map
        progress(
            f"{args.nodes} nodes ready in {ready_s:.1f}s, in the placement map (epoch {store.map.epoch}) "
            f"{map_s:.1f}s later; controller {cluster.controller()}"
        )

        # -- etcd at rest; the placement map
        time.sleep(1.0)
        value = cluster.etcd_client().get(cluster.map_key).value
        pmap = PlacementMap.from_json(value)
        map_info = {
            "key": cluster.map_key,
            "bytes": len(value),
            "epoch": pmap.epoch,
            "nodes": len(pmap.nodes),
            "groups": pmap.groups,
            "width": pmap.width,
        }
        progress(f"etcd at rest for {args.idle_seconds:g}s")
        a = sample_etcd(cluster)
        time.sleep(args.idle_seconds)
        windows.append(etcd_window("at rest", a, sample_etcd(cluster)))

        # -- throughput
        if "throughput" in args.phases:
            cfg = {
                "url": cluster.url,
                "nodes": args.nodes,
                "via": args.via,
                "root": str(root),
                "value_size": args.value_size,
                "batch": args.batch,
                "small_keys": args.small_keys,
                "large_keys": args.large_keys,
            }
            progress(f"starting {args.clients} client processes")
            clients = Workers(args.clients, client_setup, cfg, name="cluster-bench-client", timeout=WORKER_TIMEOUT)
            stack.callback(clients.close)
            a = sample_etcd(cluster)
            rows, ref_samples = measure_throughput(args, clients)
            windows.append(etcd_window("under load", a, sample_etcd(cluster)))
            clients.close()
            removed = store.remove_prefix("tp/")
            progress(f"removed the {removed} throughput-phase copies")

        # -- rejoin
        if "rejoin" in args.phases:
            a = sample_etcd(cluster)
            run = RejoinRun(args, cluster, store)
            rejoins = run.run()
            windows.append(etcd_window("rejoin", a, sample_etcd(cluster), own={"KV.Range": run.etcd_reads}))
            with contextlib.suppress(Exception):
                store._refresh(store.map)

        # -- repair
        if "repair" in args.phases:
            keys, src, write_gbps = write_repair_data(args, store)
            progress(
                f"wrote {len(keys)} x {format_size(args.value_size)} with replicas={REPAIR_REPLICAS} "
                f"at {write_gbps:.3f} GB/s"
            )
            for kill in args.kill:
                repairs.append(measure_repair(args, cluster, keys, src, kill))
                if repairs[-1].etcd:
                    windows.append(EtcdWindow(**repairs[-1].etcd))
                with contextlib.suppress(Exception):
                    store._refresh(store.map)
    # everything stopped and removed from here on

    refs = {
        name: {
            "gbps": median(s),
            "samples": s,
            "what": (
                f"{args.clients}x loopback TCP {format_size(args.value_size)} messages "
                f"(the peer's, and a put's source, rotating over {format_size(args.large_keys * args.value_size)}): "
                + {
                    "loop-recv": "sender process sendall, back to back -> client recv_into(MSG_WAITALL)",
                    "loop-req": "client 1-byte request -> server process sendall -> client recv_into(MSG_WAITALL)",
                    "loop-send": "client sendall -> sink process recv_into + 1-byte ack",
                }[name]
            ),
        }
        for name, s in ref_samples.items()
    }
    anomalies = find_anomalies(args, rows, windows, repairs, rejoins)
    if "throughput" in args.phases:
        notes.append(
            f"keys/s counts keys (batch rows: {args.batch} per call); GB/s counts value bytes (1e9 B/s); "
            "wire GB/s counts every copy a put sends (R x); x ref = wire GB/s over the reference taken right "
            "before each rep (get: loop-req, a round trip per value as a get pays); x stream = over loop-recv, "
            "a stream with no requests"
        )
    notes.append(
        "etcd: at rest = nodes idle; under load = the whole throughput phase; rejoin = the whole rejoin "
        "phase (kills, map changes, restarts); repair = kill -> repaired; the benchmark's own reads (rejoin: "
        "a keys-only Range every 20-100 ms, the map when it moved; repair: a keys-only Range every 20 ms) "
        "taken out of ops/s but not of sent kB/s; nodes cpu = cores the nodes alive at both ends used "
        "together (client load and repair included)"
    )
    if "rejoin" in args.phases:
        notes.append(
            "rejoin: keys held = objects the node reported before the first kill; dropped = kill -> a map "
            "without it (after-drop only); ready = its ready line (store opened, registered in etcd); in "
            "map = a map in etcd naming the new process; serving = its metrics show rejoining 0 and that "
            "map's epoch (scraped every ~0.1-0.2s); catch-up = its own log, 'rejoining' -> 'placement' of "
            "that epoch; keys*nodes/s = keys held x others / catch-up; passes = catch-ups begun per "
            "restart; refused = request errors the restarted node answered (Rejoining: a client asked "
            "it during the catch-up); the first row (before any rejoin keys were put) has no catch-up"
        )
    if "repair" in args.phases:
        notes += [
            "repair: new map = kill -> a map without the node in etcd (lease expiry + controller); copying = "
            "new map -> every key on 2 live nodes (includes the nodes reading the new map); s/GiB divide by "
            "the dead node's share",
            f"repair data written at {write_gbps:.3f} GB/s (this process, via unix, one batch_put, "
            f"replicas={REPAIR_REPLICAS})",
        ]
    notes += [f"ANOMALY: {a}" for a in anomalies]
    if args.via == "unix" and "throughput" in args.phases:
        notes.insert(
            1,
            "via unix, large values move by memcpy through the nodes' shared pools: the loopback TCP "
            "reference is no bound there (x ref may exceed 1)",
        )
    print(render(args, rows, refs, windows, map_info, repairs, rejoins, notes))
    write_json(
        args.json,
        {
            "tool": "cluster_bench",
            "machine": machine_info({"etcd": etcd_version}),
            "config": {k: v for k, v in vars(args).items()},
            "startup": {"nodes_ready_s": ready_s, "map_complete_s": map_s},
            "references": refs,
            "rows": [asdict(r) for r in rows],
            "etcd": {"windows": [asdict(w) for w in windows], "placement_map": map_info},
            "rejoin": {
                "restart": args.rejoin_restart,
                "value_size": SMALL,
                "replicas": 1,
                "durable": True,
                "node_ssd": args.node_ssd,
                "rows": [asdict(r) for r in rejoins],
            }
            if "rejoin" in args.phases
            else None,
            "repair": {
                "write_gbps": write_gbps,
                "keys": len(keys),
                "value_size": args.value_size,
                "replicas": REPAIR_REPLICAS,
                "rounds": [asdict(r) for r in repairs],
            }
            if "repair" in args.phases
            else None,
            "anomalies": anomalies,
            "notes": notes,
            "seconds": time.perf_counter() - started,
        },
    )
    progress(f"wrote {args.json} ({time.perf_counter() - started:.0f}s)")
    return 0


def find_anomalies(
    args: argparse.Namespace,
    rows: Sequence[Row],
    windows: Sequence[EtcdWindow],
    repairs: Sequence[Repair],
    rejoins: Sequence[Rejoin] = (),
) -> list[str]:
    out = [f"row {r.op} {format_size(r.size)} R={r.replicas} failed: {r.error}" for r in rows if r.error]
    rest = next((w for w in windows if w.phase == "at rest"), None)
    load = next((w for w in windows if w.phase == "under load"), None)
    if rest and load and load.ops_per_s > 1.5 * rest.ops_per_s + 2:
        out.append(
            f"etcd ops/s under load ({load.ops_per_s:.1f}) exceed those at rest ({rest.ops_per_s:.1f}): "
            "something per object or per batch touches etcd"
        )
    for r in repairs:
        if r.error:
            out.append(f"repair ({r.kill}): {r.error}")
        if r.extra_copies:
            out.append(
                f"repair ({r.kill}): {r.extra_copies} keys were on more than {REPAIR_REPLICAS} nodes "
                "when the repair completed"
            )
        if r.on_new_owners is not None and r.on_new_owners < r.keys:
            out.append(f"repair ({r.kill}): only {r.on_new_owners} of {r.keys} keys were on their new map owners")
        if r.under_at_kill and r.under_at_kill != r.keys_on_victim:
            out.append(
                f"repair ({r.kill}): {r.under_at_kill} keys under-replicated at the first poll, but the "
                f"victim held {r.keys_on_victim}"
            )
    for j in rejoins:
        if j.error:
            out.append(f"rejoin ({j.target} keys): {j.error}")
        if j.pulled:
            out.append(f"rejoin ({j.keys} keys): the node pulled {j.pulled} values, but none changed while it was away")
        if j.keys_after is not None and j.keys_after < j.keys:
            out.append(f"rejoin: the node held {j.keys} objects before its restarts, {j.keys_after} after")
        if j.keys and j.reps and any(r.passes == 0 for r in j.reps):
            out.append(f"rejoin ({j.keys} keys): a restart with data served without catching up")
        for r in j.reps:
            if r.passes > 1:
                stale = (
                    " (the first for the map it was killed under, which names its previous process)"
                    if r.rejoin_epochs[0] == r.epoch_killed
                    else ""
                )
                out.append(
                    f"rejoin ({j.keys} keys): {r.passes} catch-up passes in one restart, for epochs "
                    f"{r.rejoin_epochs}{stale}; it serves epoch {r.epoch}"
                )
                break
    return out


if __name__ == "__main__":
    sys.exit(main())
