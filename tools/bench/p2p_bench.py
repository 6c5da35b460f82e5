"""Checkpoint distribution by plain ``cp``: N readers copy one file out of a cluster mount at once.

One writer host and up to 8 reader hosts, each a network namespace with a node and a mount, every link
shaped to the same rate each way (tests/netns_hosts.py).  For each N in --readers: a fresh file is written
on the writer's host, then N readers start ``cp`` together; all_readers_s is when the last one finished,
single_reader_s the time of N = 1 (each with --files files, medians), source_bytes_sent what the writer's
host sent on its link meanwhile, etcd_requests the requests etcd answered meanwhile (by method, from its
own /metrics: the whole cluster's, nodes and mounts included) and etcd_events the watch events it sent.
Per round: cpu_busy, the whole machine's busy share (other work included), and cpu_s, the CPU seconds the
testbed's own mounts, nodes, etcd and ``cp`` used (cpu_s_per_gib: their sum per GiB copied out).
--rate shapes every link; a rate low enough that the CPU is not the limit (cpu_busy well below 1) shows
whether the distribution itself meets its target.
Physical reference printed beside: the file over one shaped link (file_bytes / rate).  Needs root, etcd,
FUSE.

    python3 tools/bench/p2p_bench.py --json /tmp/p2p.json                     # 256 MiB, 400 Mbit/s, N=1,2,4,8
    python3 tools/bench/p2p_bench.py --readers 1,4 --rate 150mbit             # links, not the CPU, the limit
    MOONCAKEFS_P2P=off python3 tools/bench/p2p_bench.py --readers 1,4         # without readers serving
    cd /other/checkout && PYTHONPATH=$PWD python3 /this/tools/bench/p2p_bench.py  # another checkout's code

(Run it from the root of the checkout measured: nodes and mounts start with ``python -m``, which imports
the ``mooncakefs`` of the current directory before ``PYTHONPATH``.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MiB, cpu_seconds, format_table, machine_info, median, progress, report, scrape

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from netns_hosts import Testbed, netns_unavailable


def parse_rate(rate: str) -> float:
    """bits/s of a tc rate such as 400mbit or 1gbit."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate must end in kbit, mbit or gbit: {rate!r}")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs: how close the machine was to its CPU limit during a round."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def our_cpu_s(bed: Testbed) -> dict[str, float]:
    """CPU seconds used so far by the testbed's processes, by kind: on a machine shared with other work
    the whole machine's busy share says little, these say what moving the file cost (``cp``: the copies
    this process waited for, as os.times counts its reaped children)."""
    children = os.times()
    return {
        "mounts": sum(process_cpu_s(m.proc.pid if m.proc else None) for m in bed.mounts),
        "nodes": sum(process_cpu_s(n.proc.pid if n.proc else None) for n in bed.nodes),
        "etcd": process_cpu_s(bed.etcd_proc.pid if bed.etcd_proc else None),
        "cp": children.children_user + children.children_system,
    }


def etcd_counters(bed: Testbed) -> dict[str, float]:
    """etcd's own counts of the requests it answered (by gRPC method) and the watch events it sent."""
    out: dict[str, float] = {}
    for sample in scrape(f"http://{bed.subnet}.1:{bed.etcd_port}/metrics"):
        if sample.name == "grpc_server_handled_total":
            method = sample.labels["grpc_method"]
            out[method] = out.get(method, 0) + sample.value
        elif sample.name == "etcd_debugging_mvcc_events_total" and not sample.labels:
            out["events"] = sample.value
    return out


def one_round(bed: Testbed, readers: list[int], size: int, tmp: Path, tag: str) -> dict:
    src = tmp / f"{tag}.src"
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    subprocess.run(["cp", str(src), str(bed.mounts[0].mnt / tag)], check=True, timeout=900)
    bed.drop_caches()
    before = bed.sent(0)
    etcd0 = etcd_counters(bed)
    cpu0 = cpu_ticks()
    ours0 = our_cpu_s(bed)
    start = time.monotonic()
    procs = {k: bed.copy_out(k, tag, tmp / f"{tag}.{k}") for k in readers}
    ends = {}
    while len(ends) < len(procs):
        for k, p in procs.items():
            if k not in ends and p.poll() is not None:
                if p.returncode != 0:
                    raise RuntimeError(f"cp on host {k} failed ({p.returncode})")
                ends[k] = time.monotonic() - start
        time.sleep(0.01)
    sent = bed.sent(0) - before
    etcd1 = etcd_counters(bed)
    cpu1 = cpu_ticks()
    ours1 = our_cpu_s(bed)
    busy = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1)
    ours = {k: round(ours1[k] - ours0[k], 2) for k in ours0}
    expected = src.read_bytes()
    for k in readers:
        out = tmp / f"{tag}.{k}"
        if out.read_bytes() != expected:
            raise RuntimeError(f"reader {k} got different bytes")
        out.unlink()
    src.unlink()
    os.unlink(bed.mounts[0].mnt / tag)
    return {
        "all_s": max(ends.values()),
        "each_s": sorted(ends.values()),
        "source_bytes_sent": sent,
        "cpu_busy": round(busy, 3),
        "cpu_s": ours,
        "cpu_s_per_gib": round(sum(ours.values()) / (len(readers) * size / (1 << 30)), 2),
        "etcd_requests": {k: int(v - etcd0.get(k, 0)) for k, v in etcd1.items() if k != "events" and v != etcd0.get(k)},
        "etcd_events": int(etcd1.get("events", 0) - etcd0.get("events", 0)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", default="1,2,4,8")
    ap.add_argument("--size", default=256, type=int, help="MiB per file (default 256)")
    ap.add_argument("--rate", default="400mbit", help="every link's rate each way, tc syntax (default 400mbit)")
    ap.add_argument("--files", default=2, type=int, help="files per N (medians; chunks land differently)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    why = netns_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.readers.split(",")]
    size = args.size * MiB
    tmp = Path(tempfile.mkdtemp(prefix="p2p-bench-"))
    bed = Testbed(tmp / "bed", 1 + max(counts), rate=args.rate, dram=f"{max(768, 3 * args.size)}MiB")
    rows = []
    try:
        bed.start()
        link_s = size * 8 / parse_rate(args.rate)
        progress(
            f"file {args.size} MiB, links {args.rate} each way (the file over one link: {link_s:.2f} s), "
            f"{len(bed.nodes)} hosts, p2p {os.environ.get('MOONCAKEFS_P2P', 'on')}"
        )
        single = None
        for n in counts:
            rounds = [one_round(bed, list(range(1, n + 1)), size, tmp, f"f{n}-{i}") for i in range(args.files)]
            all_s = median(r["all_s"] for r in rounds) or 0.0
            sent = median(r["source_bytes_sent"] for r in rounds) or 0.0
            if n == 1 or single is None:
                single = all_s
            rows.append(
                {
                    "readers": n,
                    "file_bytes": size,
                    "single_reader_s": round(single, 3),
                    "all_readers_s": round(all_s, 3),
                    "ratio": round(all_s / single, 3),
                    "source_bytes_sent": int(sent),
                    "source_x_file": round(sent / size, 3),
                    "link_s": round(link_s, 3),
                    "rounds": rounds,
                }
            )
            r = rows[-1]
            progress(
                f"N={n:2d}  all readers {all_s:7.2f} s  (x{r['ratio']:.2f} of one reader, x{all_s / link_s:.2f} "
                f"of the link)  source sent {r['source_x_file']:.2f} x the file   "
                f"runs: {[round(x['all_s'], 2) for x in rounds]}  CPU busy {[x['cpu_busy'] for x in rounds]}  "
                f"CPU s per GiB copied {[x['cpu_s_per_gib'] for x in rounds]}"
            )
            print(f"        etcd: {[x['etcd_requests'] for x in rounds]}, events {[x['etcd_events'] for x in rounds]}")
    finally:
        bed.close()
    body = [
        [
            str(r["readers"]),
            str(r["file_bytes"] // MiB),
            f"{r['single_reader_s']:.2f}",
            f"{r['all_readers_s']:.2f}",
            f"{r['ratio']:.2f}",
            str(r["source_bytes_sent"]),
            f"{r['source_x_file']:.2f}",
        ]
        for r in rows
    ]
    header = ["readers", "file MiB", "single s", "all s", "ratio", "source sent", "x file"]
    report(
        format_table(header, body, [True] * len(header)),
        {
            "readers": [r["readers"] for r in rows],
            "file_bytes": size,
            "rate": args.rate,
            "p2p": os.environ.get("MOONCAKEFS_P2P", "on"),
            "single_reader_s": rows[0]["single_reader_s"] if rows else None,
            "all_readers_s": [r["all_readers_s"] for r in rows],
            "ratio": [r["ratio"] for r in rows],
            "source_bytes_sent": [r["source_bytes_sent"] for r in rows],
            "by_readers": rows,
            "machine": machine_info(),
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
