"""POSIX semantics of the mooncakefs FUSE mount: files, directories, links, rename, attributes, xattrs,
statfs and exact errnos.  All tests share one mount (64 MiB DRAM, 256 MiB SSD, 64 KiB chunks) and each
works in a fresh directory of it (the ``fuse_dir`` fixture)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
from conftest import rand_bytes
from fuse_helpers import (
    FALLOC_FL_KEEP_SIZE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    KiB,
    MiB,
    errname,
    expect_errno,
    raw_fallocate,
    read_file,
    renameat2,
    write_file,
)

ENOTSUP_CODES = {errno.ENOTSUP, errno.EOPNOTSUPP}

# ------------------------------------------------------------------------------------------ regular files


def test_create_write_read(fuse_dir):
    p = fuse_dir / "f"
    data = rand_bytes(200_000, "cwr")
    write_file(p, data)
    assert read_file(p) == data
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == len(data)
    assert st.st_nlink == 1
    assert os.listdir(fuse_dir) == ["f"]


def test_empty_file(fuse_dir):
    p = fuse_dir / "empty"
    write_file(p, b"")
    assert os.stat(p).st_size == 0
    assert read_file(p) == b""


def test_create_mode_and_owner(fuse_dir):
    old = os.umask(0)
    try:
        fd = os.open(fuse_dir / "m", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
        os.close(fd)
        os.mkdir(fuse_dir / "d", 0o751)
    finally:
        os.umask(old)
    st = os.stat(fuse_dir / "m")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE(os.stat(fuse_dir / "d").st_mode) == 0o751


def test_overwrite_middle_and_extend(fuse_dir):
    p = fuse_dir / "f"
    base = bytearray(rand_bytes(300_000, "base"))
    write_file(p, bytes(base))
    patch = rand_bytes(70_000, "patch")  # crosses 64 KiB chunk boundaries
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pwrite(fd, patch, 100_000) == len(patch)
        base[100_000:170_000] = patch
        tail = rand_bytes(50_000, "tail")
        assert os.pwrite(fd, tail, 280_000) == len(tail)
        base[280_000:330_000] = tail
        assert os.pread(fd, 400_000, 0) == bytes(base)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 330_000
    assert read_file(p) == bytes(base)


def test_random_io_against_model(fuse_dir):
    """Random pwrite/pread/ftruncate at any offset on two files, checked against bytearrays."""
    import random

    rng = random.Random(1234)
    models = {"a": bytearray(), "b": bytearray()}
    fds = {n: os.open(fuse_dir / n, os.O_RDWR | os.O_CREAT, 0o644) for n in models}
    try:
        for step in range(300):
            name = rng.choice("ab")
            fd, model = fds[name], models[name]
            op = rng.random()
            if op < 0.5:
                off = rng.randrange(0, 600_000)
                size = rng.choice([1, 17, 4096, 65_536, rng.randrange(1, 200_000)])
                data = rand_bytes(size, (name, step))
                assert os.pwrite(fd, data, off) == size
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + size] = data
            elif op < 0.6:
                size = rng.randrange(0, 700_000)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            else:
                off = rng.randrange(0, 700_000)
                size = rng.randrange(0, 200_000)
                got = os.pread(fd, size, off)
                assert got == bytes(model[off : off + size]), f"step {step}: pread({name}, {size}, {off})"
            assert os.fstat(fd).st_size == len(model), f"step {step}: size of {name}"
    finally:
        for fd in fds.values():
            os.close(fd)
    for name, model in models.items():
        assert read_file(fuse_dir / name) == bytes(model), f"{name} after close"


def test_sparse_file_reads_zeros(fuse_dir):
    p = fuse_dir / "sparse"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"tail", 10 * MiB)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 10 * MiB + 4
    data = read_file(p)
    assert len(data) == 10 * MiB + 4
    assert data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4 : 10 * MiB].count(0) == 10 * MiB - 4, "the hole does not read as zeros"


def test_truncate_extends_with_zeros_and_shrinks(fuse_dir):
    p = fuse_dir / "t"
    data = rand_bytes(150_000, "trunc")
    write_file(p, data)
    os.truncate(p, 1000)
    assert os.stat(p).st_size == 1000
    assert read_file(p) == data[:1000]
    os.truncate(p, 200_000)  # the old bytes past 1000 must not come back
    assert os.stat(p).st_size == 200_000
    assert read_file(p) == data[:1000] + bytes(199_000)
    os.truncate(p, 0)
    assert read_file(p) == b""


def test_ftruncate_on_open_fd(fuse_dir):
    p = fuse_dir / "ft"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, rand_bytes(100_000, "ft"))
        os.ftruncate(fd, 70_000)
        assert os.fstat(fd).st_size == 70_000
        os.ftruncate(fd, 70_001)
        assert os.pread(fd, 10, 69_995) == rand_bytes(100_000, "ft")[69_995:70_000] + b"\0"
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 70_001
    assert read_file(p) == rand_bytes(100_000, "ft")[:70_000] + b"\0"


def test_o_trunc_o_append_o_excl(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, b"0123456789")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"abc")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"def")  # O_APPEND: still at the end
    finally:
        os.close(fd)
    assert read_file(p) == b"0123456789abcdef"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(p).st_size == 0
    expect_errno(errno.EEXIST, os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def test_posix_fallocate(fuse_dir):
    """posix_fallocate works (glibc falls back to writing when the filesystem has no fallocate)."""
    p = fuse_dir / "fa"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"keep me")
        os.posix_fallocate(fd, 0, 3 * MiB + 5)
        assert os.fstat(fd).st_size == 3 * MiB + 5
        os.posix_fallocate(fd, 0, 100)  # inside the file: no change
        assert os.fstat(fd).st_size == 3 * MiB + 5
    finally:
        os.close(fd)
    data = read_file(p)
    assert data[:7] == b"keep me"
    assert data[7:].count(0) == len(data) - 7


def test_raw_fallocate_mode0_works_or_eopnotsupp(fuse_dir):
    p = fuse_dir / "raw"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"xyz")
        try:
            raw_fallocate(fd, 0, 0, 1 * MiB)
        except OSError as exc:
            assert exc.errno in ENOTSUP_CODES, f"fallocate(mode 0): got {errname(exc.errno)}"
            assert os.fstat(fd).st_size == 3
            return
        assert os.fstat(fd).st_size == 1 * MiB
        assert os.pread(fd, 1 * MiB, 0) == b"xyz" + bytes(1 * MiB - 3)
        # KEEP_SIZE, if supported at all, must not change the size
        try:
            raw_fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 2 * MiB)
        except OSError as exc:
            assert exc.errno in ENOTSUP_CODES, f"fallocate(KEEP_SIZE): got {errname(exc.errno)}"
        assert os.fstat(fd).st_size == 1 * MiB
    finally:
        os.close(fd)


def test_close_to_open(fuse_dir):
    """A file written and closed is complete for the next open (same process and another process)."""
    import subprocess
    import sys

    p = fuse_dir / "c2o"
    for i in range(5):
        data = rand_bytes(300_000 + i * 70_001, ("c2o", i))
        write_file(p, data)
        assert os.stat(p).st_size == len(data)
        assert read_file(p) == data
    # written and closed by another process, read here
    code = "import sys; open(sys.argv[1], 'wb').write(bytes(range(256)) * 3000)"
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, timeout=60)
    assert read_file(p) == bytes(range(256)) * 3000
    # written here, read by another process
    data = rand_bytes(500_000, "c2o-child")
    write_file(p, data)
    code = "import sys, hashlib; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"
    out = subprocess.run([sys.executable, "-c", code, str(p)], check=True, timeout=60, capture_output=True, text=True)
    import hashlib

    assert out.stdout.strip() == hashlib.sha256(data).hexdigest()


def test_two_fds_see_each_others_writes(fuse_dir):
    p = fuse_dir / "shared"
    a = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(p, os.O_RDWR)
    try:
        os.pwrite(a, b"hello world", 0)
        assert os.pread(b, 11, 0) == b"hello world"
        os.pwrite(b, b"WORLD", 6)
        assert os.pread(a, 11, 0) == b"hello WORLD"
    finally:
        os.close(a)
        os.close(b)


def test_mmap_read(fuse_dir):
    import mmap

    p = fuse_dir / "mm"
    data = rand_bytes(3 * MiB + 123, "mmap")
    write_file(p, data)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert len(m) == len(data)
        assert m[:] == data
        assert m[2 * MiB : 2 * MiB + 10] == data[2 * MiB : 2 * MiB + 10]


def test_safetensors_roundtrip(fuse_dir):
    np = pytest.importorskip("numpy")
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(7)
    tensors = {
        "embed": rng.standard_normal((512, 256), dtype=np.float32),
        "layer0.k": rng.standard_normal((64, 128)).astype(np.float16),
        "layer0.v": rng.integers(-1000, 1000, size=(3, 5, 7), dtype=np.int32),
        "scalar": np.array([42], dtype=np.int64),
    }
    path = str(fuse_dir / "model.safetensors")
    st_numpy.save_file(tensors, path)
    loaded = st_numpy.load_file(path)
    assert set(loaded) == set(tensors)
    for name, arr in tensors.items():
        assert loaded[name].dtype == arr.dtype and loaded[name].shape == arr.shape, name
        assert np.array_equal(loaded[name], arr), name


def test_read_past_eof(fuse_dir):
    p = fuse_dir / "short"
    write_file(p, b"abc")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 1) == b"bc"
        assert os.pread(fd, 100, 3) == b""
        assert os.pread(fd, 100, 1_000_000) == b""
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- unlink


def test_unlinked_open_file_stays_readable(fuse_dir):
    p = fuse_dir / "gone"
    data = rand_bytes(400_000, "gone")
    write_file(p, data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        expect_errno(errno.ENOENT, os.stat, p)
        assert "gone" not in os.listdir(fuse_dir)
        assert os.pread(fd, len(data) + 10, 0) == data
        assert os.fstat(fd).st_size == len(data)
        os.pwrite(fd, b"still writable", 10)
        assert os.pread(fd, 14, 10) == b"still writable"
        # a new file of the same name is a different file
        write_file(p, b"new")
        assert read_file(p) == b"new"
        assert os.pread(fd, 14, 10) == b"still writable"
    finally:
        os.close(fd)
    assert read_file(p) == b"new"


def test_unlink_errors(fuse_dir):
    expect_errno(errno.ENOENT, os.unlink, fuse_dir / "missing")
    os.mkdir(fuse_dir / "d")
    expect_errno(errno.EISDIR, os.unlink, fuse_dir / "d")


# ------------------------------------------------------------------------------------------- directories


def test_mkdir_rmdir_listing(fuse_dir):
    os.mkdir(fuse_dir / "d")
    os.mkdir(fuse_dir / "d" / "e")
    write_file(fuse_dir / "d" / "f", b"x")
    assert sorted(os.listdir(fuse_dir / "d")) == ["e", "f"]
    st = os.stat(fuse_dir / "d")
    assert stat.S_ISDIR(st.st_mode)
    names = {e.name: (e.is_dir(), e.is_file()) for e in os.scandir(fuse_dir / "d")}
    assert names == {"e": (True, False), "f": (False, True)}
    expect_errno(errno.ENOTEMPTY, os.rmdir, fuse_dir / "d")
    os.unlink(fuse_dir / "d" / "f")
    expect_errno(errno.ENOTEMPTY, os.rmdir, fuse_dir / "d")
    os.rmdir(fuse_dir / "d" / "e")
    os.rmdir(fuse_dir / "d")
    assert os.listdir(fuse_dir) == []
    expect_errno(errno.ENOENT, os.stat, fuse_dir / "d")


def test_dir_nlink(fuse_dir):
    """A directory's link count is 2 + its subdirectories (or always 1, "unknown", which find(1) accepts);
    anything else makes find's leaf optimisation skip subdirectories."""
    os.mkdir(fuse_dir / "d")
    counts = [os.stat(fuse_dir / "d").st_nlink]
    os.mkdir(fuse_dir / "d" / "a")
    os.mkdir(fuse_dir / "d" / "b")
    write_file(fuse_dir / "d" / "f", b"")
    counts.append(os.stat(fuse_dir / "d").st_nlink)
    os.rmdir(fuse_dir / "d" / "a")
    counts.append(os.stat(fuse_dir / "d").st_nlink)
    assert counts in ([2, 4, 3], [1, 1, 1]), f"directory st_nlink with 0, 2, 1 subdirectories: {counts}"


def test_readdir_many_entries_with_offsets(fuse_dir):
    """More entries than one readdir buffer holds: every name exactly once (getdents paging)."""
    names = {f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(3000)}
    for n in names:
        os.close(os.open(fuse_dir / n, os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(fuse_dir)
    assert len(listed) == len(names)
    assert set(listed) == names


def test_listing_during_unlink(fuse_dir):
    """Removing entries while a directory is being read never yields duplicates, and every entry that
    stays is returned (POSIX leaves only the removed ones unspecified)."""
    all_names = {f"n{i}" for i in range(500)}
    for n in all_names:
        os.close(os.open(fuse_dir / n, os.O_CREAT | os.O_WRONLY, 0o644))
    seen: list[str] = []
    removed: set[str] = set()
    with os.scandir(fuse_dir) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k == 10:
                for n in sorted(all_names):
                    if n not in seen and int(n[1:]) % 2 == 0:
                        os.unlink(fuse_dir / n)
                        removed.add(n)
    assert len(seen) == len(set(seen)), "readdir returned a name twice"
    kept = all_names - removed
    assert kept <= set(seen), f"readdir skipped {len(kept - set(seen))} entries that were never removed"
    assert set(os.listdir(fuse_dir)) == kept


def test_names_utf8_non_utf8_and_max_length(fuse_dir):
    names = ["café", "日本語", "with space", "a" * 255, "-dash", "..dots", "x~y"]
    for n in names:
        write_file(fuse_dir / n, n.encode())
    raw = os.fsencode(fuse_dir) + b"/bad\xff\xfename"
    write_file(raw, b"raw")
    listed = set(os.listdir(os.fsencode(fuse_dir)))
    assert listed == {n.encode() for n in names} | {b"bad\xff\xfename"}
    for n in names:
        assert read_file(fuse_dir / n) == n.encode()
    assert read_file(raw) == b"raw"


def test_enametoolong(fuse_dir):
    long = "n" * 256
    expect_errno(errno.ENAMETOOLONG, os.open, fuse_dir / long, os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, fuse_dir / long)
    expect_errno(errno.ENAMETOOLONG, os.stat, fuse_dir / long)
    write_file(fuse_dir / "short", b"")
    expect_errno(errno.ENAMETOOLONG, os.rename, fuse_dir / "short", fuse_dir / long)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "target", fuse_dir / long)
    assert os.listdir(fuse_dir) == ["short"]


def test_errnos(fuse_dir):
    f = fuse_dir / "file"
    d = fuse_dir / "dir"
    write_file(f, b"data")
    os.mkdir(d)
    write_file(d / "inner", b"")
    # ENOENT
    expect_errno(errno.ENOENT, os.stat, fuse_dir / "nope")
    expect_errno(errno.ENOENT, os.open, fuse_dir / "nope", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.open, fuse_dir / "nope" / "x", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENOENT, os.rmdir, fuse_dir / "nope")
    expect_errno(errno.ENOENT, os.rename, fuse_dir / "nope", fuse_dir / "other")
    expect_errno(errno.ENOENT, os.truncate, fuse_dir / "nope", 0)
    expect_errno(errno.ENOENT, os.chmod, fuse_dir / "nope", 0o600)
    expect_errno(errno.ENOENT, os.listdir, fuse_dir / "nope")
    # EEXIST
    expect_errno(errno.EEXIST, os.mkdir, d)
    expect_errno(errno.EEXIST, os.mkdir, f)
    expect_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    expect_errno(errno.EEXIST, os.symlink, "x", f)
    expect_errno(errno.EEXIST, os.link, f, d / "inner")
    # ENOTDIR
    expect_errno(errno.ENOTDIR, os.stat, f / "x")
    expect_errno(errno.ENOTDIR, os.open, f / "x", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENOTDIR, os.mkdir, f / "x")
    expect_errno(errno.ENOTDIR, os.rmdir, f)
    expect_errno(errno.ENOTDIR, os.listdir, f)
    expect_errno(errno.ENOTDIR, os.open, f, os.O_RDONLY | os.O_DIRECTORY)
    # EISDIR
    expect_errno(errno.EISDIR, os.open, d, os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, d, os.O_RDWR)
    expect_errno(errno.EISDIR, os.unlink, d)
    expect_errno(errno.EISDIR, os.rename, f, d)
    fd = os.open(d, os.O_RDONLY)
    try:
        expect_errno(errno.EISDIR, os.read, fd, 10)
    finally:
        os.close(fd)
    # ENOTEMPTY
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    # nothing above changed anything
    assert sorted(os.listdir(fuse_dir)) == ["dir", "file"]
    assert read_file(f) == b"data"


# ------------------------------------------------------------------------------------ symlinks, hard links


def test_symlinks(fuse_dir):
    write_file(fuse_dir / "target", b"pointed at")
    os.symlink("target", fuse_dir / "rel")
    os.symlink(str(fuse_dir / "target"), fuse_dir / "abs")
    os.symlink("does/not/exist", fuse_dir / "dangling")
    long_target = "/".join(["segment"] * 400)  # 3199 bytes
    os.symlink(long_target, fuse_dir / "long")
    assert os.readlink(fuse_dir / "rel") == "target"
    assert os.readlink(fuse_dir / "abs") == str(fuse_dir / "target")
    assert os.readlink(fuse_dir / "long") == long_target
    lst = os.lstat(fuse_dir / "rel")
    assert stat.S_ISLNK(lst.st_mode)
    assert lst.st_size == len("target")
    assert read_file(fuse_dir / "rel") == b"pointed at"
    assert read_file(fuse_dir / "abs") == b"pointed at"
    expect_errno(errno.ENOENT, os.stat, fuse_dir / "dangling")
    assert stat.S_ISLNK(os.lstat(fuse_dir / "dangling").st_mode)
    expect_errno(errno.EINVAL, os.readlink, fuse_dir / "target")
    # writing through a symlink writes the target
    write_file(fuse_dir / "rel", b"through link")
    assert read_file(fuse_dir / "target") == b"through link"
    os.mkdir(fuse_dir / "d")
    os.symlink("d", fuse_dir / "dlink")
    write_file(fuse_dir / "dlink" / "inside", b"in d")
    assert read_file(fuse_dir / "d" / "inside") == b"in d"
    os.unlink(fuse_dir / "rel")
    assert read_file(fuse_dir / "target") == b"through link"


def test_hard_links(fuse_dir):
    a = fuse_dir / "a"
    write_file(a, b"linked")
    os.mkdir(fuse_dir / "sub")
    b = fuse_dir / "sub" / "b"
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    write_file(b, b"changed via b")
    assert read_file(a) == b"changed via b"
    os.chmod(a, 0o600)
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
    os.unlink(a)
    assert os.stat(b).st_nlink == 1
    assert read_file(b) == b"changed via b"
    expect_errno(errno.EPERM, os.link, fuse_dir / "sub", fuse_dir / "dirlink")


# ---------------------------------------------------------------------------------------------- rename


def test_rename_file_and_across_dirs(fuse_dir):
    os.makedirs(fuse_dir / "x" / "y")
    os.mkdir(fuse_dir / "z")
    data = rand_bytes(250_000, "mv")
    write_file(fuse_dir / "x" / "y" / "f", data)
    os.rename(fuse_dir / "x" / "y" / "f", fuse_dir / "z" / "g")
    expect_errno(errno.ENOENT, os.stat, fuse_dir / "x" / "y" / "f")
    assert os.listdir(fuse_dir / "x" / "y") == []
    assert read_file(fuse_dir / "z" / "g") == data
    # a directory with contents, across directories
    write_file(fuse_dir / "x" / "y" / "h", b"h")
    os.rename(fuse_dir / "x", fuse_dir / "z" / "x2")
    assert read_file(fuse_dir / "z" / "x2" / "y" / "h") == b"h"
    assert sorted(os.listdir(fuse_dir)) == ["z"]
    # same name: no-op
    os.rename(fuse_dir / "z" / "g", fuse_dir / "z" / "g")
    assert read_file(fuse_dir / "z" / "g") == data


def test_rename_over_existing_file_is_atomic(fuse_dir):
    old = fuse_dir / "old"
    new = fuse_dir / "new"
    write_file(old, b"replacement")
    write_file(new, b"original content")
    fd = os.open(new, os.O_RDONLY)
    try:
        os.rename(old, new)
        assert read_file(new) == b"replacement"
        expect_errno(errno.ENOENT, os.stat, old)
        # the replaced file is still readable through an fd opened before
        assert os.pread(fd, 100, 0) == b"original content"
    finally:
        os.close(fd)
    assert sorted(os.listdir(fuse_dir)) == ["new"]


def test_rename_over_existing_file_across_dirs(fuse_dir):
    os.mkdir(fuse_dir / "a")
    os.mkdir(fuse_dir / "b")
    write_file(fuse_dir / "a" / "f", b"from a")
    write_file(fuse_dir / "b" / "f", b"from b")
    os.rename(fuse_dir / "a" / "f", fuse_dir / "b" / "f")
    assert os.listdir(fuse_dir / "a") == []
    assert read_file(fuse_dir / "b" / "f") == b"from a"


def test_rename_readers_never_see_a_missing_file(fuse_dir):
    """While files are renamed over ``target`` in a loop, readers always open a complete version."""
    import threading

    target = fuse_dir / "target"
    rounds = 200
    versions = {i: rand_bytes(20_000 + i, ("ver", i)) for i in range(rounds)}
    known = set(versions.values())
    write_file(target, versions[0])
    stop = threading.Event()
    problems: list[str] = []

    def reader():
        while not stop.is_set() and not problems:
            try:
                fd = os.open(target, os.O_RDONLY)
            except OSError as exc:
                problems.append(f"open(target) failed: {errname(exc.errno)}")
                return
            try:
                data = os.pread(fd, 100_000, 0)
            except OSError as exc:
                problems.append(f"pread(target) failed: {errname(exc.errno)}")
                return
            finally:
                os.close(fd)
            if data not in known:
                problems.append(f"read a torn/unknown version ({len(data)} bytes)")
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(1, rounds):
            tmp = fuse_dir / f"tmp{i}"
            write_file(tmp, versions[i])
            os.rename(tmp, target)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not problems, problems
    assert read_file(target) == versions[rounds - 1]


def test_rename_directory_rules(fuse_dir):
    os.makedirs(fuse_dir / "src" / "child")
    os.mkdir(fuse_dir / "empty")
    os.makedirs(fuse_dir / "full" / "x")
    write_file(fuse_dir / "file", b"f")
    expect_errno(errno.ENOTEMPTY, os.rename, fuse_dir / "src", fuse_dir / "full")
    expect_errno(errno.ENOTDIR, os.rename, fuse_dir / "src", fuse_dir / "file")
    expect_errno(errno.EISDIR, os.rename, fuse_dir / "file", fuse_dir / "empty")
    expect_errno(errno.EINVAL, os.rename, fuse_dir / "src", fuse_dir / "src" / "child" / "under")
    os.rename(fuse_dir / "src", fuse_dir / "empty")  # over an empty directory
    assert os.listdir(fuse_dir / "empty") == ["child"]
    assert sorted(os.listdir(fuse_dir)) == ["empty", "file", "full"]


def test_rename_hard_link_onto_itself(fuse_dir):
    write_file(fuse_dir / "a", b"same inode")
    os.link(fuse_dir / "a", fuse_dir / "b")
    os.rename(fuse_dir / "a", fuse_dir / "b")  # POSIX: does nothing
    assert sorted(os.listdir(fuse_dir)) == ["a", "b"]
    assert read_file(fuse_dir / "b") == b"same inode"


def _renameat2_supported_or_einval(old, new, flags) -> bool:
    """True if renameat2 did the rename; False if the filesystem refused the flags with EINVAL."""
    try:
        renameat2(old, new, flags)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def test_renameat2_noreplace(fuse_dir):
    a, b, c = fuse_dir / "a", fuse_dir / "b", fuse_dir / "c"
    write_file(a, b"A")
    write_file(b, b"B")
    try:
        renameat2(a, b, RENAME_NOREPLACE)
    except OSError as exc:
        assert exc.errno in (errno.EEXIST, errno.EINVAL), f"RENAME_NOREPLACE onto existing: {errname(exc.errno)}"
        if exc.errno == errno.EINVAL:
            assert read_file(a) == b"A" and read_file(b) == b"B"
            return
    else:
        pytest.fail("RENAME_NOREPLACE replaced an existing file")
    assert read_file(a) == b"A" and read_file(b) == b"B"
    # (the EEXIST above may come from the VFS itself; the rename to a fresh name reaches the filesystem)
    if _renameat2_supported_or_einval(a, c, RENAME_NOREPLACE):
        expect_errno(errno.ENOENT, os.stat, a)
        assert read_file(c) == b"A"
    else:
        assert read_file(a) == b"A"
        expect_errno(errno.ENOENT, os.stat, c)


def test_renameat2_exchange(fuse_dir):
    os.mkdir(fuse_dir / "d")
    a, b = fuse_dir / "a", fuse_dir / "d" / "b"
    write_file(a, b"AAAA")
    write_file(b, b"BB")
    if not _renameat2_supported_or_einval(a, b, RENAME_EXCHANGE):
        assert read_file(a) == b"AAAA" and read_file(b) == b"BB"
        return
    assert read_file(a) == b"BB" and read_file(b) == b"AAAA"
    assert os.stat(a).st_size == 2 and os.stat(b).st_size == 4
    expect_errno(errno.ENOENT, renameat2, a, fuse_dir / "missing", RENAME_EXCHANGE)
    # a file with a directory
    os.mkdir(fuse_dir / "e")
    write_file(fuse_dir / "e" / "inside", b"i")
    renameat2(a, fuse_dir / "e", RENAME_EXCHANGE)
    assert read_file(fuse_dir / "e") == b"BB"
    assert read_file(a / "inside") == b"i"


# ----------------------------------------------------------------------------------- attributes, statfs


def test_chmod(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, b"")
    for mode in (0o000, 0o600, 0o644, 0o755, 0o4755, 0o2711, 0o1777, 0o7777):
        os.chmod(p, mode)
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == mode, f"chmod {oct(mode)} read back {oct(stat.S_IMODE(st.st_mode))}"
        assert stat.S_ISREG(st.st_mode)
    os.mkdir(fuse_dir / "d")
    os.chmod(fuse_dir / "d", 0o700)
    assert os.stat(fuse_dir / "d").st_mode == stat.S_IFDIR | 0o700


def test_fchmod_fchown_on_open_file(fuse_dir):
    if os.geteuid() != 0:
        pytest.skip("chown to other users needs root")
    p = fuse_dir / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.fchmod(fd, 0o640)
        os.fchown(fd, 4321, 8765)
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 4321, 8765)
    finally:
        os.close(fd)


def test_chown(fuse_dir):
    if os.geteuid() != 0:
        pytest.skip("chown to other users needs root")
    p = fuse_dir / "f"
    write_file(p, b"")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.symlink("f", fuse_dir / "l")
    os.lchown(fuse_dir / "l", 777, 888)
    lst = os.lstat(fuse_dir / "l")
    assert (lst.st_uid, lst.st_gid) == (777, 888)
    assert os.stat(p).st_uid == 1234


def test_utimens_nanoseconds(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, b"x")
    atime = 1_234_567_890_123_456_789
    mtime = 1_700_000_000_987_654_321
    os.utime(p, ns=(atime, mtime))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    # far future
    os.utime(p, ns=(4_102_444_800_000_000_001, 4_102_444_800_000_000_001))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (4_102_444_800_000_000_001, 4_102_444_800_000_000_001)
    os.mkdir(fuse_dir / "d")
    os.utime(fuse_dir / "d", ns=(5, 999_999_999))
    st = os.stat(fuse_dir / "d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5, 999_999_999)
    # symlink itself
    os.symlink("f", fuse_dir / "l")
    os.utime(fuse_dir / "l", ns=(11, 22), follow_symlinks=False)
    lst = os.lstat(fuse_dir / "l")
    assert (lst.st_atime_ns, lst.st_mtime_ns) == (11, 22)
    assert os.stat(p).st_mtime_ns == 4_102_444_800_000_000_001


def test_utimens_before_1970(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, b"x")
    os.utime(p, ns=(-1_000_000_001, -86_400_000_000_007))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1_000_000_001, -86_400_000_000_007)


def test_times_set_before_close_stick(fuse_dir):
    """``cp -p``/``cp -a``/``tar`` write a file, set its times with futimens, then close it: the close
    must not overwrite the times that were set."""
    for size in (0, 10, 100_000, 3 * MiB):
        p = fuse_dir / f"f{size}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, rand_bytes(size, "futimens"))
            os.utime(fd, ns=(1_111_111_111_000_000_001, 1_222_222_222_000_000_002))
        finally:
            os.close(fd)
        st = os.stat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_111_111_111_000_000_001, 1_222_222_222_000_000_002), (
            f"{size}-byte file: times set by futimens before close were changed by the close"
        )


def test_utime_now_and_mtime_on_write(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, b"x")
    os.utime(p, ns=(10**9, 10**9))
    before = time.time_ns()
    os.utime(p)  # now
    st = os.stat(p)
    assert abs(st.st_mtime_ns - before) < 60 * 10**9
    os.utime(p, ns=(10**9, 10**9))
    with open(p, "ab") as f:
        f.write(b"more")
    st = os.stat(p)
    assert st.st_mtime_ns > 10**9, "write did not update mtime"
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * 10**9
    os.utime(p, ns=(10**9, 10**9))
    os.truncate(p, 1)
    assert os.stat(p).st_mtime_ns > 10**9, "truncate did not update mtime"
    # creating an entry updates the directory's mtime
    os.utime(fuse_dir, ns=(10**9, 10**9))
    write_file(fuse_dir / "g", b"")
    assert os.stat(fuse_dir).st_mtime_ns > 10**9, "create did not update the parent directory's mtime"


def test_statfs_reports_capacity_and_use(shared_mount, fuse_dir):
    sv = os.statvfs(shared_mount.mnt)
    total = sv.f_blocks * sv.f_frsize
    free = sv.f_bfree * sv.f_frsize
    assert sv.f_frsize > 0 and sv.f_bsize > 0
    assert 0 <= sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert sv.f_namemax == 255
    # the shared mount has 64 MiB of DRAM and 256 MiB of SSD
    assert 256 * MiB * 0.95 <= total <= (64 + 256) * MiB * 1.05, f"f_blocks*f_frsize = {total}"
    data = rand_bytes(16 * MiB, "statfs")
    write_file(fuse_dir / "big", data, fsync=True)
    sv2 = os.statvfs(shared_mount.mnt)
    used_before = total - free
    used_after = (sv2.f_blocks - sv2.f_bfree) * sv2.f_frsize
    assert used_after - used_before >= 15 * MiB, f"used went from {used_before} to {used_after} after 16 MiB"
    os.unlink(fuse_dir / "big")


def test_st_blocks_and_blksize(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, rand_bytes(1 * MiB, "blocks"))
    st = os.stat(p)
    assert st.st_blksize > 0
    assert st.st_blocks * 512 >= 1 * MiB, f"st_blocks {st.st_blocks} too small for 1 MiB (du would lie)"


# ------------------------------------------------------------------------------------------------ xattrs


def test_user_xattrs(fuse_dir):
    p = fuse_dir / "f"
    write_file(p, b"")
    assert os.listxattr(p) == []
    os.setxattr(p, "user.alpha", b"1")
    os.setxattr(p, "user.beta", b"")
    big = rand_bytes(32 * KiB, "xattr")
    os.setxattr(p, "user.big", big)
    os.setxattr(p, "user.bin", b"\x00\xff\x00")
    assert os.getxattr(p, "user.alpha") == b"1"
    assert os.getxattr(p, "user.beta") == b""
    assert os.getxattr(p, "user.big") == big
    assert os.getxattr(p, "user.bin") == b"\x00\xff\x00"
    assert sorted(os.listxattr(p)) == ["user.alpha", "user.beta", "user.big", "user.bin"]
    os.setxattr(p, "user.alpha", b"replaced")
    assert os.getxattr(p, "user.alpha") == b"replaced"
    expect_errno(errno.EEXIST, os.setxattr, p, "user.alpha", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE)
    os.setxattr(p, "user.alpha", b"again", os.XATTR_REPLACE)
    os.setxattr(p, "user.gamma", b"g", os.XATTR_CREATE)
    os.removexattr(p, "user.beta")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.beta")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.beta")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.never")
    assert sorted(os.listxattr(p)) == ["user.alpha", "user.big", "user.bin", "user.gamma"]
    # directories carry xattrs too
    os.mkdir(fuse_dir / "d")
    os.setxattr(fuse_dir / "d", "user.dir", b"yes")
    assert os.getxattr(fuse_dir / "d", "user.dir") == b"yes"
    # and they follow the inode across rename and hard links
    os.rename(p, fuse_dir / "g")
    os.link(fuse_dir / "g", fuse_dir / "h")
    assert os.getxattr(fuse_dir / "h", "user.alpha") == b"again"


def test_other_xattr_namespaces_unsupported(fuse_dir):
    """Only user.* is kept; the other namespaces are EOPNOTSUPP at once (so ls -l stops asking every
    file for security.selinux and the ACL), and that leaves user.* working on the same mount."""
    p = fuse_dir / "f"
    write_file(p, b"")
    for name in ("trusted.x", "security.x", "system.x", "security.selinux", "system.posix_acl_access"):
        if name != "system.posix_acl_access":  # (the kernel parses an ACL first: EINVAL for b"v")
            expect_errno(ENOTSUP_CODES, os.setxattr, p, name, b"v")
        expect_errno(ENOTSUP_CODES, os.getxattr, p, name)
        expect_errno(ENOTSUP_CODES, os.removexattr, p, name)
    assert os.listxattr(p) == []
    os.setxattr(p, "user.after", b"still")
    assert os.getxattr(p, "user.after") == b"still"
    assert os.listxattr(p) == ["user.after"]
    os.removexattr(p, "user.after")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.after")


def test_xattr_on_missing_file(fuse_dir):
    expect_errno(errno.ENOENT, os.getxattr, fuse_dir / "missing", "user.a")
    expect_errno(errno.ENOENT, os.setxattr, fuse_dir / "missing", "user.a", b"v")


# ------------------------------------------------------------------------------------------ odd shapes


def test_huge_sparse_offset(fuse_dir):
    """A write 1 TiB into a file neither allocates the hole nor breaks reads around it."""
    p = fuse_dir / "huge"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"far", 1 << 40)
        assert os.fstat(fd).st_size == (1 << 40) + 3
        assert os.pread(fd, 10, (1 << 40) - 7) == bytes(7) + b"far"
        assert os.pread(fd, 10, 12345) == bytes(10)
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 100, 0) == bytes(10)
    finally:
        os.close(fd)
    sv = os.statvfs(fuse_dir)
    assert sv.f_bfree <= sv.f_blocks


def test_deep_nesting_and_long_path(fuse_dir):
    parts = [f"level{i:02d}-" + "p" * 60 for i in range(60)]  # ~4 KiB of path
    d = fuse_dir
    for part in parts[:55]:
        d = d / part
        os.mkdir(d)
    write_file(d / "leaf", b"deep")
    assert read_file(d / "leaf") == b"deep"
    walked = [root for root, _, files in os.walk(fuse_dir) if "leaf" in files]
    assert walked == [str(d)]


def test_rename_open_file_then_write(fuse_dir):
    os.mkdir(fuse_dir / "x")
    fd = os.open(fuse_dir / "a", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before ")
        os.rename(fuse_dir / "a", fuse_dir / "x" / "b")
        os.write(fd, b"after")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_file(fuse_dir / "x" / "b") == b"before after"
    expect_errno(errno.ENOENT, os.stat, fuse_dir / "a")


def test_write_then_mmap_sees_new_data(fuse_dir):
    import mmap

    p = fuse_dir / "m"
    write_file(p, bytes(2 * MiB))
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:4] == bytes(4)
        os.pwrite(f.fileno(), b"NEW!", 1 * MiB)
        assert m[1 * MiB : 1 * MiB + 4] == b"NEW!"
    assert read_file(p)[1 * MiB : 1 * MiB + 4] == b"NEW!"


@pytest.mark.parametrize("block", [10_000, 100_000])
def test_concurrent_writers_in_threads(fuse_dir, block):
    """Eight threads write eight files, and one shared file at interleaved disjoint offsets, at once."""
    import threading

    for rnd in range(3):
        errors: list[BaseException] = []
        shared = fuse_dir / f"shared{rnd}"
        write_file(shared, b"")

        def work(i: int, rnd: int = rnd, shared=shared, errors=errors) -> None:
            try:
                data = rand_bytes(8 * block, ("thr", rnd, i))
                write_file(fuse_dir / f"f{rnd}-{i}", data)
                fd = os.open(shared, os.O_WRONLY)
                try:
                    for k in range(8):
                        os.pwrite(fd, data[k * block : (k + 1) * block], (k * 8 + i) * block)
                finally:
                    os.close(fd)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for i in range(8):
            assert read_file(fuse_dir / f"f{rnd}-{i}") == rand_bytes(8 * block, ("thr", rnd, i)), f"round {rnd} f{i}"
        got = read_file(shared)
        assert len(got) == 64 * block
        bad = []
        for i in range(8):
            data = rand_bytes(8 * block, ("thr", rnd, i))
            for k in range(8):
                off = (k * 8 + i) * block
                if got[off : off + block] != data[k * block : (k + 1) * block]:
                    bad.append((i, k, off))
        assert not bad, f"round {rnd}: blocks (thread, block, offset) read back wrong: {bad}"


def test_statfs_space_comes_back_after_unlink(shared_mount, fuse_dir):
    def used():
        sv = os.statvfs(shared_mount.mnt)
        return (sv.f_blocks - sv.f_bfree) * sv.f_frsize

    base = used()
    write_file(fuse_dir / "big", rand_bytes(24 * MiB, "reclaim"), fsync=True)
    grown = used()
    assert grown - base >= 23 * MiB
    os.unlink(fuse_dir / "big")
    deadline = time.monotonic() + 10
    while used() > base + 4 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert used() <= base + 4 * MiB, f"used: {base} before, {grown} with the file, {used()} after unlink"


# ------------------------------------------------------------------------------ write-only (direct) handles


def test_write_only_handle_costs_one_request_per_write(tmp_path, fuse_watchdog):
    """A write-only handle is opened with direct_io: the kernel sends each write() on its own, not after
    a getxattr(security.capability) as on its buffered path (half the requests of a sequential write)."""
    from fuse_helpers import FuseMount

    m = FuseMount(tmp_path / "data", tmp_path / "mnt", ssd="0", extra=["--debug"]).start()
    fuse_watchdog.watch(m)
    try:
        data = rand_bytes(64 * KiB, "direct")
        fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(8):
                assert os.pwrite(fd, data[i * 8 * KiB : (i + 1) * 8 * KiB], i * 8 * KiB) == 8 * KiB
        finally:
            os.close(fd)
        assert read_file(m.mnt / "f") == data
    finally:
        m.stop()
    requests = [line.split("opcode: ")[1].split()[0] for line in m.lines if "opcode: " in line]
    assert requests.count("WRITE") == 8, requests
    assert "GETXATTR" not in requests, f"getxattr requests next to the writes: {requests}"


def test_direct_writes_reach_other_handles_and_their_mappings(fuse_dir):
    """Pages another handle cached (read, or mapped) show what a write-only handle wrote since."""
    import mmap

    p = fuse_dir / "f"
    write_file(p, b"A" * (2 * MiB))
    reader = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(reader, 4, MiB) == b"AAAA"  # now in the page cache
        with mmap.mmap(reader, 0, access=mmap.ACCESS_READ) as mapped:
            assert mapped[:4] == b"AAAA"
            writer = os.open(p, os.O_WRONLY)
            try:
                os.pwrite(writer, b"BBBB", MiB)
                assert os.pread(reader, 4, MiB) == b"BBBB"
                os.pwrite(writer, b"CCCC", 0)
                assert mapped[:4] == b"CCCC"
            finally:
                os.close(writer)
    finally:
        os.close(reader)


def _write_without_fsetid(path, *, wait_first: bool = False) -> subprocess.Popen:
    """A child (root, but without CAP_FSETID, like any user's writer) that opens ``path`` write-only
    and writes a byte to it; with ``wait_first``, it writes only after a line on its stdin."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_FSETID")
    script = (
        "import os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_WRONLY)\n"
        "print('open', flush=True)\n"
        f"{'sys.stdin.readline()' if wait_first else ''}\n"
        "os.write(fd, b'y')\n"
        "os.close(fd)\n"
    )
    argv = ["setpriv", "--bounding-set=-fsetid", "--inh-caps=-fsetid", sys.executable, "-c", script]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "open\n"
    return child


@pytest.mark.parametrize("mode, left", [(0o6775, 0o775), (0o4755, 0o755), (0o2755, 0o755), (0o2745, 0o2745)])
def test_write_by_unprivileged_writer_clears_set_id_bits(fuse_dir, mode, left):
    """As on a disk filesystem: set-user-ID goes, set-group-ID too where group execute is set (without
    it, only for writers outside the file's group: this one is in it)."""
    p = fuse_dir / "f"
    write_file(p, b"x")
    os.chmod(p, mode)
    assert _write_without_fsetid(p).wait(timeout=30) == 0
    assert stat.S_IMODE(os.stat(p).st_mode) == left


def test_chmod_u_s_while_a_write_only_handle_is_open_is_cleared_by_its_write(fuse_dir):
    """The handle was opened direct (no set-ID bits then); its next write clears the bits a chmod set
    since, as the kernel does before a buffered write."""
    p = fuse_dir / "f"
    write_file(p, b"x")
    os.chmod(p, 0o775)
    child = _write_without_fsetid(p, wait_first=True)
    try:
        os.chmod(p, 0o6775)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o6775
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o775
    assert read_file(p) == b"y"


def test_appends_not_yet_copied_are_seen_by_reads_overwrites_and_truncation(fuse_dir):
    """Appending writes are copied into their chunk buffer later (on the thread that stores a full
    chunk); a read, an overwrite or a truncation in between must see them, as must what is stored."""
    p = fuse_dir / "f"
    model = bytearray()
    writer = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    other = os.open(p, os.O_RDWR)
    try:
        for i in range(5):  # 40 KiB appends: chunks of 64 KiB fill, go to the store, and start again
            piece = rand_bytes(40 * KiB, ("append", i))
            os.write(writer, piece)
            model += piece
            assert os.pread(other, 8 * KiB, len(model) - 8 * KiB) == bytes(model[-8 * KiB :])
        os.pwrite(writer, b"X" * 100, 130 * KiB)  # inside the last, partly filled chunk
        model[130 * KiB : 130 * KiB + 100] = b"X" * 100
        os.ftruncate(other, 150 * KiB)
        del model[150 * KiB :]
        piece = rand_bytes(30 * KiB, "after")
        os.pwrite(writer, piece, len(model))
        model += piece
        assert os.pread(other, len(model) + 10, 0) == bytes(model)
    finally:
        os.close(writer)
        os.close(other)
    assert read_file(p) == bytes(model)
