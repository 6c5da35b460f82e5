#!/usr/bin/env python3
"""The same Mooncake workload through the real Mooncake and through mooncakefs's drop-in, side by side.

``mooncake_baseline.py`` is the workload: single and batched put/get, bytes and zero-copy, for each
value size, median of timed repetitions.  It runs three times, unchanged:

* real Mooncake (the venv of ``setup_mooncake_venv.sh``), ``--layout remote``: a mooncake_master, a
  second process holding the segment, the measuring client holding none, so bytes cross processes;
* the drop-in (``mooncakefs as-mooncake -- python3 mooncake_baseline.py --endpoint URL``) against a
  mooncakefs node process, reached over its Unix socket (``unix://``, same host: shared memory);
* the same over the node's TCP port (``host:port``, as a Mooncake master address is written).

The three run back to back for one value size before the next size starts, so that numbers compared
with each other are taken close together on a shared machine.

With two or more CPUs, the measuring process is pinned to one CPU and the process holding the data
(Mooncake's segment server, or the node) to another, in every run.  Prints a table of medians and
drop-in/Mooncake ratios (keys/s; >1 means the drop-in is faster) and writes JSON.

    tools/bench/setup_mooncake_venv.sh /tmp/mooncake-venv
    python3 tools/bench/compat_bench.py --venv /tmp/mooncake-venv
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    cli_command,
    format_size,
    format_table,
    machine_info,
    pin_threads,
    report,
    run_json_script,
    running_node,
)

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "mooncake_baseline.py"
BASELINE_TIMEOUT = 3600.0


def run_baseline(cmd: list[str], out: Path) -> dict[str, Any]:
    """Run one mooncake_baseline.py and return its JSON document (its table goes to our stderr)."""
    doc = run_json_script([*cmd, "--json", str(out)], out, timeout=BASELINE_TIMEOUT)
    if "error" in doc:
        raise RuntimeError(doc["error"])
    return doc


def workload_args(args: argparse.Namespace, size: str) -> list[str]:
    return [
        "--sizes",
        size,
        "--ops",
        args.ops,
        "--reps",
        str(args.reps),
        "--rep-time",
        str(args.rep_time),
        "--batch",
        str(args.batch),
        "--segment",
        args.segment,
        "--local-buffer",
        args.local_buffer,
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default="/tmp/mooncake-venv", help="virtualenv holding the real Mooncake")
    p.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB")
    p.add_argument("--ops", default="put,get,get_into,put_from,batch_put,batch_get,batch_get_into,batch_put_from")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rep-time", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--segment", default="2GiB", help="Mooncake's served segment; the node's DRAM pool too")
    p.add_argument("--local-buffer", default="256MiB")
    p.add_argument("--paths", default="unix,tcp", help="drop-in paths to the node: unix, tcp")
    p.add_argument("--json", default="bench-results/compat_bench.json")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pin = cpus[:2] if len(cpus) >= 2 else None
    pin_args = ["--cpus", f"{pin[0]},{pin[1]}"] if pin else []
    runs: dict[str, dict[str, Any]] = {}
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="compat-bench-") as tmp:
        root = Path(tmp)
        python = str(Path(args.venv) / "bin" / "python")
        (root / "node").mkdir()
        with running_node(root / "node", args.segment, 0) as node:
            if pin:
                pin_threads(node.pid, pin[1])
            # One size at a time, the three systems back to back: on a shared machine the load moves,
            # and numbers compared with each other should be taken minutes apart at most.
            for size in [x.strip() for x in args.sizes.split(",") if x.strip()]:
                one = workload_args(args, size)
                got = {
                    "mooncake": run_baseline(
                        [python, str(BASELINE), "--layout", "remote", *pin_args, *one], root / "mooncake.json"
                    )
                }
                for path in paths:
                    url = node.unix_url if path == "unix" else node.tcp_url.removeprefix("tcp://")
                    cmd = cli_command(
                        "as-mooncake", "--", sys.executable, str(BASELINE), "--endpoint", url, *pin_args, *one
                    )
                    got[f"drop-in {path}"] = run_baseline(cmd, root / f"dropin-{path}.json")
                for name, doc in got.items():
                    runs.setdefault(name, {**doc, "results": []})["results"].extend(doc["results"])
    table, rows = render(runs)
    report(
        table,
        {
            "bench": "compat_bench",
            "machine": machine_info({"pinned_cpus": pin}),
            "command": " ".join([sys.executable, *sys.argv]),
            "rows": rows,
            "runs": runs,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        args.json,
    )
    slower = [r for r in rows if any(v < 1.0 for k, v in r.items() if k.startswith("ratio"))]
    if slower:
        print(f"\n{len(slower)} row(s) where the drop-in is slower than Mooncake", file=sys.stderr)
    return 0


def render(runs: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """One row per (op, size): each system's median keys/s and GB/s, each drop-in's ratio to Mooncake."""
    base = {(r["op"], r["size"]): r for r in runs["mooncake"]["results"]}
    others = [name for name in runs if name != "mooncake"]
    header = ["op", "size", "mooncake keys/s (GB/s)"]
    for name in others:
        header += [f"{name} keys/s (GB/s)", "ratio"]
    lines, rows = [], []
    for (op, size), ref in base.items():
        cells = [op, format_size(size), f"{ref['ops_per_s']:,.0f} ({ref['gbps']:.2f})"]
        row: dict[str, Any] = {"op": op, "size": size, "mooncake_keys_per_s": ref["ops_per_s"]}
        for name in others:
            got = next((r for r in runs[name]["results"] if (r["op"], r["size"]) == (op, size)), None)
            if got is None:
                cells += ["-", "-"]
                continue
            ratio = got["ops_per_s"] / ref["ops_per_s"] if ref["ops_per_s"] else float("inf")
            cells += [f"{got['ops_per_s']:,.0f} ({got['gbps']:.2f})", f"{ratio:.2f}x"]
            key = name.replace(" ", "_").replace("-", "_")
            row[f"{key}_keys_per_s"] = got["ops_per_s"]
            row[f"ratio_{key}"] = round(ratio, 3)
        lines.append(cells)
        rows.append(row)
    return format_table(header, lines, [False, True] + [True] * (len(header) - 2)), rows


if __name__ == "__main__":
    sys.exit(main())
