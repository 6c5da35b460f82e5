"""Small files on the mount: their bytes kept inline in the namespace (no chunk object), every way a
file moves between inline bytes and chunks, and ``ls -l`` answered without a request per file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest
from conftest import rand_bytes
from fuse_helpers import KiB, MiB, read_file, write_file

from mooncakefs.errors import MooncakeError
from mooncakefs.fuse.namespace import FORMAT, Namespace

INLINE_MAX = 64 * KiB  # mooncakefs.fuse.filesystem.INLINE_MAX


def stored_chunks(mnt) -> int:
    """Chunk objects the namespace records (inline bytes are not chunks)."""
    return json.loads(read_file(mnt / ".mooncakefs" / "stats.json"))["fs"]["chunks"]


def test_small_files_inline_and_back(mount_factory):
    """Files up to INLINE_MAX store no chunk; growing past it, shrinking into it, a sparse write far
    past inline bytes and a truncation all read back right, also after a restart."""
    m = mount_factory()
    expected: dict[str, bytes] = {}

    small = rand_bytes(4 * KiB, "small")
    write_file(m.mnt / "small", small)
    expected["small"] = small
    edge = rand_bytes(INLINE_MAX, "edge")
    write_file(m.mnt / "edge", edge)
    expected["edge"] = edge
    assert stored_chunks(m.mnt) == 0, "small files were stored as chunks"

    grown = rand_bytes(1000, "grown")
    write_file(m.mnt / "grown", grown)
    more = rand_bytes(200 * KiB, "more")
    with open(m.mnt / "grown", "ab") as f:  # past INLINE_MAX: the inline bytes become chunk 0
        f.write(more)
    expected["grown"] = grown + more

    shrunk = rand_bytes(300 * KiB, "shrunk")
    write_file(m.mnt / "shrunk", shrunk)
    os.truncate(m.mnt / "shrunk", 5000)
    with open(m.mnt / "shrunk", "r+b") as f:  # rewritten while small: its chunk 0 goes inline
        f.write(b"0123456789")
    expected["shrunk"] = b"0123456789" + shrunk[10:5000]

    sparse = rand_bytes(3000, "sparse")
    write_file(m.mnt / "sparse", sparse)
    fd = os.open(m.mnt / "sparse", os.O_WRONLY)
    try:
        os.pwrite(fd, b"tail", 8 * MiB)  # chunk 2 only: the inline bytes must still be chunk 0's
    finally:
        os.close(fd)
    expected["sparse"] = sparse + bytes(8 * MiB - 3000) + b"tail"

    cut = rand_bytes(10_000, "cut")
    write_file(m.mnt / "cut", cut)
    os.truncate(m.mnt / "cut", 100)
    expected["cut"] = cut[:100]
    emptied = rand_bytes(2000, "emptied")
    write_file(m.mnt / "emptied", emptied)
    os.truncate(m.mnt / "emptied", 0)
    os.truncate(m.mnt / "emptied", 50)  # extended again: zeros, not the old inline bytes
    expected["emptied"] = bytes(50)

    for name, data in expected.items():
        assert read_file(m.mnt / name) == data, f"{name}: wrong bytes"
    # grown: 1 chunk (0; its 200 KiB fit in one 4 MiB chunk), sparse: chunks 0 and 2
    assert stored_chunks(m.mnt) == 3
    m.restart()
    for name, data in expected.items():
        assert read_file(m.mnt / name) == data, f"{name}: wrong bytes after a restart"
    for name in expected:
        os.unlink(m.mnt / name)
    assert stored_chunks(m.mnt) == 0


def test_inline_file_fsync_survives_kill9(mount_factory):
    """An fsync'd small file is durable like any other: its inline bytes are in the synced namespace."""
    m = mount_factory()
    data = rand_bytes(6000, "durable-inline")
    write_file(m.mnt / "f", data, fsync=True)
    m.kill9()
    m.start()
    assert read_file(m.mnt / "f") == data


def test_ls_l_sends_no_xattr_request_per_file(mount_factory):
    """``ls -l`` asks every file for its SELinux label and its ACL.  The mount answers EOPNOTSUPP for
    those namespaces, which ls takes as "none on this filesystem" and stops asking, while user.*
    xattrs keep working (the kernel disables getxattr for a mount only on ENOSYS)."""
    m = mount_factory(extra=["--debug"])
    d = m.mnt / "d"
    d.mkdir()
    files = 40
    for i in range(files):
        write_file(d / f"f{i}", b"x")
    os.setxattr(d / "f7", "user.tag", b"kept")
    listing = subprocess.run(["ls", "-l", str(d)], capture_output=True, text=True, timeout=60, check=True)
    assert len(listing.stdout.splitlines()) == files + 1  # "total" and one line per file
    assert os.getxattr(d / "f7", "user.tag") == b"kept"
    assert m.unmount() == 0
    getxattrs = m.output.count("opcode: GETXATTR")
    # Writes ask for security.capability once per write call (40 here), ls -l at most twice on the
    # directory, our own getxattr once: one request per file for each of ls' two questions is 80 more.
    assert getxattrs <= files + 4, f"{getxattrs} GETXATTR requests: ls -l asked per file"


def test_a_namespace_from_a_newer_mooncakefs_is_refused(tmp_path):
    """The namespace says which format wrote it: a newer one (which may keep bytes where this code would
    not look) is refused with a clear error, an older one is stamped current and keeps its files."""
    path = tmp_path / "fs.sqlite"
    Namespace(path, chunk_size=MiB).close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM settings WHERE name = 'format'").fetchone() == (str(FORMAT),)
    db.execute("DELETE FROM settings WHERE name = 'format'")  # as format 1 left it
    db.commit()
    Namespace(path, chunk_size=MiB).close()
    assert db.execute("SELECT value FROM settings WHERE name = 'format'").fetchone() == (str(FORMAT),)
    db.execute("UPDATE settings SET value = ? WHERE name = 'format'", (str(FORMAT + 1),))
    db.commit()
    with pytest.raises(MooncakeError, match=f"format {FORMAT + 1}.*newer mooncakefs"):
        Namespace(path, chunk_size=MiB)
    db.close()
