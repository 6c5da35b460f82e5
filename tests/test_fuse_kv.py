"""The KV API's objects under ``/.kv/`` (read-only, escaped names) and ``/.mooncakefs/stats.json``."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from conftest import rand_bytes
from fuse_helpers import LONG_NAME_RE, MiB, expect_errno, kv_escape, read_file, write_file

# key -> value; the keys cover every escaping rule
KV_OBJECTS: dict = {
    "plain": b"plain value",
    "model/layer0/blk-17": rand_bytes(3 * MiB + 7, "blk17"),  # larger than one FUSE read
    "100%": b"percent",
    "tab\there\nnewline": b"controls",
    "del\x7fete": b"del",
    b"\xff\xfebinary": b"invalid utf-8 bytes",
    b"trunc\xc3": b"truncated utf-8 sequence",
    "café/日本語": b"utf-8 kept as is",
    " spaces ~!#$&'()*+,;=@[]": b"printable ascii kept",
    "emoji-\U0001f600": b"4-byte utf-8",
    "empty-value": b"",
    "x" * 255: b"exactly 255 bytes, not cut",
    "y" * 300: b"long ascii key",
    "y" * 290 + "-other": b"same 200-byte prefix, different key",
    "z" * 240 + "/" * 10: b"escaping pushes it over 255",
    b"%2F": b"already looks escaped",
    "%2F": b"dup?",  # same key as b"%2F" (str and bytes share one namespace); last put wins
}


def expected_names() -> dict[bytes, bytes]:
    """File name under /.kv/ -> value, for names that are not cut (<= 255 bytes after escaping)."""
    out = {}
    for key, value in KV_OBJECTS.items():
        name = kv_escape(key)
        if len(name) <= 255:
            out[name] = value
    return out


def long_keys() -> dict[bytes, bytes]:
    """Escaped name (uncut) -> value, for keys whose escaped name is longer than 255 bytes."""
    return {kv_escape(k): v for k, v in KV_OBJECTS.items() if len(kv_escape(k)) > 255}


@pytest.fixture
def kv_mount(mount_factory, tmp_path):
    """A data dir seeded through the KV API (durable puts, store closed), then mounted."""
    import mooncakefs

    data = tmp_path / "data"
    with mooncakefs.open(data, dram="64MiB", ssd="256MiB") as store:
        for key, value in KV_OBJECTS.items():
            store.put(key, value, durable=True)
        assert len(store) == len(KV_OBJECTS) - 1  # b"%2F" and "%2F" are one key
    return mount_factory(data="data", dram="64MiB", ssd="256MiB")


def test_kv_names_escaped(kv_mount):
    kv = os.fsencode(kv_mount.mnt / ".kv")
    listed = set(os.listdir(kv))
    short = expected_names()
    assert short.keys() <= listed, f"missing under /.kv/: {sorted(short.keys() - listed)}"
    extra = listed - short.keys()
    long_names = [n for n in extra if LONG_NAME_RE.match(n)]
    assert len(extra) == len(long_names) == len(long_keys()), f"unexpected names under /.kv/: {sorted(extra)}"
    # long names: the first 200 bytes of the escaped name, '~', 16 hex digits of a hash; all distinct
    heads = sorted(LONG_NAME_RE.match(n).group("head") for n in long_names)
    assert heads == sorted(k[:200] for k in long_keys())
    assert len(set(long_names)) == len(long_names)
    assert all(len(n) == 217 for n in long_names)


def test_kv_sizes_and_contents(kv_mount):
    kv = os.fsencode(kv_mount.mnt / ".kv")
    for name, value in expected_names().items():
        path = kv + b"/" + name
        st = os.stat(path)
        assert st.st_size == len(value), f"{name!r}: st_size {st.st_size}, value is {len(value)} bytes"
        assert read_file(path) == value, f"{name!r}: contents differ"
    # long names: the hash is the implementation's choice, so match values per 200-byte head
    got: dict[bytes, list[bytes]] = {}
    for name in os.listdir(kv):
        m = LONG_NAME_RE.match(name)
        if m:
            assert os.stat(kv + b"/" + name).st_size == len(read_file(kv + b"/" + name))
            got.setdefault(m.group("head"), []).append(read_file(kv + b"/" + name))
    want: dict[bytes, list[bytes]] = {}
    for k, v in long_keys().items():
        want.setdefault(k[:200], []).append(v)
    assert {h: sorted(v) for h, v in got.items()} == {h: sorted(v) for h, v in want.items()}


def test_kv_ls_du_cat(kv_mount):
    kv = kv_mount.mnt / ".kv"
    res = subprocess.run(["ls", "-la", str(kv)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"plain" in res.stdout and b"model%2Flayer0%2Fblk-17" in res.stdout
    res = subprocess.run(["cat", str(kv / "model%2Flayer0%2Fblk-17")], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == KV_OBJECTS["model/layer0/blk-17"]
    res = subprocess.run(["du", "-ab", str(kv)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    sizes = {}
    for line in res.stdout.splitlines():
        size, path = line.split(b"\t", 1)
        sizes[os.path.basename(path)] = int(size)
    for name, value in expected_names().items():
        assert sizes.get(name) == len(value), f"du -ab {name!r}: {sizes.get(name)} (value is {len(value)} bytes)"
    res = subprocess.run(["du", "-sk", str(kv)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    total_kib = int(res.stdout.split()[0])
    assert total_kib >= sum(len(v) for v in KV_OBJECTS.values()) // 1024 - 1, f"du -sk: {total_kib} KiB"


def test_kv_is_read_only(kv_mount):
    mnt = kv_mount.mnt
    kv = mnt / ".kv"
    existing = kv / "plain"
    write_file(mnt / "outside", b"a file outside")
    os.mkdir(mnt / "dir")
    expect_errno(errno.EROFS, os.open, kv / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fd = os.open(existing, os.O_WRONLY)
    except OSError as exc:
        assert exc.errno == errno.EROFS, f"open(.kv/plain, O_WRONLY): {errno.errorcode.get(exc.errno)}"
    else:
        try:
            expect_errno(errno.EROFS, os.write, fd, b"overwrite")
        finally:
            os.close(fd)
    expect_errno(errno.EROFS, os.truncate, existing, 0)
    expect_errno(errno.EROFS, os.unlink, existing)
    expect_errno(errno.EROFS, os.mkdir, kv / "newdir")
    expect_errno(errno.EROFS, os.rename, mnt / "outside", kv / "moved-in")
    expect_errno(errno.EROFS, os.rename, mnt / "dir", kv / "dir-moved-in")
    expect_errno(errno.EROFS, os.rename, existing, mnt / "moved-out")
    expect_errno(errno.EROFS, os.rename, existing, kv / "renamed-inside")
    expect_errno(errno.EROFS, os.symlink, "plain", kv / "symlink")
    expect_errno(errno.EROFS, os.link, mnt / "outside", kv / "hardlink")
    # nothing changed
    assert read_file(existing) == KV_OBJECTS["plain"]
    assert read_file(mnt / "outside") == b"a file outside"
    assert os.path.isdir(mnt / "dir")
    assert set(os.listdir(os.fsencode(kv))) >= set(expected_names())
    for name in (b"new", b"newdir", b"moved-in", b"dir-moved-in", b"renamed-inside", b"symlink", b"hardlink"):
        assert name not in os.listdir(os.fsencode(kv))


def test_kv_missing_name_enoent(kv_mount):
    expect_errno(errno.ENOENT, os.stat, kv_mount.mnt / ".kv" / "no-such-key")
    expect_errno(errno.ENOENT, os.stat, kv_mount.mnt / ".kv" / "plain%")  # not a valid escape of any key


def test_kv_survives_file_activity_and_restart(kv_mount):
    """Writing files on the mount does not disturb the KV objects, nor leak file chunks into /.kv/."""
    mnt = kv_mount.mnt
    before = set(os.listdir(os.fsencode(mnt / ".kv")))
    write_file(mnt / "file", rand_bytes(2 * MiB, "activity"), fsync=True)
    os.unlink(mnt / "file")
    write_file(mnt / "kept", rand_bytes(1 * MiB, "kept"), fsync=True)
    assert set(os.listdir(os.fsencode(mnt / ".kv"))) == before, "file data shows up (or KV objects vanished) in /.kv/"
    kv_mount.restart()
    assert set(os.listdir(os.fsencode(mnt / ".kv"))) == before
    assert read_file(mnt / ".kv" / "model%2Flayer0%2Fblk-17") == KV_OBJECTS["model/layer0/blk-17"]
    assert read_file(mnt / "kept") == rand_bytes(1 * MiB, "kept")


def test_kv_empty_store(mount_factory):
    m = mount_factory()
    assert os.path.isdir(m.mnt / ".kv")
    assert os.listdir(m.mnt / ".kv") == []


# ----------------------------------------------------------------------------------------- statistics


def _stats(mnt) -> dict:
    with open(mnt / ".mooncakefs" / "stats.json") as f:
        text = f.read()
    return json.loads(text)


def test_stats_json(mount_factory):
    m = mount_factory()
    s1 = _stats(m.mnt)
    for key in ("dram", "objects", "ssd"):
        assert key in s1, f"stats.json has no {key!r}: {sorted(s1)}"
    res = subprocess.run(["cat", str(m.mnt / ".mooncakefs" / "stats.json")], capture_output=True, timeout=60)
    assert res.returncode == 0
    assert set(json.loads(res.stdout)) >= {"dram", "objects", "ssd"}
    write_file(m.mnt / "f", rand_bytes(4 * MiB, "stats"), fsync=True)
    s2 = _stats(m.mnt)
    assert s2 != s1, "stats.json did not change after writing and fsyncing 4 MiB"
    if isinstance(s1["objects"], int):
        assert s2["objects"] > s1["objects"]


def test_stats_json_without_ssd(mount_factory):
    m = mount_factory(ssd="0", dram="32MiB")
    s = _stats(m.mnt)
    assert "dram" in s and "objects" in s
