"""Errors carry their errno and exit status (``mooncakefs.errors.ERRORS``): the table itself, the CLI's
exit statuses and one-line messages, and the filesystem's errno, with real processes and a real etcd."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, wait_until
from fuse_helpers import FuseMount, expect_errno, require_fuse
from node_helpers import EtcdCluster, NodeProcess, free_port

import mooncakefs
from mooncakefs import errors
from mooncakefs.errors import (
    ERRORS,
    EX_NOINPUT,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    EtcdUnavailable,
    Fenced,
    InvalidKey,
    KeyNotFound,
    MooncakeError,
    NotNewer,
    Rejoining,
    StoreLocked,
    Unavailable,
    errno_of,
    exit_code_of,
)


def _every_error_class() -> list[type[MooncakeError]]:
    for info in pkgutil.walk_packages(mooncakefs.__path__, "mooncakefs."):  # errors defined anywhere count
        if not info.name.startswith(("mooncakefs.fuse", "mooncakefs.compat")):  # (need libfuse; optional)
            with contextlib.suppress(ImportError):
                importlib.import_module(info.name)
    out, todo = [], [MooncakeError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def test_every_error_class_has_an_errno_and_an_exit_status():
    classes = _every_error_class()
    assert len(classes) >= 20
    for cls in classes:
        assert cls.errno in errno.errorcode, cls
        assert 1 <= cls.exit_code <= 125 and cls.exit_code != 2, cls  # 2 is click's usage error
        listed = next(base for base in cls.__mro__ if base in ERRORS)
        assert (cls.errno, cls.exit_code) == ERRORS[listed], f"{cls.__name__} does not take {listed.__name__}'s row"


@pytest.mark.parametrize(
    ("cls", "code", "status"),
    [
        (MooncakeError, errno.EIO, 1),
        (KeyNotFound, errno.ENOENT, EX_NOINPUT),
        (NotNewer, errno.EEXIST, 1),  # a KeyExists
        (InvalidKey, errno.EINVAL, EX_USAGE),
        (Unavailable, errno.ETIMEDOUT, EX_UNAVAILABLE),
        (EtcdUnavailable, errno.ETIMEDOUT, EX_UNAVAILABLE),  # its first base is EtcdError: listed on purpose
        (Fenced, errno.EAGAIN, EX_TEMPFAIL),
        (Rejoining, errno.EAGAIN, EX_TEMPFAIL),
        (StoreLocked, errno.EBUSY, EX_TEMPFAIL),
    ],
)
def test_rows(cls, code, status):
    assert (cls.errno, cls.exit_code) == (code, status)
    exc = cls.__new__(cls)
    assert (errno_of(exc), exit_code_of(exc)) == (code, status)


def test_other_exceptions():
    assert errno_of(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert errno_of(RuntimeError("bug")) == errno.EIO and exit_code_of(RuntimeError("bug")) == 1
    assert isinstance(Unavailable("x"), ConnectionError)  # the builtin it also is, unchanged
    assert errors.Unavailable("x").errno == errno.ETIMEDOUT


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )


def test_cli_etcd_away_is_a_one_line_error_with_its_exit_status():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = _cli("status", "--etcd", url, "--cluster", "gone")
    assert out.returncode == EX_UNAVAILABLE, out
    assert "Traceback" not in out.stderr and out.stderr.startswith("Error: ") and out.stderr.count("\n") == 1, out
    assert url in out.stderr
    out = _cli("status", "--etcd", url, "--cluster", "gone", "--json")
    assert out.returncode == EX_UNAVAILABLE and '"error"' in out.stdout and "Traceback" not in out.stderr, out


def test_cli_node_away_and_locked_data_dir(tmp_path):
    out = _cli("status", "--node", f"unix://{tmp_path}/no.sock")
    assert out.returncode == EX_UNAVAILABLE and "Traceback" not in out.stderr, out
    with mooncakefs.open(tmp_path / "d", dram="8MiB", ssd="16MiB"):
        out = _cli("fsck", "--data", str(tmp_path / "d"))
    assert out.returncode == EX_TEMPFAIL and "in use by" in out.stderr, out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")
def test_a_cluster_mount_with_etcd_away_fails_calls_with_etimedout_not_an_internal_error(tmp_path):
    require_fuse()
    etcd = EtcdCluster().start()
    node = NodeProcess(
        tmp_path, name="n0", dram="48MiB", extra=("--etcd", etcd.url, "--cluster", "away", "--lease-ttl", "3")
    )
    url = f"etcd://{etcd.url.replace('http://', '')}/away"
    mount = FuseMount(None, tmp_path / "mnt", dram=None, ssd=None, chunk_size="1MiB", extra=[url, "--replicas", "1"])
    try:
        node.start()

        def mapped() -> bool:
            try:
                with mooncakefs.connect(url) as probe:
                    return len(probe.map.nodes) == 1
            except Unavailable:
                return False

        assert wait_until(mapped, timeout=30, interval=0.2)
        mount.start(timeout=30)
        (mount.mnt / "before").write_bytes(b"x")
        etcd.stop()
        expect_errno(errno.ETIMEDOUT, os.mkdir, mount.mnt / "during")
        expect_errno(errno.ETIMEDOUT, os.stat, mount.mnt / "unknown")
        Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets its inodes: no reply to fail
        assert not wait_until(lambda: not mount.alive, timeout=2, interval=0.2), mount.describe()
        assert mount.alive, mount.describe()
        assert "internal error" not in mount.output and "Traceback" not in mount.output, mount.describe()
        assert "ETIMEDOUT" not in mount.output  # the log names etcd, not the errno
        etcd.start()
        assert wait_until(lambda: _mkdir(mount.mnt / "after"), timeout=30, interval=0.5), mount.describe()
    finally:
        mount.stop()
        node.kill()
        etcd.close()


def _mkdir(path) -> bool:
    try:
        os.mkdir(path)
        return True
    except OSError:
        return False
