"""``mooncakefs cp`` into and out of a real FUSE mount: byte-exact trees, cp's rules for where things
land, clear refusals, and a progress bar only on a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env
from test_cli import BAR, Pty

from mooncakefs import copy


def cp(*args: str | Path, stderr_tty: bool = False, cwd: Path | None = None) -> tuple[int, str]:
    """Run ``mooncakefs cp ARGS``; (exit status, what it wrote on stderr)."""
    argv = [sys.executable, "-m", "mooncakefs.cli", "cp", *map(str, args)]
    if not stderr_tty:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, env=child_env(), stdin=subprocess.DEVNULL, cwd=cwd
        )
        return done.returncode, done.stderr
    terminal = Pty()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal.slave, env=child_env()
        )
        terminal.child_started()
        proc.wait(timeout=300)
    finally:
        terminal.close()
    return proc.returncode, terminal.text


def make_tree(root: Path) -> dict[str, bytes]:
    """A small checkpoint-like tree: shards of uneven sizes, an empty file, a nested dir, a symlink."""
    files = {
        "config.json": b'{"layers": 2}',
        "empty": b"",
        "shards/00.bin": os.urandom(9 << 20),
        "shards/01.bin": os.urandom((4 << 20) + 1),
        "shards/deep/tail.bin": os.urandom(777),
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "shards" / "00.bin").chmod(0o600)
    (root / "latest").symlink_to("shards/00.bin")
    return files


def test_a_tree_goes_into_the_mount_and_back_byte_exact(mount_factory, tmp_path):
    mnt = mount_factory(chunk_size="1MiB").mnt
    src = tmp_path / "ckpt"
    files = make_tree(src)
    status, err = cp("-r", src, mnt)
    assert status == 0 and err == "", err  # unattended: silent
    status, err = cp("-r", "-v", mnt / "ckpt", tmp_path / "back")
    assert status == 0 and "copied 5 files" in err, err
    for root in (mnt / "ckpt", tmp_path / "back"):
        for name, data in files.items():
            assert (root / name).read_bytes() == data, (root, name)
        assert os.readlink(root / "latest") == "shards/00.bin"
        assert (root / "shards" / "00.bin").stat().st_mode & 0o777 == 0o600
        assert (root / "config.json").stat().st_mtime == pytest.approx((src / "config.json").stat().st_mtime, abs=1)


def test_a_long_copy_shows_a_bar_on_a_terminal(mount_factory, tmp_path):
    mnt = mount_factory().mnt
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 << 20))
    status, text = cp(big, mnt / "big.bin", stderr_tty=True)
    assert status == 0, text
    assert "copying 1 files" in text and BAR in text, text
    assert (mnt / "big.bin").read_bytes() == big.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing", "out"], "no such file or directory"),
        (["dir", "out"], "is a directory: use -r"),
        (["a", "b", "not-a-dir"], "needs DEST to be an existing directory"),
        (["-r", "dir", "dir/inner"], "into itself"),
        (["a", "a"], "are the same file"),  # cp truncated it to 0 bytes, and said nothing
        (["a", "."], "are the same file"),
        (["a", "link-to-a"], "are the same file"),
        (["link-to-a", "link-to-a"], "are the same file"),  # the link was unlinked, then read
    ],
)
def test_refusals_are_clear_and_write_nothing(tmp_path, args, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    (tmp_path / "link-to-a").symlink_to("a")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    status, err = cp(*args, cwd=tmp_path)
    assert status != 0 and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "a").read_bytes() == b"a" and os.readlink(tmp_path / "link-to-a") == "a"


def test_the_plan_follows_cps_rules(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"12345")
    into = copy.plan([tmp_path / "f"], tmp_path / "d", recursive=False)
    assert [(i.dst, i.kind, i.size) for i in into] == [(tmp_path / "d" / "f", "file", 5)]
    renamed = copy.plan([tmp_path / "f"], tmp_path / "g", recursive=False)
    assert [i.dst for i in renamed] == [tmp_path / "g"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(copy.CopyError, match="not a regular file"):
        copy.plan([fifo], tmp_path / "d", recursive=False)
