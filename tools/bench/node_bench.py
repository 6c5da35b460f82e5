#!/usr/bin/env python3
"""Throughput of a mooncakefs node (daemon + transfer engine) seen from a client process, beside the
physical references and, optionally, the real Mooncake's cross-process layout, all in one run.

The benchmark starts a real node process (``python -m mooncakefs.cli node``, DRAM only, its own Unix
socket and loopback TCP port, no metrics), waits until it accepts and has finished prefaulting its pool,
and measures from this process through ``mooncakefs.connect``:

* ``unix://`` (same host: large values move by memcpy through the shared pool) and ``tcp://`` (forced
  TCP on loopback): get_into, get and put of 16 MiB, and batch_get of all --large-keys of them; get,
  get_into and put of 4 KiB; batch_get_into and batch_put of 32 x 4 KiB.  ops/s counts keys (batch rows
  too).

Physical references, in the same run; one repetition of a row's reference runs right before each
repetition of the row, so the drift of a noisy host reaches both sides of the ratio alike:

* numpy copy of 16 MiB (rotating sources, one fixed destination; glibc's memcpy), for the unix 16 MiB
  rows, and beside it "copy nt", the same copies by ``mooncakefs._engine.copy_at``, which streams its
  stores from 4 MiB as the node's same-host read does (glibc streams only past its own threshold, 192 MiB
  on the dev VMs): "x nt" says how much of a row's lead over numpy is the streaming stores alone;
* a plain Python loop over loopback TCP between this process and a child process, 16 MiB messages from
  and into prefaulted, reused buffers: child ``sendall`` -> parent ``recv_into(MSG_WAITALL)`` (the
  reference of get), and parent ``sendall`` -> child ``recv_into`` + a 1-byte ack (the reference of put);
* a 4 KiB ping-pong between two processes over loopback TCP and over a Unix socket (round trips/s), for
  the 4 KiB single-op rows of the same transport.  Batch rows have no physical reference.

With ``--vs-mooncake VENV`` it then runs ``tools/bench/mooncake_baseline.py --layout remote`` inside VENV
(the real Mooncake, a client without a segment plus a segment-serving process, bytes over loopback TCP)
and prints each row's ratio to the same Mooncake op and size next to the issue's targets.

Method, for small noisy VMs: every buffer is allocated and written once before timing and then reused;
values are prefilled; each row runs one warm-up pass, then --reps time-bounded repetitions, and the
median is reported.  The node and every child process are stopped on exit, Ctrl-C or SIGTERM, and die
with this process if it is killed.

Output: a plain table on stdout (progress on stderr) and JSON at --json.

Examples::

    python tools/bench/node_bench.py
    python tools/bench/node_bench.py --vs-mooncake /tmp/mooncake-venv --json bench-results/node_bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    GB,
    KiB,
    KVWorkload,
    MiB,
    Reference,
    copy_reference,
    exit_on_sigterm,
    format_number,
    format_size,
    format_table,
    glibc_copy_note,
    in_turn,
    machine_info,
    measure,
    median,
    peer,
    prefaulted,
    progress,
    recv_exactly,
    report,
    run_json_script,
    running_node,
    stream_copy_reference,
    stream_reference,
)

import mooncakefs
from mooncakefs import shm

SMALL, LARGE = 4 * KiB, 16 * MiB
VIAS = ("unix", "tcp")
# (op, size) rows measured for each transport, in table order.
ROWS: tuple[tuple[str, int], ...] = (
    ("get_into", LARGE),
    ("get", LARGE),
    ("put", LARGE),
    ("batch_get", LARGE),
    ("get", SMALL),
    ("get_into", SMALL),
    ("put", SMALL),
    ("batch_get_into", SMALL),
    ("batch_put", SMALL),
)
# Physical references: name -> what it is (for the table notes and the JSON).
COPY, COPY_NT = "copy", "copy nt"
LOOP_RECV, LOOP_SEND, PP_TCP, PP_UNIX = "loop-recv", "loop-send", "pp-tcp", "pp-unix"
REFERENCE_TEXT = {
    COPY: "numpy copy 16MiB (glibc memcpy), GB/s",
    COPY_NT: "mooncakefs copy_at 16MiB (streaming stores), GB/s",
    LOOP_RECV: "tcp loop 16MiB child sendall -> bench recv_into(MSG_WAITALL), GB/s",
    LOOP_SEND: "tcp loop 16MiB bench sendall -> child recv_into + 1-byte ack, GB/s",
    PP_TCP: "tcp ping-pong 4KiB between two processes, round trips/s",
    PP_UNIX: "unix-socket ping-pong 4KiB between two processes, round trips/s",
}


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``metric`` of a row at least ``minimum``.

    ``x_ref`` is the ratio to the row's physical reference, ``x_mooncake`` to Mooncake's same op and size,
    ``ops_per_s`` an absolute rate.
    """

    metric: str
    minimum: float

    def label(self, reference: str | None) -> str:
        if self.metric == "ops_per_s":
            return f">={self.minimum / 1e3:g}k/s"
        return f">={self.minimum:g}x {reference if self.metric == 'x_ref' else 'mc'}"


_VS_MC_LARGE = (Target("x_mooncake", 1.5), Target("x_ref", 0.8))
TARGETS: dict[tuple[str, str, int], tuple[Target, ...]] = {
    ("unix", "get_into", LARGE): (Target("x_ref", 0.85),),  # issue 14: same-host get_into >= 0.85x copy
    ("tcp", "get_into", LARGE): _VS_MC_LARGE,
    ("tcp", "get", LARGE): _VS_MC_LARGE,
    ("tcp", "put", LARGE): _VS_MC_LARGE,
    ("unix", "get", SMALL): (Target("x_mooncake", 2.0), Target("ops_per_s", 100e3)),
    ("tcp", "get", SMALL): (Target("x_mooncake", 2.0),),
    **{(via, "put", SMALL): (Target("x_mooncake", 2.0),) for via in VIAS},
    **{(via, op, SMALL): (Target("x_mooncake", 1.5),) for via in VIAS for op in ("batch_get_into", "batch_put")},
}


def reference_of(via: str, op: str, size: int) -> str | None:
    """The physical reference a row is divided by (None for batches: no single physical analogue)."""
    if op.startswith("batch"):
        return None
    if size == LARGE:
        return COPY if via == "unix" else LOOP_SEND if op == "put" else LOOP_RECV
    return PP_UNIX if via == "unix" else PP_TCP


@dataclass
class Row:
    """One (transport, op, size) measurement.  ``ops_per_s`` counts keys, for batch calls too."""

    via: str
    op: str
    size: int
    batch: int = 1
    reps_ops_per_s: list[float] = field(default_factory=list)
    ops_per_s: float = 0.0
    gbps: float = 0.0
    reference: str | None = None
    reference_reps: list[float] = field(default_factory=list)  # one before each of the row's repetitions
    reference_value: float | None = None  # their median
    x_ref: float | None = None  # GB/s over the reference's GB/s, or keys/s over its round trips/s
    stream_reps: list[float] = field(default_factory=list)  # copy nt, beside the unix 16 MiB rows' copy
    stream_value: float | None = None
    x_stream: float | None = None  # GB/s over copy nt's
    mooncake_ops_per_s: float | None = None
    x_mooncake: float | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


# -------------------------------------------------------------------------------- physical references


def ping_pong_reference(conn: Any, kind: str) -> Reference:
    """4 KiB out, the same 4 KiB back, over a peer connection in "echo" mode."""
    out, back = prefaulted(SMALL), prefaulted(SMALL)

    def run(start: int, count: int) -> None:
        for _ in range(count):
            conn.sendall(out)
            recv_exactly(conn, back, SMALL)

    return Reference(PP_UNIX if kind == "unix" else PP_TCP, run, 256, 1.0)


@contextlib.contextmanager
def references(via: str, root: Path, src: np.ndarray, dst: np.ndarray) -> Iterator[dict[str, Reference]]:
    """The references of ``via``'s rows, their peer processes running (idle between repetitions)."""
    with contextlib.ExitStack() as stack:
        if via == "unix":
            # numpy copy of 16 MiB from rotating source slices into one fixed destination (what get_into does)
            sources = [src[i * LARGE : (i + 1) * LARGE] for i in range(len(src) // LARGE)]
            refs = [
                copy_reference(COPY, sources, [dst[:LARGE]] * len(sources)),
                stream_copy_reference(COPY_NT, sources, [dst[:LARGE]] * len(sources)),
                ping_pong_reference(stack.enter_context(peer("echo", "unix", SMALL, root)), "unix"),
            ]
        else:
            sender, sink = (stack.enter_context(peer(mode, "tcp", LARGE, root)) for mode in ("send", "sink"))
            refs = [
                stream_reference(LOOP_RECV, sender, LARGE, inbound=True),
                stream_reference(LOOP_SEND, sink, LARGE, inbound=False),
                ping_pong_reference(stack.enter_context(peer("echo", "tcp", SMALL, root)), "tcp"),
            ]
        for ref in refs:
            ref.what = REFERENCE_TEXT[ref.name]
        yield {r.name: r for r in refs}


# ------------------------------------------------------------------------------------ mooncakefs rows


def measure_rows(
    args: argparse.Namespace, url: str, via: str, src: np.ndarray, dst: np.ndarray, refs: dict[str, Reference]
) -> list[Row]:
    """Every (op, size) of ROWS through one client of the node, values prefilled first.  Each repetition
    of a row follows one repetition of its physical reference, so drift on a noisy host hits both."""
    loads = {
        SMALL: KVWorkload.carve(via, SMALL, args.small_keys, args.batch, src, dst),
        LARGE: KVWorkload.carve(via, LARGE, args.large_keys, args.large_keys, src, dst),
    }
    for ref in refs.values():
        ref.warm_up(args.rep_seconds)
    rows = []
    with mooncakefs.connect(url) as store:
        for w in loads.values():
            for key, value in zip(w.keys, w.values, strict=True):
                store.put(key, value)
        for op, size in ROWS:
            w = loads[size]
            row = Row(via, op, size, batch=w.batch if op.startswith("batch") else 1)
            row.reference = reference_of(via, op, size)
            ref = refs.get(row.reference or "")
            stream = refs.get(COPY_NT) if row.reference == COPY else None
            try:
                w.check(store, op)
                run, period, per_call = w.runner(store, op)
                before = ref.paired(args.rep_seconds, row.reference_reps) if ref else None
                if ref and stream:
                    before = in_turn(before, stream.paired(args.rep_seconds, row.stream_reps))
                reps = measure(run, period=period, reps=args.reps, rep_seconds=args.rep_seconds, before_rep=before)
                row.reps_ops_per_s = [r * per_call for r in reps]
                row.ops_per_s = median(row.reps_ops_per_s) or 0.0
                row.gbps = row.ops_per_s * size / GB
                progress(f"{via} {op} {format_size(size)}: {row.ops_per_s:,.0f} keys/s {row.gbps:.3f} GB/s")
            except Exception as exc:  # one failing op must not hide the other rows
                row.error = f"{type(exc).__name__}: {exc}"
                progress(f"{via} {op} {format_size(size)}: FAILED {row.error}")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ mooncake


def run_mooncake(venv: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Mooncake's remote (cross-process) layout via mooncake_baseline.py in ``venv``: its JSON, or
    ``{"error": ...}``."""
    out = root / "mooncake.json"
    cmd = [
        str(Path(venv) / "bin" / "python"),
        str(Path(__file__).with_name("mooncake_baseline.py")),
        "--layout",
        "remote",
        "--sizes",
        f"{format_size(SMALL)},{format_size(LARGE)}",
        "--reps",
        str(args.mooncake_reps),
        "--json",
        str(out),
    ]
    return {**run_json_script(cmd, out), "command": cmd}


# -------------------------------------------------------------------------------------------- report


def finish_rows(rows: Sequence[Row], mooncake: dict[str, Any] | None) -> None:
    """Ratios to the paired physical reference and to Mooncake's same op and size; the targets' verdicts."""
    theirs = {(r["op"], r["size"]): r["ops_per_s"] for r in (mooncake or {}).get("results", [])}
    for row in rows:
        if row.error:
            continue
        if row.reference_reps:
            row.reference_value = median(row.reference_reps)
            row.x_ref = (row.gbps if row.size == LARGE else row.ops_per_s) / row.reference_value
        if row.stream_reps:
            row.stream_value = median(row.stream_reps)
            row.x_stream = row.gbps / row.stream_value
        if theirs.get((row.op, row.size)):
            row.mooncake_ops_per_s = theirs[row.op, row.size]
            row.x_mooncake = row.ops_per_s / row.mooncake_ops_per_s
        for t in TARGETS.get((row.via, row.op, row.size), ()):
            value = {"x_ref": row.x_ref, "x_mooncake": row.x_mooncake, "ops_per_s": row.ops_per_s}[t.metric]
            row.targets.append(
                {
                    **asdict(t),
                    "label": t.label(row.reference),
                    "value": value,
                    "pass": None if value is None else value >= t.minimum,
                }
            )


def render(rows: Sequence[Row], refs: dict[str, dict[str, Any]], notes: Sequence[str]) -> str:
    ref_rows = [
        [name, format_number(v["value"]) if v["value"] else "-", str(len(v["samples"])), v["what"]]
        for name, v in refs.items()
    ]
    header = ["via", "op", "size", "keys/s", "GB/s", "ref", "ref value", "x ref", "x nt", "mc keys/s", "x mc"]
    header.append("target")
    right = [False, False, True, True, True, False, True, True, True, True, True, False]
    body, failures = [], []
    for r in rows:
        size = format_size(r.size) if r.batch == 1 else f"{r.batch}x{format_size(r.size)}"
        verdicts = [f"{t['label']} {'?' if t['pass'] is None else 'ok' if t['pass'] else 'MISS'}" for t in r.targets]
        if r.error:
            failures.append(f"failed: {r.via} {r.op} {size}: {r.error}")
            body.append([r.via, r.op, size, "FAILED", "", "", "", "", "", "", "", "; ".join(verdicts)])
            continue
        body.append(
            [
                r.via,
                r.op,
                size,
                f"{r.ops_per_s:,.0f}",
                f"{r.gbps:.3f}",
                r.reference or "",
                format_number(r.reference_value) if r.reference_value else "",
                f"{r.x_ref:.2f}" if r.x_ref is not None else "",
                f"{r.x_stream:.2f}" if r.x_stream is not None else "",
                f"{r.mooncake_ops_per_s:,.0f}" if r.mooncake_ops_per_s else "",
                f"{r.x_mooncake:.2f}" if r.x_mooncake is not None else "",
                "; ".join(verdicts),
            ]
        )
    return "\n".join(
        [
            "physical references (median of all their repetitions in this run):",
            format_table(["ref", "value", "reps", "what"], ref_rows, [False, True, True, False]),
            "",
            format_table(header, body, right),
            *failures,
            *(f"note: {n}" for n in notes),
        ]
    )


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row, median reported (%(default)s)")
    p.add_argument("--rep-seconds", type=float, default=0.3, help="time bound of one repetition (%(default)s)")
    p.add_argument("--dram", default="2GiB", help="DRAM pool of the node (%(default)s)")
    p.add_argument("--port", type=int, default=0, help="the node's loopback TCP port (default: a free one)")
    p.add_argument("--small-keys", type=int, default=1024, help="distinct 4KiB keys (%(default)s)")
    p.add_argument("--large-keys", type=int, default=4, help="distinct 16MiB keys (%(default)s)")
    p.add_argument("--batch", type=int, default=32, help="keys per batch call (%(default)s)")
    p.add_argument("--via", default=",".join(VIAS), help="transports to measure (%(default)s)")
    p.add_argument("--vs-mooncake", metavar="VENV", help="also run mooncake_baseline.py --layout remote in VENV")
    p.add_argument("--mooncake-reps", type=int, default=3, help="repetitions of the Mooncake run (%(default)s)")
    p.add_argument("--dir", help="parent of the node's data dir and sockets (default: the system temp dir)")
    p.add_argument("--json", default="bench-results/node_bench.json", help="JSON results (%(default)s)")
    args = p.parse_args(argv)
    args.via = [v.strip() for v in args.via.split(",") if v.strip()]
    if not set(args.via) <= set(VIAS):
        p.error(f"--via takes {','.join(VIAS)}")
    if args.reps < 1 or args.small_keys < args.batch or args.large_keys < 1 or args.batch < 1:
        p.error("--reps, --batch and --large-keys must be positive, --small-keys at least --batch")
    args.small_keys -= args.small_keys % args.batch
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started = time.perf_counter()
    # Client-side buffers, touched once here: the sources of every put and the destinations of every read.
    src = prefaulted(max(args.small_keys * SMALL, args.large_keys * LARGE))
    dst = prefaulted(max(args.batch * SMALL, LARGE))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="node_bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        refs: dict[str, dict[str, Any]] = {}
        with running_node(root, args.dram, args.port) as node:
            for via in args.via:
                with references(via, root, src, dst) as paired:
                    rows += measure_rows(args, node.unix_url if via == "unix" else node.tcp_url, via, src, dst, paired)
                refs.update({name: ref.summary() for name, ref in paired.items()})
        mooncake = run_mooncake(args.vs_mooncake, args, root) if args.vs_mooncake else None
    notes = [
        f"median of {args.reps} reps of <= {args.rep_seconds}s after a warm-up pass; keys/s counts keys, "
        "GB/s = 1e9 B/s",
        "ref value: median of the reference's reps taken right before each of the row's reps; x ref: GB/s over "
        "it (16MiB) or keys/s over its round trips/s (4KiB); x nt (unix 16MiB): GB/s over copy nt's, taken "
        "right before each rep too",
        glibc_copy_note(),
        f"pages: {shm.host_pages()} (copy: between numpy buffers, anonymous memory; unix 16MiB rows: out of or "
        "into the node's pool, shared memory)",
    ]
    if mooncake and "error" in mooncake:
        notes.append(f"mooncake baseline failed: {mooncake['error']}")
    elif mooncake:
        notes.append(
            f"mc: Mooncake {mooncake.get('version')} --layout remote (client without a segment + a "
            f"segment-serving process, tcp loopback), median of {args.mooncake_reps} reps, same op and size"
        )
    finish_rows(rows, mooncake)
    report(
        render(rows, refs, notes),
        {
            "tool": "node_bench",
            "machine": machine_info(),
            "config": vars(args),
            "node": asdict(node),
            "references": refs,
            "rows": [asdict(r) for r in rows],
            "mooncake": mooncake,
            "notes": notes,
            "seconds": time.perf_counter() - started,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
