"""Group commits of the mount's namespace: changes are committed together (on a 20 ms timer, and at
fsync, fsyncdir, statfs and unmount), so kill -9 may lose the last group and nothing else; store
objects change only once the names they depend on are committed; a failed group commit turns the mount
read-only.  Also the namespace's groups without a mount: savepoints, rollbacks, what another reader sees."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import trio
from conftest import child_env, rand_bytes
from fuse_helpers import MiB, expect_errno, fsync_dir, read_file, write_file

import mooncakefs
from mooncakefs.fuse.filesystem import MooncakeFS, chunk_key
from mooncakefs.fuse.namespace import ROOT, Namespace

COMMIT_DELAY = 0.02  # mooncakefs.fuse.filesystem.COMMIT_DELAY


def committed_names(db_path) -> set[bytes]:
    """Entry names another process sees in the namespace: what a crash would keep."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return {name for (name,) in db.execute("SELECT name FROM dentries")}


def store_stats(mnt) -> dict:
    return json.loads(read_file(mnt / ".mooncakefs" / "stats.json"))


# ------------------------------------------------------------------------------ the namespace alone


def test_group_is_invisible_until_committed_and_a_failed_change_rolls_back_alone(tmp_path):
    path = tmp_path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    opened: list[int] = []
    ns.group_commits(lambda: opened.append(ns.uncommitted))
    try:
        ns.create(ROOT, b"a", 0o100644, 0, 0)
        ns.create(ROOT, b"b", 0o100644, 0, 0)
        assert opened == [1], "the group's opening was not announced once, at its first change"
        assert ns.uncommitted == 2
        assert committed_names(path) == set(), "grouped changes were committed before commit()"
        with pytest.raises(Exception) as info:
            ns.create(ROOT, b"a", 0o100644, 0, 0)  # EEXIST inside the group
        assert getattr(info.value, "errno", None) == errno.EEXIST
        assert ns.lookup(ROOT, b"b") is not None, "a failed change rolled back the changes before it"
        ns.commit()
        assert committed_names(path) == {b"a", b"b"}
        assert ns.uncommitted == 0
        ns.unlink(ROOT, b"a", rmdir=False)
        assert opened == [1, 1], "a new group after a commit was not announced"
    finally:
        ns.close()
    assert committed_names(path) == {b"b"}, "close() did not commit the open group"


def test_deleting_small_files_writes_no_page_of_zeros_per_file(tmp_path):
    """An unlinked small file's inline page is freed, not overwritten: with SQLite's secure delete (the
    Debian build's default) each one went to the WAL again as zeros, most of an unlink's cost."""
    path = tmp_path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    ns.group_commits(lambda: None)
    try:
        inos = []
        for i in range(200):
            node = ns.create(ROOT, b"f%d" % i, 0o100644, 0, 0)
            node.size = 4096
            ns.set_inline(node.ino, os.urandom(4096), node)
            inos.append(node.ino)
        ns.commit()
        ns.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for i in range(200):
            ns.unlink(ROOT, b"f%d" % i, rmdir=False)
        ns.remove_inodes(inos)
        ns.commit()
        written = os.path.getsize(f"{path}-wal")
    finally:
        ns.close()
    assert written < 50 * 4096, f"deleting 200 small files wrote {written // 4096} pages to the WAL"


def test_without_grouping_every_change_commits(tmp_path):
    path = tmp_path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    try:
        node = ns.create(ROOT, b"a", 0o100644, 0, 0)
        node.size = 5
        ns.update(node)  # (update() called inside create() must not commit it halfway either)
        assert committed_names(path) == {b"a"}
        assert ns.uncommitted == 0
    finally:
        ns.close()


class Caller:
    """The requesting process of a handler call (what pyfuse3 passes as ``ctx``)."""

    uid, gid, pid, umask = os.getuid(), os.getgid(), os.getpid(), 0o022


def _size_fields() -> object:
    """pyfuse3.SetattrFields with only ``update_size`` set (a truncate)."""
    fields = type("Fields", (), {"update_size": True})()
    for name in ("mode", "uid", "gid", "atime", "mtime", "ctime"):
        setattr(fields, f"update_{name}", False)
    return fields


def committed_chunks(db_path) -> set[tuple[int, int]]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return set(db.execute("SELECT ino, idx FROM chunks"))


def test_chunk_records_join_the_group_only_where_asked(tmp_path):
    """A sequential write records a chunk every few milliseconds: grouped, those records cost one
    commit per group instead of one each.  Ungrouped, a record commits at once, with the group."""
    path = tmp_path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    ns.group_commits(lambda: None)
    try:
        ino = ns.create(ROOT, b"f", 0o100644, 0, 0).ino
        ns.commit()
        ns.add_chunks(ino, [0], grouped=True)
        ns.add_chunks(ino, [1], grouped=True)
        assert ns.uncommitted == 2
        assert committed_chunks(path) == set(), "grouped chunk records were committed at once"
        ns.add_chunks(ino, [2])
        assert ns.uncommitted == 0
        assert committed_chunks(path) == {(ino, 0), (ino, 1), (ino, 2)}
    finally:
        ns.close()


def test_a_clean_session_is_told_apart_from_a_crashed_one(tmp_path):
    path = tmp_path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    assert not ns.open_session(), "a new namespace passed for one whose last mount ended cleanly"
    ns.close_session()
    ns.close()
    ns = Namespace(path, chunk_size=MiB)
    assert ns.open_session(), "a closed session was not seen as clean"
    ns.close()  # no close_session: as after kill -9
    ns = Namespace(path, chunk_size=MiB)
    try:
        assert not ns.open_session(), "a session that never closed was seen as clean"
    finally:
        ns.close()


def _on_three_chunks_in_a_group(fs: MooncakeFS, then) -> None:
    """Serve ``fs``'s handlers in this process, make file "f" of three 1 MiB chunks (fsync'd), open a
    namespace group with a mkdir, then ``await then(attrs of f, caller)`` before serving stops."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fs.start_serving(nursery)
            caller = Caller()
            info, attrs = await fs.create(ROOT, b"f", 0o644, os.O_WRONLY, caller)
            await fs.write(info.fh, 0, rand_bytes(3 * MiB, "chunks"))
            await fs.fsync(info.fh, False)
            await fs.release(info.fh)
            await fs.mkdir(ROOT, b"opens-a-group", 0o755, caller)
            await then(attrs, caller)
            fs.stop_serving()

    trio.run(main)


@pytest.mark.parametrize("how", ["unlink", "O_TRUNC", "truncate, then rewrite small"])
def test_chunks_leave_the_store_only_after_the_namespace_forgot_them(tmp_path, how):
    """The handlers of a serving mount, called in this process over a real store: whenever a chunk is
    removed from the store, the committed namespace (what a crash would keep) no longer records it
    under a file that has a name, nor gives that file a size that reaches into it (zeros where data
    was) unless its inline row holds those bytes.  Each way a chunk leaves is triggered with a group still open."""
    store = mooncakefs.open(tmp_path / "data", dram="64MiB", ssd="256MiB")
    path = store.path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    fs = MooncakeFS(store, ns)
    removed: list[bytes] = []

    def committed_chunk_of_named_file(key: bytes) -> bool:
        ino, idx = int.from_bytes(key[-16:-8], "big"), int.from_bytes(key[-8:], "big")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute(
                "SELECT nlink FROM inodes JOIN chunks USING (ino) WHERE ino = ? AND idx = ?", (ino, idx)
            ).fetchone()
        return row is not None and row[0] > 0

    real_remove = store.remove

    def committed_size_reaches(key: bytes) -> bool:
        ino, idx = int.from_bytes(key[-16:-8], "big"), int.from_bytes(key[-8:], "big")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute("SELECT nlink, size FROM inodes WHERE ino = ?", (ino,)).fetchone()
            inline = db.execute("SELECT 1 FROM inline WHERE ino = ?", (ino,)).fetchone()  # chunk 0's truth
        return row is not None and row[0] > 0 and row[1] > idx * MiB and not (idx == 0 and inline)

    def remove(key):  # a spy: the real store removes the chunk, after the check
        assert not committed_chunk_of_named_file(bytes(key)), f"{how}: a chunk left before its name did"
        assert not committed_size_reaches(bytes(key)), f"{how}: a chunk left while the committed size covered it"
        removed.append(bytes(key))
        return real_remove(key)

    store.remove = remove  # type: ignore[method-assign]

    async def forget_the_chunks(attrs, caller) -> None:
        if how == "unlink":
            await fs.unlink(ROOT, b"f", caller)
            await fs.forget([(attrs.st_ino, 1)])
            await fs.statfs(caller)  # deletes the forgotten inode at once
        elif how == "O_TRUNC":
            info = await fs.open(attrs.st_ino, os.O_WRONLY | os.O_TRUNC, caller)
            await fs.release(info.fh)
        else:
            attrs.st_size = 1000
            await fs.setattr(attrs.st_ino, attrs, _size_fields(), None, caller)  # chunks 1 and 2 go
            info = await fs.open(attrs.st_ino, os.O_WRONLY, caller)
            await fs.write(info.fh, 0, b"small now")
            await fs.release(info.fh)  # its bytes go inline, and chunk 0 goes

    try:
        _on_three_chunks_in_a_group(fs, forget_the_chunks)
        assert removed, f"{how} removed no chunk from the store"
    finally:
        fs.shutdown()
        ns.close()
        store.close()


def test_a_trimmed_last_chunk_is_stored_only_after_the_new_size_is_committed(tmp_path):
    """A truncation inside a file's last chunk drops no whole chunk, only stores that chunk shorter: a
    crash must not keep the old size over the shortened chunk (zeros where data was), so the new size
    is committed before the shorter chunk replaces the old one."""
    store = mooncakefs.open(tmp_path / "data", dram="64MiB", ssd="256MiB")
    path = store.path / "fs.sqlite"
    ns = Namespace(path, chunk_size=MiB)
    fs = MooncakeFS(store, ns)
    trimmed: list[tuple[int, int]] = []
    real_put = store.put

    def committed_size(ino: int) -> int:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT size FROM inodes WHERE ino = ?", (ino,)).fetchone()[0]

    def put(key, value, **options):  # a spy: checks a chunk stored shorter than it was, then stores it
        raw = bytes(key)
        if raw.startswith(bytes(chunk_key(0, 0))[:-16]) and raw in store.raw_index():
            ino, idx, n = int.from_bytes(raw[-16:-8], "big"), int.from_bytes(raw[-8:], "big"), len(value)
            if n < store.stat(key).size:
                trimmed.append((ino, idx))
                assert committed_size(ino) <= idx * MiB + n, "a chunk was cut while the committed size covered it"
        return real_put(key, value, **options)

    store.put = put  # type: ignore[method-assign]

    async def truncate_inside_the_last_chunk(attrs, caller) -> None:
        attrs.st_size = 2 * MiB + 1000  # inside chunk 2: no whole chunk goes
        await fs.setattr(attrs.st_ino, attrs, _size_fields(), None, caller)

    try:
        _on_three_chunks_in_a_group(fs, truncate_inside_the_last_chunk)
        assert trimmed, "the truncation stored no shorter chunk"
    finally:
        fs.shutdown()
        ns.close()
        store.close()


# ---------------------------------------------------------------------------------- kill -9, mounted


@pytest.mark.parametrize("sync_point", ["fsyncdir", "fsync", "statfs"])
def test_sync_points_keep_every_change_through_kill9(mount_factory, sync_point):
    """What fsyncdir, fsync (of any file) and statfs returned for survives kill -9, however recent."""
    m = mount_factory()
    d = m.mnt / "d"
    os.mkdir(d)
    files = {f"f{i}": rand_bytes(100 + i, ("sync", i)) for i in range(30)}
    for name, data in files.items():
        write_file(d / name, data)
    os.rename(d / "f0", d / "renamed")
    files["renamed"] = files.pop("f0")
    if sync_point == "fsyncdir":
        fsync_dir(d)
    elif sync_point == "fsync":
        write_file(m.mnt / "other", b"x", fsync=True)
    else:
        os.statvfs(m.mnt)
    m.kill9()
    m.start()
    assert sorted(os.listdir(d)) == sorted(files), f"entries lost by kill -9 after {sync_point}"
    for name, data in files.items():
        assert read_file(d / name) == data, f"{name}: contents lost by kill -9 after {sync_point}"


WRITER = r"""
import os, sys, time
d, log, pause_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(log, "w") as out:
    for i in range(1_000_000):
        if i == pause_after:
            time.sleep(1.0)  # 50x the commit delay: a group commit must have run meanwhile
        try:
            with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
                f.write(i.to_bytes(8, "big") * 64)
        except OSError:
            break
        out.write(f"{i}\n")
        out.flush()
"""


def test_kill9_loses_only_the_last_group(mount_factory, tmp_path):
    """A writer creating files one after another, never syncing, when the daemon is killed: the files
    that come back are a prefix of what it wrote (the namespace as it was at one commit: no gaps),
    whole except perhaps the last (created, its close not yet committed), and they include every file
    closed before the writer paused for a second (the commit timer ran meanwhile)."""
    m = mount_factory()
    d = m.mnt / "w"
    os.mkdir(d)
    log = tmp_path / "closed.txt"
    pause_after = 100
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(log), str(pause_after)], env=child_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().split()) < 2 * pause_after):
            time.sleep(0.02)
        m.kill9()
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
    assert len(log.read_text().split()) >= 2 * pause_after, "the writer did not get going"
    m.start()
    assert d.is_dir(), "the directory made before the writer started was lost"
    names = sorted(os.listdir(d))
    assert names == [f"f{i:06d}" for i in range(len(names))], f"not a prefix of what was written: {names[-5:]}"
    assert len(names) >= pause_after, f"only {len(names)} files came back: the ones before the pause were lost"
    for i, name in enumerate(names):
        got = read_file(d / name)
        if got != i.to_bytes(8, "big") * 64:
            assert i == len(names) - 1 and got == b"", f"{name} is neither whole nor the last, empty file"


def test_unlink_then_kill9_never_leaves_a_name_without_its_bytes(mount_factory):
    """Files of several chunks, fsync'd, then unlinked at different moments before kill -9: after it,
    each is either gone or intact (its chunks left the store only after its unlink was committed), and
    once the next mount has collected what was left nameless, the store holds no chunk the namespace
    does not know."""
    m = mount_factory(chunk_size="1MiB")
    files = {f"f{i}": rand_bytes(3 * MiB + i, ("unlink", i)) for i in range(6)}
    for name, data in files.items():
        write_file(m.mnt / name, data, fsync=True)
    fsync_dir(m.mnt)
    for i, name in enumerate(files):
        os.unlink(m.mnt / name)
        time.sleep(i * 0.008)  # 0 to 40 ms: before, around and after the reap and commit timers
    m.kill9()
    m.start()
    for name, data in files.items():
        if (m.mnt / name).exists():
            assert read_file(m.mnt / name) == data, f"{name} came back after kill -9 without its bytes"
    stats = store_stats(m.mnt)
    assert stats["objects"] == stats["fs"]["chunks"], f"chunks leaked in the store: {stats}"


# ---------------------------------------------------------------------------------- a failed commit


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 4 MiB tmpfs for the data dir (the namespace), so that filling it makes SQLite's commits fail."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "tiny"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(64 * 1024))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_failed_group_commit_turns_the_mount_read_only(mount_factory, tmp_path, tiny_tmpfs):
    """A group commit that fails (the namespace's disk is full) loses the group: the daemon says so in
    its log, fsyncdir answers ENOSPC, every change is refused (EROFS) while reads go on, and the next
    mount works again without the lost files."""
    m = mount_factory(data=str(tiny_tmpfs / "data"), ssd=f"{tmp_path / 'ssd'}:64MiB")
    write_file(m.mnt / "kept", b"committed before the disk filled", fsync=True)
    fill(tiny_tmpfs)
    for i in range(200):  # ~1 MiB of WAL pages: more than the disk has left
        try:
            write_file(m.mnt / f"lost{i}", rand_bytes(4000, ("lost", i)))
        except OSError as exc:  # a timed commit failed meanwhile: EROFS from then, ENOSPC for a close then
            assert exc.errno in (errno.EROFS, errno.ENOSPC), f"lost{i}: {errno.errorcode.get(exc.errno)}"
            break
    expect_errno(errno.ENOSPC, fsync_dir, m.mnt)
    deadline = time.monotonic() + 10
    while "read-only" not in m.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "namespace changes failed" in m.output and "read-only" in m.output, m.output[-3000:]
    expect_errno(errno.EROFS, os.mkdir, m.mnt / "d")
    expect_errno(errno.EROFS, write_file, m.mnt / "new", b"x")
    expect_errno(errno.EROFS, os.unlink, m.mnt / "kept")
    assert read_file(m.mnt / "kept") == b"committed before the disk filled"
    os.unlink(tiny_tmpfs / "filler")
    assert m.unmount() == 0, m.describe()
    m.start()
    assert set(os.listdir(m.mnt)) - {".kv", ".mooncakefs"} == {"kept"}, "the lost group came back"
    write_file(m.mnt / "after", b"works again", fsync=True)
    assert read_file(m.mnt / "after") == b"works again"


def test_chunks_a_crash_left_unrecorded_are_removed_by_the_next_mount(mount_factory):
    """Chunk records wait for the group commit, so kill -9 may leave chunks in the store (on the SSD
    tier) that no record names: of a file whose record was in the lost group, or of an inode that group
    created.  The next mount removes them (here put in place while the daemon is down), and only them."""
    m = mount_factory(chunk_size="1MiB")
    data = rand_bytes(3 * MiB + 5, "kept")
    write_file(m.mnt / "kept", data, fsync=True)
    ino = os.stat(m.mnt / "kept").st_ino
    m.kill9()
    store = mooncakefs.open(m.data, dram="64MiB", ssd="256MiB")
    try:
        for stray in (chunk_key(ino, 9), chunk_key(ino + 1000, 0)):
            store.put(stray, rand_bytes(MiB, bytes(stray)))
    finally:
        store.close()
    m.start()
    assert read_file(m.mnt / "kept") == data
    stats = store_stats(m.mnt)
    assert stats["objects"] == stats["fs"]["chunks"] == 4, f"chunks leaked in the store: {stats}"
    assert "removed 2 file chunks" in m.output


@pytest.mark.parametrize("grow", ["truncate", "write past its end"])
def test_a_chunk_a_crash_left_longer_than_its_file_is_cut_by_the_next_mount(mount_factory, grow):
    """A truncation commits the new size before it cuts the last chunk, so kill -9 between the two
    leaves that chunk longer than its file (here put back in place while the daemon is down).  The
    next mount cuts it: a file grown again reads zeros past its old end, not the bytes cut away."""
    m = mount_factory(chunk_size="1MiB")
    data = rand_bytes(MiB + 100 * 1024, "cut")
    write_file(m.mnt / "f", data, fsync=True)
    ino = os.stat(m.mnt / "f").st_ino
    m.kill9()
    store = mooncakefs.open(m.data, dram="64MiB", ssd="256MiB")
    try:
        store.put(chunk_key(ino, 1), data[MiB:] + b"\xab" * (2 * MiB - len(data)))  # as before its cut
    finally:
        store.close()
    m.start()
    if grow == "truncate":
        os.truncate(m.mnt / "f", 3 * MiB)
    else:
        with open(m.mnt / "f", "r+b") as f:
            f.seek(3 * MiB - 1)
            f.write(b"\0")
    assert read_file(m.mnt / "f") == data + bytes(3 * MiB - len(data)), "bytes cut away came back"
