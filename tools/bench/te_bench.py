"""The transfer engine between two processes: mooncakefs (tcp, and the same-host path) beside Mooncake's own
transfer_engine_bench (tcp), a raw socket and memcpy, measured in the same run.

A target process registers ordinary memory and a managed buffer; this process reaches them through
mooncakefs's ``TransferEngine`` (Mooncake's method names) on three paths: ``tcp`` (the same-host path
off) and ``local`` use the managed buffer (a memfd a same-host peer maps and memcpys), ``vm`` the
ordinary memory (process_vm_readv/writev).  Shapes (block size x batch): 4KiB x32, 64KiB x32, 1MiB x32,
16MiB x4; read and write; one synchronous batch at a time from one thread (Mooncake: --threads=1).

References, in the same run: one repetition of the raw socket (a peer process and batch-sized messages,
one round trip per batch as a synchronous batch has: a 1-byte request, then ``sendall`` ->
``recv_into(MSG_WAITALL)`` for reads; ``sendall``, then a 1-byte ack for writes) right before each tcp
repetition, and of memcpy (numpy copy of the same blocks between two local buffers, glibc's memcpy) right
before each same-host one, so the drift of a loaded host reaches both sides of a ratio.  Before each local
repetition also "memcpy nt": the same blocks copied by the call the local path makes (``copy_at``, which
streams its stores from 4 MiB a call; glibc streams only past its own threshold, 192 MiB on the dev VMs),
so that a local row's lead over memcpy can be told apart from the streaming stores alone.  Mooncake runs after, one
transfer_engine_bench initiator per repetition against one target.  Each cell is the median of its
repetitions; ratios are of medians.  Targets (issue 16): tcp >= 1.5x Mooncake at every shape, local
>= 0.85x memcpy from 1 MiB up, tcp >= 0.8x the raw socket at 16 MiB.

    tools/bench/setup_mooncake_venv.sh /tmp/mooncake-venv
    python3 tools/bench/te_bench.py --vs-mooncake /tmp/mooncake-venv --json bench-results/te_bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    GB,
    KiB,
    MiB,
    Reference,
    child_process,
    copy_reference,
    exit_on_sigterm,
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
    report,
    stream_copy_reference,
    stream_reference,
    wait_until,
)

SHAPES = [(4 * KiB, 32), (64 * KiB, 32), (1 * MiB, 32), (16 * MiB, 4)]
OPS = ("read", "write")
REGION = 256 * MiB
RAW, MEMCPY, MEMCPY_NT, MOONCAKE = "raw socket", "memcpy", "memcpy nt", "Mooncake"
# path -> (same-host path on, the target's memory it reaches, its paired references)
PATHS = {
    "tcp": (False, "managed", (RAW,)),
    "local": (True, "managed", (MEMCPY, MEMCPY_NT)),
    "vm": (True, "addr", (MEMCPY,)),
}


@dataclass(frozen=True)
class Target:
    """A goal of issue 16: ``path`` at least ``minimum`` times ``reference`` for the shapes ``applies``."""

    path: str
    reference: str
    minimum: float
    applies: Callable[[int], bool]

    def label(self) -> str:
        return f"{self.path}>={self.minimum:g}x {self.reference}"


TARGETS = (
    Target("tcp", MOONCAKE, 1.5, lambda block: True),
    Target("local", MEMCPY, 0.85, lambda block: block >= MiB),
    Target("tcp", RAW, 0.8, lambda block: block == 16 * MiB),
)


@dataclass
class Row:
    """One (shape, op): GB/s of each repetition per path and per reference; medians and ratios at the end."""

    block: int
    batch: int
    op: str
    reps_gbps: dict[str, list[float]] = field(default_factory=dict)  # paths, references, Mooncake
    median_gbps: dict[str, float | None] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)  # "tcp/Mooncake": ...
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return f"{format_size(self.block)} x{self.batch}"

    def finish(self) -> None:
        self.median_gbps = {name: median(reps) for name, reps in self.reps_gbps.items()}
        pairs = [("tcp", MOONCAKE), ("tcp", RAW), ("local", MEMCPY), ("local", MEMCPY_NT), ("vm", MEMCPY)]
        for path, ref in pairs:
            ours, theirs = self.median_gbps.get(path), self.median_gbps.get(ref)
            self.ratios[f"{path}/{ref}"] = ours / theirs if ours is not None and theirs else None
        for t in TARGETS:
            if t.applies(self.block):
                value = self.ratios[f"{t.path}/{t.reference}"]
                self.targets.append(
                    {"label": t.label(), "value": value, "pass": None if value is None else value >= t.minimum}
                )


# ------------------------------------------------------------------------------------ the target process


def serve_target() -> None:
    """The peer: a mooncakefs engine with REGION bytes of ordinary memory and a REGION managed buffer
    registered; prints their addresses and its port, serves until stdin closes."""
    from mooncakefs.transfer import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit(f"initialize failed: {engine.last_error}")
    buf = prefaulted(REGION)
    engine.register_memory(buf.ctypes.data, buf.nbytes)
    managed = engine.allocate_managed_buffer(REGION)
    engine.get_engine().view(managed, REGION, write=True)[:] = memoryview(buf)
    print(json.dumps({"port": engine.get_rpc_port(), "addr": buf.ctypes.data, "managed": managed}), flush=True)
    sys.stdin.read()
    engine.close()


@contextlib.contextmanager
def target_process() -> Iterator[dict[str, Any]]:
    """The target process, running the same ``mooncakefs`` as this one; its port and addresses."""
    import mooncakefs

    env = {**os.environ, "PYTHONPATH": str(Path(mooncakefs.__file__).resolve().parents[1])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    with child_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as proc:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("the target process exited before it was ready")
        yield json.loads(line)


# -------------------------------------------------------------------------------------- mooncakefs rows


def engines(local: np.ndarray) -> dict[bool, Any]:
    """One mooncakefs ``TransferEngine`` per setting of the same-host path, ``local`` registered in each."""
    from mooncakefs.transfer import TransferEngine
    from mooncakefs.transfer.engine import Engine

    out = {}
    for same_host in (False, True):
        engine = TransferEngine.wrapping(Engine("127.0.0.1", "P2PHANDSHAKE", "tcp", same_host=same_host))
        engine.register_memory(local.ctypes.data, local.nbytes)
        out[same_host] = engine
    return out


def batch_runner(engine: Any, session: str, op: str, local: int, remote: int, block: int, batch: int) -> Callable:
    """``run(start, count)``: ``count`` synchronous batches of ``batch`` blocks, local ↔ remote."""
    lptrs = [local + i * block for i in range(batch)]
    rptrs = [remote + i * block for i in range(batch)]
    lengths = [block] * batch
    call = engine.batch_transfer_sync_read if op == "read" else engine.batch_transfer_sync_write

    def run(start: int, count: int) -> None:
        for _ in range(count):
            if call(session, lptrs, rptrs, lengths) != 0:
                raise RuntimeError(f"{op} of {batch} x {format_size(block)} failed: {engine.last_error}")

    return run


def measure_rows(args: argparse.Namespace, root: Path) -> list[Row]:
    """Every shape and op on every path, each repetition after one of its paired reference's."""
    local, scratch = prefaulted(REGION), prefaulted(REGION)
    rows = []
    with target_process() as info, contextlib.ExitStack() as stack:
        session = f"127.0.0.1:{info['port']}"
        engine = engines(local)
        for e in engine.values():
            stack.callback(e.close)
        for block, batch in SHAPES:
            blocks = [slice(i * block, (i + 1) * block) for i in range(batch)]
            sources, destinations = [local[b] for b in blocks], [scratch[b] for b in blocks]
            memcpy = copy_reference(MEMCPY, sources, destinations)
            memcpy_nt = stream_copy_reference(MEMCPY_NT, sources, destinations, per_call=batch)
            with peer("serve", "tcp", block * batch, root) as server, peer("sink", "tcp", block * batch, root) as sink:
                refs = {
                    "read": {
                        MEMCPY: memcpy,
                        MEMCPY_NT: memcpy_nt,
                        RAW: stream_reference(RAW, server, block * batch, inbound=True, requested=True),
                    },
                    "write": {
                        MEMCPY: memcpy,
                        MEMCPY_NT: memcpy_nt,
                        RAW: stream_reference(RAW, sink, block * batch, inbound=False),
                    },
                }
                rows += [measure_row(args, engine, session, info, local, refs[op], block, batch, op) for op in OPS]
    return rows


def measure_row(
    args: argparse.Namespace,
    engine: dict[bool, Any],
    session: str,
    info: dict[str, Any],
    local: np.ndarray,
    refs: dict[str, Reference],
    block: int,
    batch: int,
    op: str,
) -> Row:
    row = Row(block, batch, op)
    for path, (same_host, region, ref_names) in PATHS.items():
        befores = []
        for name in ref_names:
            refs[name].warm_up(args.rep_seconds)
            befores.append(refs[name].paired(args.rep_seconds, row.reps_gbps.setdefault(name, [])))
        run = batch_runner(engine[same_host], session, op, local.ctypes.data, info[region], block, batch)
        before = in_turn(*befores)
        reps = measure(run, period=1, reps=args.reps, rep_seconds=args.rep_seconds, before_rep=before)
        row.reps_gbps[path] = [r * block * batch / GB for r in reps]
        progress(f"{row.shape} {op} {path}: {median(row.reps_gbps[path]):.2f} GB/s")
    return row


# ------------------------------------------------------------------------------------------- Mooncake


def mooncake_reps(venv: str, args: argparse.Namespace, root: Path, rows: Sequence[Row]) -> str:
    """Mooncake's transfer_engine_bench (tcp, P2P handshake, one thread): a target, then one initiator run per
    repetition of each row; GB/s into ``row.reps_gbps[MOONCAKE]``.  Returns the wheel's version."""
    binary = str(Path(venv) / "bin" / "transfer_engine_bench")
    common = ["--metadata_server=P2PHANDSHAKE", "--protocol=tcp", f"--buffer_size={REGION}"]
    log = root / "mooncake-target.log"
    target_cmd = [binary, "--mode=target", "--local_server_name=127.0.0.1:0", *common]
    with log.open("wb") as out, child_process(target_cmd, stdout=out, stderr=subprocess.STDOUT) as target:
        found = wait_until(
            lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace")),
            "Mooncake's transfer_engine_bench target listening",
            30,
            proc=target,
            log=log,
        )
        for row in rows:
            cmd = [binary, "--mode=initiator", "--local_server_name=127.0.0.1:0", f"--segment_id=127.0.0.1:{found[1]}"]
            cmd += [*common, f"--block_size={row.block}", f"--batch_size={row.batch}", "--threads=1"]
            cmd += [f"--duration={args.mooncake_seconds}", f"--operation={row.op}", "--report_unit=MB"]
            for _ in range(args.mooncake_reps):
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                said = run.stdout + run.stderr
                m = re.search(r"throughput ([\d.]+) MB/s", said)  # MB: GB's two decimals round small shapes to 0
                if not m:
                    raise RuntimeError(f"transfer_engine_bench said: {said[-500:]}")
                row.reps_gbps.setdefault(MOONCAKE, []).append(float(m[1]) / 1e3)
            progress(f"{row.shape} {row.op} Mooncake: {median(row.reps_gbps[MOONCAKE]):.2f} GB/s")
    version = subprocess.run(
        [
            str(Path(venv) / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mooncake-transfer-engine-non-cuda'))",
        ],
        capture_output=True,
        text=True,
    )
    return version.stdout.strip() or "unknown"


# --------------------------------------------------------------------------------------------- report


def render(rows: Sequence[Row], notes: Sequence[str]) -> str:
    def gbps(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    header = ["shape", "op", "tcp", MOONCAKE, "x", RAW, "x", "local", "vm", MEMCPY, "x local", "x vm", MEMCPY_NT]
    header += ["x local", "targets"]
    body = []
    for r in rows:
        m, q = r.median_gbps, r.ratios
        verdicts = [f"{t['label']} {'?' if t['pass'] is None else 'ok' if t['pass'] else 'MISS'}" for t in r.targets]
        cells = [m["tcp"], m.get(MOONCAKE), q["tcp/Mooncake"], m[RAW], q["tcp/raw socket"], m["local"], m["vm"]]
        cells += [m[MEMCPY], q["local/memcpy"], q["vm/memcpy"], m[MEMCPY_NT], q[f"local/{MEMCPY_NT}"]]
        kinds = [gbps, gbps, x, gbps, x, gbps, gbps, gbps, x, x, gbps, x]
        body.append([r.shape, r.op, *(show(v) for show, v in zip(kinds, cells, strict=True)), "; ".join(verdicts)])
    table = format_table(header, body, [False, False] + [True] * 12 + [False])
    return "\n".join([table, *(f"note: {n}" for n in notes)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell, median reported (%(default)s)")
    p.add_argument("--rep-seconds", type=float, default=0.4, help="time bound of one repetition (%(default)s)")
    p.add_argument("--vs-mooncake", metavar="VENV", help="also run Mooncake's transfer_engine_bench from VENV")
    p.add_argument("--mooncake-reps", type=int, default=3, help="Mooncake runs per cell (%(default)s)")
    p.add_argument("--mooncake-seconds", type=int, default=2, help="--duration of each Mooncake run (%(default)s)")
    p.add_argument("--json", default="bench-results/te_bench.json", help="JSON results (%(default)s)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps < 1 or args.rep_seconds <= 0 or args.mooncake_reps < 1 or args.mooncake_seconds < 1:
        p.error("--reps, --rep-seconds, --mooncake-reps and --mooncake-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_target()
        return 0
    exit_on_sigterm()
    started = time.perf_counter()
    version = None
    with tempfile.TemporaryDirectory(prefix="te_bench-") as tmp:
        rows = measure_rows(args, Path(tmp))
        if args.vs_mooncake:
            version = mooncake_reps(args.vs_mooncake, args, Path(tmp), rows)
    for row in rows:
        row.finish()
    from mooncakefs import shm

    notes = [
        f"GB/s = 1e9 B/s; median of {args.reps} reps of {args.rep_seconds}s, each after one rep of its references "
        "(tcp: raw socket, local: memcpy and memcpy nt, vm: memcpy); x: ratio of medians",
        "memcpy: numpy copy of the batch's blocks, one at a time (glibc memcpy); memcpy nt: the same blocks "
        "copied by the call the local path makes (mooncakefs copy_at, the batch at once), so local/memcpy nt "
        "is the path's cost beside a copy that streams as it does",
        glibc_copy_note(),
        "tcp: the same-host path off; local: the target's managed buffer (memfd, memcpy); vm: its ordinary "
        "registered memory (process_vm_readv/writev)",
        f"pages: {shm.host_pages()} (memcpy copies between numpy buffers, anonymous memory; local copies to "
        "or from a memfd, shared memory)",
    ]
    if version:
        notes.append(
            f"Mooncake: mooncake-transfer-engine-non-cuda {version} transfer_engine_bench, tcp, --threads=1, "
            f"median of {args.mooncake_reps} runs of {args.mooncake_seconds}s"
        )
    report(
        render(rows, notes),
        {
            "tool": "te_bench",
            "machine": machine_info({"mooncake_venv": args.vs_mooncake, "mooncake_version": version}),
            "config": vars(args),
            "rows": [{**asdict(r), "shape": r.shape} for r in rows],
            "notes": notes,
            "seconds": time.perf_counter() - started,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
