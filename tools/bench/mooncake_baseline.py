#!/usr/bin/env python3
"""Baseline numbers for the REAL Mooncake store, for side-by-side comparison with mooncakefs.

Runs inside the venv made by ``tools/bench/setup_mooncake_venv.sh`` (stdlib + numpy + mooncake
only; it deliberately does not import mooncakefs). It starts ``mooncake_master`` on free loopback
ports, sets up one ``MooncakeDistributedStore`` in this process (protocol tcp, P2PHANDSHAKE
metadata, so no etcd/http metadata service is needed) and measures single and batched put/get,
bytes and zero-copy, for a list of value sizes. Each number is the median of several time-bounded
repetitions because the target VMs are small and noisy.

Layouts (``--layout``):

* ``local`` (default): the measuring client also contributes the segment that holds the data, so
  every transfer stays inside one process.
* ``--endpoint ADDR`` (layout ``endpoint``): start no master; ``setup()`` names ADDR as its master.
  With mooncakefs's drop-in (``mooncakefs as-mooncake -- python3 mooncake_baseline.py --endpoint
  unix:///…/node.sock``) this runs the very same workload against a mooncakefs node, whose process
  holds the data as the segment server does in ``remote``; ``tools/bench/compat_bench.py`` runs both.
* ``remote``: Mooncake's cross-process path. A second process (this script in a hidden
  ``--serve-segment`` mode) contributes the segment (``--segment``); the measuring client
  contributes none (global_segment_size=0), so every put/get moves its bytes over TCP on loopback
  between the two processes. Before measuring, the script checks that a put fails while no serving
  process exists and that the replica's transport endpoint is a socket owned by the serving
  process. ``--cpus A,B`` pins the measuring process to CPU A and the serving process to CPU B
  (the master stays unpinned); the default is no pinning.

Output: a human table on stderr and a JSON document on stdout (or ``--json PATH``)::

    {"system": "mooncake", "version": "...", "layout": "local", "results": [{"op": "get_into", "size": 16777216,
     "ops_per_s": ..., "gbps": ..., "reps": [...]}, ...]}

``ops_per_s`` counts keys (for batch ops too: keys/s, not batches/s); ``gbps`` is 1e9 bytes/s.

Example::

    tools/bench/setup_mooncake_venv.sh /tmp/mooncake-venv
    /tmp/mooncake-venv/bin/python tools/bench/mooncake_baseline.py --json /tmp/mooncake.json
    /tmp/mooncake-venv/bin/python tools/bench/mooncake_baseline.py --layout remote --cpus 0,1
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib.metadata
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    GB,
    KiB,
    MiB,
    accepts,
    exit_on_sigterm,
    format_size,
    format_table,
    free_port,
    median,
    parse_size,
    pin_threads,
    spawn,
    stop,
    wait_until,
    write_json,
)
from mooncake.store import MooncakeDistributedStore

OPS_SINGLE = ("put", "get", "get_into", "put_from")
OPS_BATCH = ("batch_put", "batch_get", "batch_get_into", "batch_put_from")
# Batched ops are only measured for small values, as in the brief (KV-page sized objects).
BATCH_MAX_SIZE = 64 * KiB


def find_master_binary(override: str | None) -> str:
    """Locate mooncake_master: the wheel ships an ELF inside the package plus a console script."""
    if override:
        return override
    import mooncake

    pkg_bin = Path(mooncake.__file__).resolve().parent / "mooncake_master"
    if pkg_bin.is_file():
        if not os.access(pkg_bin, os.X_OK):
            pkg_bin.chmod(pkg_bin.stat().st_mode | 0o111)
        return str(pkg_bin)
    for cand in (Path(sys.prefix) / "bin" / "mooncake_master", shutil.which("mooncake_master")):
        if cand and Path(cand).is_file():
            return str(cand)
    raise FileNotFoundError("mooncake_master not found; run setup_mooncake_venv.sh")


def pin_process(cpu: int | None) -> None:
    """Pin every thread of this process to one CPU; threads created later inherit the mask, so call this
    before the store starts its threads."""
    if cpu is not None:
        pin_threads(os.getpid(), cpu)


def setup_store(store: MooncakeDistributedStore, segment: int, local_buffer: int, master_addr: str) -> None:
    """setup() over tcp with P2PHANDSHAKE metadata (no etcd/http metadata service needed)."""
    rc = store.setup(
        "127.0.0.1",  # local_hostname
        "P2PHANDSHAKE",  # metadata_server
        segment,  # global_segment_size this client contributes (0: none)
        local_buffer,  # local_buffer_size (put/get stage through it)
        "tcp",  # protocol
        "",  # rdma_devices
        master_addr,  # master_server_addr
    )
    check(rc, "setup")


def listening_socket_owner(port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds a listening TCP socket on ``port`` (from /proc), or None."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A = LISTEN
                    inodes.add(f"socket:[{cols[9]}]")
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(os.path.join(fd_dir, fd)) in inodes:
                    return pid
    return None


class Master:
    """mooncake_master as a child process on free loopback ports, stopped cleanly at exit."""

    def __init__(self, binary: str, log_path: str, extra: list[str]) -> None:
        self.rpc_port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path
        cmd = [
            binary,
            f"--rpc_port={self.rpc_port}",
            "--rpc_address=127.0.0.1",
            f"--metrics_port={self.metrics_port}",
            "--metrics_host=127.0.0.1",
            "--logtostderr",
            *extra,
        ]
        # Own session: a Ctrl-C in the terminal reaches only this script, which then stops its
        # children in order (store first, master last) instead of all of them dying at once.
        with open(log_path, "wb") as log:  # the master holds its own descriptor of it
            self.proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)
        listening = functools.partial(accepts, ("127.0.0.1", self.rpc_port))
        wait_until(listening, f"mooncake_master listening (log: {log_path})", 20.0, proc=self.proc)

    @property
    def addr(self) -> str:
        """master_server_addr for setup()."""
        return f"127.0.0.1:{self.rpc_port}"

    def stop(self) -> None:
        """SIGTERM (the master handles it as a graceful shutdown), then SIGKILL if it hangs."""
        stop(self.proc)


class SegmentServer:
    """A second Mooncake client process (this script, ``--serve-segment``) that only contributes
    a memory segment. It exits when its stdin closes (this process stopped or died) or on SIGTERM.
    """

    def __init__(self, master_addr: str, segment: int, cpu: int | None, log_path: str) -> None:
        self.log_path = log_path
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-segment", master_addr, "--segment", str(segment)]
        if cpu is not None:
            cmd += ["--serve-cpu", str(cpu)]
        with open(log_path, "wb") as log:  # the server holds its own descriptor of it
            self.proc = spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        atexit.register(self.stop)
        self.pid = self.proc.pid
        self.hostname = self._wait_ready(timeout=60.0)

    def _wait_ready(self, timeout: float) -> str:
        """Wait for the 'READY <hostname>' line printed after setup() returned."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode().split() if ready else []
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"segment server not ready after {timeout}s (got {line}); see {self.log_path}")
        return line[1]

    def stop(self) -> None:
        """Close its stdin (it closes its store and exits), then SIGTERM / SIGKILL if it hangs."""
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop(self.proc)


def serve_segment(args: argparse.Namespace) -> int:
    """Hidden ``--serve-segment`` mode: contribute ``--segment`` bytes until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    pin_process(args.serve_cpu)
    store = MooncakeDistributedStore()
    try:
        setup_store(store, args.segment, 0, args.serve_segment)  # serves only: no local buffer
        print(f"READY {store.get_hostname()}", flush=True)
        sys.stdin.buffer.read()  # returns at EOF: the measuring process is done or gone
    finally:
        store.close()
    return 0


def check_remote_placement(store: MooncakeDistributedStore, server: SegmentServer, key: str, value: bytes) -> str:
    """Put ``key`` and prove its only replica lives in the serving process; returns its endpoint.

    The measuring client has no segment, so the put must land elsewhere; on top of that the
    replica's transport endpoint must be a listening socket of the serving process, not ours.
    """
    deadline = time.monotonic() + 20.0
    while (rc := store.put(key, value)) != 0:  # the served segment may mount a little after setup
        if time.monotonic() > deadline:
            raise RuntimeError(f"put into the served segment failed rc={rc}; see {server.log_path}")
        time.sleep(0.1)
    replicas = store.get_replica_desc(key)
    if not replicas:
        raise RuntimeError("no replica descriptor for the probe key")
    endpoints = []
    for r in replicas:
        if not r.is_memory_replica():
            raise RuntimeError("probe replica is not a memory replica")
        endpoint = r.get_memory_descriptor().buffer_descriptor.transport_endpoint
        owner = listening_socket_owner(int(endpoint.rsplit(":", 1)[1]), [server.pid, os.getpid()])
        if owner != server.pid:
            raise RuntimeError(f"replica endpoint {endpoint} is owned by pid {owner}, not server {server.pid}")
        endpoints.append(endpoint)
    return ",".join(endpoints)


@dataclass
class Result:
    """One (op, size) measurement; reps hold per-repetition keys/s."""

    op: str
    size: int
    batch: int
    reps: list[float] = field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        return median(self.reps) or 0.0

    def to_json(self) -> dict[str, Any]:
        ops = self.ops_per_s
        return {
            "op": self.op,
            "size": self.size,
            "batch": self.batch,
            "ops_per_s": round(ops, 1),
            "gbps": round(ops * self.size / GB, 4),
            "reps": [round(r, 1) for r in self.reps],
        }


def check(rc: int, what: str) -> None:
    """Mooncake returns 0 / negative error codes (-200 out of space, -600 bad params, ...)."""
    if rc != 0:
        raise RuntimeError(f"{what} failed rc={rc}")


class Bench:
    """Holds the store, registered buffers and the per-op timing loops."""

    def __init__(self, store: MooncakeDistributedStore, args: argparse.Namespace) -> None:
        self.s = store
        self.args = args
        self.batch = args.batch
        self.max_size = max(args.sizes)
        # Both zero-copy buffers must hold one max-size value or one full batch of small values.
        nbytes = max(self.max_size, self.batch * min(BATCH_MAX_SIZE, self.max_size))
        rng = np.random.default_rng(1234)
        self.src = rng.integers(0, 256, size=nbytes, dtype=np.uint8)  # written => prefaulted
        self.dst = np.ones(nbytes, dtype=np.uint8)  # ones, not zeros: forces page faults now
        check(self.s.register_buffer(self.src.ctypes.data, self.src.nbytes), "register_buffer(src)")
        check(self.s.register_buffer(self.dst.ctypes.data, self.dst.nbytes), "register_buffer(dst)")
        self.src_ptr = int(self.src.ctypes.data)
        self.dst_ptr = int(self.dst.ctypes.data)
        self.seq = 0
        # Space a measurement may occupy at once; stays well below the 0.90 eviction watermark.
        self.budget = int(args.segment * args.fill)

    def close(self) -> None:
        """Unregister the zero-copy buffers before the store is closed."""
        self.s.unregister_buffer(self.src_ptr)
        self.s.unregister_buffer(self.dst_ptr)

    def fresh_keys(self, n: int, tag: str) -> list[str]:
        """Never-used keys: Mooncake put is write-once, a re-put silently does nothing."""
        base = self.seq
        self.seq += n
        return [f"bench/{tag}/{base + i}" for i in range(n)]

    def remove(self, keys: list[str]) -> None:
        """Force-remove (skips read leases, which every get takes for 10 s)."""
        for i in range(0, len(keys), 1024):
            chunk = keys[i : i + 1024]
            rcs = self.s.batch_remove(chunk, True)
            bad = [rc for rc in rcs if rc not in (0, -704)]
            if bad:
                raise RuntimeError(f"batch_remove failed: {bad[:5]}")

    # ---- timing loops -------------------------------------------------------------------

    def time_puts(self, size: int, per_call: int, call: Callable[[list[str]], None]) -> float:
        """Keys/s for one repetition of a write op.

        Puts go in chunks that fit in the segment budget; each chunk is force-removed outside the
        timed region, so the rep can run its full time without filling the segment.
        """
        chunk_calls = max(1, self.budget // (size * per_call))
        elapsed, keys_done = 0.0, 0
        max_keys = self.args.max_ops
        while elapsed < self.args.rep_time and keys_done < max_keys:
            written: list[str] = []
            t0 = time.perf_counter()
            for _ in range(chunk_calls):
                keys = self.fresh_keys(per_call, "w")
                call(keys)
                written.extend(keys)
                if time.perf_counter() - t0 + elapsed >= self.args.rep_time:
                    break
                if keys_done + len(written) >= max_keys:
                    break
            elapsed += time.perf_counter() - t0
            keys_done += len(written)
            self.remove(written)
        return keys_done / elapsed

    def time_gets(self, pool: list[str], per_call: int, call: Callable[[list[str]], None]) -> float:
        """Keys/s for one repetition of a read op, cycling over a prefilled key pool."""
        groups = [pool[i : i + per_call] for i in range(0, len(pool) - per_call + 1, per_call)]
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + self.args.rep_time
        while True:
            call(groups[n % len(groups)])
            n += 1
            now = time.perf_counter()
            if now >= deadline or n * per_call >= self.args.max_ops:
                break
        return n * per_call / (now - t0)

    # ---- op bodies ------------------------------------------------------------------------

    def make_ops(self, size: int, value: bytes) -> dict[str, tuple[str, int, Callable[[list[str]], None]]]:
        """op name -> (kind, keys per call, callable). Callables raise on any failure."""
        s, b = self.s, self.batch
        src, dst = self.src_ptr, self.dst_ptr
        ptrs_src = [src + i * size for i in range(b)]
        ptrs_dst = [dst + i * size for i in range(b)]
        sizes = [size] * b
        values = [value] * b

        def put(keys: list[str]) -> None:
            check(s.put(keys[0], value), "put")

        def put_from(keys: list[str]) -> None:
            check(s.put_from(keys[0], src, size), "put_from")

        def get(keys: list[str]) -> None:
            if len(s.get(keys[0])) != size:
                raise RuntimeError(f"get {keys[0]} returned wrong length")

        def get_into(keys: list[str]) -> None:
            rc = s.get_into(keys[0], dst, size)
            if rc != size:
                raise RuntimeError(f"get_into rc={rc}")

        def batch_put(keys: list[str]) -> None:
            check(s.put_batch(keys, values), "put_batch")

        def batch_put_from(keys: list[str]) -> None:
            rcs = s.batch_put_from(keys, ptrs_src, sizes)
            if any(rcs):
                raise RuntimeError(f"batch_put_from rcs={rcs}")

        def batch_get(keys: list[str]) -> None:
            out = s.get_batch(keys)
            if len(out) != b or any(len(v) != size for v in out):
                raise RuntimeError("get_batch returned short/missing values")

        def batch_get_into(keys: list[str]) -> None:
            rcs = s.batch_get_into(keys, ptrs_dst, sizes)
            if any(rc != size for rc in rcs):
                raise RuntimeError(f"batch_get_into rcs={rcs}")

        return {
            "put": ("w", 1, put),
            "put_from": ("w", 1, put_from),
            "get": ("r", 1, get),
            "get_into": ("r", 1, get_into),
            "batch_put": ("w", b, batch_put),
            "batch_put_from": ("w", b, batch_put_from),
            "batch_get": ("r", b, batch_get),
            "batch_get_into": ("r", b, batch_get_into),
        }

    def verify(self, size: int, value: bytes) -> None:
        """Once per size: bytes and zero-copy paths both return exactly what was put."""
        k1, k2 = self.fresh_keys(2, "verify")
        check(self.s.put(k1, value), "verify put")
        if self.s.get(k1) != value:
            raise RuntimeError(f"get mismatch at size {size}")
        self.dst[:size] = 0
        if self.s.get_into(k1, self.dst_ptr, size) != size or not np.array_equal(
            self.dst[:size], np.frombuffer(value, dtype=np.uint8)
        ):
            raise RuntimeError(f"get_into mismatch at size {size}")
        check(self.s.put_from(k2, self.src_ptr, size), "verify put_from")
        if self.s.get(k2) != self.src[:size].tobytes():
            raise RuntimeError(f"put_from/get mismatch at size {size}")
        self.remove([k1, k2])

    def run_size(self, size: int, ops: list[str]) -> list[Result]:
        """All requested ops for one value size: writes first, then reads over a prefilled pool."""
        value = self.src[:size].tobytes()
        self.verify(size, value)
        table = self.make_ops(size, value)
        results: list[Result] = []
        wanted = [op for op in ops if op in table and (op in OPS_SINGLE or size <= BATCH_MAX_SIZE)]

        for op in (o for o in wanted if table[o][0] == "w"):
            _, per_call, call = table[op]
            res = Result(op, size, per_call)
            self.time_puts(size, per_call, call)  # warm-up rep (connections, allocator, page faults)
            for _ in range(self.args.reps):
                res.reps.append(self.time_puts(size, per_call, call))
            results.append(res)

        readers = [o for o in wanted if table[o][0] == "r"]
        if readers:
            # Distinct keys, capped by the segment budget: overfilling past the 0.90 watermark
            # makes the master evict prefilled keys and gets then return b"".
            n_pool = min(self.args.pool, self.budget // size)
            if any(table[o][1] > n_pool for o in readers):
                raise RuntimeError(f"segment budget holds {n_pool} keys of {size} B < batch {self.batch}")
            pool = self.fresh_keys(n_pool, "r")
            for i in range(0, n_pool, self.batch):
                keys = pool[i : i + self.batch]
                rcs = self.s.batch_put_from(keys, [self.src_ptr] * len(keys), [size] * len(keys))
                if any(rcs):
                    raise RuntimeError(f"prefill failed rcs={rcs[:5]}")
            try:
                for op in readers:
                    _, per_call, call = table[op]
                    res = Result(op, size, per_call)
                    self.time_gets(pool, per_call, call)  # warm-up rep
                    for _ in range(self.args.reps):
                        res.reps.append(self.time_gets(pool, per_call, call))
                    results.append(res)
            finally:
                self.remove(pool)
        order = {op: i for i, op in enumerate(ops)}
        return sorted(results, key=lambda r: order[r.op])

    def prefault_segment(self) -> None:
        """Touch the whole mounted segment once (put then remove big objects).

        setup() mounts the segment lazily (1 GiB mounts in ~20 ms), so without this the first
        puts would pay first-touch page faults that later puts do not.
        """
        # Big objects whatever --sizes says: 4 KiB ones would take ~300k puts (minutes over TCP).
        size = min(64 * MiB, self.args.local_buffer, self.budget)
        value = bytes(size)
        keys = self.fresh_keys(max(1, self.budget // size), "prefault")
        for k in keys:
            check(self.s.put(k, value), "prefault put")
        self.remove(keys)


def reps_text(reps: list[float]) -> str:
    return " ".join(f"{x:.0f}" for x in reps)


def print_table(results: list[Result], header: str) -> None:
    """Human table on stderr."""
    body = [
        [r.op, format_size(r.size), f"{r.ops_per_s:,.0f}", f"{r.ops_per_s * r.size / GB:.3f}", reps_text(r.reps)]
        for r in results
    ]
    table = format_table(["op", "size", "keys/s", "GB/s", "reps (keys/s)"], body, [False, True, True, True, False])
    print(f"{header}\n{table}", file=sys.stderr)


@contextlib.contextmanager
def native_stderr_to(path: str | None) -> Iterator[None]:
    """Send fd 2 (glog output of the C++ client: INFO per mount, per op errors) to a file.

    GLOG_minloglevel in the environment does not silence the wheel's logging, so the fd is
    redirected instead; Python's sys.stderr keeps pointing at the real terminal.
    """
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    old_stderr = sys.stderr
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = open(saved, "w", buffering=1, closefd=False)  # noqa: SIM115 - restored below
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = old_stderr


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB", help="comma-separated value sizes")
    p.add_argument("--ops", default=",".join(OPS_SINGLE + OPS_BATCH), help="comma-separated op names")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per (op, size); median reported")
    p.add_argument("--rep-time", type=float, default=0.3, help="seconds per repetition")
    p.add_argument("--max-ops", type=int, default=200_000, help="cap on keys per repetition")
    p.add_argument("--batch", type=int, default=32, help="keys per batched call")
    p.add_argument("--pool", type=int, default=1024, help="max prefilled keys for read ops")
    p.add_argument(
        "--layout",
        choices=("local", "remote"),
        default="local",
        help="local: this process holds the segment; remote: a second process does (bytes cross TCP)",
    )
    p.add_argument(
        "--cpus",
        default=None,
        metavar="A,B",
        help="remote layout: pin the measuring process to CPU A and the serving process to CPU B",
    )
    p.add_argument(
        "--segment", default="2GiB", help="global_segment_size of the client holding the data (see --layout)"
    )
    p.add_argument("--local-buffer", default="256MiB", help="local_buffer_size (copy APIs stage here)")
    p.add_argument("--fill", type=float, default=0.6, help="max fraction of the segment in use at once")
    p.add_argument("--master-bin", default=None, help="path to mooncake_master (default: from the wheel)")
    p.add_argument(
        "--master-arg",
        action="append",
        default=[],
        help="extra master flag, e.g. --master-arg=--client_ttl=30",
    )
    p.add_argument(
        "--endpoint",
        default=None,
        metavar="ADDR",
        help="start no master: pass ADDR to setup() as master_server_addr (e.g. a mooncakefs node "
        "through the drop-in); implies --layout endpoint",
    )
    p.add_argument("--json", default=None, help="write JSON here instead of stdout")
    p.add_argument("--verbose", action="store_true", help="keep Mooncake INFO logging")
    p.add_argument("--serve-segment", default=None, metavar="MASTER_ADDR", help=argparse.SUPPRESS)
    p.add_argument("--serve-cpu", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sizes = [parse_size(x) for x in a.sizes.split(",") if x.strip()]
    a.ops = [x.strip() for x in a.ops.split(",") if x.strip()]
    unknown = set(a.ops) - set(OPS_SINGLE + OPS_BATCH)
    if unknown:
        p.error(f"unknown ops: {sorted(unknown)}")
    a.segment = parse_size(a.segment)
    if a.endpoint is not None:
        a.layout = "endpoint"
    if a.cpus is not None:
        if a.layout not in ("remote", "endpoint"):
            p.error("--cpus needs --layout remote or --endpoint")
        try:
            a.cpus = [int(x) for x in a.cpus.split(",")]
        except ValueError:
            a.cpus = []
        if len(a.cpus) != 2 or not set(a.cpus) <= os.sched_getaffinity(0):
            p.error(f"--cpus wants two CPU numbers out of {sorted(os.sched_getaffinity(0))}")
    if a.serve_segment is not None:
        return a
    a.local_buffer = parse_size(a.local_buffer)
    if max(a.sizes) > a.local_buffer:
        p.error("--local-buffer must be >= the largest size (put/get stage through it)")
    if max(a.sizes) > a.segment * a.fill:
        p.error("--segment * --fill must be >= the largest size")
    return a


def run_bench(args: argparse.Namespace, log_dir: str) -> tuple[list[Result], dict[str, Any]]:
    """Start master (+ segment server for --layout remote) and the measuring client; measure."""
    remote = args.layout == "remote"
    cpu_here, cpu_server = args.cpus if args.cpus else (None, None)
    master = (
        None
        if args.endpoint
        else Master(find_master_binary(args.master_bin), os.path.join(log_dir, "master.log"), args.master_arg)
    )
    server: SegmentServer | None = None
    extra: dict[str, Any] = {}
    pin_process(cpu_here)  # after the master started: it inherits nothing and stays unpinned
    store = MooncakeDistributedStore()
    try:
        setup_store(
            store, 0 if remote else args.segment, args.local_buffer, args.endpoint or (master.addr if master else "")
        )
        if remote:
            # Nothing holds a segment yet, so a put must fail: the measuring client stores nothing.
            rc = store.put("bench/probe/no-segment", b"x")
            if rc == 0:
                raise RuntimeError("put succeeded with no serving process: some local segment exists")
            server = SegmentServer(master.addr, args.segment, cpu_server, os.path.join(log_dir, "server.log"))
            endpoint = check_remote_placement(store, server, "bench/probe/remote", b"x" * 4096)
            check(store.remove("bench/probe/remote", True), "remove probe")
            print(f"[remote segment: pid {server.pid}, endpoint {endpoint}, put without it rc={rc}]", file=sys.stderr)
            extra = {"server_pid": server.pid, "replica_transport_endpoint": endpoint, "put_without_server_rc": rc}
        bench = Bench(store, args)
        try:
            bench.prefault_segment()
            results: list[Result] = []
            for size in args.sizes:
                t0 = time.perf_counter()
                results.extend(bench.run_size(size, args.ops))
                print(f"[{format_size(size)} done in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
        finally:
            bench.close()
    except BaseException:
        print(f"mooncake logs kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        store.close()
        if server is not None:
            server.stop()
        if master is not None:
            master.stop()
    return results, extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()  # the finally blocks close the store and stop the master
    if args.serve_segment is not None:
        return serve_segment(args)
    import mooncake

    drop_in = bool(getattr(mooncake, "__mooncakefs__", False))
    system = "mooncakefs-drop-in" if drop_in else "mooncake"
    version = (
        __import__("mooncakefs").__version__
        if drop_in
        else importlib.metadata.version("mooncake-transfer-engine-non-cuda")
    )
    log_dir = tempfile.mkdtemp(prefix="mooncake-baseline-")
    t_start = time.perf_counter()
    client_log = None if args.verbose else os.path.join(log_dir, "client.log")
    with native_stderr_to(client_log):
        results, extra = run_bench(args, log_dir)

    elapsed = time.perf_counter() - t_start
    if args.layout == "remote":
        where = "client without segment + segment-server process"
        if args.cpus:
            where += f" (cpus {args.cpus[0]},{args.cpus[1]})"
    elif args.layout == "endpoint":
        where = f"client of {args.endpoint}" + (f" (cpu {args.cpus[0]})" if args.cpus else "")
    else:
        where = "1 in-process client"
    header = (
        f"{system} {version} [{args.layout}]: {where}, tcp, P2PHANDSHAKE, segment {format_size(args.segment)}, "
        f"batch {args.batch}, median of {args.reps} x {args.rep_time}s reps, total {elapsed:.0f}s"
    )
    print_table(results, header)
    doc = {
        "system": system,
        "version": version,
        "layout": args.layout,
        "config": {
            "protocol": "tcp",
            "metadata_server": "P2PHANDSHAKE",
            "global_segment_size": args.segment,
            "segment_owner": {"remote": "server process", "endpoint": f"the process behind {args.endpoint}"}.get(
                args.layout, "measuring process"
            ),
            "endpoint": args.endpoint,
            "local_buffer_size": args.local_buffer,
            "cpus": args.cpus,
            "batch": args.batch,
            "reps": args.reps,
            "rep_time_s": args.rep_time,
            "ops_per_s_unit": "keys/s",
            "gbps_unit": "1e9 bytes/s",
            **extra,
        },
        "results": [r.to_json() for r in results],
    }
    if args.json:
        write_json(args.json, doc)
    else:
        print(json.dumps(doc, indent=2))
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
