"""Hypothesis state machine: the same random file operations on the mount and on a local directory
(the kernel's own filesystem), comparing every result or errno, and the whole tree after each step.

One mount (64 KiB chunks, so small writes cross chunk boundaries) serves the whole run; each example
works in a fresh subdirectory of it and of a local temporary directory.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import os
import shutil
import stat
import tempfile

from conftest import rand_bytes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

NAMES = ["a", "b", "d", "e"]
paths_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
offsets_st = st.one_of(st.integers(0, 70_000), st.sampled_from([65_535, 65_536, 131_072, 200_000]))
sizes_st = st.one_of(st.integers(0, 3000), st.sampled_from([1, 4096, 65_536, 65_537, 140_000]))


def outcome(fn, *args):
    """("ok", result) or ("err", errno name): what a call did, comparable across filesystems."""
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def _create(path):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _write(path, offset, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _read(path, offset, size):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def tree(root: str) -> dict:
    """relative path -> ("dir",) or ("file", size, sha256)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st_ = os.lstat(p)
            assert stat.S_ISREG(st_.st_mode)
            with open(p, "rb") as fh:
                data = fh.read()
            assert len(data) == st_.st_size, f"{p}: st_size {st_.st_size} but read {len(data)} bytes"
            out[os.path.normpath(os.path.join(rel, f))] = ("file", st_.st_size, hashlib.sha256(data).hexdigest())
    return out


class FsMachine(RuleBasedStateMachine):
    MOUNT = None  # set by the test: the mount's root
    LOCAL = None  # a local scratch directory
    counter = itertools.count()
    tally: collections.Counter = collections.Counter()  # (rule, "ok"/errno): how often, for the summary

    def __init__(self):
        super().__init__()
        n = next(self.counter)
        self.fuse = os.path.join(self.MOUNT, f"ex{n}")
        self.local = os.path.join(self.LOCAL, f"ex{n}")
        os.mkdir(self.fuse)
        os.mkdir(self.local)

    def teardown(self):
        shutil.rmtree(self.local, ignore_errors=True)

    def both(self, fn, args_by_root):
        """Run ``fn`` on both trees (``args_by_root(root)`` gives the arguments) and compare outcomes."""
        a = outcome(fn, *args_by_root(self.local))
        b = outcome(fn, *args_by_root(self.fuse))
        assert b == a, f"{fn.__name__}: local {a!r}, mount {b!r}"
        self.tally[(fn.__name__, a[0] if a[0] == "ok" else a[1])] += 1
        return b

    # -- choosing paths: mostly existing entries (so operations succeed and build state), sometimes any
    # path of the small name space (so the error paths are compared too)

    def _entries(self):
        files, dirs = [], []
        for dirpath, dirnames, filenames in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            dirs += [os.path.normpath(os.path.join(rel, d)) for d in dirnames]
            files += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
        return sorted(files), sorted(dirs)

    def _path(self, data, *, files=False, dirs=False, new=False, label="path"):
        existing_files, existing_dirs = self._entries()
        choices = [paths_st]
        if files and existing_files:
            choices += [st.sampled_from(existing_files)] * 6
        if dirs and existing_dirs:
            choices += [st.sampled_from(existing_dirs)] * 4
        if new:
            parents = st.sampled_from(["", *existing_dirs])
            choices += [st.builds(lambda d, n: os.path.join(d, n), parents, st.sampled_from(NAMES))] * 6
        return data.draw(st.one_of(*choices), label=label)

    @rule(data=st.data())
    def create(self, data):
        p = self._path(data, new=True)
        self.both(_create, lambda r: (os.path.join(r, p),))

    @rule(data=st.data(), offset=offsets_st, size=sizes_st, seed=st.integers(0, 1000))
    def write(self, data, offset, size, seed):
        p = self._path(data, files=True, new=True)
        buf = rand_bytes(size, seed)
        self.both(_write, lambda r: (os.path.join(r, p), offset, buf))

    @rule(data=st.data(), size=st.one_of(st.integers(0, 140_000), st.sampled_from([0, 65_536])))
    def truncate(self, data, size):
        p = self._path(data, files=True)
        self.both(os.truncate, lambda r: (os.path.join(r, p), size))

    @rule(data=st.data())
    def rename(self, data):
        src = self._path(data, files=True, dirs=True, label="src")
        dst = self._path(data, files=True, dirs=True, new=True, label="dst")
        self.both(os.rename, lambda r: (os.path.join(r, src), os.path.join(r, dst)))

    @rule(data=st.data())
    def unlink(self, data):
        p = self._path(data, files=True)
        self.both(os.unlink, lambda r: (os.path.join(r, p),))

    @rule(data=st.data())
    def mkdir(self, data):
        p = self._path(data, new=True)
        self.both(os.mkdir, lambda r: (os.path.join(r, p),))

    @rule(data=st.data())
    def rmdir(self, data):
        p = self._path(data, dirs=True)
        self.both(os.rmdir, lambda r: (os.path.join(r, p),))

    @rule(data=st.data(), offset=offsets_st, size=sizes_st)
    def read(self, data, offset, size):
        p = self._path(data, files=True)
        self.both(_read, lambda r: (os.path.join(r, p), offset, size))

    @invariant()
    def same_tree(self):
        local, fuse = tree(self.local), tree(self.fuse)
        assert fuse == local, (
            f"trees differ: only local {sorted(local.keys() - fuse.keys())}, only mount "
            f"{sorted(fuse.keys() - local.keys())}, different "
            f"{ {k: (local[k], fuse[k]) for k in local.keys() & fuse.keys() if local[k] != fuse[k]} }"
        )


def test_mount_matches_local_filesystem(shared_mount, fuse_watchdog, tmp_path):
    fuse_watchdog.watch(shared_mount)
    FsMachine.MOUNT = str(shared_mount.mnt)
    FsMachine.LOCAL = tempfile.mkdtemp(dir=tmp_path)
    FsMachine.tally.clear()
    run_state_machine_as_test(
        FsMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print("examples:", next(FsMachine.counter), "outcomes:", sorted(FsMachine.tally.items()))
