"""Crash safety (kill -9 during durable writes), corruption detection, and the data-dir lock."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys

import pytest
from conftest import MiB, as_bytes_key, child_env, kill_process, rand_bytes, spawn_python, tier_of, wait_until

import mooncakefs

# ------------------------------------------------------------------------------- self-describing values

VALUE_CODE = r"""
import random

def make_value(key, version):
    header = f"{key}|{version}|".encode()
    rng = random.Random(header)
    size = rng.choice([0, 1, 100, 4096, rng.randint(1, 300_000)])
    return header + rng.randbytes(size)
"""
_namespace: dict = {}
exec(VALUE_CODE, _namespace)  # make_value() here is exactly the one the children run
make_value = _namespace["make_value"]


def parse_value(value: bytes) -> tuple[str, int]:
    key, version, _ = value.split(b"|", 2)
    return key.decode(), int(version)


def check_value(key: str, value: bytes) -> int:
    """Assert ``value`` is exactly something that was put under ``key``; return its version."""
    try:
        vkey, version = parse_value(value)
    except ValueError:
        pytest.fail(f"{key}: value is not one that was ever put (unparseable header {value[:40]!r})")
    assert vkey == key, f"{key}: holds the value of {vkey}"
    assert value == make_value(key, version), f"{key}: version {version} with wrong bytes"
    return version


WRITER = (
    VALUE_CODE
    + r"""
import sys
import mooncakefs

path, start = sys.argv[1], int(sys.argv[2])
store = mooncakefs.open(path, dram="16MiB", ssd="128MiB", segment_size="4MiB")
print("ready", flush=True)
i = start
while True:
    key = f"d{i}"
    store.put(key, make_value(key, 0), durable=True)
    print(f"ack {key} 0", flush=True)
    okey = f"o{i % 5}"
    store.put(okey, make_value(okey, i), durable=True)
    print(f"ack {okey} {i}", flush=True)
    store.put(f"n{i}", make_value(f"n{i}", 0))  # not durable: may or may not survive
    if i % 7 == 3:
        store.remove(f"n{i - 1}")
    i += 1
"""
)


EVICTING_WRITER = (
    VALUE_CODE
    + r"""
import sys
import mooncakefs

# a DRAM tier far too small for what is written: objects are demoted to SSD (and SSD segments
# reclaimed) all the time, so the kill lands in the middle of demotions as well as of puts
path, start = sys.argv[1], int(sys.argv[2])
store = mooncakefs.open(path, dram="2MiB", ssd="24MiB", segment_size="1MiB")
print("ready", flush=True)
i = start
while True:
    store.put(f"n{i}", make_value(f"n{i}", 0))
    okey = f"v{i % 7}"
    store.put(okey, make_value(okey, i))  # non-durable overwrites: any version that was put is fine
    store.batch_put({f"b{i}": make_value(f"b{i}", 0), f"v{(i + 3) % 7}": make_value(f"v{(i + 3) % 7}", i)})
    if i % 3 == 0:
        store.remove(f"n{i - 2}")
    if i % 11 == 0:
        store.remove_prefix(f"b{i - 5}")
    store.get(f"n{i - 1}") if store.exists(f"n{i - 1}") else None
    key = f"d{i}"
    store.put(key, make_value(key, 0), durable=True)
    print(f"ack {key} 0", flush=True)
    i += 1
"""
)


def _run_writer_and_kill(path, start: int, acks_wanted: int, writer: str = WRITER) -> dict[str, int]:
    """Start a durable writer, read ``acks_wanted`` acks, kill -9 it; return key -> acked version."""
    proc = spawn_python(writer, str(path), str(start))
    acked: dict[str, int] = {}
    durable_acks = 0
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            kill_process(proc)
            pytest.fail(f"writer did not start: {line!r} {proc.stderr.read()[-3000:]}")
        while durable_acks < acks_wanted:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer died: {proc.stderr.read()[-3000:]}")
            _, key, version = line.split()
            acked[key] = int(version)
            durable_acks += key.startswith("d")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        kill_process(proc)
    assert proc.returncode == -signal.SIGKILL
    return acked


def _verify_after_crash(store, acked: dict[str, int], plain: dict[str, bytes] | None = None) -> None:
    """``acked``: key -> last acknowledged version; ``plain``: keys put normally (not by a writer)."""
    plain = plain or {}
    # every acknowledged durable put is there, with its version or a later one (never an older one)
    for key, version in acked.items():
        try:
            value = store.get(key)
        except mooncakefs.KeyNotFound:
            pytest.fail(f"acknowledged durable key {key} (version {version}) lost after kill -9")
        got = check_value(key, value)
        assert got >= version, f"{key}: rolled back from acknowledged version {version} to {got}"
    # every key present returns exactly a value that was put, or is absent
    for raw in list(store.keys()):
        key = as_bytes_key(raw).decode()
        try:
            value = store.get(raw)
        except mooncakefs.KeyNotFound:
            continue
        if key in plain:
            assert value == plain[key], key
        else:
            check_value(key, value)
    assert len(store) == len(list(store.keys()))


@pytest.mark.slow
def test_kill_9_during_durable_writes(tmp_path):
    path = tmp_path / "db"
    all_acked: dict[str, int] = {}
    start = 0
    for acks_wanted in (25, 60, 110):
        acked = _run_writer_and_kill(path, start, acks_wanted)
        for k, v in acked.items():
            all_acked[k] = max(v, all_acked.get(k, -1))
        start += 1000
        # the killed writer's lock must not block the reopen
        with mooncakefs.open(path, dram="16MiB", ssd="128MiB", segment_size="4MiB") as store:
            _verify_after_crash(store, all_acked)
    # and the recovered store takes new writes and keeps them
    with mooncakefs.open(path, dram="16MiB", ssd="128MiB", segment_size="4MiB") as store:
        store.put("after", b"recovered", durable=True)
    with mooncakefs.open(path, dram="16MiB", ssd="128MiB", segment_size="4MiB") as store:
        assert store.get("after") == b"recovered"
        _verify_after_crash(store, all_acked, {"after": b"recovered"})


@pytest.mark.slow
def test_kill_9_during_evictions(tmp_path):
    """Killed while demoting to SSD and reclaiming segments: acked durable keys survive, the rest is
    exact or absent."""
    path = tmp_path / "db"
    all_acked: dict[str, int] = {}
    start = 0
    for acks_wanted in (10, 40, 90, 150):
        acked = _run_writer_and_kill(path, start, acks_wanted, EVICTING_WRITER)
        all_acked.update(acked)
        start += 1000
        with mooncakefs.open(path, dram="2MiB", ssd="24MiB", segment_size="1MiB") as store:
            # SSD space is bounded: when it is full, old objects may be evicted from SSD too, so only
            # the most recent acknowledged durable keys are sure to fit; all must be exact or absent
            recent = dict(list(acked.items())[-5:])
            _verify_after_crash(store, recent)
            for key in all_acked:
                with contextlib.suppress(mooncakefs.KeyNotFound):
                    check_value(key, store.get(key))


def test_kill_9_right_after_first_write(tmp_path):
    path = tmp_path / "db"
    acked = _run_writer_and_kill(path, 0, 1)
    with mooncakefs.open(path, dram="16MiB", ssd="128MiB", segment_size="4MiB") as store:
        _verify_after_crash(store, acked)


# --------------------------------------------------------------------------------------- corruption


def find_in_segments(path, pattern: bytes) -> tuple[object, int]:
    hits = []
    for seg in sorted((path / "ssd").glob("seg-*.dat")):
        data = seg.read_bytes()
        pos = data.find(pattern)
        while pos != -1:
            hits.append((seg, pos))
            pos = data.find(pattern, pos + 1)
    assert hits, "value bytes not found in any segment file (is the value really on SSD?)"
    assert len(hits) == 1, f"pattern found {len(hits)} times: {hits}"
    return hits[0]


def flip_byte(file, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))
        f.flush()
        os.fsync(f.fileno())


def _corrupt(path, value: bytes) -> None:
    seg, pos = find_in_segments(path, value[:64])
    flip_byte(seg, pos + len(value) // 2)


OPTS = dict(dram="8MiB", ssd="64MiB", segment_size="4MiB")


def _read_get(store, key, size):
    return store.get(key)


def _read_getitem(store, key, size):
    return store[key]


def _read_get_into(store, key, size):
    buf = bytearray(size)
    n = store.get_into(key, buf)
    return bytes(buf[:n])


def _read_view(store, key, size):
    with store.view(key) as mv:
        return bytes(mv)


def _read_batch_get(store, key, size):
    (result,) = store.batch_get([key])
    if isinstance(result, BaseException):
        raise result
    if result is None:
        raise mooncakefs.KeyNotFound(key)
    return result


def _read_batch_get_into(store, key, size):
    buf = bytearray(size)
    (result,) = store.batch_get_into([key], [buf])
    if isinstance(result, BaseException):
        raise result
    return bytes(buf[:result])


READERS = [_read_get, _read_getitem, _read_get_into, _read_view, _read_batch_get, _read_batch_get_into]
READER_IDS = ["get", "getitem", "get_into", "view", "batch_get", "batch_get_into"]


@pytest.mark.parametrize("reader", READERS, ids=READER_IDS)
def test_corrupted_segment_after_reopen(tmp_path, reader):
    path = tmp_path / "db"
    victim = rand_bytes(256 * 1024, "victim")
    neighbours = {f"n{i}": rand_bytes(100_000, ("n", i)) for i in range(5)}
    with mooncakefs.open(path, **OPTS) as store:
        store.put("n0", neighbours["n0"], durable=True)
        store.put("victim", victim, durable=True)
        for k in list(neighbours)[1:]:
            store.put(k, neighbours[k], durable=True)
    _corrupt(path, victim)
    with mooncakefs.open(path, **OPTS) as store:
        try:
            got = reader(store, "victim", len(victim))
        except (mooncakefs.ChecksumError, mooncakefs.KeyNotFound):
            pass
        else:
            what = "the original" if got == victim else "WRONG"
            pytest.fail(f"a read of a value whose segment bytes were corrupted returned {what} bytes")
        # the bad entry was dropped
        with pytest.raises(mooncakefs.KeyNotFound):
            store.get("victim")
        assert not store.exists("victim")
        assert b"victim" not in {as_bytes_key(k) for k in store.keys()}  # noqa: SIM118
        # neighbours in the same segment are fine
        for k, v in neighbours.items():
            assert store.get(k) == v
    # and it stays dropped after another reopen
    with mooncakefs.open(path, **OPTS) as store:
        assert not store.exists("victim")
        for k, v in neighbours.items():
            assert store.get(k) == v


def test_corrupted_segment_checksum_error_message_names_key(tmp_path):
    path = tmp_path / "db"
    victim = rand_bytes(100_000, "victim-name")
    with mooncakefs.open(path, **OPTS) as store:
        store.put("victim-name", victim, durable=True)
    _corrupt(path, victim)
    with mooncakefs.open(path, **OPTS) as store:
        try:
            store.get("victim-name")
        except mooncakefs.ChecksumError as exc:
            assert "victim-name" in str(exc)
        except mooncakefs.KeyNotFound:
            pass
        else:
            pytest.fail("corrupted value returned bytes")


def test_corruption_of_live_ssd_object(store_factory, tmp_path):
    """A value demoted to SSD, corrupted on disk while the store is open: never wrong bytes."""
    path = tmp_path / "live"
    store = store_factory(path, **OPTS, promote_after=1000)
    victim = rand_bytes(256 * 1024, "live-victim")
    store.put("victim", victim, durable=True)
    for i in range(16):
        store.put(f"fill{i}", rand_bytes(MiB, i))
    assert wait_until(lambda: tier_of(store, "victim") == "ssd")
    _corrupt(path, victim)
    try:
        got = store.get("victim")
    except (mooncakefs.ChecksumError, mooncakefs.KeyNotFound):
        with pytest.raises(mooncakefs.KeyNotFound):
            store.get("victim")
        assert not store.exists("victim")
    else:
        assert got == victim, "a read from a corrupted SSD segment returned wrong bytes"
    for i in range(16):
        assert store.get(f"fill{i}") == rand_bytes(MiB, i)


def test_truncated_segment(tmp_path):
    """A segment cut short on disk: each key is exact or fails cleanly; the store opens and keeps working."""
    path = tmp_path / "db"
    values = {f"k{i}": rand_bytes(150_000, i) for i in range(20)}
    with mooncakefs.open(path, **OPTS) as store:
        for k, v in values.items():
            store.put(k, v, durable=True)
    segs = sorted((path / "ssd").glob("seg-*.dat"))
    assert segs
    first = segs[0]
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size // 2)
    with mooncakefs.open(path, **OPTS) as store:
        lost = 0
        for k, v in values.items():
            try:
                got = store.get(k)
            except (mooncakefs.ChecksumError, mooncakefs.KeyNotFound):
                lost += 1
                with pytest.raises(mooncakefs.KeyNotFound):
                    store.get(k)
                continue
            assert got == v, f"{k}: wrong bytes from a truncated segment"
        assert lost > 0
        store.put("new", b"works", durable=True)
        assert store.get("new") == b"works"


# -------------------------------------------------------------------------------------- data dir lock

HOLDER = r"""
import os, sys
import mooncakefs

store = mooncakefs.open(sys.argv[1], dram="16MiB", ssd="16MiB", segment_size="4MiB")
store.put("from-child", b"hello", durable=True)
print("ready", os.getpid(), flush=True)
line = sys.stdin.readline().strip()
if line == "close":
    store.close()
print("bye", flush=True)
"""

TRY_OPEN = r"""
import sys
import mooncakefs

try:
    mooncakefs.open(sys.argv[1], dram="16MiB").close()
except mooncakefs.StoreLocked as exc:
    print("LOCKED", exc)
else:
    print("OPENED")
"""


def _start_holder(path) -> subprocess.Popen:
    proc = spawn_python(HOLDER, str(path))
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        kill_process(proc)
        pytest.fail(f"holder did not start: {line!r} {proc.stderr.read()[-3000:] if proc.stderr else ''}")
    assert int(line.split()[1]) == proc.pid
    return proc


def test_second_open_same_process_refused(tmp_path):
    path = tmp_path / "db"
    with mooncakefs.open(path, dram="16MiB") as first:
        first.put("k", b"v")
        with pytest.raises(mooncakefs.StoreLocked) as info:
            mooncakefs.open(path, dram="16MiB")
        assert str(os.getpid()) in str(info.value), f"message does not name the holder pid: {info.value}"
        assert isinstance(info.value, mooncakefs.MooncakeError)
        # the refused open did not disturb the first store ...
        assert first.get("k") == b"v"
        first.put("k2", b"v2")
        # ... nor its lock: another process is still refused too
        proc = subprocess.run(
            [sys.executable, "-c", TRY_OPEN, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
        )
        assert proc.stdout.startswith("LOCKED"), proc.stdout + proc.stderr
        assert str(os.getpid()) in proc.stdout
        # and a third try in this process is refused the same way
        with pytest.raises(mooncakefs.StoreLocked):
            mooncakefs.open(path, dram="16MiB")
    with mooncakefs.open(path, dram="16MiB") as again:
        again.put("k", b"v")


def test_open_refused_while_another_process_holds(tmp_path):
    path = tmp_path / "db"
    proc = _start_holder(path)
    try:
        with pytest.raises(mooncakefs.StoreLocked) as info:
            mooncakefs.open(path, dram="16MiB", ssd="16MiB", segment_size="4MiB")
        assert str(proc.pid) in str(info.value), f"message does not name the holder pid: {info.value}"
        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "bye"
        proc.wait(timeout=30)
        assert proc.returncode == 0, proc.stderr.read()
    finally:
        kill_process(proc)
    with mooncakefs.open(path, dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
        assert store.get("from-child") == b"hello"


def test_holder_exiting_without_close_releases(tmp_path):
    path = tmp_path / "db"
    proc = _start_holder(path)
    try:
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        kill_process(proc)
    with mooncakefs.open(path, dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
        assert store.get("from-child") == b"hello"


def test_stale_lock_from_killed_process(tmp_path):
    path = tmp_path / "db"
    proc = _start_holder(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kill_process(proc)
    with mooncakefs.open(path, dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
        assert store.get("from-child") == b"hello"
        # and now this process is the holder
        with pytest.raises(mooncakefs.StoreLocked, match=str(os.getpid())):
            mooncakefs.open(path, dram="16MiB")


def test_leftover_lock_file_without_holder(tmp_path):
    path = tmp_path / "db"
    path.mkdir()
    (path / "LOCK").write_text("pid 999999 on nowhere (a long dead process)\n")
    with mooncakefs.open(path, dram="16MiB") as store:
        store.put("k", b"v")


def test_lock_released_after_close_for_other_process(tmp_path):
    path = tmp_path / "db"
    store = mooncakefs.open(path, dram="16MiB")
    store.close()
    proc = subprocess.run(
        [sys.executable, "-c", TRY_OPEN, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert proc.stdout.startswith("OPENED"), proc.stdout + proc.stderr


def test_concurrent_opens_never_share_the_dir(tmp_path):
    """Processes racing to open one dir: the holds of those that got it never overlap in time."""
    race = r"""
import sys, time
import mooncakefs
try:
    s = mooncakefs.open(sys.argv[1], dram="16MiB")
except mooncakefs.StoreLocked:
    print("LOCKED", flush=True)
else:
    start = time.monotonic()
    time.sleep(0.5)
    end = time.monotonic()
    s.close()
    print("OPENED", start, end, flush=True)
"""
    path = tmp_path / "db"
    path.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", race, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for _ in range(4)
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(out.split())
    held = sorted((float(o[1]), float(o[2])) for o in outputs if o[0] == "OPENED")
    assert held, outputs
    assert all(o[0] in ("OPENED", "LOCKED") for o in outputs), outputs
    for (_, end1), (start2, _) in itertools.pairwise(held):
        assert end1 <= start2, f"two processes held the data dir at once: {held}"


def test_unreadable_ssd_index_is_rebuilt_from_the_segment_journals(tmp_path, caplog):
    with mooncakefs.open(tmp_path, dram="16MiB", ssd="64MiB") as store:
        store.put("k", b"v", durable=True)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "index.sqlite").write_bytes(b"not a database" * 512)
    with (
        caplog.at_level("WARNING", logger="mooncakefs.ssd"),
        mooncakefs.open(tmp_path, dram="16MiB", ssd="64MiB") as store,
    ):  # tests/test_index_rebuild.py: more
        assert store.get("k") == b"v"
    assert "index.sqlite was unreadable" in caplog.text and "1 value (1B) recovered" in caplog.text
    assert list(tmp_path.glob("index.sqlite.broken-*"))
