"""The benchmarks' shared harness, so that each benchmark says only what it measures.

Here: sizes, prefaulted buffers and number formats; the timing loop (reps, medians); the KV workload every
store benchmark times (one runner and one check per op); physical references measured in the same run
(numpy copy, loopback socket loops against a peer process); child processes (started in their own session,
dying with the benchmark, stopped on the way out), free ports and CPU time; a mooncakefs node process, a
single-member etcd and a Prometheus scrape; worker processes that load a service together; the reference
run in another virtualenv (the real Mooncake); progress lines; the table; the JSON (machine info, written
atomically).  Only the standard library and numpy are imported, so the module also works inside the
separate virtualenv that holds the real Mooncake (tools/bench/setup_mooncake_venv.sh), where mooncakefs is
absent; run as a script it is the peer process of the socket references.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

GB = 1e9  # bandwidths are reported in GB/s = 1e9 bytes/s
PAGE = 4096  # message buffers start on one (message_slots)
KiB, MiB, GiB = 1024, 1024**2, 1024**3
T = TypeVar("T")
Runner = Callable[[int, int], object]  # run(start, count): ``count`` ops from op number ``start`` on


def parse_size(text: str) -> int:
    """Bytes from "4KiB", "64k", "1MiB", "2G" or "4096" (binary units, as ``format_size`` writes them)."""
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = 1
    for suffix, m in (("k", KiB), ("m", MiB), ("g", GiB)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    return int(float(t) * mult)


def format_size(n: int) -> str:
    """Exact binary size label: 4096 -> "4KiB", 16777216 -> "16MiB"; other values stay in bytes."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def format_number(value: float) -> str:
    """Two decimals for small values, none once they are large enough that decimals are noise."""
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def format_seconds(value: float | None, digits: int = 2) -> str:
    """``1.23s``, or ``-`` for a time that was not measured."""
    return "-" if value is None else f"{value:.{digits}f}s"


def prefaulted(nbytes: int) -> np.ndarray:
    """A uint8 array whose every page has been written once.

    On the benchmark VMs the first touch of freshly allocated memory is very slow (free-page reporting), so
    buffers are allocated and touched before any timing starts, then reused.  The content is a position
    pattern, so different slices hold different bytes and a wrong read is detectable.
    """
    words = np.arange((nbytes + 7) // 8, dtype=np.uint64)
    return words.view(np.uint8)[:nbytes]


# -- timing --------------------------------------------------------------------------------------------


def measure(
    run: Runner,
    *,
    period: int,
    reps: int,
    rep_seconds: float,
    warmup: bool = True,
    max_ops_per_rep: int | None = None,
    before_rep: Callable[[], object] | None = None,
) -> list[float]:
    """Ops per second of each repetition of ``run(start, count)``, which performs ``count`` ops.

    ``period`` is how many distinct ops the workload cycles through (keys or batches).  The warm-up does one
    full period, so every source and destination page has been touched, and sizes the chunk between clock
    reads to about a millisecond of work.  Each repetition then runs whole chunks until ``rep_seconds`` have
    passed or ``max_ops_per_rep`` ops are done (at least one op).
    """
    chunk = 1
    if warmup:
        t0 = time.perf_counter()
        run(0, period)
        per_op = max((time.perf_counter() - t0) / period, 1e-9)
        chunk = max(1, min(period, int(1e-3 / per_op)))
    limit = max_ops_per_rep or sys.maxsize
    results = []
    start = 0
    for _ in range(reps):
        if before_rep is not None:
            before_rep()
        done = 0
        t0 = time.perf_counter()
        while True:
            count = min(chunk, limit - done)
            run(start, count)
            start = (start + count) % period
            done += count
            elapsed = time.perf_counter() - t0
            if elapsed >= rep_seconds or done >= limit:
                break
        results.append(done / elapsed)
    return results


def median(values: Iterable[float | None]) -> float | None:
    """The median of the repetitions, skipping those that measured nothing (None for none): every benchmark
    reports medians, not means, so one slow rep on a busy 2-core VM does not move the number."""
    got = [v for v in values if v is not None]
    return float(statistics.median(got)) if got else None


# -- the KV workload -----------------------------------------------------------------------------------


def raise_batch_errors(results: Iterable[object], what: str = "batch_put") -> None:
    """A batch call answers per key (None, or the error) instead of raising: raise the first error."""
    for r in results:
        if r is not None:
            raise r if isinstance(r, BaseException) else AssertionError(f"{what}: {r!r}")


@dataclass
class KVWorkload:
    """Keys of one value size with their values (views into one prefaulted source) and the buffer reads write
    into (one value for get_into and view, a whole batch for batch_get_into): what every store benchmark
    times, whatever the store (embedded, a node, a cluster)."""

    size: int
    keys: list[str]
    values: list[np.ndarray]
    batch: int
    dst: np.ndarray  # batch * size bytes

    @classmethod
    def carve(cls, prefix: str, size: int, count: int, batch: int, src: np.ndarray, dst: np.ndarray) -> KVWorkload:
        """``count`` keys "<prefix>/<size>/<i>" whose values are consecutive slices of ``src``."""
        return cls(
            size,
            [f"{prefix}/{format_size(size)}/{i}" for i in range(count)],
            [src[i * size : (i + 1) * size] for i in range(count)],
            batch,
            dst[: batch * size],
        )

    @property
    def batches(self) -> int:
        return len(self.keys) // self.batch

    def batch_keys(self, j: int) -> list[str]:
        return self.keys[j * self.batch : (j + 1) * self.batch]

    def batch_items(self, j: int) -> list[tuple[str, np.ndarray]]:
        return list(zip(self.batch_keys(j), self.values[j * self.batch : (j + 1) * self.batch], strict=True))

    def batch_buffers(self) -> list[np.ndarray]:
        return [self.dst[i * self.size : (i + 1) * self.size] for i in range(self.batch)]

    def runner(self, store: Any, op: str, *, strict: bool = False, **put_options: Any) -> tuple[Runner, int, int]:
        """``(run(start, count), period, keys_per_call)`` for ``measure``.

        Lists are doubled so ``run`` can index ``start .. start + count`` (start < period, count <= period)
        without a modulo in the hot loop.  ``put_options`` go to put and batch_put (replicas=2); ``strict``
        checks every batch's answers, for stores that report a failed key instead of raising (a cluster).
        """
        keys2, values2, one = self.keys * 2, self.values * 2, self.dst[: self.size]
        put = functools.partial(store.put, **put_options) if put_options else store.put
        batch_put = functools.partial(store.batch_put, **put_options) if put_options else store.batch_put
        get, get_into, view, batch_get, batch_get_into = (
            store.get,
            store.get_into,
            getattr(store, "view", None),
            store.batch_get,
            store.batch_get_into,
        )
        groups2 = [self.batch_keys(j) for j in range(self.batches)] * 2
        items2 = [self.batch_items(j) for j in range(self.batches)] * 2
        buffers, sink = self.batch_buffers(), memoryview(one)

        def run_put(start: int, count: int) -> None:
            for j in range(start, start + count):
                put(keys2[j], values2[j])

        def run_get(start: int, count: int) -> None:
            for j in range(start, start + count):
                get(keys2[j])

        def run_get_into(start: int, count: int) -> None:
            for j in range(start, start + count):
                get_into(keys2[j], one)

        def run_view(start: int, count: int) -> None:
            # A view alone costs nothing per byte; what a reader does with it is consume the bytes, so the
            # row times open + copy out into a destination + close, which makes it comparable with get_into.
            for j in range(start, start + count):
                with view(keys2[j]) as mv:
                    sink[:] = mv

        def run_batch_put(start: int, count: int) -> None:
            for j in range(start, start + count):
                results = batch_put(items2[j])
                if strict:
                    raise_batch_errors(results)

        def run_batch_get(start: int, count: int) -> None:
            for j in range(start, start + count):
                if None in batch_get(groups2[j]) and strict:
                    raise AssertionError("batch_get: a key is missing")

        def run_batch_get_into(start: int, count: int) -> None:
            for j in range(start, start + count):
                batch_get_into(groups2[j], buffers)

        singles = {"put": run_put, "get": run_get, "get_into": run_get_into, "view": run_view}
        batched = {"batch_put": run_batch_put, "batch_get": run_batch_get, "batch_get_into": run_batch_get_into}
        if op in singles:
            return singles[op], len(self.keys), 1
        if op in batched:
            return batched[op], self.batches, self.batch
        raise ValueError(f"unknown op {op!r}")

    def check(self, store: Any, op: str, **put_options: Any) -> None:
        """One untimed call of ``op`` whose result is compared with the source bytes; raises on a mismatch."""

        def same(got: object, j: int) -> bool:
            return np.array_equal(np.frombuffer(got, dtype=np.uint8), self.values[j])  # type: ignore[call-overload]

        key, n, b = self.keys[0], self.size, self.batch
        if op == "put":
            store.put(key, self.values[0], **put_options)
            ok, what = same(store.get(key), 0), "get after put"
        elif op == "get":
            ok, what = same(store.get(key), 0), "get"
        elif op == "get_into":
            written = store.get_into(key, self.dst[:n])
            ok, what = written == n and same(self.dst[:n], 0), f"get_into (returned {written})"
        elif op == "view":
            with store.view(key) as mv:
                ok, what = same(mv, 0), "view"
        elif op == "batch_put":
            res = store.batch_put(self.batch_items(0), **put_options)
            errors = [r for r in res if r is not None]
            ok = not errors and all(same(store.get(k), j) for j, k in enumerate(self.batch_keys(0)))
            what = f"batch_put (errors {errors[:2]})"
        elif op == "batch_get":
            res = store.batch_get(self.batch_keys(0))
            ok, what = len(res) == b and all(r is not None and same(r, j) for j, r in enumerate(res)), "batch_get"
        elif op == "batch_get_into":
            buffers = self.batch_buffers()
            res = store.batch_get_into(self.batch_keys(0), buffers)
            ok = res == [n] * b and all(same(buf, j) for j, buf in enumerate(buffers))
            what = f"batch_get_into (returned {res[:3]}...)"
        else:
            raise ValueError(f"unknown op {op!r}")
        if not ok:
            raise AssertionError(f"wrong result from {what} for {format_size(n)} values")


# -- references measured in the same run ---------------------------------------------------------------


@dataclass
class Reference:
    """A physical reference: ``run(start, count)`` does ``count`` ops, each worth ``scale`` (GB, or 1 round
    trip).  ``samples`` collects one value per repetition, each taken right before a repetition of a row
    that is compared with it, so the drift of a noisy host reaches both sides of the ratio alike."""

    name: str
    run: Runner
    period: int
    scale: float
    what: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "GB/s" if self.scale != 1 else "round trips/s"

    def warm_up(self, seconds: float) -> None:
        measure(self.run, period=self.period, reps=1, rep_seconds=seconds)

    def rep(self, seconds: float) -> float:
        value = measure(self.run, period=self.period, reps=1, rep_seconds=seconds, warmup=False)[0] * self.scale
        self.samples.append(value)
        return value

    def paired(self, seconds: float, into: list[float]) -> Callable[[], None]:
        """A ``before_rep`` for ``measure``: one repetition of this reference, its value appended to ``into``."""
        return lambda: into.append(self.rep(seconds))

    def summary(self) -> dict[str, Any]:
        return {"value": median(self.samples), "unit": self.unit, "what": self.what, "samples": self.samples}


def in_turn(*befores: Callable[[], None]) -> Callable[[], None]:
    """One ``before_rep`` for ``measure`` that runs several references' repetitions, one after another."""

    def run() -> None:
        for before in befores:
            before()

    return run


def copy_reference(name: str, sources: Sequence[np.ndarray], destinations: Sequence[np.ndarray]) -> Reference:
    """numpy copy of each source into the destination beside it (GB/s): the memory bandwidth a store's copy
    of the same values into the same kind of destination could reach."""
    sources2, destinations2 = list(sources) * 2, list(destinations) * 2

    def run(start: int, count: int) -> None:
        for j in range(start, start + count):
            np.copyto(destinations2[j], sources2[j])

    return Reference(name, run, len(sources), sources[0].nbytes / GB)


def stream_copy_reference(
    name: str, sources: Sequence[np.ndarray], destinations: Sequence[np.ndarray], per_call: int = 1
) -> Reference:
    """The copy the same-host paths make, of each source into the destination beside it (GB/s):
    ``mooncakefs._engine.copy_at`` of ``per_call`` blocks a call, whose stores stream once a call moves
    STREAM_COPY_MIN bytes or more.  numpy's copy is glibc's memcpy, which streams only past its own
    threshold (glibc_copy_note), so beside copy_reference this says how much of a same-host row's lead
    over numpy comes from the streaming stores alone rather than from the path."""
    from mooncakefs import _engine

    calls = [
        (
            [d.ctypes.data for d in destinations[i : i + per_call]],
            [s.ctypes.data for s in sources[i : i + per_call]],
            [s.nbytes for s in sources[i : i + per_call]],
        )
        for i in range(0, len(sources), per_call)
    ]
    calls2 = calls * 2

    def run(start: int, count: int) -> None:
        for j in range(start, start + count):
            _engine.copy_at(*calls2[j])

    return Reference(name, run, len(calls), sum(s.nbytes for s in sources[:per_call]) / GB)


def glibc_copy_note() -> str:
    """Which copies stream their stores in this run: glibc's memcpy (numpy's copy) past its
    x86_non_temporal_threshold (from ``ld.so --list-diagnostics``, GLIBC_TUNABLES can move it), ours
    from mooncakefs._engine.STREAM_COPY_MIN, on the path stream_copy_kind names."""
    from mooncakefs import _engine

    threshold = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["/lib64/ld-linux-x86-64.so.2", "--list-diagnostics"], capture_output=True, text=True, timeout=10
        ).stdout
        found = re.search(r"cpu_features\.non_temporal_threshold=(0x[0-9a-f]+)", out)
        if found:
            threshold = format_size(int(found.group(1), 16))
    ours = format_size(getattr(_engine, "STREAM_COPY_MIN", 4 << 20))
    return (
        f"streaming stores: glibc memcpy (numpy copy) from {threshold} "
        f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!s}), mooncakefs copy_at from {ours} "
        f"({_engine.stream_copy_kind()})"
    )


def recv_exactly(conn: socket.socket, buf: np.ndarray | bytearray | memoryview, n: int) -> None:
    if conn.recv_into(buf, n, socket.MSG_WAITALL) != n:
        raise ConnectionError("the peer process closed the connection early")


def message_slots(size: int, spread: int) -> list[memoryview]:
    """``size``-byte message buffers over ``spread`` bytes of distinct, prefaulted memory (one buffer if
    ``spread`` <= ``size``): a reference that moves a store's values goes through as much memory as they
    fill, which the caches do not hold, rather than one buffer they keep hot.  The buffers start on a page
    (numpy's own large arrays start 16 bytes into one), so neither kernel copy of a message, into or out
    of the socket's pages, is one of the slow ones on the AMD VMs (``mooncakefs.wire.payload_phase``):
    the reference is the best the sockets do, whatever the buffers of the rows measured against it."""
    count = max(1, spread // size)
    memory = prefaulted(count * size + PAGE)
    start = -memory.ctypes.data % PAGE
    view = memoryview(memory).cast("B")[start : start + count * size]
    return [view[i * size : (i + 1) * size] for i in range(count)]


def peer_main(mode: str, address: str, size: int, spread: int = 0) -> int:
    """The peer process of the socket references: connect to ``address`` and serve until EOF.

    send: sendall ``size``-byte messages forever; serve: sendall one message per 1-byte request; sink:
    recv_into each message, answer a 1-byte ack; echo: recv_into each message and send it back.  The
    messages rotate through ``spread`` bytes (``message_slots``).
    """
    kind, _, where = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)
    else:
        host, _, port = where.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    slots = itertools.cycle(message_slots(size, spread))
    with sock, contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if mode == "send":
            while True:
                sock.sendall(next(slots))
        elif mode == "serve":
            while sock.recv(1):
                sock.sendall(next(slots))
        else:
            while sock.recv_into(buf := next(slots), size, socket.MSG_WAITALL) == size:
                sock.sendall(b"k" if mode == "sink" else buf)
    return 0


@contextlib.contextmanager
def peer(
    mode: str, kind: str, size: int, root: Path, timeout: float = 30.0, spread: int = 0
) -> Iterator[socket.socket]:
    """A blocking connection to a peer process (this module run as a script) in ``mode`` over ``kind``
    (tcp/unix); its Unix socket, if any, under ``root``; its messages rotate through ``spread`` bytes."""
    if kind == "unix":
        path = root / f"peer-{mode}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        address = f"unix:{path}"
    else:
        listener = socket.create_server(("127.0.0.1", 0))
        address = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    command = [sys.executable, str(Path(__file__).resolve()), mode, address, str(size), str(spread)]
    with listener, child_process(command) as proc:
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        conn.setblocking(True)
        if kind == "tcp":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            yield conn
            conn.shutdown(socket.SHUT_RDWR)  # the peer sees EOF or EPIPE and exits
        proc.wait(timeout=10)


def stream_reference(
    name: str, conn: socket.socket, size: int, *, inbound: bool, requested: bool = False, spread: int = 0
) -> Reference:
    """``size``-byte messages over a peer connection (GB/s): received (peer in "send" mode: the reference of
    a get; ``requested``, the peer in "serve" mode: each asked for with a 1-byte request, the reference of a
    synchronous read, which pays a round trip per call) or sent and acknowledged (peer in "sink" mode: the
    reference of a put); this side's messages rotate through ``spread`` bytes (``message_slots``)."""
    slots, ack = message_slots(size, spread), bytearray(1)

    def recv(start: int, count: int) -> None:
        for i in range(start, start + count):
            recv_exactly(conn, slots[i % len(slots)], size)

    def request(start: int, count: int) -> None:
        for i in range(start, start + count):
            conn.sendall(b"r")
            recv_exactly(conn, slots[i % len(slots)], size)

    def send(start: int, count: int) -> None:
        for i in range(start, start + count):
            conn.sendall(slots[i % len(slots)])
            recv_exactly(conn, ack, 1)

    return Reference(name, (request if requested else recv) if inbound else send, 1, size / GB)


# -- progress ------------------------------------------------------------------------------------------


def progress(message: str, *, tag: str | None = None) -> None:
    """A progress line on stderr, so stdout holds only the table (``tag``: "[tag HH:MM:SS] message")."""
    line = f"[{tag} {time.strftime('%H:%M:%S')}] {message}" if tag else message
    print(line, file=sys.stderr, flush=True)


# -- child processes -----------------------------------------------------------------------------------


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (no stray daemons)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_on_sigterm() -> None:
    """Make SIGTERM a SystemExit, so the ``finally`` and ``with`` blocks stop what the benchmark started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def spawn(cmd: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (a Ctrl-C reaches only the benchmark, which then stops it) that
    dies with this process."""
    return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=die_with_parent, **popen)


def stop(*procs: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM every one of ``procs`` at once, and SIGKILL those that have not exited ``timeout`` seconds
    later."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            progress(f"pid {proc.pid} ignored SIGTERM for {timeout:.0f}s: SIGKILL")
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def child_process(cmd: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``spawn(cmd)`` for the duration of a ``with``; ``stop`` on leaving, however it is left."""
    proc = spawn(cmd, **popen)
    try:
        yield proc
    finally:
        stop(proc)


def wait_until(
    ready: Callable[[], T],
    what: str,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    poll: float = 0.05,
) -> T:
    """Poll ``ready()`` until it returns something true, and return that; raise if ``proc`` exits first
    (with the end of its ``log``) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(poll)


def free_port() -> int:
    """An unused loopback TCP port (another process could take it before it is used: a small race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(address: str | tuple[str, int]) -> bool:
    """Whether something accepts connections at ``address``: a Unix socket path, or (host, port)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(address) == 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout: float, window: float = 0.25, busy: float = 0.05) -> bool:
    """Wait until the process uses under ``busy`` of a core over two consecutive windows (a daemon done
    with its start-up work); False if it was still busy after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    quiet, last = 0, cpu_seconds(pid)
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - last < busy * window else 0
        last = now
    return quiet >= 2


def pin_threads(pid: int, cpu: int) -> None:
    """Pin every thread of a process (affinity is per thread; threads started later inherit it) to one CPU."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


def run_json_script(cmd: Sequence[str], out: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run a script that writes its results to ``out`` (a reference in another virtualenv, such as the real
    Mooncake's mooncake_baseline.py), its own table going to our stderr: the JSON it wrote, or
    ``{"error": ...}`` if it failed."""
    progress("running " + shlex.join(cmd))
    with child_process(cmd, stdout=sys.stderr) as proc:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"{shlex.join(cmd)} ran past {timeout:.0f}s"}
    if rc != 0 or not out.exists():
        return {"error": f"{shlex.join(cmd)} exited {rc}"}
    return json.loads(out.read_text())


# -- services: a node, an etcd, their metrics ----------------------------------------------------------


def cli_command(*args: str) -> list[str]:
    """``mooncakefs ARGS`` of the checkout measured: ``python -m`` imports the current directory's
    ``mooncakefs`` (run benchmarks from the root of the checkout they measure)."""
    return [sys.executable, "-m", "mooncakefs.cli", *args]


def node_command(root: Path, dram: str, *options: str, listen: str = "127.0.0.1:0", metrics: str = "none") -> list[str]:
    """``mooncakefs node`` with its data dir and Unix socket under ``root``; ``options`` are appended."""
    return cli_command(
        "node",
        "--data",
        str(root / "data"),
        "--dram",
        dram,
        "--socket",
        str(root / "node.sock"),
        "--listen",
        listen,
        "--metrics",
        metrics,
        *options,
    )


class NodeProcess:
    """A ``mooncakefs node`` child process on ``root``, its output appended to ``root/node.log`` (a restart
    on the same root appends to it: ``output()`` is the current process's part)."""

    def __init__(self, root: Path, cmd: Sequence[str]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.launch(cmd)

    def launch(self, cmd: Sequence[str]) -> None:
        """Start the node (again: the previous process must have exited) on the same root."""
        assert getattr(self, "proc", None) is None or self.proc.poll() is not None, "launch of a running node"
        self.cmd = list(cmd)
        self.tcp = ""  # host:port, from its ready line
        self.ident = ""  # its node id, from its data dir, once ready
        self.killed = False
        self.log_from = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = spawn(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.root / "node.log"

    @property
    def socket_path(self) -> Path:
        return self.root / "node.sock"

    def alive(self) -> bool:
        return not self.killed and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to leave its cluster."""
        self.proc.kill()
        self.killed = True

    def output(self) -> str:
        """What the current process has logged so far."""
        with self.log.open("rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")

    def ready(self) -> bool:
        """Has the current process printed its ready line (then ``tcp`` and ``ident`` are set)?  Raises if it
        exited before."""
        if self.tcp:
            return True
        if self.proc.poll() is not None:
            raise RuntimeError(f"node {self.root.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        m = re.search(r"node ready: \S+ tcp://(\S+)", self.output())
        if m:
            self.tcp = m.group(1)
            with contextlib.suppress(OSError):
                self.ident = (self.root / "data" / "node-id").read_text().strip()
        return m is not None


def wait_ready(nodes: Sequence[NodeProcess], timeout: float) -> float:
    """Wait until every one of ``nodes`` (started together) has printed its ready line; the seconds it took."""
    t0 = time.perf_counter()
    wait_until(lambda: all([n.ready() for n in nodes]), f"{len(nodes)} node(s) ready", timeout)
    return time.perf_counter() - t0


@dataclass
class NodeInfo:
    """A running node, as a benchmark reports it."""

    cmd: list[str]
    pid: int
    unix_url: str
    tcp_url: str
    ready_s: float
    settled_s: float
    pool_resident_bytes: int


def rss_shmem(pid: int) -> int:
    """Resident shared memory of a process: how much of a node's DRAM pool has been touched."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def running_node(root: Path, dram: str, port: int = 0, *, timeout: float = 60.0) -> Iterator[NodeInfo]:
    """A node process serving ``root/node.sock`` and 127.0.0.1:``port`` (0: any free port), ready to use: its
    sockets accept and its background pool prefault is over (the process has gone idle, or 3 x ``timeout``
    passed); stopped on leaving."""
    t0 = time.perf_counter()
    node = NodeProcess(root, node_command(root, dram, listen=f"127.0.0.1:{port}"))
    progress("starting node: " + shlex.join(node.cmd))
    try:
        ready_s = wait_ready([node], timeout)
        host, _, tcp_port = node.tcp.rpartition(":")
        wait_until(lambda: accepts(str(node.socket_path)), "the node's Unix socket accepting", timeout)
        wait_until(lambda: accepts((host, int(tcp_port))), "the node's TCP port accepting", timeout)
        if not wait_idle(node.pid, 3 * timeout):
            progress(f"warning: the node was still busy after {3 * timeout:.0f}s; measuring anyway")
        settled_s = time.perf_counter() - t0
    except BaseException:
        progress("node log:\n" + node.output()[-4000:])
        stop(node.proc)
        raise
    info = NodeInfo(
        node.cmd, node.pid, f"unix://{node.socket_path}", f"tcp://{node.tcp}", ready_s, settled_s, rss_shmem(node.pid)
    )
    progress(
        f"node pid {node.pid} ready in {ready_s:.1f}s, idle (pool prefaulted: "
        f"{format_size(info.pool_resident_bytes)} resident) after {settled_s:.1f}s"
    )
    try:
        yield info
        if node.proc.poll() is not None:
            raise RuntimeError(f"the node exited early ({node.proc.returncode}): {node.output()[-2000:]}")
    finally:
        stop(node.proc)


class EtcdProcess:
    """A single-member etcd on free loopback ports, its data and log under ``root``: a benchmark's own."""

    def __init__(self, root: Path, timeout: float = 30.0) -> None:
        self.port, peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        cmd = ["etcd", "--name", "b", "--data-dir", str(root / "etcd"), "--log-level", "warn"]
        cmd += ["--listen-client-urls", self.url, "--advertise-client-urls", self.url]
        cmd += ["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url]
        cmd += ["--initial-cluster", f"b={peer_url}"]
        log = root / "etcd.log"
        with log.open("wb") as out:
            self.proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(self.healthy, "etcd healthy", timeout, proc=self.proc, log=log, poll=0.1)
        except BaseException:
            self.close()
            raise

    def http(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return r.read().decode()

    def healthy(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.http("/health")).get("health") == "true"
        return False

    def version(self) -> str | None:
        return json.loads(self.http("/version")).get("etcdserver")

    def metrics(self) -> list[Sample]:
        return parse_metrics(self.http("/metrics"))

    def close(self) -> None:
        stop(self.proc)


class LocalCluster:
    """A single-member etcd and ``mooncakefs node`` processes under ``root``: a benchmark's own cluster.  Nodes
    start together, restart on their data dir, die by SIGKILL; ``connect()`` gives a client whose map names
    every live node; ``close()`` stops the nodes (SIGTERM, then SIGKILL after ``stop_timeout``), then etcd."""

    def __init__(
        self,
        root: Path,
        dram: str,
        *node_options: str,
        name: str = "bench",
        lease_ttl: int = 3,
        map_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.root, self.dram, self.node_options, self.name = root, dram, node_options, name
        self.lease_ttl, self.map_timeout, self.stop_timeout = lease_ttl, map_timeout, stop_timeout
        self.etcd: EtcdProcess | None = None
        self.nodes: list[NodeProcess] = []
        self.client: Any = None  # etcd client of this process (mooncakefs.cluster.etcd.Etcd)

    def start_etcd(self) -> EtcdProcess:
        self.etcd = EtcdProcess(self.root)
        return self.etcd

    @property
    def etcd_url(self) -> str:
        assert self.etcd is not None
        return self.etcd.url

    @property
    def url(self) -> str:
        """What ``mooncakefs.connect`` takes."""
        assert self.etcd is not None
        return f"etcd://127.0.0.1:{self.etcd.port}/{self.name}"

    @property
    def map_key(self) -> str:
        return f"/mooncakefs/{self.name}/placement"

    def etcd_client(self) -> Any:
        if self.client is None:
            from mooncakefs.cluster.etcd import Etcd

            self.client = Etcd(self.etcd_url, timeout=5)
        return self.client

    def controller(self) -> str | None:
        kv = self.etcd_client().get(f"/mooncakefs/{self.name}/controller")
        return kv.value.decode() if kv is not None else None

    def node_cmd(self, root: Path, metrics: str = "none", log_format: str = "text") -> list[str]:
        """A cluster node on ``root``, without a pool prefault (nodes start together on small machines)."""
        cluster = ["--etcd", self.etcd_url, "--cluster", self.name, "--lease-ttl", str(self.lease_ttl)]
        own = [*self.node_options, "--log-format", log_format, "--no-prefault"]
        return node_command(root, self.dram, *own, *cluster, metrics=metrics)

    def start_nodes(self, n: int, timeout: float) -> float:
        """Start ``n`` nodes in parallel; seconds until all printed their ready line."""
        for i in range(n):
            root = self.root / f"n{i}"
            self.nodes.append(NodeProcess(root, self.node_cmd(root)))
        return wait_ready(self.nodes, timeout)

    def restart(self, node: NodeProcess, metrics: str) -> None:
        """Start ``node`` again on its data dir (it must have exited), with a metrics endpoint and JSON logs;
        poll ``node.ready()`` for its ready line."""
        node.launch(self.node_cmd(node.root, metrics=metrics, log_format="json"))

    def connect(self) -> Any:
        """A cluster client whose map names every live node (waits for the controller to publish it)."""
        import mooncakefs

        live = {n.ident for n in self.nodes if n.alive()}
        deadline = time.monotonic() + self.map_timeout
        store = None
        while True:
            try:
                if store is None:
                    store = mooncakefs.connect(self.url)
                else:
                    store._refresh(store.map)
                if set(store.map.nodes) == live:
                    return store
            except mooncakefs.MooncakeError:
                pass
            if time.monotonic() > deadline:
                got = sorted(store.map.nodes) if store is not None else None
                raise TimeoutError(
                    f"no placement map naming the {len(live)} live nodes after {self.map_timeout:.0f}s (map has {got})"
                )
            time.sleep(0.1)

    def by_id(self, ident: str) -> NodeProcess:
        return next(n for n in self.nodes if n.ident == ident)

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        stop(*(n.proc for n in self.nodes), timeout=self.stop_timeout)
        if self.etcd is not None:
            self.etcd.close()


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments skipped)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        out.append(Sample(name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


def scrape(url: str) -> list[Sample]:
    """A /metrics endpoint's samples."""
    with urllib.request.urlopen(url, timeout=5) as r:
        return parse_metrics(r.read().decode())


# -- worker processes ----------------------------------------------------------------------------------


class WorkersLost(Exception):
    """A worker process is gone or hung: the phase that needs them cannot go on."""


def _worker_main(wid: int, conn: Any, setup: Callable[..., Any], cfg: Any) -> None:
    """A worker process: ``side = setup(wid, cfg, stack)``, then call ``side.<method>(*args)`` for every
    (method, *args) received and answer ("ok", result) or ("error", text), until ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    die_with_parent()
    try:
        with contextlib.ExitStack() as stack:
            side = setup(wid, cfg, stack)
            conn.send(("ok", getattr(side, "info", None)))
            while True:
                method, *args = conn.recv()
                if method == "stop":
                    conn.send(("ok", None))
                    return
                try:  # a failing request is reported, and the process goes on serving
                    conn.send(("ok", getattr(side, method)(*args)))
                except Exception as exc:
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))


class Workers:
    """``n`` spawned worker processes that load a service together (each its own client); ``ask`` sends one
    request to each and returns their answers.  ``setup(wid, cfg, stack)`` runs in each (a module-level
    function: it is pickled) and returns the object whose methods the requests call; its ``info``, if
    any, is in ``self.info``."""

    def __init__(self, n: int, setup: Callable[..., Any], cfg: Any, *, name: str, timeout: float) -> None:
        ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (gRPC)
        self.timeout = timeout
        self.procs, self.conns = [], []
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(wid, child, setup, cfg), name=f"{name}-{wid}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        try:
            self.info = self.collect(timeout)
        except BaseException:
            self.close()
            raise

    def collect(self, timeout: float) -> list[Any]:
        """One answer from each process (all read, so the pipes stay in step); the first error raised."""
        out, errors = [], []
        deadline = time.monotonic() + timeout
        for wid, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise WorkersLost(f"worker process {wid} did not answer in {timeout:.0f}s")
            try:
                status, value = conn.recv()
            except EOFError:
                raise WorkersLost(f"worker process {wid} exited") from None
            if status != "ok":
                errors.append(f"worker process {wid}: {value}")
            out.append(value)
        if errors:
            raise RuntimeError("; ".join(errors))
        return out

    def ask(self, *request: Any) -> list[Any]:
        for conn in self.conns:
            conn.send(request)
        return self.collect(self.timeout)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs, self.conns = [], []


# -- the report ----------------------------------------------------------------------------------------


def machine_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores available, memory, kernel, Python and numpy versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info.update(extra or {})
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temporary file then rename), creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def format_table(header: Iterable[str], rows: Iterable[Iterable[str]], right: Iterable[bool]) -> str:
    """Plain fixed-width columns; ``right`` says which columns are right-aligned (numbers)."""
    header, right = list(header), list(right)
    body = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def report(table: str, payload: dict[str, Any], json_path: str | Path | None) -> None:
    """The end of every benchmark: the table on stdout, the JSON at ``json_path`` (if any), and a progress
    line saying where it went."""
    print(table, flush=True)
    if json_path:
        write_json(json_path, payload)
        progress(f"wrote {json_path}")


if __name__ == "__main__":  # the peer process of a socket reference: _common.py MODE ADDRESS SIZE
    sys.exit(peer_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0))
