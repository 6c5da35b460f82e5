#!/usr/bin/env python3
"""CPU time per operation of a cluster's large put and get_into (or of a single node's small get and put),
on the clients and on the nodes, and an interleaved A/B of it between two trees.

On the 2-core dev VMs, ``cluster_bench.py``'s 2 client processes and 8 nodes keep both cores busy, so the
CPU an operation costs, summed over its client and its node, is what bounds the rates there; its
repetitions also spread by +-20% on a shared VM, more than most changes move them.  This counts that CPU
directly (user + system time from /proc, every thread, of the client processes and of all the nodes,
around each slice), which a busy neighbour moves much less.  The cluster is ``cluster_bench.py``'s (8
nodes with a DRAM and an SSD tier, a single-member etcd, clients that claim another host, so every value
crosses loopback TCP); ``--clients`` client processes each put and read their own 32 values of
``--value-size`` from a prefaulted numpy array (a value 16 bytes into a page, as numpy's are), all at
once, for ``--seconds`` a slice; the nodes' idle work (their etcd leases and watches) is in their share.

With ``--target node``, the same for one node (no etcd) reached ``--via`` loopback TCP or its Unix socket,
by default with its ops ``get`` and ``put`` of 4 KiB values: the per-request cost of the node and its
client, which small values show best.

With ``--ab TREE``, the same runs on TREE's code too (its own cluster, from its root, its code on
PYTHONPATH), the two trees' slices alternating, the order flipped each round; printed: the medians of
each tree and of the per-round ratios (this tree over TREE).

Examples::

    python3 tools/bench/cluster_cpu.py
    python3 tools/bench/cluster_cpu.py --ab /work/wt-base --rounds 10 --seconds 1.5
    python3 tools/bench/cluster_cpu.py --target node --via tcp --ab /work/wt-base --rounds 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    LocalCluster,
    cpu_seconds,
    format_table,
    machine_info,
    median,
    parse_size,
    prefaulted,
    running_node,
    write_json,
)

OPS = {"cluster": ("put", "get_into"), "node": ("get", "put")}
SIZES = {"cluster": "1MiB", "node": "4KiB"}
VALUES = 32  # distinct values per client process
NODES = 8


def client_main(url: str, wid: int, size: int, replicas: int) -> None:
    """A client process: its values put once and read once, then ``<op> <seconds>`` lines on stdin, each
    answered with a JSON line (ops done, wall seconds, this process's CPU seconds)."""
    cluster = url.startswith("etcd://")
    if cluster:
        os.environ["MOONCAKEFS_HOST"] = f"cluster-cpu-client-{wid}"  # another host: values cross TCP
    import mooncakefs

    store = mooncakefs.connect(url)
    while cluster and len(store.map.nodes) < NODES:
        time.sleep(0.1)
        store._refresh(store.map)
    source, landing = prefaulted(VALUES * size), prefaulted(size)
    keys = [f"cluster-cpu/{wid}/{i}" for i in range(VALUES)]
    values = [source[i * size : (i + 1) * size] for i in range(VALUES)]
    placed = {"replicas": replicas} if cluster else {}

    def run(op: str, i: int) -> None:
        if op == "put":
            store.put(keys[i % VALUES], values[i % VALUES], **placed)
        elif op == "get":
            store.get(keys[i % VALUES])
        else:
            store.get_into(keys[i % VALUES], landing)

    for op in ("put", "get_into"):  # every value and page touched once
        for i in range(VALUES):
            run(op, i)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        op, seconds = line.split()
        cpu, start, i = cpu_seconds(os.getpid()), time.perf_counter(), 0
        while time.perf_counter() - start < float(seconds):
            run(op, i)
            i += 1
        wall = time.perf_counter() - start
        print(json.dumps({"ops": i, "wall": wall, "cpu": cpu_seconds(os.getpid()) - cpu}), flush=True)
    store.close()


def serve_main(args: argparse.Namespace) -> None:
    """A cluster (or a node) and its client processes; ``<op> <seconds>`` lines on stdin run a slice on every
    client at once, answered with one JSON line: ops, wall seconds, clients' and nodes' CPU seconds."""
    root = Path(tempfile.mkdtemp(prefix="cluster-cpu-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        if args.target == "node":
            node = stack.enter_context(running_node(root, "512MiB"))
            url, nodes = node.tcp_url if args.via == "tcp" else node.unix_url, [node.pid]
        else:
            cluster = LocalCluster(root, "64MiB", "--ssd", "256MiB")
            stack.callback(cluster.close)
            cluster.start_etcd()
            cluster.start_nodes(NODES, 120.0)
            url, nodes = cluster.url, [n.proc.pid for n in cluster.nodes]
        command = [sys.executable, __file__, "client", url, "--value-size", str(args.value_size), "--replicas"]
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    [*command, str(args.replicas), "--wid", str(w)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            for w in range(args.clients)
        ]
        for proc in procs:
            stack.callback(proc.kill)
            if not json.loads(proc.stdout.readline()).get("ready"):  # type: ignore[union-attr]
                raise RuntimeError("a client process failed to start")
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            before = sum(cpu_seconds(pid) for pid in nodes)
            for proc in procs:
                proc.stdin.write(line)  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
            done = [json.loads(proc.stdout.readline()) for proc in procs]  # type: ignore[union-attr]
            nodes_cpu = sum(cpu_seconds(pid) for pid in nodes) - before
            total = {"ops": sum(d["ops"] for d in done), "wall": max(d["wall"] for d in done)}
            print(json.dumps({**total, "client": sum(d["cpu"] for d in done), "nodes": nodes_cpu}), flush=True)


def start_tree(tree: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    """``serve`` with ``tree``'s code: run from its root, its code on PYTHONPATH (nodes included)."""
    command = [sys.executable, __file__, "serve", "--clients", str(args.clients), "--value-size", str(args.value_size)]
    proc = subprocess.Popen(
        [*command, "--replicas", str(args.replicas), "--target", args.target, "--via", args.via],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if not json.loads(proc.stdout.readline()).get("ready"):  # type: ignore[union-attr]
        raise RuntimeError(f"the cluster of {tree} failed to start")
    return proc


def ask(proc: subprocess.Popen[str], op: str, seconds: float) -> dict[str, float]:
    proc.stdin.write(f"{op} {seconds}\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    return json.loads(proc.stdout.readline())  # type: ignore[union-attr]


def per_op(slice_: dict[str, float], what: str) -> float:
    return slice_[what] / slice_["ops"] * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="measure", choices=("measure", "serve", "client"), help=argparse.SUPPRESS)
    p.add_argument("url", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--wid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ab", type=Path, help="another tree's root: measure both, interleaved")
    p.add_argument("--target", choices=("cluster", "node"), default="cluster", help="what to measure (%(default)s)")
    p.add_argument("--via", choices=("tcp", "unix"), default="tcp", help="a node's transport (%(default)s)")
    p.add_argument("--clients", type=int, help="client processes (cluster: 2, node: 1)")
    p.add_argument("--value-size", help="value size (cluster: 1MiB, node: 4KiB)")
    p.add_argument("--replicas", type=int, default=1, help="copies of each put (%(default)s)")
    p.add_argument("--rounds", type=int, default=8, help="slices of each op per tree (%(default)s)")
    p.add_argument("--seconds", type=float, default=1.5, help="length of a slice (%(default)s)")
    p.add_argument("--json", default="bench-results/cluster_cpu.json", help="JSON results (%(default)s)")
    args = p.parse_args(argv)
    args.value_size = parse_size(args.value_size or SIZES[args.target])
    args.clients = args.clients or (2 if args.target == "cluster" else 1)
    ops = OPS[args.target]
    if args.mode == "client":
        client_main(args.url, args.wid, args.value_size, args.replicas)
        return 0
    if args.mode == "serve":
        serve_main(args)
        return 0
    trees = {"this": Path.cwd()} | ({"other": args.ab.resolve()} if args.ab else {})
    procs = {name: start_tree(tree, args) for name, tree in trees.items()}
    slices: dict[tuple[str, str], list[dict[str, float]]] = {(t, op): [] for t in trees for op in ops}
    try:
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for op in ops:
                for name in order:
                    slices[(name, op)].append(ask(procs[name], op, args.seconds))
    finally:
        for proc in procs.values():
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(timeout=60)
    rows: list[list[str]] = []
    payload: dict[str, Any] = {"trees": {k: str(v) for k, v in trees.items()}, "slices": {}, "ratios": {}}
    for op in ops:
        for name, tree in trees.items():
            got = slices[(name, op)]
            payload["slices"][f"{name} {op}"] = got
            client, nodes = median(per_op(s, "client") for s in got), median(per_op(s, "nodes") for s in got)
            gbps = median(s["ops"] / s["wall"] * args.value_size / 1e9 for s in got)
            rows.append(
                [op, str(tree), f"{client:.0f}", f"{nodes:.0f}", f"{(client or 0) + (nodes or 0):.0f}", f"{gbps:.3f}"]
            )
        if args.ab:
            this, other = slices[("this", op)], slices[("other", op)]
            cpu = [
                (per_op(a, "client") + per_op(a, "nodes")) / (per_op(b, "client") + per_op(b, "nodes"))
                for a, b in zip(this, other, strict=True)
            ]
            rate = [(a["ops"] / a["wall"]) / (b["ops"] / b["wall"]) for a, b in zip(this, other, strict=True)]
            payload["ratios"][op] = {"cpu_per_op": cpu, "rate": rate}
            rows.append([op, "this / other", "", "", f"{median(cpu):.3f}x", f"{median(rate):.3f}x"])
    header = ["op", "tree", "client us/op", "nodes us/op", "CPU us/op", "GB/s"]
    print(format_table(header, rows, [False, False, True, True, True, True]))
    setup = (
        f"{args.clients} clients, {NODES} nodes, replicas {args.replicas}"
        if args.target == "cluster"
        else f"{args.clients} client(s), one node via {args.via}"
    )
    print(f"medians of {args.rounds} slices of {args.seconds:g} s; {setup}")
    write_json(
        args.json,
        {"tool": "cluster_cpu", "machine": machine_info(), "config": vars(args) | {"ab": str(args.ab)}, **payload},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
