#!/usr/bin/env python3
"""Throughput of the mooncakefs KV API against the machine's own copy bandwidth (and, optionally, Mooncake).

Measures put, get, get_into, view and batch_put / batch_get / batch_get_into (32 keys a batch) for values
of 4KiB to 64MiB, once with the values resident in DRAM and once read back from the SSD tier, and in the
same run the numpy copy bandwidth of prefaulted buffers as the physical reference.  Also measures the index
memory per object (anonymous RSS growth in a fresh subprocess that puts N small objects).

Method, for small noisy VMs whose freshly allocated memory is slow to touch the first time: every source
and destination buffer is allocated and written once up front and then reused; each row runs one warm-up
pass over its keys and then at least 5 time-bounded repetitions, and the median is reported.  Puts rewrite
the same keys, so the DRAM pool reuses pages it already touched.  SSD rows read values put with
durable=True after the store was closed and reopened (DRAM does not survive a close), with promotion
disabled so every read stays on SSD; the page cache is warm unless --cold drops it before each repetition.

Output: a plain fixed-width table on stdout (progress on stderr) and JSON at --json.

Examples::

    python tools/bench/kv_bench.py --quick
    python tools/bench/kv_bench.py --vs-mooncake /tmp/mooncake-venv --json bench-results/kv_bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GB,
    KiB,
    KVWorkload,
    MiB,
    copy_reference,
    format_size,
    format_table,
    machine_info,
    measure,
    median,
    prefaulted,
    progress,
    report,
    run_json_script,
)

import mooncakefs
from mooncakefs.units import parse_size

FULL_SIZES = "4KiB,64KiB,1MiB,16MiB,64MiB"
QUICK_SIZES = "4KiB,64KiB,16MiB"
DRAM_OPS = ("put", "get", "get_into", "view", "batch_put", "batch_get", "batch_get_into")
SSD_OPS = ("get", "get_into", "view", "batch_get", "batch_get_into")
MEMCPY_RATIO_FROM = 1 * MiB  # below this, per-call overhead dominates and a bandwidth ratio means little
NO_PROMOTION = 10**9  # promote_after for the SSD store: reads must stay on SSD
FIXED_DST, ROTATING_DST = "fixed_dst", "rotating_dst"  # the two numpy copy references
# Ops whose destinations rotate (pool blocks, batch buffers); the others write into one reused buffer.
ROTATING_OPS = {"put", "batch_put", "batch_get", "batch_get_into"}

# Our op -> Mooncake ops to compare with (first is the primary reference, the rest are printed beside it).
MOONCAKE_OPS = {
    "put": ("put", "put_from"),
    "get": ("get",),
    "get_into": ("get_into",),
    "batch_put": ("batch_put_from", "batch_put"),
    "batch_get": ("batch_get",),
    "batch_get_into": ("batch_get_into",),
}


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``x_memcpy`` (ratio to numpy copy) or ``ops_per_s`` at least ``minimum``."""

    metric: str
    minimum: float

    def label(self) -> str:
        return f">={self.minimum:g}x" if self.metric == "x_memcpy" else f">={self.minimum / 1e3:g}k/s"


TARGETS: dict[tuple[str, str, int], Target] = {
    ("dram", "get_into", 16 * MiB): Target("x_memcpy", 0.85),
    ("dram", "view", 16 * MiB): Target("x_memcpy", 0.85),
    ("dram", "put", 16 * MiB): Target("x_memcpy", 0.7),
    ("dram", "get", 4 * KiB): Target("ops_per_s", 1e6),
    ("dram", "put", 4 * KiB): Target("ops_per_s", 500e3),
    ("dram", "batch_put", 4 * KiB): Target("ops_per_s", 1e6),
    ("dram", "batch_get", 4 * KiB): Target("ops_per_s", 500e3),
    ("dram", "batch_get_into", 4 * KiB): Target("ops_per_s", 1.5e6),
}
INDEX_TARGET_BYTES = 256


@dataclass
class Row:
    """One (tier, op, size) measurement.  ``ops_per_s`` counts keys, for batch calls too."""

    tier: str
    op: str
    size: int
    keys: int
    batch: int = 1
    reps_ops_per_s: list[float] = field(default_factory=list)
    ops_per_s: float = 0.0
    gbps: float = 0.0
    copy_reference: str | None = None  # FIXED_DST or ROTATING_DST: what x_memcpy divides by
    x_memcpy: float | None = None
    target: dict[str, Any] | None = None
    mooncake: dict[str, Any] | None = None
    error: str | None = None


def drop_page_cache() -> None:
    """Make the next SSD read come from the device, not the page cache (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --------------------------------------------------------------------------------------------- bench


class Bench:
    """The shared prefaulted buffers, the per-size workloads and the timing parameters of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.layout = {size: self._layout(size) for size in args.sizes}
        # dst is as large as src: it also holds the rotating destinations of the copy reference.
        nbytes = max(keys * size for size, (keys, _) in self.layout.items())
        self.src = prefaulted(nbytes)
        self.dst = prefaulted(nbytes)
        self.reference: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}  # (tier, size) -> kind -> GB/s

    def _layout(self, size: int) -> tuple[int, int]:
        """(keys, batch) for ``size``: about --working-set bytes of keys, and no batch larger."""
        a = self.args
        batch = max(1, min(a.batch, a.working_set // size))
        keys = max(batch, min(a.max_keys, a.working_set // size))
        return keys - keys % batch, batch

    def workload(self, size: int, prefix: str) -> KVWorkload:
        keys, batch = self.layout[size]
        return KVWorkload.carve(prefix, size, keys, batch, self.src, self.dst)

    def time(self, run: Callable[[int, int], object], period: int, *, cold: bool = False) -> list[float]:
        a = self.args
        if cold:  # each repetition reads distinct keys from a dropped page cache, no warm-up
            return measure(
                run,
                period=period,
                reps=a.reps,
                rep_seconds=a.rep_seconds,
                warmup=False,
                max_ops_per_rep=period,
                before_rep=drop_page_cache,
            )
        return measure(run, period=period, reps=a.reps, rep_seconds=a.rep_seconds)

    def copy_reference(self, tier: str, size: int) -> None:
        """numpy copy GB/s for ``size`` from the source slices the store rows use, into ``self.reference``.

        Measured right before each tier's rows of that size, because on a noisy VM the bandwidth drifts
        over minutes.  Two destinations, because caching the destination matters: one fixed buffer (what
        get, get_into and view write into) and rotating slots across --working-set bytes (what put and the
        batch calls write into: pool blocks or many batch buffers).
        """
        w = self.workload(size, "copy")
        slots = [self.dst[i * size : (i + 1) * size] for i in range(len(w.keys))]
        ref = {}
        for kind, destinations in ((FIXED_DST, [w.dst[:size]] * len(w.keys)), (ROTATING_DST, slots)):
            copy = copy_reference(kind, w.values, destinations)
            reps = [r * copy.scale for r in self.time(copy.run, copy.period)]
            ref[kind] = {"gbps": median(reps), "reps_gbps": reps}
        self.reference[tier, size] = ref
        progress(
            f"{tier} numpy copy {format_size(size)}: "
            + ", ".join(f"{kind} {v['gbps']:.2f} GB/s" for kind, v in ref.items())
        )

    def measure_row(self, store: Any, tier: str, op: str, w: KVWorkload, *, cold: bool = False) -> Row:
        row = Row(tier=tier, op=op, size=w.size, keys=len(w.keys), batch=w.batch if op.startswith("batch") else 1)
        try:
            w.check(store, op)
            run, period, per_op = w.runner(store, op)
            row.reps_ops_per_s = [r * per_op for r in self.time(run, period, cold=cold)]
            row.ops_per_s = median(row.reps_ops_per_s) or 0.0
            row.gbps = row.ops_per_s * w.size / GB
            progress(f"{tier} {op} {format_size(w.size)}: {row.ops_per_s:,.0f} ops/s {row.gbps:.3f} GB/s")
        except Exception as exc:  # a failing op must not hide the other rows; it is reported in the table
            row.error = f"{type(exc).__name__}: {exc}"
            progress(f"{tier} {op} {format_size(w.size)}: FAILED {row.error}")
        return row

    def dram_rows(self, root: Path) -> list[Row]:
        """Every op on values resident in DRAM; puts overwrite the keys the read rows use."""
        a = self.args
        rows = []
        with mooncakefs.open(root / "dram", **a.store_options) as store:
            for size in a.sizes:
                w = self.workload(size, "dram")
                for key, value in zip(w.keys, w.values, strict=True):
                    store.put(key, value)
                self.copy_reference("dram", size)
                rows += [self.measure_row(store, "dram", op, w) for op in DRAM_OPS]
        return rows

    def ssd_rows(self, root: Path) -> tuple[list[Row], dict[str, Any]]:
        """Read ops on values that only the SSD tier holds: durable puts, close, reopen without promotion."""
        a = self.args
        workloads = [self.workload(size, "ssd") for size in a.sizes]
        with mooncakefs.open(root / "ssd", **a.store_options) as store:
            for w in workloads:
                for key, value in zip(w.keys, w.values, strict=True):
                    store.put(key, value, durable=True)
        os.sync()  # no writeback of the fill may compete with the reads
        rows = []
        with mooncakefs.open(root / "ssd", **{**a.store_options, "promote_after": NO_PROMOTION}) as store:
            stats_after_reopen = store.stats()
            for w in workloads:
                self.copy_reference("ssd", w.size)
                rows += [self.measure_row(store, "ssd", op, w, cold=a.cold) for op in SSD_OPS]
            stats_after_reads = store.stats()
        return rows, {"after_reopen": stats_after_reopen, "after_reads": stats_after_reads}


# ------------------------------------------------------------------------------------ index memory


def rss_anon_bytes() -> int:
    """Private anonymous memory of this process: VmRSS without the shared-memory DRAM pool or file pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def index_memory_child(n: int, directory: str, dram: str) -> dict[str, Any]:
    """Anonymous RSS growth per object over ``n`` puts of a 16-byte value (run in a fresh process).

    Keys are built inside the loop, so only what the store keeps of them is counted.
    """
    value = b"v" * 16
    with mooncakefs.open(directory, dram=dram) as store:
        store.put("warm-up", value)
        gc.collect()
        before = rss_anon_bytes()
        t0 = time.perf_counter()
        put = store.put
        for i in range(n):
            put(f"object/{i:09d}", value)
        seconds = time.perf_counter() - t0
        gc.collect()
        after = rss_anon_bytes()
        objects = store.stats().get("objects")
    return {
        "objects_put": n,
        "objects_in_store": objects,
        "rss_anon_delta_bytes": after - before,
        "bytes_per_object": (after - before) / n,
        "puts_per_s": n / seconds,
        "value_bytes": len(value),
        "dram": dram,
    }


def index_memory(n: int, root: Path, dram: str) -> dict[str, Any]:
    """Run ``index_memory_child`` in a fresh interpreter, so this process's buffers do not blur the delta."""
    progress(f"index memory: putting {n:,} objects of 16 bytes in a subprocess")
    cmd = [
        sys.executable,
        __file__,
        "--index-child",
        str(n),
        "--index-dir",
        str(root / "index"),
        "--index-dram",
        dram,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"subprocess exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["target_bytes"] = INDEX_TARGET_BYTES
    result["pass"] = result["bytes_per_object"] <= INDEX_TARGET_BYTES
    progress(f"index memory: {result['bytes_per_object']:.0f} B/object")
    return result


# ----------------------------------------------------------------------------------------- mooncake


def run_mooncake(venv: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run tools/bench/mooncake_baseline.py inside ``venv`` and return its JSON (or ``{"error": ...}``)."""
    script = Path(__file__).with_name("mooncake_baseline.py")
    with tempfile.TemporaryDirectory(prefix="kv_bench-mooncake-") as tmp:
        out = Path(tmp) / "mooncake.json"
        cmd = [
            str(Path(venv) / "bin" / "python"),
            str(script),
            "--sizes",
            ",".join(map(format_size, args.sizes)),
            "--reps",
            str(args.reps),
            "--rep-time",
            str(args.rep_seconds),
            "--json",
            str(out),
        ]
        return run_json_script(cmd, out)


def attach_mooncake(rows: Sequence[Row], baseline: dict[str, Any]) -> None:
    """Put Mooncake's keys/s for the mapped op and size beside each DRAM row, with our ratio to it."""
    theirs = {(r["op"], parse_size(r["size"])): r for r in baseline.get("results", [])}
    for row in rows:
        if row.tier != "dram" or row.error:
            continue
        refs = []
        for op in MOONCAKE_OPS.get(row.op, ()):
            ref = theirs.get((op, row.size))
            if ref and ref.get("ops_per_s"):
                refs.append(
                    {
                        "op": op,
                        "ops_per_s": ref["ops_per_s"],
                        "gbps": ref.get("gbps"),
                        "ratio": row.ops_per_s / ref["ops_per_s"],
                    }
                )
        if refs:
            row.mooncake = {"primary": refs[0], "others": refs[1:]}


# ------------------------------------------------------------------------------------------- report


def finish_rows(rows: Sequence[Row], reference: dict[tuple[str, int], dict[str, dict[str, Any]]]) -> None:
    """Ratios to numpy copy (for large values) and pass/fail against the issue's targets."""
    for row in rows:
        row.copy_reference = ROTATING_DST if row.op in ROTATING_OPS else FIXED_DST
        if row.size >= MEMCPY_RATIO_FROM and not row.error:
            row.x_memcpy = row.gbps / reference[row.tier, row.size][row.copy_reference]["gbps"]
        target = TARGETS.get((row.tier, row.op, row.size))
        if target:
            value = row.x_memcpy if target.metric == "x_memcpy" else row.ops_per_s
            row.target = {
                **asdict(target),
                "label": target.label(),
                "pass": value is not None and value >= target.minimum,
            }


def render(
    rows: Sequence[Row],
    reference: dict[tuple[str, int], dict[str, dict[str, Any]]],
    index: dict[str, Any] | None,
    with_mooncake: bool,
    notes: Sequence[str],
) -> str:
    header = ["tier", "op", "size", "batch", "ops/s", "GB/s", "x copy", "target"]
    right = [False, False, True, True, True, True, True, False]
    if with_mooncake:
        header += ["mooncake ops/s", "x mooncake"]
        right += [True, False]
    body: list[list[str]] = []
    failures: list[str] = []
    for r in rows:
        target = f"{r.target['label']} {'ok' if r.target['pass'] else 'FAIL'}" if r.target else ""
        cells = [r.tier, r.op, format_size(r.size), str(r.batch)]
        if r.error:
            failures.append(f"failed: {r.tier} {r.op} {format_size(r.size)}: {r.error}")
            body.append([*cells, "FAILED", "", "", target] + ([""] * 2 if with_mooncake else []))
            continue
        cells += [
            f"{r.ops_per_s:,.0f}",
            f"{r.gbps:.3f}",
            f"{r.x_memcpy:.2f}" if r.x_memcpy is not None else "",
            target,
        ]
        if with_mooncake:
            mc = r.mooncake
            if mc:
                ratio = f"{mc['primary']['ratio']:.2f}x {mc['primary']['op']}"
                ratio += "".join(f", {o['ratio']:.2f}x {o['op']}" for o in mc["others"])
                cells += [f"{mc['primary']['ops_per_s']:,.0f}", ratio]
            else:
                cells += ["", ""]
        body.append(cells)
    ref_rows = [
        [tier, format_size(size)] + [f"{v[kind]['gbps']:.2f}" for kind in (FIXED_DST, ROTATING_DST)]
        for (tier, size), v in reference.items()
    ]
    lines = [
        "numpy copy reference in GB/s (prefaulted buffers, median, measured before each tier's rows):",
        format_table(["tier", "size", "fixed dst", "rotating dst"], ref_rows, [False, True, True, True]),
        "",
        format_table(header, body, right),
        "",
        *failures,
    ]
    if index:
        if "error" in index:
            lines.append(f"index memory: FAILED {index['error']}")
        else:
            lines.append(
                f"index memory: {index['bytes_per_object']:.0f} B/object over "
                f"{index['objects_put']:,} objects of {index['value_bytes']} B "
                f"(target <= {INDEX_TARGET_BYTES} B: "
                f"{'ok' if index['pass'] else 'FAIL'}; {index['puts_per_s']:,.0f} puts/s)"
            )
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, short reps, 100k index objects")
    p.add_argument("--sizes", help=f"comma-separated value sizes (default {FULL_SIZES})")
    p.add_argument("--tiers", default="dram,ssd", help="which tiers to measure (default %(default)s)")
    p.add_argument(
        "--reps", type=int, default=5, help="timed repetitions per row, median reported (default %(default)s)"
    )
    p.add_argument("--rep-seconds", type=float, help="time bound of one repetition (default 0.25, quick 0.1)")
    p.add_argument(
        "--working-set",
        help="bytes of distinct keys per size, also the cap on one batch (default 256MiB, quick 64MiB)",
    )
    p.add_argument("--max-keys", type=int, default=16384, help="cap on distinct keys per size (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="keys per batch call (default %(default)s)")
    p.add_argument("--dram", default="2GiB", help="DRAM tier of the benchmark stores (default %(default)s)")
    p.add_argument("--ssd", default="4GiB", help="SSD tier of the benchmark stores (default %(default)s)")
    p.add_argument("--segment-size", help="segment_size passed to mooncakefs.open (default: the engine's)")
    p.add_argument("--dir", help="parent directory for the store data (default: a temporary directory)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each SSD repetition (root)")
    p.add_argument(
        "--index-objects",
        type=int,
        help="objects for the index-memory row (default 1,000,000, quick 100,000; 0 skips)",
    )
    p.add_argument("--vs-mooncake", metavar="VENV", help="also run mooncake_baseline.py with VENV/bin/python")
    p.add_argument(
        "--json",
        default="bench-results/kv_bench.json",
        help="where to write the JSON results (default %(default)s)",
    )
    p.add_argument("--index-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index-dir", help=argparse.SUPPRESS)
    p.add_argument("--index-dram", default="1GiB", help="DRAM tier of the index-memory store (default %(default)s)")
    args = p.parse_args(argv)
    args.sizes = [parse_size(x) for x in (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")]
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if args.rep_seconds is None:
        args.rep_seconds = 0.1 if args.quick else 0.25
    args.working_set = parse_size(args.working_set or ("64MiB" if args.quick else "256MiB"))
    if args.index_objects is None:
        args.index_objects = 100_000 if args.quick else 1_000_000
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.cold and os.geteuid() != 0:
        p.error("--cold writes /proc/sys/vm/drop_caches and needs root")
    args.store_options = {"dram": args.dram, "ssd": args.ssd}
    if args.segment_size:
        args.store_options["segment_size"] = args.segment_size
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.index_child is not None:  # the subprocess of index_memory()
        print(json.dumps(index_memory_child(args.index_child, args.index_dir, args.index_dram)))
        return 0
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="kv_bench-", dir=args.dir))
    notes = [
        f"median of {args.reps} reps of <= {args.rep_seconds}s after a warm-up pass; ops/s counts keys "
        f"(batch rows too); GB/s = 1e9 bytes/s",
        f"x copy (sizes >= {format_size(MEMCPY_RATIO_FROM)}): GB/s over numpy copy of the same size into a "
        "fixed buffer (get, get_into, view) or rotating buffers (put and batch rows)",
        "view rows time open + copy out into a buffer + close",
    ]
    if "ssd" in args.tiers:
        notes.append(
            "ssd rows: reopened store, promotion off; page cache "
            + (
                "dropped before each repetition, no warm-up, each key read at most once a repetition (--cold)"
                if args.cold
                else "WARM (use --cold as root)"
            )
        )
    try:
        bench = Bench(args)
        progress(f"buffers: {format_size(bench.src.nbytes)} source, {format_size(bench.dst.nbytes)} destination")
        rows, ssd_stats = [], None
        if "dram" in args.tiers:
            rows += bench.dram_rows(root)
        if "ssd" in args.tiers:
            ssd, ssd_stats = bench.ssd_rows(root)
            rows += ssd
            if ssd_stats["after_reads"].get("dram", {}).get("objects"):
                notes.append("WARNING: objects reached DRAM during the ssd rows; some reads were not from SSD")
        reference = bench.reference
        dst_page_offset = bench.dst.ctypes.data % 4096
        del bench
        gc.collect()
        index = index_memory(args.index_objects, root, args.index_dram) if args.index_objects else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = run_mooncake(args.vs_mooncake, args) if args.vs_mooncake else None
    if baseline and "error" not in baseline:
        attach_mooncake(rows, baseline)
    elif baseline:
        notes.append(f"mooncake baseline failed: {baseline['error']}")
    finish_rows(rows, reference)
    table = render(rows, reference, index, baseline is not None and "error" not in baseline, notes)
    config = {k: v for k, v in vars(args).items() if not k.startswith("index_") or k == "index_objects"}
    config["dst_page_offset"] = dst_page_offset  # numpy's large arrays start 16 bytes into a page
    report(
        table,
        {
            "tool": "kv_bench",
            "machine": machine_info({"mooncakefs": mooncakefs.__version__, "data_dir": str(root)}),
            "config": config,
            "reference": {"numpy_copy": [{"tier": t, "size": s, **v} for (t, s), v in reference.items()]},
            "rows": [asdict(r) for r in rows],
            "index_memory": index,
            "ssd_stats": ssd_stats,
            "mooncake": baseline,
            "notes": notes,
            "seconds": time.perf_counter() - started,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
