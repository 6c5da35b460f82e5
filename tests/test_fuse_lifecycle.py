"""Mount life cycle: the command line, restart persistence, fsync durability, kill -9 and recovery,
checksum failures (EIO), chunk objects, the in-memory mode and the default data dir."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import child_env, rand_bytes
from fuse_helpers import (
    KiB,
    MiB,
    daemon_pid_from_lock,
    diff_snapshots,
    expect_errno,
    fsync_dir,
    is_mounted,
    pattern_bytes,
    read_file,
    snapshot_tree,
    wait_pid_gone,
    write_file,
)


def build_tree(root) -> dict[str, bytes]:
    """A tree with every kind of entry; returns relative path -> contents of the regular files."""
    files = {
        "empty": b"",
        "small.txt": b"hello mooncakefs\n",
        "multi-chunk.bin": rand_bytes(5 * MiB + 12_345, "multi"),
        "dir/nested/deep.bin": rand_bytes(300_000, "deep"),
        "dir/odd name é": b"unicode",
    }
    os.makedirs(root / "dir" / "nested")
    os.mkdir(root / "emptydir")
    for rel, data in files.items():
        write_file(root / rel, data)
    # a sparse file
    fd = os.open(root / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", 20 * MiB)
    os.close(fd)
    files["sparse"] = bytes(20 * MiB) + b"end"
    # links
    os.symlink("small.txt", root / "link-to-small")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "small.txt", root / "dir" / "hardlink")
    files["dir/hardlink"] = files["small.txt"]
    # modes, owners, times (set last; nanoseconds)
    os.chmod(root / "small.txt", 0o640)
    os.chmod(root / "dir" / "nested", 0o710)
    os.chmod(root / "multi-chunk.bin", 0o4755)
    if os.geteuid() == 0:
        os.chown(root / "dir" / "odd name é", 1001, 2002)
        os.lchown(root / "dangling", 3003, 4004)
    os.setxattr(root / "small.txt", "user.note", b"kept across restarts")
    t = 1_600_000_000_123_456_789
    timed = ["empty", "small.txt", "multi-chunk.bin", "dir/nested/deep.bin", "sparse", "dir/nested", "emptydir", "dir"]
    for i, rel in enumerate(timed):
        os.utime(root / rel, ns=(t + i * 1_000_000_007, t + i * 3_000_000_011))
    os.utime(root / "link-to-small", ns=(t - 5, t - 7), follow_symlinks=False)
    return files


def check_files(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        got = read_file(root / rel)
        assert len(got) == len(data), f"{rel}: {len(got)} bytes, expected {len(data)}"
        assert got == data, f"{rel}: contents differ"


# ----------------------------------------------------------------------------------- the command line


def test_mount_help_lists_options():
    res = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "mount", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert res.returncode == 0, res.stderr
    for opt in ("--data", "--dram", "--ssd", "--chunk-size", "--background", "--debug"):
        assert opt in res.stdout, f"{opt} missing from mount --help"


def test_mount_unmount_exit_status(mount_factory):
    m = mount_factory()
    assert os.path.ismount(m.mnt)
    write_file(m.mnt / "f", b"x")
    rc = m.unmount()
    assert rc == 0, f"daemon exit status after fusermount3 -u: {rc}\n{m.describe()}"
    assert not is_mounted(m.mnt)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_after_flushing(mount_factory, signum):
    m = mount_factory()
    data = rand_bytes(3 * MiB, "sig")
    write_file(m.mnt / "unsynced", data)  # closed, not fsync'd
    os.mkdir(m.mnt / "d")
    write_file(m.mnt / "d" / "small", b"small")
    m.signal(signum)
    rc = m.wait_exit(30)
    assert rc == 0, f"exit status after {signal.Signals(signum).name}: {rc}\n{m.describe()}"
    assert not is_mounted(m.mnt), f"still mounted after {signal.Signals(signum).name}"
    m.start()
    assert read_file(m.mnt / "unsynced") == data
    assert read_file(m.mnt / "d" / "small") == b"small"


def test_background_mount(tmp_path, fuse_watchdog):
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    mnt.mkdir()
    argv = [
        sys.executable,
        "-m",
        "mooncakefs.cli",
        "mount",
        "--background",
        "--data",
        str(data),
        "--dram",
        "32MiB",
        "--ssd",
        "64MiB",
        str(mnt),
    ]
    try:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env())
        except subprocess.TimeoutExpired:
            pytest.fail("mount --background did not return within 30 s (does the daemon keep stdout/stderr open?)")
        assert res.returncode == 0, res.stdout + res.stderr
        assert os.path.ismount(mnt), "mount --background returned before the mount was ready"
        write_file(mnt / "f", b"background")
        assert read_file(mnt / "f") == b"background"
        pid = daemon_pid_from_lock(data)
        assert pid is not None, "the data dir's LOCK does not name the daemon"
        assert pid != os.getpid()
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert wait_pid_gone(pid, 30), f"background daemon {pid} still running after unmount"
    finally:
        pid = daemon_pid_from_lock(data)
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if pid and not wait_pid_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)


def test_default_data_dir_from_env(mount_factory, tmp_path):
    dd = tmp_path / "env-data-dir"
    m = mount_factory(data=None, env={"MOONCAKEFS_DATA": str(dd)}, dram="32MiB", ssd="64MiB")
    write_file(m.mnt / "f", b"in the default data dir")
    assert (dd / "LOCK").exists(), "the mount did not use $MOONCAKEFS_DATA"
    assert daemon_pid_from_lock(dd) == m.proc.pid
    m.restart()
    assert read_file(m.mnt / "f") == b"in the default data dir"


def test_a_missing_mount_point_is_named_with_the_fix(tmp_path):
    """It used to say the missing directory "is not a directory"."""
    missing = tmp_path / "nowhere"
    argv = [sys.executable, "-m", "mooncakefs.cli", "mount", "--data", str(tmp_path / "d"), str(missing)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode != 0
    assert f"mount point {missing} does not exist: create it first (mkdir -p {missing})" in res.stderr
    assert not missing.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_mount_the_kernel_refuses_is_one_clear_error(tmp_path):
    """An unprivileged user mounting on a directory of root's: libfuse's bare RuntimeError ("fuse_session_
    mount failed") came out as a traceback after fusermount3's line saying why."""
    import encodings.unicode_escape  # noqa: F401  (the mount imports it late: as another user the child may not)

    from test_hostile import as_user

    from mooncakefs.fuse.mount import serve

    base = Path(tempfile.mkdtemp(prefix="mcfs-", dir="/tmp"))  # pytest's tmp dirs are root's alone
    try:
        base.chmod(0o755)
        data, mnt = base / "data", base / "mnt"
        data.mkdir()
        os.chown(data, 65534, 65534)
        mnt.mkdir()  # root's: another user may not mount on it

        def mount() -> None:
            serve(mnt, data=data, dram=16 << 20, ssd="0", chunk_size=1 << 20, announce=lambda line: None)

        outcome = as_user(65534, mount)
        assert outcome[:2] == ("raised", "MooncakeError") and f"cannot mount at {mnt}" in outcome[2], outcome
        assert not is_mounted(mnt)
    finally:
        shutil.rmtree(base)


def test_data_dir_in_use_is_refused(mount_factory, tmp_path):
    """A second mount of the same data dir fails (non-zero exit, no hang) and leaves the first intact."""
    import mooncakefs

    m = mount_factory()
    write_file(m.mnt / "f", b"first")
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    argv = [
        sys.executable,
        "-m",
        "mooncakefs.cli",
        "mount",
        "--data",
        str(m.data),
        "--dram",
        "16MiB",
        "--ssd",
        "64MiB",
        str(mnt2),
    ]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env())
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", str(mnt2)], capture_output=True, timeout=30)
        pytest.fail("a second mount of a data dir in use did not exit")
    assert res.returncode != 0
    assert not is_mounted(mnt2)
    with pytest.raises(mooncakefs.errors.StoreLocked):
        mooncakefs.open(m.data, dram="16MiB", ssd="64MiB")
    assert read_file(m.mnt / "f") == b"first"


# ---------------------------------------------------------------------------------------- persistence


def test_namespace_survives_restart(mount_factory):
    m = mount_factory()
    files = build_tree(m.mnt)
    before = snapshot_tree(m.mnt, contents=False)
    m.restart()
    after = snapshot_tree(m.mnt, contents=False)  # stat everything before reading (atime)
    problems = diff_snapshots(before, after)
    assert not problems, "changed by a restart:\n" + "\n".join(problems)
    check_files(m.mnt, files)
    assert os.readlink(m.mnt / "link-to-small") == "small.txt"
    assert os.stat(m.mnt / "dir" / "hardlink").st_ino == os.stat(m.mnt / "small.txt").st_ino
    assert os.getxattr(m.mnt / "small.txt", "user.note") == b"kept across restarts"
    # and it is still a working filesystem
    write_file(m.mnt / "dir" / "after-restart", b"new")
    os.unlink(m.mnt / "small.txt")
    assert read_file(m.mnt / "dir" / "hardlink") == files["small.txt"]
    m.restart()
    assert read_file(m.mnt / "dir" / "after-restart") == b"new"
    assert not os.path.exists(m.mnt / "small.txt")
    assert os.stat(m.mnt / "dir" / "hardlink").st_nlink == 1


def test_ctime_survives_restart(mount_factory):
    m = mount_factory()
    write_file(m.mnt / "f", b"x")
    os.mkdir(m.mnt / "d")
    before = {n: os.lstat(m.mnt / n).st_ctime_ns for n in ("f", "d")}
    m.restart()
    after = {n: os.lstat(m.mnt / n).st_ctime_ns for n in ("f", "d")}
    assert after == before


def test_unlinked_and_renamed_state_survives_restart(mount_factory):
    m = mount_factory()
    os.makedirs(m.mnt / "a" / "b")
    write_file(m.mnt / "a" / "b" / "f", b"one")
    write_file(m.mnt / "g", b"two")
    write_file(m.mnt / "h", b"three")
    os.rename(m.mnt / "a" / "b" / "f", m.mnt / "moved")
    os.rename(m.mnt / "g", m.mnt / "h")  # over an existing file
    os.rename(m.mnt / "a", m.mnt / "a2")
    write_file(m.mnt / "trunc", rand_bytes(200_000, "tr"))
    os.truncate(m.mnt / "trunc", 1000)
    m.restart()
    assert sorted(os.listdir(m.mnt / "a2")) == ["b"]
    assert os.listdir(m.mnt / "a2" / "b") == []
    assert read_file(m.mnt / "moved") == b"one"
    assert read_file(m.mnt / "h") == b"two"
    assert not os.path.exists(m.mnt / "g")
    assert not os.path.exists(m.mnt / "a")
    assert read_file(m.mnt / "trunc") == rand_bytes(200_000, "tr")[:1000]


def test_unlinked_open_file_space_is_reclaimed_after_restart(mount_factory):
    """An unlinked file that was still open at unmount is gone (no ghost entry) after a restart."""
    m = mount_factory()
    write_file(m.mnt / "ghost", rand_bytes(1 * MiB, "ghost"))
    fd = os.open(m.mnt / "ghost", os.O_RDONLY)
    os.unlink(m.mnt / "ghost")
    os.close(fd)
    m.restart()
    assert os.listdir(m.mnt) == [] or set(os.listdir(m.mnt)) <= {".kv", ".mooncakefs"}


def test_in_memory_mount_starts_empty(mount_factory):
    m = mount_factory(ssd="0", dram="64MiB")
    write_file(m.mnt / "f", rand_bytes(1 * MiB, "mem"))
    os.mkdir(m.mnt / "d")
    assert read_file(m.mnt / "f") == rand_bytes(1 * MiB, "mem")
    m.restart()
    leftovers = [n for n in os.listdir(m.mnt) if n not in (".kv", ".mooncakefs")]
    assert leftovers == [], f"an --ssd 0 mount kept {leftovers} across a remount"


def _ssd_objects(data_dir) -> list[tuple[bytes, bytes]]:
    """(key, value) of every object in the SSD tier, read through its documented on-disk format
    (``index.sqlite`` rows: key, segment number, offset, size; values in ``ssd/seg-NNNNNNNN.dat``).
    Unlike ``Store.keys()``, this includes the filesystem's internal chunk objects."""
    import sqlite3

    con = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT key, seg, off, size FROM objects").fetchall()
    finally:
        con.close()
    out = []
    for key, seg, off, size in rows:
        with open(data_dir / "ssd" / f"seg-{seg:08d}.dat", "rb") as f:
            f.seek(off)
            out.append((bytes(key), f.read(size)))
    return out


@pytest.mark.parametrize("chunk", [64 * KiB, 1 * MiB])
def test_chunk_size_option(mount_factory, chunk):
    """File data is stored as chunk objects of the configured size."""
    m = mount_factory(chunk_size=f"{chunk // KiB}KiB")
    data = pattern_bytes(4 * chunk + 100, f"chunk-size-{chunk}")
    write_file(m.mnt / "f", data, fsync=True)
    rc = m.unmount()
    assert rc == 0, m.describe()
    objects = _ssd_objects(m.data)
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        holders = [(k, v) for k, v in objects if piece in v]
        assert holders, f"bytes {i}..{i + len(piece)} of the file are not in any SSD object"
        for k, v in holders:
            assert len(v) <= chunk, f"object {k!r} holding file data is {len(v)} bytes with --chunk-size {chunk}"
    m.start()
    assert read_file(m.mnt / "f") == data


# ------------------------------------------------------------------------------------- fsync, kill -9


def test_kill9_enotconn_then_recovery(mount_factory):
    m = mount_factory()
    os.makedirs(m.mnt / "d" / "e")
    synced = {
        "d/e/a.bin": rand_bytes(2 * MiB + 1, "k9a"),
        "d/b.txt": b"fsync'd small file",
        "c.bin": rand_bytes(9 * MiB, "k9c"),
        "empty": b"",
    }
    for rel, data in synced.items():
        write_file(m.mnt / rel, data, fsync=True)
        fsync_dir((m.mnt / rel).parent)
    write_file(m.mnt / "volatile", rand_bytes(1 * MiB, "vol"))  # not fsync'd: may be lost
    m.kill9()
    assert is_mounted(m.mnt), "the mount vanished when its daemon was killed"
    expect_errno(errno.ENOTCONN, os.stat, m.mnt)
    expect_errno(errno.ENOTCONN, os.listdir, m.mnt)
    expect_errno(errno.ENOTCONN, os.open, m.mnt / "d" / "b.txt", os.O_RDONLY)
    m.start()  # same data dir, same mountpoint: the daemon cleans the stale mount itself
    for rel, data in synced.items():
        got = read_file(m.mnt / rel)
        assert got == data, f"{rel}: fsync'd file not intact after kill -9 ({len(got)} bytes, expected {len(data)})"
    # fully usable afterwards
    write_file(m.mnt / "after", b"after recovery", fsync=True)
    m.restart()
    assert read_file(m.mnt / "after") == b"after recovery"
    assert read_file(m.mnt / "c.bin") == synced["c.bin"]


def test_kill9_file_rewritten_after_fsync(mount_factory):
    """An fsync'd file rewritten (O_TRUNC, not fsync'd) just before kill -9 comes back as the old
    version, the new one, or empty (the truncation) -- readable, never EIO and never a mix."""
    m = mount_factory()
    old, new = rand_bytes(300_000, "old"), rand_bytes(200_000, "new")
    write_file(m.mnt / "rewritten", old, fsync=True)
    fsync_dir(m.mnt)
    write_file(m.mnt / "rewritten", new)
    m.kill9()
    m.start()
    got = read_file(m.mnt / "rewritten")
    assert got in (old, new, b""), f"after kill -9: {len(got)} bytes, neither the old nor the new version"


def test_fsync_makes_data_durable_on_ssd(mount_factory):
    """After fsync the file's bytes are in an SSD segment file (not just in DRAM)."""
    m = mount_factory()
    data = pattern_bytes(256 * KiB, "durable-on-ssd")
    fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        segs = sorted((m.data / "ssd").glob("seg-*.dat"))
        assert segs, "no SSD segment files after fsync"
        assert any(data[:4096] in s.read_bytes() for s in segs), "fsync'd data is not in any SSD segment"
    finally:
        os.close(fd)


def test_failed_write_through_is_reported_by_fsync_and_synced_bytes_survive_kill9(mount_factory):
    """Full chunks go to the SSD tier in the background while the writer goes on, so a full SSD tier
    fails a store nobody waits for: the fsync after it must answer ENOSPC (again at every retry, since
    the bytes are still not on the disk), never success.  Every byte an fsync did confirm survives
    kill -9 of the daemon."""
    m = mount_factory(dram="64MiB", ssd="8MiB", chunk_size="1MiB")
    fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written: list[bytes] = []
    synced = 0  # bytes of ``f`` an fsync confirmed
    try:
        for i in range(32):  # 32 MiB into an 8 MiB SSD tier: some fsync must fail
            block = rand_bytes(1 * MiB, f"wt{i}")
            assert os.write(fd, block) == len(block)  # ends a chunk: its store is behind, not waited for
            written.append(block)
            try:
                os.fsync(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, f"fsync after {i + 1} MiB: {errno.errorcode.get(exc.errno)}"
                break
            synced = sum(map(len, written))
        else:
            pytest.fail("32 MiB were fsync'd on a mount with an 8 MiB SSD tier")
        assert synced, "the first fsync already failed: the tier had no room at all"
        expect_errno(errno.ENOSPC, os.fsync, fd)  # still not durable: the error is not forgotten
    finally:
        try:
            os.close(fd)
        except OSError as exc:  # the flush at close retries the store, and may report it once more
            assert exc.errno == errno.ENOSPC, f"close: {errno.errorcode.get(exc.errno)}"
    m.kill9()
    m.start()
    got = read_file(m.mnt / "f")
    assert len(got) >= synced, f"after kill -9: {len(got)} bytes, but {synced} were fsync'd"
    assert got[:synced] == b"".join(written)[:synced], "fsync'd bytes changed after kill -9"


# ------------------------------------------------------------------------------------------- checksums


def _flip_in_segments(data_dir, needle: bytes) -> int:
    flipped = 0
    for seg in sorted((data_dir / "ssd").glob("seg-*.dat")):
        blob = bytearray(seg.read_bytes())
        pos = blob.find(needle)
        changed = False
        while pos >= 0:
            blob[pos + len(needle) // 2] ^= 0xFF
            flipped += 1
            changed = True
            pos = blob.find(needle, pos + 1)
        if changed:
            seg.write_bytes(bytes(blob))
    return flipped


def test_checksum_failure_is_eio(mount_factory):
    m = mount_factory(chunk_size="64KiB")
    data = pattern_bytes(512 * KiB, "eio-target")
    other = pattern_bytes(300 * KiB, "eio-bystander")
    write_file(m.mnt / "victim", data, fsync=True)
    write_file(m.mnt / "bystander", other, fsync=True)
    assert m.unmount() == 0, m.describe()
    needle = data[200 * KiB : 200 * KiB + 64]  # inside the 4th 64 KiB chunk
    assert _flip_in_segments(m.data, needle) >= 1, "the file's bytes were not found in any SSD segment"
    m.start()
    assert os.stat(m.mnt / "victim").st_size == len(data)
    fd = os.open(m.mnt / "victim", os.O_RDONLY)
    try:
        expect_errno(errno.EIO, os.pread, fd, 64 * KiB, 192 * KiB)
    finally:
        os.close(fd)
    # a second attempt must not return zeros or other wrong bytes
    try:
        got = read_file(m.mnt / "victim")
    except OSError as exc:
        assert exc.errno == errno.EIO, f"second read: {errno.errorcode.get(exc.errno)}"
    else:
        pytest.fail(f"second read of the corrupted file returned {len(got)} bytes (equal to original: {got == data})")
    # undamaged chunks of the same file and other files still read fine; the mount is usable
    fd = os.open(m.mnt / "victim", os.O_RDONLY)
    try:
        assert os.pread(fd, 64 * KiB, 0) == data[: 64 * KiB]
    finally:
        os.close(fd)
    assert read_file(m.mnt / "bystander") == other
    write_file(m.mnt / "new", b"still works")
    assert read_file(m.mnt / "new") == b"still works"


# ------------------------------------------------------------------------------ more command-line cases


def test_ssd_path_and_size(mount_factory, tmp_path):
    ssd_dir = tmp_path / "elsewhere" / "ssd"
    m = mount_factory(ssd=f"{ssd_dir}:64MiB", dram="16MiB")
    data = pattern_bytes(3 * MiB, "ssd-elsewhere")
    write_file(m.mnt / "f", data, fsync=True)
    segs = list(ssd_dir.glob("seg-*.dat"))
    assert segs, f"no segment files under {ssd_dir}"
    assert any(data[:4096] in s.read_bytes() for s in segs)
    sv = os.statvfs(m.mnt)
    assert sv.f_blocks * sv.f_frsize <= (64 + 16) * MiB * 1.05
    m.restart()
    assert read_file(m.mnt / "f") == data


def test_missing_mountpoint_fails_cleanly(tmp_path):
    argv = [
        sys.executable,
        "-m",
        "mooncakefs.cli",
        "mount",
        "--data",
        str(tmp_path / "data"),
        "--dram",
        "16MiB",
        "--ssd",
        "0",
        str(tmp_path / "no-such-dir"),
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode != 0
    assert not is_mounted(tmp_path / "no-such-dir")


def test_debug_option(mount_factory):
    m = mount_factory(extra=["--debug"], ssd="0", dram="32MiB")
    write_file(m.mnt / "f", b"debug")
    assert read_file(m.mnt / "f") == b"debug"
    assert m.unmount() == 0


def test_kill9_during_writes(mount_factory, tmp_path):
    """kill -9 while another process is writing and fsyncing files: after recovery every file it saw
    fsync return for is intact, and every file that is listed reads without error."""
    m = mount_factory()
    log = tmp_path / "fsynced.txt"
    code = r"""
import os, sys, random
mnt, log = sys.argv[1], sys.argv[2]
os.mkdir(os.path.join(mnt, "w"))
with open(log, "w") as out:
    for i in range(100000):
        data = random.Random(i).randbytes(random.Random(-i).choice([1, 5000, 70000, 300000]))
        p = os.path.join(mnt, "w", f"f{i}")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(os.path.join(mnt, "w"), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        out.write(f"{i}\n")
        out.flush()
"""
    import random

    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(m.mnt), str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:

        def finished() -> int:
            return len(log.read_text().split()) if log.exists() else 0

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and finished() < 40 and writer.poll() is None:
            time.sleep(0.05)
        m.kill9()
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
    done = [int(x) for x in log.read_text().split()]
    assert len(done) >= 40, f"the writer only finished {len(done)} files: {writer.stderr.read()[-2000:]}"
    m.start()
    listed = os.listdir(m.mnt / "w")
    for i in done:
        data = random.Random(i).randbytes(random.Random(-i).choice([1, 5000, 70000, 300000]))
        assert read_file(m.mnt / "w" / f"f{i}") == data, f"f{i} was fsync'd but is not intact"
    for name in listed:
        try:
            read_file(m.mnt / "w" / name)
        except OSError as exc:
            pytest.fail(f"w/{name} is listed after recovery but reading it fails: {errno.errorcode.get(exc.errno)}")


def test_ssd_on_a_block_device_formats_only_when_asked_and_survives_a_remount(mount_factory, loop_devices):
    """``--ssd /dev/loopN``: a device holding stray data is refused (nothing written to it) unless
    ``--format-ssd`` is given; then files written survive a remount made without the flag."""
    from blockdev_helpers import device_size_for

    device = loop_devices.attach(device_size_for(128 * MiB, 64 * MiB))  # the mount's 64 MiB segments
    with open(device, "r+b") as f:
        f.write(b"not empty")
        os.fsync(f.fileno())
    refused = mount_factory(ssd=device, dram="16MiB", start=False)
    refused.mnt.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(refused.argv(), capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode != 0 and not is_mounted(refused.mnt), res.stdout + res.stderr
    assert "--format-ssd" in res.stderr and "non-zero byte" in res.stderr, res.stderr
    with open(device, "rb") as f:
        assert f.read(9) == b"not empty"

    m = mount_factory(data="data2", mnt="mnt2", ssd=device, dram="16MiB", extra=["--format-ssd"])
    data = pattern_bytes(5 * MiB + 321, "on-the-device")
    write_file(m.mnt / "f", data, fsync=True)
    m.extra = []  # a remount must not format it again
    m.restart()
    assert read_file(m.mnt / "f") == data
