"""The mount under load and at its limits: ENOSPC, 100,000-entry directories, ``cp -r`` of 1,000 files,
fio with verification, and ``mount -t mooncakefs`` through the mount helper."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, rand_bytes
from fuse_helpers import (
    MiB,
    PidHandle,
    daemon_pid_from_lock,
    diff_snapshots,
    errname,
    force_unmount,
    guarded,
    is_mounted,
    read_file,
    snapshot_tree,
    wait_pid_gone,
    write_file,
)

# ---------------------------------------------------------------------------------------------- ENOSPC


def test_enospc_when_tiers_are_full(mount_factory):
    m = mount_factory(dram="16MiB", ssd="32MiB")
    keep = rand_bytes(1 * MiB, "keep")
    write_file(m.mnt / "keep", keep, fsync=True)
    block = rand_bytes(1 * MiB, "fill")
    failures: list[str] = []
    written = 0
    fd = os.open(m.mnt / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < 100 * MiB:
            try:
                n = os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, f"write at {written}: {errname(exc.errno)}, expected ENOSPC"
                failures.append(f"write at {written}")
                break
            assert n > 0
            written += n
        try:
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"fsync: {errname(exc.errno)}, expected ENOSPC"
            failures.append("fsync")
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"close: {errname(exc.errno)}, expected ENOSPC"
            failures.append("close")
    assert failures, f"wrote {written} bytes, fsync'd and closed them on a mount with 16 MiB DRAM + 32 MiB SSD"
    # the mount stays usable: free the space, write again (more than was free before the unlink)
    assert read_file(m.mnt / "keep") == keep
    os.unlink(m.mnt / "big")
    os.statvfs(m.mnt)
    fresh = rand_bytes(24 * MiB, "fresh")  # needs the space the unlinked file held
    write_file(m.mnt / "fresh", fresh, fsync=True)
    assert read_file(m.mnt / "fresh") == fresh
    assert read_file(m.mnt / "keep") == keep
    m.restart()
    assert read_file(m.mnt / "fresh") == fresh
    assert read_file(m.mnt / "keep") == keep


def test_enospc_does_not_corrupt_other_files(mount_factory):
    """Filling the tiers with many files: every file that was written, fsync'd and closed without an
    error reads back exactly; the ones that failed report ENOSPC."""
    m = mount_factory(dram="16MiB", ssd="32MiB")
    ok: dict[str, bytes] = {}
    saw_enospc = False
    for i in range(40):
        data = rand_bytes(2 * MiB, ("many", i))
        try:
            write_file(m.mnt / f"f{i}", data, fsync=True)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"f{i}: {errname(exc.errno)}"
            saw_enospc = True
            continue
        ok[f"f{i}"] = data
    assert saw_enospc, "80 MiB of files fit on 16 MiB DRAM + 32 MiB SSD"
    for name, data in ok.items():
        assert read_file(m.mnt / name) == data, f"{name} was written without error but reads back wrong"


# ------------------------------------------------------------------------------------ big directories


@pytest.mark.slow
def test_directory_with_100k_entries(mount_factory):
    m = mount_factory(dram="128MiB", ssd="256MiB")
    d = m.mnt / "big"
    os.mkdir(d)
    names = {f"file-{i:06d}" for i in range(100_000)}
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    listed = guarded(m, os.listdir, d, timeout=240)
    assert len(listed) == len(names), f"listdir returned {len(listed)} entries for 100000"
    assert set(listed) == names
    for n in random.Random(3).sample(sorted(names), 50):
        assert os.stat(d / n).st_size == 0
    # removing some is reflected exactly
    gone = set(random.Random(4).sample(sorted(names), 1000))
    for n in gone:
        os.unlink(d / n)
    assert set(os.listdir(d)) == names - gone


# ------------------------------------------------------------------------------------------- cp -r, diff


def make_source_tree(root: Path, files: int = 1000) -> None:
    rng = random.Random(99)
    dirs = [root]
    for i in range(30):
        parent = rng.choice(dirs)
        d = parent / f"dir{i}"
        d.mkdir()
        dirs.append(d)
    (root / "emptydir").mkdir()
    for i in range(files):
        size = rng.choice([0, 1, 100, 4096, 65_536, 65_537, rng.randrange(1, 300_000)])
        if i % 100 == 0:
            size = 1 * MiB + rng.randrange(0, 100_000)
        p = rng.choice(dirs) / f"file{i:04d}.bin"
        p.write_bytes(rand_bytes(size, ("tree", i)))
        os.chmod(p, rng.choice([0o644, 0o600, 0o755, 0o640]))


@pytest.mark.slow
def test_cp_r_1000_files_in_and_out(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_source_tree(src)
    m = mount_factory()
    dst = m.mnt / "tree"
    res = subprocess.run(["cp", "-r", str(src), str(dst)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"cp -r in: {res.stderr[-2000:]}"
    res = subprocess.run(["diff", "-r", str(src), str(dst)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"diff -r src mnt/tree:\n{res.stdout[-3000:]}{res.stderr[-2000:]}"
    out = tmp_path / "out"
    res = subprocess.run(["cp", "-r", str(dst), str(out)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"cp -r out: {res.stderr[-2000:]}"
    res = subprocess.run(["diff", "-r", str(src), str(out)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"diff -r src out:\n{res.stdout[-3000:]}{res.stderr[-2000:]}"
    # after a restart, too
    m.restart()
    res = subprocess.run(["diff", "-r", str(src), str(dst)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"diff -r after restart:\n{res.stdout[-3000:]}{res.stderr[-2000:]}"


@pytest.mark.slow
def test_cp_a_preserves_modes_and_times(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_source_tree(src, files=300)
    os.symlink("dir0", src / "link")
    m = mount_factory()
    dst = m.mnt / "copy"
    res = subprocess.run(["cp", "-a", str(src), str(dst)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"cp -a: {res.stderr[-2000:]}"

    def strip(snap):
        return {k: {f: v for f, v in e.items() if f != "atime_ns"} for k, e in snap.items()}

    want = strip(snapshot_tree(src))
    got = strip(snapshot_tree(dst))
    problems = diff_snapshots(want, got)
    assert not problems, "cp -a onto the mount lost metadata:\n" + "\n".join(problems[:30])


# ------------------------------------------------------------------------------------------------- fio


FIO_JOBS = {
    "randwrite-4k": ["--rw=randwrite", "--bs=4k", "--size=16m"],
    "write-1m": ["--rw=write", "--bs=1m", "--size=64m"],
    "randrw-mixed-fsync": ["--rw=randrw", "--bsrange=4k-256k", "--size=32m", "--fsync=16"],
}


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(FIO_JOBS))
def test_fio_verify(mount_factory, job):
    m = mount_factory(dram="64MiB", ssd="256MiB")
    argv = [
        "fio",
        "--name=v",
        f"--directory={m.mnt}",
        *FIO_JOBS[job],
        "--verify=crc32c",
        "--do_verify=1",
        "--ioengine=psync",
        "--verify_fatal=1",
        "--verify_state_save=0",  # no state file in the working directory
    ]
    try:
        # cwd: fio leaves its verify state file in the working directory
        res = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=m.data.parent)
    except subprocess.TimeoutExpired:
        m.kill9()
        pytest.fail(f"fio {job} did not finish in 240 s\n{m.describe()}")
    assert res.returncode == 0, f"fio {job} exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


# ------------------------------------------------------------------------------------- mount -t helper


HELPER = Path("/sbin/mount.mooncakefs")


@pytest.mark.skipif(os.geteuid() != 0, reason="mount -t needs root")
def test_mount_t_mooncakefs_and_umount(tmp_path, fuse_watchdog):
    existed = HELPER.exists() or HELPER.is_symlink()
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    mnt.mkdir()
    daemon = fuse_watchdog.watch(PidHandle())
    env = child_env()
    try:
        res = subprocess.run(
            [sys.executable, "-m", "mooncakefs.cli", "install-mount-helper"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert HELPER.is_symlink(), f"{HELPER} is not a symlink after install-mount-helper"
        assert os.access(HELPER, os.X_OK), f"{HELPER} -> {os.readlink(HELPER)} is not executable"
        # again: idempotent
        res = subprocess.run(
            [sys.executable, "-m", "mooncakefs.cli", "install-mount-helper"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 0, "install-mount-helper run twice: " + res.stdout + res.stderr

        res = subprocess.run(
            ["mount", "-t", "mooncakefs", str(data), str(mnt), "-o", "dram=64MiB,ssd=256MiB,chunk_size=256KiB"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 0, f"mount -t mooncakefs: {res.stdout}{res.stderr}"
        assert os.path.ismount(mnt)
        daemon.pid = daemon_pid_from_lock(data)
        assert daemon.pid is not None, "no daemon pid in the data dir's LOCK"
        payload = rand_bytes(2 * MiB, "helper")
        guarded(daemon, write_file, mnt / "f", payload, timeout=60)
        assert guarded(daemon, read_file, mnt / "f", timeout=60) == payload

        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"umount: {res.stderr}"
        assert not is_mounted(mnt)
        assert wait_pid_gone(daemon.pid, 30), "the daemon did not exit after umount"

        # again (other options): the data is still there
        res = subprocess.run(
            ["mount", "-t", "mooncakefs", str(data), str(mnt), "-o", "dram=32MiB,ssd=256MiB"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 0, f"second mount -t mooncakefs: {res.stdout}{res.stderr}"
        daemon.pid = daemon_pid_from_lock(data)
        assert guarded(daemon, read_file, mnt / "f", timeout=60) == payload
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"umount: {res.stderr}"
        assert wait_pid_gone(daemon.pid, 30), "the daemon did not exit after the second umount"
    finally:
        force_unmount(mnt)
        pid = daemon_pid_from_lock(data)
        if pid and not wait_pid_gone(pid, 10):
            PidHandle(pid).kill9()
        if not existed:
            with contextlib.suppress(FileNotFoundError):
                HELPER.unlink()
