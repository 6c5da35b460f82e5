"""The benchmarks' shared harness, so that each benchmark says only what it measures.

Here: size labels and prefaulted buffers; the timing loop (reps, medians); child processes (started in
their own session, dying with the benchmark, stopped on the way out) and their CPU time; the reference
run in another virtualenv (the real Mooncake); progress lines; the table; the JSON (machine info,
written atomically).  Only the standard library and numpy are used here, so the module also works inside
the separate virtualenv that holds the real Mooncake (tools/bench/setup_mooncake_venv.sh), where
mooncakefs is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GB = 1e9  # bandwidths are reported in GB/s = 1e9 bytes/s


def format_size(n: int) -> str:
    """Exact binary size label: 4096 -> "4KiB", 16777216 -> "16MiB"; other values stay in bytes."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def prefaulted(nbytes: int) -> np.ndarray:
    """A uint8 array whose every page has been written once.

    On the benchmark VMs the first touch of freshly allocated memory is very slow (free-page reporting), so
    buffers are allocated and touched before any timing starts, then reused.  The content is a position
    pattern, so different slices hold different bytes and a wrong read is detectable.
    """
    words = np.arange((nbytes + 7) // 8, dtype=np.uint64)
    return words.view(np.uint8)[:nbytes]


def measure(
    run: Callable[[int, int], object],
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


def median(values: Sequence[float]) -> float | None:
    """The median of the repetitions (None for none): every benchmark reports medians, not means, so one
    slow rep on a busy 2-core VM does not move the number."""
    return statistics.median(values) if values else None


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


def spawn(cmd: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (a Ctrl-C reaches only the benchmark, which then stops it) that
    dies with this process."""
    return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=die_with_parent, **popen)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM ``proc``, and SIGKILL it if it has not exited ``timeout`` seconds later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_json_script(cmd: Sequence[str], out: Path) -> dict[str, Any]:
    """Run a script that writes its results to ``out`` (a reference in another virtualenv, such as the real
    Mooncake's mooncake_baseline.py), its own table going to our stderr: the JSON it wrote, or
    ``{"error": ...}`` if it failed."""
    progress("running " + shlex.join(cmd))
    with child_process(cmd, stdout=sys.stderr) as proc:
        rc = proc.wait()
    if rc != 0 or not out.exists():
        return {"error": f"{shlex.join(cmd)} exited {rc}"}
    return json.loads(out.read_text())


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
