"""A damaged SSD index is rebuilt from the segment journals (``seg-NNNNNNNN.keys``), and ``mooncakefs fsck``.

Every test writes a real store in a child process (closed cleanly, or ended with ``os._exit`` so the
SQLite ``-wal`` still holds the last commits), damages real files, and reopens it here.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, rand_bytes

import mooncakefs
from mooncakefs.errors import StoreLocked
from mooncakefs.units import format_size

OPEN = {"dram": "16MiB", "ssd": "64MiB", "segment_size": "256KiB"}
N = 400  # enough rows for an index of many pages (a truncation cuts the table, not only the header)

WORKLOAD = r"""
import mmap, os, random, sys
import mooncakefs

def value(i, version):
    rng = random.Random(f"{i}/{version}")
    return rng.randbytes(rng.randint(1, 8000))

path, ending = sys.argv[1], sys.argv[2]
store = mooncakefs.open(path, dram="16MiB", ssd="64MiB", segment_size="256KiB")
for i in range(N_KEYS):
    store.put(f"k{i}", value(i, 1), durable=True)
for i in range(50):
    store.put(f"k{i}", value(i, 2), durable=True)  # overwritten: the newest must come back
for i in range(50, 100):
    store.remove(f"k{i}")  # removed: must stay removed
big = mmap.mmap(-1, 1 << 20)  # page-aligned and 1 MiB: written with O_DIRECT where the filesystem allows
big[:] = random.Random("big").randbytes(1 << 20)
store.put("big", big, durable=True)
if ending == "crash":
    os._exit(0)  # no close: the -wal keeps what was committed since the last checkpoint
store.close()
""".replace("N_KEYS", str(N))


def value(i: int, version: int) -> bytes:
    import random

    rng = random.Random(f"{i}/{version}")
    return rng.randbytes(rng.randint(1, 8000))


def expected() -> dict[str, bytes]:
    want = {f"k{i}": value(i, 2 if i < 50 else 1) for i in range(N) if not 50 <= i < 100}
    import random

    want["big"] = random.Random("big").randbytes(1 << 20)
    return want


def write_store(path: Path, ending: str = "close") -> None:
    subprocess.run([sys.executable, "-c", WORKLOAD, str(path), ending], check=True, env=child_env(), timeout=120)


def check_store(path: Path) -> mooncakefs.Store:
    """Open the store and check it holds exactly what the workload left: the caller closes it."""
    store = mooncakefs.open(path, **OPEN)
    want = expected()
    for key, data in want.items():
        assert store.get(key) == data, f"{key}: wrong value after the rebuild"
    for i in range(50, 100):
        assert f"k{i}" not in store, f"k{i} was removed but came back"
    listed = list(store.keys())
    assert sorted(k.decode() if isinstance(k, bytes) else k for k in listed) == sorted(want)
    return store


def _garbage(index: Path) -> None:
    index.write_bytes(rand_bytes(index.stat().st_size, "garbage"))


def _truncated(index: Path) -> None:
    os.truncate(index, index.stat().st_size // 2)


def _zeroed(index: Path) -> None:
    index.write_bytes(bytes(index.stat().st_size))


def _deleted(index: Path) -> None:
    index.unlink()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _zeroed, _deleted], ids=lambda f: f.__name__[1:])
def test_damaged_index_is_moved_aside_and_rebuilt_from_the_journals(tmp_path, caplog, damage):
    write_store(tmp_path)
    index = tmp_path / "index.sqlite"
    assert not Path(f"{index}-wal").exists()  # closed cleanly: everything is in the main file
    assert index.stat().st_size >= 8 * 4096
    damage(index)
    with caplog.at_level("WARNING", logger="mooncakefs.ssd"):
        store = check_store(tmp_path)
    store.close()
    message = caplog.text
    assert "rebuilt it from the segment journals" in message, message
    assert f"{N - 50 + 1} values" in message and "recovered" in message, message
    assert "0 values (0B) lost" in message, message
    if damage is _deleted:
        assert "was missing or empty" in message, message
        assert not list(tmp_path.glob("index.sqlite.broken-*"))
    else:
        assert "moved it to index.sqlite.broken-" in message, message
        assert len(list(tmp_path.glob("index.sqlite.broken-*"))) == 1
    # The rebuilt index is an ordinary one: the next open says nothing and finds the same.
    caplog.clear()
    with caplog.at_level("WARNING", logger="mooncakefs.ssd"):
        store = check_store(tmp_path)
    store.close()
    assert "journals" not in caplog.text


def test_index_that_lost_its_wal_is_rolled_forward(tmp_path, caplog):
    """The -wal holds the commits since the last checkpoint; deleting it leaves a readable but stale
    index (old rows for overwritten keys, removed keys still there, newer keys missing)."""
    write_store(tmp_path, "crash")
    index = tmp_path / "index.sqlite"
    wal = Path(f"{index}-wal")
    assert wal.stat().st_size > 0
    wal.unlink()
    Path(f"{index}-shm").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="mooncakefs.ssd"):
        store = check_store(tmp_path)
    store.close()
    assert "was behind its journals" in caplog.text and "rolled it forward" in caplog.text, caplog.text


def test_corrupt_value_and_torn_journal_are_reported_not_returned(tmp_path, caplog):
    write_store(tmp_path)
    ssd = tmp_path / "ssd"
    db = sqlite3.connect(tmp_path / "index.sqlite")
    seg, off, size = db.execute("SELECT seg, off, size FROM objects WHERE key = ?", (b"k200",)).fetchone()
    db.close()
    with open(ssd / f"seg-{seg:08d}.dat", "r+b") as f:  # flip one byte of k200's value
        f.seek(off + size // 2)
        byte = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    journals = sorted(ssd.glob("seg-*.keys"))
    with open(journals[-1], "ab") as f:  # a torn record at the end of the last journal
        f.write(b"\x01\x02\x03" * 10)
    _garbage(tmp_path / "index.sqlite")
    with caplog.at_level("WARNING", logger="mooncakefs.ssd"), mooncakefs.open(tmp_path, **OPEN) as store:
        assert "k200" not in store  # its bytes are wrong: not returned
        want = expected()
        del want["k200"]
        for key, data in want.items():
            assert store.get(key) == data
    message = caplog.text
    assert f"{N - 50} values" in message and f"1 value ({format_size(size)}) lost" in message, message
    assert "1 damaged journal record dropped" in message, message
    # The lost value got a tombstone: the journals now agree with the index, and fsck says so.
    result = fsck_cli(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_store_from_before_journals_opens_and_journals_new_segments(tmp_path, caplog):
    write_store(tmp_path)
    ssd = tmp_path / "ssd"
    for journal in ssd.glob("seg-*.keys"):  # what an older mooncakefs left: segments without journals
        journal.unlink()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("DROP TABLE meta")
    db.commit()
    db.close()
    old_segments = sorted(ssd.glob("seg-*.dat"))
    store = check_store(tmp_path)  # the index is readable: nothing lost, nothing said
    store.put("new", b"after the upgrade", durable=True)
    store.close()
    assert "journals" not in caplog.text
    new_segments = sorted(set(ssd.glob("seg-*.dat")) - set(old_segments))
    assert new_segments and all(p.with_suffix(".keys").exists() for p in new_segments)
    _garbage(tmp_path / "index.sqlite")
    with caplog.at_level("WARNING", logger="mooncakefs.ssd"), mooncakefs.open(tmp_path, **OPEN) as store:
        assert store.get("new") == b"after the upgrade"
        assert "k200" not in store
    message = caplog.text
    assert f"{len(old_segments)} segments" in message and "written before segments had journals" in message
    assert "recoverable only with the old index" in message, message
    assert sorted(ssd.glob("seg-*.dat.orphan")) == [p.with_name(p.name + ".orphan") for p in old_segments]


def fsck_cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "fsck", "--data", str(data), *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )


def test_fsck_checks_every_value_and_rebuilds(tmp_path):
    write_store(tmp_path)
    result = fsck_cli(tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    assert f"index: {N - 50 + 1} values" in result.stdout

    db = sqlite3.connect(tmp_path / "index.sqlite")
    seg, off = db.execute("SELECT seg, off FROM objects WHERE key = ?", (b"k300",)).fetchone()
    db.close()
    with open(tmp_path / "ssd" / f"seg-{seg:08d}.dat", "r+b") as f:
        f.seek(off)
        f.write(b"\0")
    result = fsck_cli(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "1 bad" in result.stdout and "b'k300': CRC-32C" in result.stdout, result.stdout

    with mooncakefs.open(tmp_path, **OPEN):
        result = fsck_cli(tmp_path)  # a store has it open: fsck refuses rather than race it
    assert result.returncode == StoreLocked.exit_code and "in use by" in result.stderr, result.stderr

    _zeroed(tmp_path / "index.sqlite")
    result = fsck_cli(tmp_path)
    assert result.returncode == 1 and "index: unreadable" in result.stdout and "--rebuild" in result.stdout

    result = fsck_cli(tmp_path, "--rebuild")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "was unreadable (file is not a database)" in result.stdout, result.stdout
    assert "rebuilt it from the segment journals" in result.stdout and "1 value (" in result.stdout, result.stdout
    assert fsck_cli(tmp_path).returncode == 0
    with mooncakefs.open(tmp_path, **OPEN) as store:
        assert "k300" not in store
        assert store.get("k301") == value(301, 1)
