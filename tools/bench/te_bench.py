"""The transfer engine between two processes: mooncakefs (tcp, and the same-host path) beside Mooncake's own
transfer_engine_bench (tcp), a raw socket and memcpy, measured in the same run.

The target registers ordinary memory and a managed buffer; tcp and "local" use the managed buffer
(mapped by a same-host peer), "vm" the ordinary memory (process_vm_readv/writev).

Shapes (block size x batch): 4KiB x32, 64KiB x32, 1MiB x32, 16MiB x4; read and write.  One submitting
thread everywhere (Mooncake: --threads=1).  Each cell is the median of --reps repetitions; ratios are
to the same-run references: Mooncake for tcp, the raw socket for tcp, memcpy for the same-host path.

    python3 tools/bench/te_bench.py --vs-mooncake /tmp/mooncake-venv --json bench-results/te_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GB, format_size, format_table, machine_info, prefaulted, write_json

SHAPES = [(4 << 10, 32), (64 << 10, 32), (1 << 20, 32), (16 << 20, 4)]
OPS = ("read", "write")
REGION = 256 << 20


# ------------------------------------------------------------------------------------------- peers


def serve_engine() -> None:
    """The target: a mooncakefs engine with REGION bytes registered; prints port and address."""
    from mooncakefs.transfer import TransferEngine

    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    buf = prefaulted(REGION)  # ordinary memory: a same-host peer reaches it with process_vm_readv/writev
    assert engine.register_memory(buf.ctypes.data, buf.nbytes) == 0
    managed = engine.allocate_managed_buffer(REGION)  # a memfd: a same-host peer maps it and memcpys
    engine.get_engine().view(managed, REGION, write=True)[:] = memoryview(buf)
    print(json.dumps({"port": engine.get_rpc_port(), "addr": buf.ctypes.data, "managed": managed}), flush=True)
    sys.stdin.read()
    engine.close()


RAW = struct.Struct("<BQI")  # op (0 read, 1 write), block size, count


def serve_raw() -> None:
    """The raw-socket reference: blocks sent with sendall and received with recv_into(MSG_WAITALL)."""
    lst = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
    conn, _ = lst.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(prefaulted(REGION))
    head = bytearray(RAW.size)
    while conn.recv_into(head, RAW.size, socket.MSG_WAITALL) == RAW.size:
        op, n, count = RAW.unpack(head)
        for i in range(count):
            block = buf[(i * n) % (REGION - n) :][:n]
            if op == 0:
                conn.sendall(block)
            else:
                conn.recv_into(block, n, socket.MSG_WAITALL)
        if op == 1:
            conn.sendall(b"k")


def spawn(role: str) -> tuple[subprocess.Popen, dict[str, Any]]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", role], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    return proc, json.loads(proc.stdout.readline())  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------- timing


def timed(run: Callable[[], int], reps: int, seconds: float) -> list[float]:
    """GB/s of each repetition: ``run()`` (one batch, returns bytes) repeated for ``seconds``."""
    run()  # warm: connections, page tables
    out = []
    for _ in range(reps):
        moved, start = 0, time.perf_counter()
        while True:
            moved += run()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        out.append(moved / elapsed / GB)
    return out


def mooncakefs_cell(
    same_host: bool,
    session_info: dict[str, Any],
    op: str,
    block: int,
    batch: int,
    local: np.ndarray,
    args: argparse.Namespace,
    region: str = "managed",
) -> list[float]:
    from mooncakefs.transfer import TransferEngine

    engine = TransferEngine()
    os.environ["MOONCAKEFS_TE_SAME_HOST"] = "1" if same_host else "0"
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    engine.register_memory(local.ctypes.data, local.nbytes)
    session = f"127.0.0.1:{session_info['port']}"
    lptrs = [local.ctypes.data + i * block for i in range(batch)]
    rptrs = [session_info[region] + i * block for i in range(batch)]
    lengths = [block] * batch
    call = engine.batch_transfer_sync_read if op == "read" else engine.batch_transfer_sync_write

    def run() -> int:
        if call(session, lptrs, rptrs, lengths) != 0:
            raise RuntimeError(f"transfer failed: {engine.last_error}")
        return block * batch

    try:
        return timed(run, args.reps, args.rep_seconds)
    finally:
        engine.close()


def raw_cell(
    port: int, op: str, block: int, batch: int, local: np.ndarray, args: argparse.Namespace, sock: socket.socket
) -> list[float]:
    view = memoryview(local)

    def run() -> int:
        sock.sendall(RAW.pack(0 if op == "read" else 1, block, batch))
        for i in range(batch):
            if op == "read":
                sock.recv_into(view[i * block :][:block], block, socket.MSG_WAITALL)
            else:
                sock.sendall(view[i * block :][:block])
        if op == "write":
            sock.recv(1)
        return block * batch

    return timed(run, args.reps, args.rep_seconds)


def memcpy_cell(block: int, batch: int, src: np.ndarray, dst: np.ndarray, args: argparse.Namespace) -> list[float]:
    def run() -> int:
        for i in range(batch):
            np.copyto(dst[i * block : (i + 1) * block], src[i * block : (i + 1) * block])
        return block * batch

    return timed(run, args.reps, args.rep_seconds)


def mooncake_cells(venv: str, args: argparse.Namespace) -> dict[tuple[str, int, int], list[float]]:
    """Mooncake's transfer_engine_bench, tcp, P2P handshake: a target, then one initiator run per rep."""
    binary = str(Path(venv) / "bin" / "transfer_engine_bench")
    common = ["--metadata_server=P2PHANDSHAKE", "--protocol=tcp", f"--buffer_size={REGION}"]
    log = Path(args.json).with_suffix(".mooncake-target.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        target = subprocess.Popen(
            [binary, "--mode=target", "--local_server_name=127.0.0.1:0", *common], stdout=out, stderr=subprocess.STDOUT
        )
    results: dict[tuple[str, int, int], list[float]] = {}
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.1)
        if port is None:
            raise RuntimeError(f"Mooncake's target did not start (see {log})")
        for block, batch in SHAPES:
            for op in OPS:
                got = []
                for _ in range(args.mooncake_reps):
                    run = subprocess.run(
                        [
                            binary,
                            "--mode=initiator",
                            "--local_server_name=127.0.0.1:0",
                            f"--segment_id=127.0.0.1:{port}",
                            *common,
                            f"--block_size={block}",
                            f"--batch_size={batch}",
                            "--threads=1",
                            f"--duration={args.mooncake_seconds}",
                            f"--operation={op}",
                            "--report_unit=GB",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    m = re.search(r"throughput ([\d.]+) GB/s", run.stdout + run.stderr)
                    if not m:
                        raise RuntimeError(f"transfer_engine_bench said: {(run.stdout + run.stderr)[-500:]}")
                    got.append(float(m.group(1)))
                results[(op, block, batch)] = got
    finally:
        target.kill()
        target.wait()
    return results


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell, median reported (%(default)s)")
    p.add_argument("--rep-seconds", type=float, default=0.4, help="length of one repetition (%(default)s)")
    p.add_argument("--vs-mooncake", metavar="VENV", help="also run Mooncake's transfer_engine_bench from VENV")
    p.add_argument("--mooncake-reps", type=int, default=3, help="Mooncake runs per cell (%(default)s)")
    p.add_argument("--mooncake-seconds", type=int, default=2, help="--duration of each Mooncake run (%(default)s)")
    p.add_argument("--json", default="bench-results/te_bench.json", help="JSON results (%(default)s)")
    p.add_argument("--serve", choices=("engine", "raw"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve == "engine":
        return serve_engine()
    if args.serve == "raw":
        return serve_raw()
    local, scratch = prefaulted(REGION), prefaulted(REGION).copy()
    target, info = spawn("engine")
    raw, raw_info = spawn("raw")
    sock = socket.create_connection(("127.0.0.1", raw_info["port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cells: dict[str, dict[tuple[str, int, int], list[float]]] = {
        k: {} for k in ("tcp", "local", "local_vm", "raw", "memcpy")
    }
    try:
        for block, batch in SHAPES:
            for op in OPS:
                key = (op, block, batch)
                cells["tcp"][key] = mooncakefs_cell(False, info, op, block, batch, local, args)
                cells["local"][key] = mooncakefs_cell(True, info, op, block, batch, local, args)
                cells["local_vm"][key] = mooncakefs_cell(True, info, op, block, batch, local, args, "addr")
                cells["raw"][key] = raw_cell(raw_info["port"], op, block, batch, local, args, sock)
                cells["memcpy"][key] = memcpy_cell(block, batch, local, scratch, args)
    finally:
        sock.close()
        for proc in (target, raw):
            proc.kill()
            proc.wait()
    mooncake = mooncake_cells(args.vs_mooncake, args) if args.vs_mooncake else {}

    med = {name: {k: statistics.median(v) for k, v in c.items()} for name, c in cells.items()}
    mc = {k: statistics.median(v) for k, v in mooncake.items()}
    rows, records = [], []
    for block, batch in SHAPES:
        for op in OPS:
            key = (op, block, batch)
            tcp, loc, rw, cp = med["tcp"][key], med["local"][key], med["raw"][key], med["memcpy"][key]
            vm = med["local_vm"][key]
            m = mc.get(key)
            rows.append(
                [
                    f"{format_size(block)} x{batch}",
                    op,
                    f"{tcp:.2f}",
                    f"{m:.2f}" if m else "-",
                    f"{tcp / m:.2f}" if m else "-",
                    f"{rw:.2f}",
                    f"{tcp / rw:.2f}",
                    f"{loc:.2f}",
                    f"{cp:.2f}",
                    f"{loc / cp:.2f}",
                    f"{vm:.2f}",
                    f"{vm / cp:.2f}",
                ]
            )
            records.append(
                {
                    "block": block,
                    "batch": batch,
                    "op": op,
                    "mooncakefs_tcp_gbps": cells["tcp"][key],
                    "mooncakefs_local_gbps": cells["local"][key],
                    "mooncakefs_local_process_vm_gbps": cells["local_vm"][key],
                    "raw_socket_gbps": cells["raw"][key],
                    "memcpy_gbps": cells["memcpy"][key],
                    "mooncake_tcp_gbps": mooncake.get(key),
                    "median": {
                        "mooncakefs_tcp": tcp,
                        "mooncakefs_local": loc,
                        "raw_socket": rw,
                        "mooncakefs_local_process_vm": vm,
                        "memcpy": cp,
                        "mooncake_tcp": m,
                    },
                    "ratio": {
                        "tcp_vs_mooncake": tcp / m if m else None,
                        "tcp_vs_raw_socket": tcp / rw,
                        "local_vs_memcpy": loc / cp,
                        "local_process_vm_vs_memcpy": vm / cp,
                    },
                }
            )
    header = [
        "shape",
        "op",
        "mcfs tcp",
        "Mooncake tcp",
        "x Mooncake",
        "raw socket",
        "x raw",
        "mcfs local",
        "memcpy",
        "x memcpy",
        "mcfs vm",
        "x memcpy",
    ]
    print(
        "GB/s (1e9 bytes/s), medians of",
        args.reps,
        "reps; Mooncake:",
        args.mooncake_reps if mooncake else 0,
        "runs of",
        args.mooncake_seconds,
        "s",
    )
    print(format_table(header, rows, [False, False] + [True] * 10))
    print(
        "mcfs tcp: same_host=False; mcfs local: same host, the peer's managed buffer (memfd, memcpy); "
        "mcfs vm: same host, ordinary registered memory (process_vm_readv/writev)"
    )
    write_json(
        args.json, {"machine": machine_info({"mooncake_venv": args.vs_mooncake}), "rows": records, "args": vars(args)}
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
