"""Helpers for the FUSE mount tests (``tests/test_fuse_*.py``).

The filesystem under test runs as a separate process (``python -m mooncakefs.cli mount ...``, foreground),
so every syscall the tests make on the mount comes from this process and the daemon serves it.

Hangs: every test that mounts gets a watchdog (see ``Watchdog``).  If the test overruns its time limit,
the watchdog SIGKILLs the daemons the test started; the kernel then aborts their FUSE connections, every
syscall blocked on them returns ENOTCONN, and the test fails instead of hanging the suite.  Single risky
calls can also be run with ``guarded(mount, fn, ...)``, which does the same after a shorter timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env

MiB = 1 << 20
KiB = 1 << 10

START_TIMEOUT = 20.0  # seconds for a mount to become ready
STOP_TIMEOUT = 30.0  # seconds for a daemon to exit after its unmount
TEST_TIMEOUT = 90.0  # per test (watchdog), unless marked slow
SLOW_TEST_TIMEOUT = 300.0

FUSERMOUNT = shutil.which("fusermount3") or "fusermount3"


# ----------------------------------------------------------------------------------------- environment


def fuse_unavailable_reason() -> str | None:
    """Why FUSE mounts cannot be tested on this machine (None when they can)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible to this user"
    return None


def require_fuse() -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE not available: {reason}")


def errname(code: int | None) -> str:
    if code is None:
        return "no error"
    return errno.errorcode.get(code, str(code))


# ---------------------------------------------------------------------------------------------- mounts


def _is_mount(path: Path) -> bool:
    """True if ``path`` is a mount point, including a dead FUSE mount (stat gives ENOTCONN)."""
    try:
        return os.path.ismount(path)
    except OSError:
        return is_mounted(path)


def is_mounted(path: os.PathLike | str) -> bool:
    """Whether ``path`` appears in the mount table (works for dead FUSE mounts, unlike os.path.ismount)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return True
    return False


def force_unmount(mnt: os.PathLike | str) -> None:
    """Unmount ``mnt`` however possible (fusermount3 -u, then -uz, then umount -l); never raises."""
    for cmd in ([FUSERMOUNT, "-u", str(mnt)], [FUSERMOUNT, "-uz", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mounted(mnt):
            return
        with contextlib.suppress(Exception):
            subprocess.run(cmd, capture_output=True, timeout=15)


def daemon_pid_from_lock(data: os.PathLike | str) -> int | None:
    """The pid recorded in ``<data>/LOCK`` ("pid N on HOST (cmd)"), or None."""
    try:
        text = (Path(data) / "LOCK").read_text()
    except OSError:
        return None
    m = re.match(r"pid (\d+)", text)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


class FuseMount:
    """One ``mooncakefs mount`` daemon, run in the foreground as a child process.

    ``start()`` waits for the "mounted" line on its stdout and for the mount to appear; ``unmount()``
    runs ``fusermount3 -u`` and waits for the daemon to exit; ``kill9()`` SIGKILLs it.
    """

    def __init__(
        self,
        data: Path | None,
        mnt: Path,
        *,
        dram: str | None = "64MiB",
        ssd: str | None = "256MiB",
        chunk_size: str | None = None,
        extra: tuple[str, ...] | list[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.data = Path(data) if data is not None else None
        self.mnt = Path(mnt)
        self.dram = dram
        self.ssd = ssd
        self.chunk_size = chunk_size
        self.extra = list(extra)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._mounted_line = threading.Event()
        self._reader: threading.Thread | None = None
        self.killed = False  # SIGKILLed on purpose (by a test or the watchdog)
        self.history: list[str] = []  # output of earlier runs of this object

    # -- command line

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "mooncakefs.cli", "mount"]
        if self.data is not None:
            argv += ["--data", str(self.data)]
        if self.dram is not None:
            argv += ["--dram", self.dram]
        if self.ssd is not None:
            argv += ["--ssd", self.ssd]
        if self.chunk_size is not None:
            argv += ["--chunk-size", self.chunk_size]
        return [*argv, *self.extra, str(self.mnt)]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def describe(self) -> str:
        rc = self.proc.poll() if self.proc else None
        pid = self.proc.pid if self.proc else None
        return f"daemon {' '.join(self.argv()[2:])} (pid {pid}, rc {rc})\n--- output ---\n{self.output[-6000:]}"

    def _read_output(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            if "mounted" in line:
                self._mounted_line.set()

    # -- life cycle

    def start(self, timeout: float = START_TIMEOUT) -> FuseMount:
        if self.proc is not None:
            self.history.append(self.output)
        self.lines = []
        self._mounted_line = threading.Event()
        self.killed = False
        if not is_mounted(self.mnt):  # (a stale mount left by a killed daemon answers ENOTCONN)
            self.mnt.mkdir(parents=True, exist_ok=True)
        env = child_env()
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=env,
        )
        self._reader = threading.Thread(target=self._read_output, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._mounted_line.is_set() and os.path.ismount(self.mnt):
                return self
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader collect the last lines
                pytest.fail(f"mount daemon exited before the mount was ready\n{self.describe()}")
            time.sleep(0.02)
        state = f"'mounted' line seen: {self._mounted_line.is_set()}, os.path.ismount: {_is_mount(self.mnt)}"
        self.kill9()
        force_unmount(self.mnt)
        pytest.fail(f"mount not ready within {timeout:.0f} s ({state})\n{self.describe()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the daemon to exit; returns its exit status, or None if it is still running."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    def unmount(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """``fusermount3 -u`` and wait for the daemon to exit: its exit status (None: still running)."""
        res = subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True, text=True, timeout=30)
        if res.returncode != 0 and is_mounted(self.mnt):
            raise AssertionError(f"fusermount3 -u {self.mnt} failed: {res.stderr.strip()}\n{self.describe()}")
        if self.proc is None:
            return None
        return self.wait_exit(timeout)

    def stop(self) -> int | None:
        """Teardown: unmount by any means, wait for the daemon, SIGKILL it if it lingers.  Never raises."""
        with contextlib.suppress(Exception):
            subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True, timeout=15)
        force_unmount(self.mnt)
        rc = None
        if self.proc is not None:
            rc = self.wait_exit(STOP_TIMEOUT if not self.killed else 5)
            if rc is None:
                self.kill9()
                rc = self.wait_exit(10)
        force_unmount(self.mnt)
        return rc

    def kill9(self) -> None:
        """SIGKILL the daemon (by its own pid) and reap it; the mount stays behind, answering ENOTCONN."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def restart(self, timeout: float = START_TIMEOUT) -> FuseMount:
        """Clean unmount (asserting the daemon exits with 0) and mount again with the same options."""
        rc = self.unmount()
        assert rc == 0, f"daemon exit status after fusermount3 -u: {rc}\n{self.describe()}"
        return self.start(timeout)


class PidHandle:
    """A daemon we did not start ourselves (``--background``, ``mount -t``): its pid, for the watchdog."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.killed = False

    def kill9(self) -> None:
        if self.pid and pid_alive(self.pid):
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_pid_gone(self.pid, 10)

    def describe(self) -> str:
        return f"daemon pid {self.pid}"


class Watchdog:
    """Kills the daemons of a test that overran its time limit, so blocked syscalls fail with ENOTCONN."""

    def __init__(self, timeout: float, name: str) -> None:
        self.timeout = timeout
        self.name = name
        self.mounts: list = []  # FuseMount or PidHandle
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, mount):
        self.mounts.append(mount)
        return mount

    def _fire(self) -> None:
        self.fired = True
        sys.stderr.write(f"\n[watchdog] {self.name} ran over {self.timeout:.0f} s: killing its mount daemons\n")
        for m in list(self.mounts):
            with contextlib.suppress(Exception):
                m.kill9()

    def cancel(self) -> None:
        self._timer.cancel()


class _Timeout(Exception):
    pass


def guarded(mount: FuseMount | None, fn, *args, timeout: float = 30.0, **kwargs):
    """Call ``fn(*args, **kwargs)`` in a thread; if it does not return in ``timeout`` s, SIGKILL the mount's
    daemon (which unblocks the call with ENOTCONN) and fail the test saying which call hung."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            result["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if mount is not None:
            mount.kill9()
        t.join(10)
        pytest.fail(
            f"{getattr(fn, '__name__', fn)}{args!r} did not return within {timeout:.0f} s (the mount hung)"
            + (f"\n{mount.describe()}" if mount is not None else "")
        )
    if "exc" in result:
        raise result["exc"]
    return result.get("value")


# ------------------------------------------------------------------------------------------ assertions


def expect_errno(expected, fn, *args, **kwargs) -> OSError:
    """Assert ``fn(*args)`` raises OSError with an errno in ``expected`` (an int or a collection of ints)."""
    codes = {expected} if isinstance(expected, int) else set(expected)
    names = "/".join(sorted(errname(c) for c in codes))
    call = f"{getattr(fn, '__name__', fn)}{tuple(args)!r}"
    try:
        result = fn(*args, **kwargs)
    except OSError as exc:
        assert exc.errno in codes, f"{call}: expected {names}, got {errname(exc.errno)} ({exc})"
        return exc
    pytest.fail(f"{call}: expected {names}, but it succeeded (returned {result!r})")


def errno_of(fn, *args, **kwargs) -> int | None:
    """The errno ``fn(*args)`` fails with, or None if it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    return None


# ------------------------------------------------------------------------------------------ file utils


def write_file(path, data: bytes, *, fsync: bool = False, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pattern_bytes(n: int, tag: str) -> bytes:
    """``n`` bytes that are unique to ``tag`` (a SHA-256 counter stream), so they can be found on disk."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{tag}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def snapshot_tree(root, *, contents: bool = True, times: bool = True) -> dict:
    """Everything a restart must preserve, per relative path: type, mode, owner, size, times, link count,
    symlink target and data digest.  Excludes mooncakefs's own top-level entries (``.kv``, ``.mooncakefs``)."""
    root = os.fspath(root)
    out: dict = {}

    def visit(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        entry: dict = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "nlink": st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
        }
        if times:
            entry.update(mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns)
        if stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(full)
            entry["size"] = st.st_size
        elif stat.S_ISREG(st.st_mode):
            entry["size"] = st.st_size
            if contents:
                entry["sha256"] = hashlib.sha256(read_file(full)).hexdigest()
        out[rel or "."] = entry
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(full)):
                if not rel and name in (".kv", ".mooncakefs"):
                    continue
                visit(os.path.join(rel, name) if rel else name)

    visit("")
    return out


def diff_snapshots(before: dict, after: dict) -> list[str]:
    problems = []
    for path in sorted(set(before) | set(after)):
        if path not in after:
            problems.append(f"{path}: missing after restart")
        elif path not in before:
            problems.append(f"{path}: appeared after restart")
        elif before[path] != after[path]:
            old, new = before[path], after[path]
            changed = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            problems.append(f"{path}: {changed}")
    return problems


# ------------------------------------------------------------------------------- syscalls through ctypes

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1


def renameat2(old, new, flags: int) -> None:
    """libc ``renameat2(AT_FDCWD, old, AT_FDCWD, new, flags)``; raises OSError on failure."""
    fn = _libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fsdecode(old), None, os.fsdecode(new))


def raw_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc ``fallocate64(fd, mode, offset, len)`` (the syscall, no glibc emulation); raises OSError."""
    fn = _libc.fallocate64
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    if fn(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# ------------------------------------------------------------------------------------ /.kv name escaping


def _utf8_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def kv_escape(key: str | bytes) -> bytes:
    """The file name (bytes) of a KV key under ``/.kv/`` *before* the length cut: every byte that is '/',
    '%', a control byte < 0x20, 0x7f, or part of invalid UTF-8 becomes ``%XX`` (uppercase hex)."""
    raw = key.encode() if isinstance(key, str) else bytes(key)
    out = bytearray()
    i = 0
    while i < len(raw):
        b = raw[i]
        n = _utf8_len(b)
        if n > 1:
            try:
                raw[i : i + n].decode("utf-8")
            except UnicodeDecodeError:
                n = 0
            if len(raw[i : i + n]) != n:
                n = 0
        if n == 0:
            out += b"%%%02X" % b
            i += 1
        elif n == 1:
            if b in (0x2F, 0x25, 0x7F) or b < 0x20:
                out += b"%%%02X" % b
            else:
                out.append(b)
            i += 1
        else:
            out += raw[i : i + n]
            i += n
    return bytes(out)


LONG_NAME_RE = re.compile(rb"^(?P<head>.{200})~(?P<hash>[0-9a-fA-F]{16})$", re.DOTALL)
