#!/usr/bin/env python3
"""Throughput of mooncakefs's FUSE mount next to minimal_fs.py, the pyfuse3 ceiling on the same machine.

Both filesystems are mounted at once and every measurement alternates between them rep by rep, so the
noise of these VMs (see environment.md §0) hits both alike.  Rows:

* cold sequential read of a DRAM-resident file (page cache dropped, file re-opened) with
  ``dd bs=1M`` and with ``cp F /dev/null``; mooncakefs's file is first written through the mount from a
  tmpfs source and fsync'd, minimal_fs serves its prefaulted ``/file``.  Target: >= 0.75x minimal_fs;
* a second read of the unchanged file (page cache);
* sequential write with ``dd if=/dev/zero bs=1M`` with and without ``conv=fsync``.  Target: >= 0.7x
  (0.8x with fsync).  minimal_fs's fsync does nothing, while mooncakefs's puts the bytes on the disk:
  the disk itself is measured in the same reps (``dd oflag=direct conv=fdatasync`` into the directory
  that holds the data dirs), and the fsync row's ratio to it is printed under the table;
* small files: create+write+close of N 4 KiB files (Python loop in a subprocess), ``ls -l`` of them
  (dentries warm, then after dropping caches), and unlinking them, in ops/s;
* after unmounting: the KV API (4 MiB objects, put and get_into a prefaulted buffer) and numpy's copy
  bandwidth, the physical reference of every row.

Each row reports the median of --reps runs after one untimed warm-up (first touches of fresh memory are
slow on these VMs).  Wall-clock times include a process start (a few ms).  Needs root (drop_caches, the
mount tuning).  Mounts are always unmounted, also on errors and Ctrl-C; a request that hangs past
--op-timeout aborts the FUSE connection.

Examples::

    python tools/bench/fuse_bench.py --quick
    python tools/bench/fuse_bench.py --json bench-results/fuse_bench.json
    python tools/bench/fuse_bench.py --targets minimal_fs            # before mooncakefs can mount
    python tools/bench/fuse_bench.py --py-spy bench-results/          # flame graph of mooncakefs's daemon
    git worktree add --detach /tmp/base main && (cd /tmp/base && python3 setup.py build_ext --inplace -q)
    python tools/bench/fuse_bench.py --baseline /tmp/base --rows write,small   # before and after, one run

Ratios are the median of the per-rep ratios (each rep runs the targets back to back).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
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
    cpu_seconds,
    exit_on_sigterm,
    format_size,
    format_table,
    machine_info,
    median,
    prefaulted,
    progress,
    report,
    spawn,
    stop,
)
from minimal_fs import mount_device, mount_tuning, tune_mount

MiB, GiB = 1024**2, 1024**3
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KV_OBJECT = 4 * MiB
READ_TARGET, WRITE_TARGET = 0.75, 0.70
WRITE_FSYNC_TARGET, SMALL_FILES_TARGET = 0.80, 0.50  # issue 14's goals
BASELINE = "baseline"  # mooncakefs mounted from another checkout (--baseline): before/after in one run
DISK = "disk"  # the disk under the data dirs, written with O_DIRECT and fdatasync: fsync's real ceiling
ROW_GROUPS = ("read", "write", "small", "memory")

SMALL_FILES_SCRIPT = r"""
import os, sys, time
d, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
payload = bytes(range(256)) * 16
t0 = time.perf_counter()
if mode == "create":
    for i in range(n):
        fd = os.open(f"{d}/f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
else:
    for i in range(n):
        os.unlink(f"{d}/f{i:06d}")
print(time.perf_counter() - t0)
"""


def log(msg: str) -> None:
    progress(msg, tag="fuse_bench")


class OpTimeout(RuntimeError):
    """A command on a mount did not finish in time; the connection was aborted."""


# -- mounts --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One mounted filesystem under test and the daemon serving it."""

    name: str
    mountpoint: Path
    cmd: list[str]
    log_path: Path
    cwd: Path = REPO  # the checkout whose code the daemon runs (python -m puts it first on sys.path)
    proc: subprocess.Popen[bytes] | None = None
    read_file: Path | None = None
    tuning: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far (its threads included), for CPU per GB."""
        if self.proc is None:
            return 0.0
        try:
            return cpu_seconds(self.proc.pid)
        except OSError:
            return 0.0


def is_mounted(path: Path) -> bool:
    """Whether a FUSE filesystem is mounted at ``path`` (reads mountinfo; never touches the mount)."""
    try:
        mount_device(path)
    except RuntimeError:
        return False
    return True


def start_mount(t: Target, timeout: float) -> None:
    """Start the daemon in the foreground and wait for its "mounted" line (stdout goes to a log file,
    so a chatty daemon can never block on a full pipe)."""
    t.mountpoint.mkdir(parents=True, exist_ok=True)
    log(f"mounting {t.name}: {shlex.join(t.cmd)}")
    with open(t.log_path, "wb") as out:
        t.proc = spawn(t.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=t.cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = t.log_path.read_text(errors="replace")
        if "mounted" in text and is_mounted(t.mountpoint):
            return
        if t.proc.poll() is not None:
            raise RuntimeError(f"{t.name} exited with {t.proc.returncode} before mounting:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{t.name} did not print 'mounted' within {timeout:.0f} s; log: {t.log_path}")


def abort_connection(mountpoint: Path) -> None:
    """Abort a hung FUSE connection through fusectl, so blocked processes and the unmount can proceed."""
    try:
        major, minor = mount_device(mountpoint)
        Path(f"/sys/fs/fuse/connections/{(major << 20) | minor}/abort").write_text("1\n")
        log(f"aborted the FUSE connection of {mountpoint}")
    except (OSError, RuntimeError) as exc:
        log(f"could not abort {mountpoint}: {exc}")


def stop_mount(t: Target) -> None:
    """Unmount (fusermount3 -u, falling back to umount -l) and make sure the daemon has exited."""
    if t.proc is None:
        return
    for cmd in (["fusermount3", "-u", str(t.mountpoint)], ["umount", "-l", str(t.mountpoint)]):
        if not is_mounted(t.mountpoint):
            break
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if res.returncode:
                log(f"{shlex.join(cmd)}: {res.stderr.strip()}")
        except subprocess.TimeoutExpired:
            log(f"{shlex.join(cmd)} timed out")
            abort_connection(t.mountpoint)
    try:
        t.proc.wait(30.0)
    except subprocess.TimeoutExpired:
        log(f"{t.name} still running 30 s after unmount; stopping it")
        stop(t.proc)
    if is_mounted(t.mountpoint):
        abort_connection(t.mountpoint)
        subprocess.run(["umount", "-l", str(t.mountpoint)], capture_output=True)
    log(f"{t.name} stopped (exit {t.proc.returncode})")


# -- primitive measurements ----------------------------------------------------------------------------


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], t: Target | None, timeout: float) -> float:
    """Wall-clock seconds of one command run against ``t``'s mount (None: no mount); on a hang the
    connection is aborted."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if t is not None:
            abort_connection(t.mountpoint)
        raise OpTimeout(f"{shlex.join(cmd)} on {t.name if t else 'the disk'} took over {timeout:.0f} s") from None
    elapsed = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {res.stderr.decode()[-2000:]}")
    return elapsed


def small_files(t: Target, directory: Path, n: int, mode: str, timeout: float) -> float:
    """Seconds the Python create (or unlink) loop took, timed inside its own process."""
    cmd = [sys.executable, "-c", SMALL_FILES_SCRIPT, str(directory), str(n), mode]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_connection(t.mountpoint)
        raise OpTimeout(f"small-file {mode} on {t.name} took over {timeout:.0f} s") from None
    if res.returncode:
        raise RuntimeError(f"small-file {mode} on {t.name} failed: {res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def make_source(path: Path, size: int) -> None:
    """A file on tmpfs with a position pattern: the prefaulted source for writing the read file."""
    chunk = prefaulted(64 * MiB)
    words = chunk.view(np.uint64)
    with open(path, "wb") as f:
        for off in range(0, size, len(chunk)):
            n = min(len(chunk), size - off)
            words[:] = np.arange(off // 8, off // 8 + len(words), dtype=np.uint64)
            f.write(memoryview(chunk)[:n])


# -- results -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a measurement per target, as runs in ``unit``."""

    key: str
    label: str
    unit: str  # "GB/s" or "ops/s"
    target_ratio: float | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    daemon_cpu: dict[str, list[float]] = field(default_factory=dict)  # s per GB, or us per op

    def median(self, name: str) -> float | None:
        return median(self.runs.get(name, []))

    def ratio(self, name: str = "mooncakefs", reference: str = "minimal_fs") -> float | None:
        """The median of the per-rep ratios ``name`` / ``reference``: each pair ran back to back, so a
        burst of load from other processes moves both of a pair rather than one side's median."""
        pairs = zip(self.runs.get(name, []), self.runs.get(reference, []), strict=False)
        return median(b / a for b, a in pairs if a)

    def disk_runs(self, name: str) -> bool:
        """Whether ``name`` and the disk reference both ran in this row's reps."""
        return bool(self.runs.get(name)) and bool(self.runs.get(DISK))

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "median": {k: self.median(k) for k in self.runs},
            "runs": self.runs,
            ("daemon_cpu_s_per_gb" if self.unit == "GB/s" else "daemon_cpu_us_per_op"): {
                k: median(v) for k, v in self.daemon_cpu.items() if v
            },
            "ratio_mooncakefs_to_minimal": self.ratio(),
            **({"ratio_baseline_to_minimal": self.ratio(BASELINE)} if BASELINE in self.runs else {}),
            **{f"ratio_{n}_to_disk": self.ratio(n, DISK) for n in ("mooncakefs", BASELINE) if self.disk_runs(n)},
            "target_ratio": self.target_ratio,
            "meets_target": None
            if self.ratio() is None or self.target_ratio is None
            else self.ratio() >= self.target_ratio,
        }


class Results:
    """Rows in the order they were first measured."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def row(self, key: str, label: str, unit: str, target: float | None = None) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, unit, target)
        return self.rows[key]

    def add(
        self,
        key: str,
        label: str,
        unit: str,
        name: str,
        value: float,
        target: float | None = None,
        daemon_cpu: float | None = None,
    ) -> None:
        r = self.row(key, label, unit, target)
        r.runs.setdefault(name, []).append(value)
        if daemon_cpu is not None:
            r.daemon_cpu.setdefault(name, []).append(daemon_cpu)

    def table(self, names: list[str]) -> str:
        def fmt(v: float | None, unit: str) -> str:
            if v is None:
                return "-"
            return f"{v:,.0f}" if unit == "ops/s" else f"{v:.2f}"

        compared = [n for n in names if n in (BASELINE, "mooncakefs")]
        header = ["measurement", "unit", *names, *(f"{n}/min" for n in compared), "target"]
        body = []
        for r in self.rows.values():
            ratio = r.ratio()
            ratios = [r.ratio(n) for n in compared]
            verdict = "" if r.target_ratio is None else f">={r.target_ratio:.2f}"
            if ratio is not None and r.target_ratio is not None:
                verdict += " ok" if ratio >= r.target_ratio else " MISS"
            body.append(
                [
                    r.label,
                    r.unit,
                    *(fmt(r.median(n), r.unit) for n in names),
                    *("-" if x is None else f"{x:.2f}x" for x in ratios),
                    verdict,
                ]
            )
        return format_table(header, body, [False, False, *([True] * (len(names) + len(compared))), False])

    def cpu_table(self, names: list[str]) -> str:
        """Median daemon CPU time per unit of work: high means compute-bound, low but slow means waiting."""
        body = []
        for r in self.rows.values():
            if not any(r.daemon_cpu.get(n) for n in names):
                continue
            unit = "s/GB" if r.unit == "GB/s" else "us/op"
            cells = [median(r.daemon_cpu.get(n, [])) for n in names]
            body.append(
                [r.label, unit, *("-" if c is None else f"{c:.2f}" if unit == "s/GB" else f"{c:.0f}" for c in cells)]
            )
        return format_table(["daemon CPU", "unit", *names], body, [False, False, *([True] * len(names))])

    def disk_lines(self) -> list[str]:
        """Each row measured with the disk reference: mooncakefs (and the baseline) over the disk."""
        lines = []
        for r in self.rows.values():
            ratios = [f"{n} {r.ratio(n, DISK):.2f}x" for n in ("mooncakefs", BASELINE) if r.disk_runs(n)]
            if ratios:
                lines.append(f"{r.label} / disk (dd oflag=direct conv=fdatasync, same reps): {', '.join(ratios)}")
        return lines


# -- the benchmark -------------------------------------------------------------------------------------


@dataclass
class Config:
    size: int
    reps: int
    small_files: int
    op_timeout: float
    mount_timeout: float


def bandwidth(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB


def measure_on(
    t: Target,
    res: Results,
    key: str,
    label: str,
    unit: str,
    work: Callable[[], float],
    amount: float,
    target: float | None = None,
) -> float:
    """Run ``work`` (returns seconds) and record amount/seconds, plus the daemon's CPU time per GB (s)
    or per op (us): where a daemon is slow but idle, it waits on round trips rather than computing."""
    cpu0 = t.cpu_seconds()
    seconds = work()
    cpu = t.cpu_seconds() - cpu0
    if unit == "GB/s":
        value, per_unit = bandwidth(int(amount), seconds), cpu / (amount / GB)
    else:
        value, per_unit = amount / seconds, cpu / amount * 1e6
    res.add(key, label, unit, t.name, value, target, per_unit)
    return value


def prepare_read_file(t: Target, src: Path, cfg: Config, res: Results) -> None:
    """minimal_fs serves /file; mooncakefs gets the same bytes written through the mount and fsync'd,
    then checked with cmp (a wrong read would make every number meaningless)."""
    if t.name == "minimal_fs":
        t.read_file = t.mountpoint / "file"
        return
    t.read_file = t.mountpoint / "seq"
    log(f"{t.name}: writing {format_size(cfg.size)} read file from tmpfs (dd conv=fsync)")
    cmd = ["dd", f"if={src}", f"of={t.read_file}", "bs=1M", "conv=fsync"]
    measure_on(
        t,
        res,
        "prep_write",
        "write from tmpfs src, fsync (prep)",
        "GB/s",
        lambda: timed(cmd, t, cfg.op_timeout),
        cfg.size,
    )
    timed(["cmp", str(src), str(t.read_file)], t, cfg.op_timeout)
    log(f"{t.name}: read file verified with cmp")


def read_rows(targets: list[Target], cfg: Config, res: Results) -> None:
    """Cold dd, page-cache dd, cold cp; one untimed cold read of each target first."""
    for t in targets:
        assert t.read_file is not None
        drop_caches()
        timed(["dd", f"if={t.read_file}", "of=/dev/null", "bs=1M"], t, cfg.op_timeout)
    for rep in range(cfg.reps):
        for t in targets:
            f = t.read_file
            dd = ["dd", f"if={f}", "of=/dev/null", "bs=1M"]
            drop_caches()
            cold = measure_on(
                t,
                res,
                "read_dd_cold",
                "seq read cold, dd bs=1M",
                "GB/s",
                lambda dd=dd, t=t: timed(dd, t, cfg.op_timeout),
                cfg.size,
                READ_TARGET,
            )
            warm = measure_on(
                t,
                res,
                "read_dd_warm",
                "seq read again (page cache), dd bs=1M",
                "GB/s",
                lambda dd=dd, t=t: timed(dd, t, cfg.op_timeout),
                cfg.size,
            )
            drop_caches()
            cp = measure_on(
                t,
                res,
                "read_cp_cold",
                "seq read cold, cp F /dev/null",
                "GB/s",
                lambda f=f, t=t: timed(["cp", str(f), "/dev/null"], t, cfg.op_timeout),
                cfg.size,
                READ_TARGET,
            )
            log(f"rep {rep + 1} {t.name}: read cold dd {cold:.2f}, again {warm:.2f}, cold cp {cp:.2f} GB/s")


def write_rows(targets: list[Target], cfg: Config, res: Results, disk_file: Path) -> None:
    """dd from /dev/zero into a new file, with and without conv=fsync; one untimed warm-up write each.
    Each rep also writes ``disk_file`` (beside the data dirs) with O_DIRECT and fdatasync: the most an
    fsync'd write can reach there, since minimal_fs's fsync keeps nothing."""
    count = cfg.size // MiB
    disk_dd = ["dd", "if=/dev/zero", f"of={disk_file}", "bs=1M", f"count={count}", "oflag=direct", "conv=fdatasync"]

    def write(t: Target, fsync: bool) -> float:
        w = t.mountpoint / "w"
        with contextlib.suppress(FileNotFoundError):
            w.unlink()
        cmd = ["dd", "if=/dev/zero", f"of={w}", "bs=1M", f"count={count}", *(["conv=fsync"] if fsync else [])]
        return timed(cmd, t, cfg.op_timeout)

    for t in targets:
        write(t, True)
    for rep in range(cfg.reps):
        disk_file.unlink(missing_ok=True)
        seconds = timed(disk_dd, None, cfg.op_timeout)
        disk_gbs = bandwidth(cfg.size, seconds)
        res.add("write_dd_fsync", "seq write, dd bs=1M conv=fsync", "GB/s", DISK, disk_gbs, WRITE_FSYNC_TARGET)
        log(f"rep {rep + 1} disk: O_DIRECT + fdatasync {disk_gbs:.2f} GB/s")
        for t in targets:
            a = measure_on(
                t,
                res,
                "write_dd_fsync",
                "seq write, dd bs=1M conv=fsync",
                "GB/s",
                lambda t=t: write(t, True),
                cfg.size,
                WRITE_FSYNC_TARGET,
            )
            b = measure_on(
                t, res, "write_dd", "seq write, dd bs=1M", "GB/s", lambda t=t: write(t, False), cfg.size, WRITE_TARGET
            )
            log(f"rep {rep + 1} {t.name}: write fsync {a:.2f}, no fsync {b:.2f} GB/s")
    disk_file.unlink(missing_ok=True)
    for t in targets:
        with contextlib.suppress(FileNotFoundError):
            (t.mountpoint / "w").unlink()


def small_file_rows(targets: list[Target], cfg: Config, res: Results) -> None:
    """Create+write+close N 4 KiB files, ls -l them (warm, then cold), unlink them."""
    n = cfg.small_files
    for rep in range(cfg.reps):
        for t in targets:
            d = t.mountpoint / f"small{rep}"
            d.mkdir()
            ls = ["ls", "-l", str(d)]
            c = measure_on(
                t,
                res,
                "small_create",
                f"create+write 4KiB+close x{n}",
                "ops/s",
                lambda d=d, t=t: small_files(t, d, n, "create", cfg.op_timeout),
                n,
                SMALL_FILES_TARGET,
            )
            lw = measure_on(
                t,
                res,
                "small_ls",
                f"ls -l of {n} files",
                "ops/s",
                lambda ls=ls, t=t: timed(ls, t, cfg.op_timeout),
                n,
                SMALL_FILES_TARGET,
            )
            drop_caches()
            lc = measure_on(
                t,
                res,
                "small_ls_cold",
                f"ls -l of {n} files, caches dropped",
                "ops/s",
                lambda ls=ls, t=t: timed(ls, t, cfg.op_timeout),
                n,
                SMALL_FILES_TARGET,
            )
            u = measure_on(
                t,
                res,
                "small_unlink",
                f"unlink x{n}",
                "ops/s",
                lambda d=d, t=t: small_files(t, d, n, "unlink", cfg.op_timeout),
                n,
                SMALL_FILES_TARGET,
            )
            d.rmdir()
            log(f"rep {rep + 1} {t.name}: create {c:,.0f}/s, ls -l {lw:,.0f}/s (cold {lc:,.0f}/s), unlink {u:,.0f}/s")


def memory_rows(cfg: Config, res: Results, kv_dir: Path, dram: str) -> None:
    """The KV API on a fresh store (4 MiB objects) and numpy's copy bandwidth, with the mounts gone."""
    import mooncakefs  # here, so --targets minimal_fs works even while mooncakefs is broken

    log("KV API and memcpy rows")
    src, dst = prefaulted(cfg.size), prefaulted(cfg.size)
    dst[:] = 0
    np.copyto(dst, src)  # warm-up
    for _ in range(max(cfg.reps, 3)):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        seconds = time.perf_counter() - t0
        res.add("memcpy", "numpy copy (reference)", "GB/s", "memory", bandwidth(cfg.size, seconds))
    n = cfg.size // KV_OBJECT
    keys = [f"bench/{i:05d}" for i in range(n)]
    sv, dv = memoryview(src), memoryview(dst)
    with mooncakefs.open(kv_dir, dram=dram) as store:
        for rep in range(cfg.reps + 1):  # the first pass is the warm-up (fresh pool pages)
            t0 = time.perf_counter()
            for i, k in enumerate(keys):
                store.put(k, sv[i * KV_OBJECT : (i + 1) * KV_OBJECT])
            put_s = time.perf_counter() - t0
            dst[:] = 0
            t0 = time.perf_counter()
            for i, k in enumerate(keys):
                store.get_into(k, dv[i * KV_OBJECT : (i + 1) * KV_OBJECT])
            get_s = time.perf_counter() - t0
            if rep == 0:
                if not np.array_equal(src[: n * KV_OBJECT], dst[: n * KV_OBJECT]):
                    raise RuntimeError("KV get_into returned different bytes than were put")
                continue
            res.add("kv_put", "KV API put, 4MiB objects", "GB/s", "memory", bandwidth(n * KV_OBJECT, put_s))
            res.add("kv_get_into", "KV API get_into, 4MiB objects", "GB/s", "memory", bandwidth(n * KV_OBJECT, get_s))


@contextlib.contextmanager
def py_spy(t: Target, out_dir: Path | None) -> Iterator[None]:
    """Record a native flame graph of ``t``'s daemon while the body runs (py-spy must be installed)."""
    if out_dir is None or t.proc is None or not shutil.which("py-spy"):
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = out_dir / f"fuse_bench_{t.name}.svg"
    spy = subprocess.Popen(
        ["py-spy", "record", "--native", "--idle", "-p", str(t.proc.pid), "-o", str(svg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log(f"py-spy recording {t.name} (pid {t.proc.pid}) into {svg}")
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def mooncakefs_available() -> bool:
    """Whether ``python -m mooncakefs.cli mount`` exists yet."""
    res = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "mount", "--help"], capture_output=True, cwd=REPO, timeout=60
    )
    return res.returncode == 0


def build_targets(args: argparse.Namespace, work: Path, cfg: Config) -> list[Target]:
    targets = []
    names = [name.strip() for name in args.targets.split(",")]
    if args.baseline is not None:
        names.append(BASELINE)
    for name in names:
        mnt = work / f"mnt_{name}"
        cwd = REPO
        if name == "minimal_fs":
            cmd = [
                sys.executable,
                str(HERE / "minimal_fs.py"),
                str(mnt),
                "--size",
                str(cfg.size),
                *(["--direct-io"] if args.minimal_direct_io else []),
            ]
        elif name in ("mooncakefs", BASELINE):
            if name == BASELINE:
                cwd = args.baseline.resolve()
            cmd = [
                sys.executable,
                "-m",
                "mooncakefs.cli",
                "mount",
                "--data",
                str(work / f"data_{name}"),
                "--dram",
                args.dram,
                "--ssd",
                args.ssd,
                *shlex.split(args.mooncakefs_args),
                str(mnt),
            ]
        else:
            raise SystemExit(f"unknown target {name!r}: use minimal_fs and/or mooncakefs")
        targets.append(Target(name, mnt, cmd, work / f"{name}.log", cwd=cwd))
    return targets


def run(args: argparse.Namespace) -> int:
    size = (256 * MiB if args.quick else GiB) if args.size is None else args.size
    cfg = Config(
        size=size - size % MiB,
        reps=args.reps or (1 if args.quick else 3),
        small_files=args.small_files or (1000 if args.quick else 10_000),
        op_timeout=args.op_timeout,
        mount_timeout=args.mount_timeout,
    )
    if "mooncakefs" in args.targets and not mooncakefs_available():
        log("`python -m mooncakefs.cli mount` does not exist yet: measuring minimal_fs only")
        args.targets = ",".join(n for n in args.targets.split(",") if n.strip() != "mooncakefs")
    work = Path(tempfile.mkdtemp(prefix="fuse_bench.", dir=args.workdir))
    src = Path("/dev/shm") / f"fuse_bench_src.{os.getpid()}"
    targets = build_targets(args, work, cfg)
    res = Results()
    t_start = time.perf_counter()
    rows = set(args.rows.split(","))
    if unknown := rows - set(ROW_GROUPS):
        raise SystemExit(f"unknown --rows {sorted(unknown)}: choose from {', '.join(ROW_GROUPS)}")
    try:
        if "read" in rows and any(t.name != "minimal_fs" for t in targets):
            make_source(src, cfg.size)
        for t in targets:
            start_mount(t, cfg.mount_timeout)
            if args.tune and t.name != "minimal_fs":
                tune_mount(t.mountpoint)  # from this process: safe, not the daemon's trio thread
            t.tuning = mount_tuning(t.mountpoint)
            if t.tuning["read_ahead_kb"] != 1024 or t.tuning["max_background"] != 64:
                t.notes.append(f"mount not tuned like minimal_fs: {t.tuning}")
                log(f"WARNING {t.name}: {t.notes[-1]}")
        spy_target = next((t for t in targets if t.name == args.py_spy_target), None)
        with py_spy(spy_target, args.py_spy) if spy_target else contextlib.nullcontext():
            if "read" in rows:
                for t in targets:
                    prepare_read_file(t, src, cfg, res)
                read_rows(targets, cfg, res)
                for t in targets:  # free the read file's DRAM before writing as much again
                    if t.read_file is not None and t.name != "minimal_fs":
                        t.read_file.unlink()
            if "write" in rows:
                write_rows(targets, cfg, res, work / "disk_reference.bin")
            if "small" in rows:
                small_file_rows(targets, cfg, res)
    finally:
        for t in targets:
            stop_mount(t)
        src.unlink(missing_ok=True)
        # Never rmtree through a live mount; keep the daemons' logs when something went wrong.
        failed = sys.exc_info()[0] is not None
        if any(is_mounted(t.mountpoint) for t in targets) or args.keep_workdir:
            log(f"leaving {work} in place")
        elif failed:
            for t in targets:
                shutil.rmtree(t.mountpoint, ignore_errors=True)
            for t in targets:
                shutil.rmtree(work / f"data_{t.name}", ignore_errors=True)
            log(f"daemon logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if "memory" in rows:
        with tempfile.TemporaryDirectory(prefix="fuse_bench_kv.", dir=args.workdir) as kv_dir:
            memory_rows(cfg, res, Path(kv_dir), args.kv_dram)

    names = [t.name for t in targets]
    title = (
        f"fuse_bench: {format_size(cfg.size)} files, {cfg.small_files:,} small files, "
        f"median of {cfg.reps} rep(s), {time.perf_counter() - t_start:.0f} s"
    )
    table = "\n".join(
        [
            title,
            res.table([*names, *([DISK] if "write" in rows else []), "memory"]),
            *res.disk_lines(),
            "",
            res.cpu_table(names),
            "",
            *(f"{t.name}: tuning {t.tuning}" + "".join(f"; NOTE {n}" for n in t.notes) for t in targets),
        ]
    )
    payload = {
        "benchmark": "fuse_bench",
        "config": {**vars(cfg), "kv_object_bytes": KV_OBJECT, "quick": args.quick},
        "machine": machine_info(),
        "targets": {t.name: {"cmd": t.cmd, "tuning": t.tuning, "notes": t.notes} for t in targets},
        "rows": {k: r.as_json() for k, r in res.rows.items()},
    }
    report(table, payload, args.json)
    return 0


def parse_size(text: str) -> int:
    from minimal_fs import parse_size as parse

    return parse(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="256MiB files, 1,000 small files, 1 rep (< 60 s)")
    ap.add_argument("--size", type=parse_size, default=None, help="bytes per large file (1GiB)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per row (3; 1 with --quick)")
    ap.add_argument("--small-files", type=int, default=None, help="number of 4KiB files (10000)")
    ap.add_argument("--targets", default="minimal_fs,mooncakefs", help="comma-separated mounts to measure")
    ap.add_argument("--dram", default="2GiB", help="mooncakefs mount --dram")
    ap.add_argument("--ssd", default="4GiB", help="mooncakefs mount --ssd")
    ap.add_argument("--mooncakefs-args", default="", help="extra mount flags, e.g. '--chunk-size 4MiB'")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="also mount mooncakefs from another checkout (built in place), e.g. a worktree of main: before/after",
    )
    ap.add_argument("--rows", default=",".join(ROW_GROUPS), help="row groups to measure: read,write,small,memory")
    ap.add_argument("--kv-dram", default="2GiB", help="DRAM of the store used for the KV API rows")
    ap.add_argument("--minimal-direct-io", action="store_true", help="run minimal_fs with --direct-io")
    ap.add_argument(
        "--tune",
        action="store_true",
        help="apply minimal_fs.tune_mount() to mooncakefs's mount if it does not tune itself",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="record a py-spy --native flame graph of a daemon into DIR",
    )
    ap.add_argument("--py-spy-target", default="mooncakefs", help="which daemon --py-spy records")
    ap.add_argument("--workdir", default=None, help="parent of the mount points and data dir (/tmp)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep mount points, data dir and logs")
    ap.add_argument("--op-timeout", type=float, default=180.0, help="seconds before a hung op aborts")
    ap.add_argument("--mount-timeout", type=float, default=120.0, help="seconds to wait for 'mounted'")
    ap.add_argument("--json", default=str(REPO / "bench-results" / "fuse_bench.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (drop_caches and the FUSE tuning)")
    exit_on_sigterm()  # run the finally blocks: unmount
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
