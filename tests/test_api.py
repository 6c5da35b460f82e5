"""The public API of mooncakefs, line by line of the contract (no tier pressure here: see test_tiers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MiB, as_bytes_key, rand_bytes
from mooncakefs._engine import crc32c  # checked against an independent oracle in test_engine_reference

import mooncakefs
from mooncakefs import errors


def _keyset(iterable) -> set[bytes]:
    return {as_bytes_key(k) for k in iterable}


def _total(stats: dict, field: str) -> int:
    return sum(stats[tier][field] for tier in ("dram", "ssd") if tier in stats)


# ------------------------------------------------------------------------------------- module surface

ERROR_NAMES = [
    "MooncakeError",
    "KeyNotFound",
    "KeyExists",
    "InvalidKey",
    "BufferTooSmall",
    "OutOfSpace",
    "ChecksumError",
    "StoreClosed",
    "StoreLocked",
]


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_errors_are_reexported(name):
    cls = getattr(errors, name)
    assert getattr(mooncakefs, name) is cls
    assert issubclass(cls, mooncakefs.MooncakeError)
    assert issubclass(cls, Exception)


def test_error_builtin_bases():
    assert issubclass(mooncakefs.KeyNotFound, KeyError)
    assert issubclass(mooncakefs.InvalidKey, ValueError)
    assert issubclass(mooncakefs.BufferTooSmall, ValueError)


def test_open_is_callable_and_returns_a_context_manager(tmp_path):
    store = mooncakefs.open(tmp_path / "db", dram="16MiB")
    try:
        assert hasattr(store, "__enter__") and hasattr(store, "__exit__")
        assert callable(store.close)
    finally:
        store.close()


def test_importing_the_package_leaves_the_transfer_engine_and_etcd_unloaded():
    """``import mooncakefs`` (every CLI command, every embedded user) loads the engine, its etcd client
    (grpc) and the RDMA driver only when asked for: they were half of its time; the names still work."""
    from conftest import run_python

    heavy = ["grpc", "mooncakefs.transfer.engine", "mooncakefs.transfer.rdma", "mooncakefs.cluster.etcd"]
    code = (
        "import sys, mooncakefs, mooncakefs.cli; "
        f"print([m for m in {heavy!r} if m in sys.modules]); "
        "from mooncakefs.transfer import Engine, TransferEngine; print(Engine.__name__, TransferEngine.__name__)"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "Engine TransferEngine"], out.stdout


def test_cli_help(tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    # the console script and `python -m`-free entry point both come from mooncakefs.cli:main
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mooncakefs.cli import main; sys.argv[0] = 'mooncakefs'; main()",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout or "usage" in proc.stdout


def test_cli_console_script_help():
    import shutil
    import subprocess

    exe = shutil.which("mooncakefs")
    if exe is None:
        pytest.skip("the mooncakefs console script is not on PATH (package not pip-installed)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------- open


def test_open_context_manager_closes(tmp_path):
    with mooncakefs.open(tmp_path / "db", dram="16MiB") as store:
        store.put("k", b"v")
        assert store.get("k") == b"v"
    with pytest.raises(mooncakefs.StoreClosed):
        store.get("k")


def test_open_context_manager_closes_on_exception(tmp_path):
    with pytest.raises(RuntimeError), mooncakefs.open(tmp_path / "db", dram="16MiB") as store:
        store.put("k", b"v")
        raise RuntimeError("boom")
    with pytest.raises(mooncakefs.StoreClosed):
        store.get("k")
    # the lock was released: the dir opens again
    with mooncakefs.open(tmp_path / "db", dram="16MiB") as again:
        again.put("k2", b"v")


def test_enter_returns_the_store(tmp_path):
    store = mooncakefs.open(tmp_path / "db", dram="16MiB")
    with store as entered:
        assert entered is store


def test_close_is_idempotent(tmp_path):
    store = mooncakefs.open(tmp_path / "db", dram="16MiB")
    store.close()
    store.close()
    with store:
        pass  # __exit__ after an explicit close must not raise either


def test_reopen_after_close(tmp_path):
    for _ in range(3):
        with mooncakefs.open(tmp_path / "db", dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
            store.put("k", b"v")


@pytest.mark.parametrize(
    ("dram", "expected"),
    [("16MiB", 16 * MiB), (24 * MiB, 24 * MiB), ("32MiB", 32 * MiB), (str(20 * MiB), 20 * MiB)],
)
def test_open_dram_sizes(tmp_path, dram, expected):
    with mooncakefs.open(tmp_path / "db", dram=dram) as store:
        assert store.stats()["dram"]["capacity"] == expected


@pytest.mark.parametrize(("ssd", "expected"), [("64MiB", 64 * MiB), (32 * MiB, 32 * MiB)])
def test_open_ssd_sizes(tmp_path, ssd, expected):
    with mooncakefs.open(tmp_path / "db", dram="16MiB", ssd=ssd, segment_size="4MiB") as store:
        stats = store.stats()
        assert stats["ssd"]["capacity"] == expected
        assert stats["dram"]["capacity"] == 16 * MiB


def test_open_without_ssd_has_no_ssd_tier(tmp_path):
    with mooncakefs.open(tmp_path / "db", dram="16MiB") as store:
        assert "ssd" not in store.stats()
    with mooncakefs.open(tmp_path / "db2", dram="16MiB", ssd=None) as store:
        assert "ssd" not in store.stats()


@pytest.mark.parametrize("bad", ["lots", "-1MiB", "12XB", -5])
def test_open_bad_size(tmp_path, bad):
    with pytest.raises(ValueError):
        mooncakefs.open(tmp_path / "db", dram=bad)
    with pytest.raises(ValueError):
        mooncakefs.open(tmp_path / "db2", dram="16MiB", ssd=bad)


@pytest.mark.parametrize(
    "options",
    [
        {"dram": 0},  # each of these raised a bare ValueError or TypeError, and the CLI showed a traceback
        {"dram": 63},
        {"dram": "1TiB"},  # more than one pool's allocator numbers (and than this host's memory)
        {"dram": "16MiB", "high_watermark": float("nan")},
        {"dram": "16MiB", "high_watermark": "0.9"},
        {"dram": "16MiB", "promote_after": 0},
        {"dram": "16MiB", "promote_after": None},
        {"dram": "16MiB", "gpu_verify": None},
    ],
)
def test_open_bad_options_are_invalid_argument_and_make_nothing(tmp_path, options):
    with pytest.raises(mooncakefs.InvalidArgument):
        mooncakefs.open(tmp_path / "db", **options)
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("options", [{"ssd": 100}, {"ssd": "16MiB", "segment_size": 0}])
def test_an_ssd_tier_too_small_is_invalid_argument_and_leaves_nothing_locked(tmp_path, options):
    with pytest.raises(mooncakefs.InvalidArgument, match="at least 512 bytes"):
        mooncakefs.open(tmp_path / "db", dram="16MiB", **options)
    with mooncakefs.open(tmp_path / "db", dram="16MiB") as store:
        store.put("k", b"v")


def test_a_dram_pool_beyond_the_hosts_memory_is_refused(tmp_path):
    """A pool beyond RAM ends in swap or the OOM killer (at once if prefaulted, as the node does by default)."""
    from mooncakefs.tiers.dram import host_memory

    with pytest.raises(mooncakefs.InvalidArgument, match=r"dram .* is more than"):
        mooncakefs.open(tmp_path / "db", dram=host_memory() + MiB)


def test_open_in_a_place_that_cannot_be_a_data_dir_names_it(tmp_path):
    """A file where the data dir or the SSD dir goes, or a directory that cannot be made, raised
    FileExistsError, NotADirectoryError or FileNotFoundError out of pathlib."""
    file = tmp_path / "file"
    file.write_bytes(b"mine")
    for path, ssd_dir in ((file, None), (file / "sub", None), (tmp_path / "db", file)):
        with pytest.raises(mooncakefs.InvalidArgument, match=str(file)):
            mooncakefs.open(path, dram="16MiB", ssd="16MiB", ssd_dir=ssd_dir, segment_size="4MiB")
    assert file.read_bytes() == b"mine"
    with pytest.raises(mooncakefs.InvalidArgument, match="cannot create the directory"):
        mooncakefs.open("/proc/mooncakefs-no-such-dir/db", dram="16MiB")
    with mooncakefs.open(tmp_path / "db", dram="16MiB") as store:  # nothing was left locked
        store.put("k", b"v")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_data_dir_this_user_cannot_write_is_a_clear_invalid_argument(tmp_path):
    """Another user's directory (readable, not writable) raised PermissionError on its LOCK file."""
    from test_hostile import as_user

    theirs = Path(tempfile.mkdtemp(prefix="mcfs-", dir="/tmp"))  # pytest's tmp dirs are root's alone
    try:
        theirs.chmod(0o755)
        for path in (theirs, theirs / "sub"):
            outcome = as_user(65534, lambda path=path: mooncakefs.open(path, dram="16MiB").close())
            assert outcome[:2] == ("raised", "InvalidArgument"), outcome
            assert str(theirs) in outcome[2] and "Permission denied" in outcome[2], outcome
    finally:
        shutil.rmtree(theirs)


def test_open_bad_size_does_not_leave_the_dir_locked(tmp_path):
    with pytest.raises(ValueError):
        mooncakefs.open(tmp_path / "db", dram="nonsense")
    with mooncakefs.open(tmp_path / "db", dram="16MiB") as store:
        store.put("k", b"v")


def test_open_accepts_str_path(tmp_path):
    with mooncakefs.open(str(tmp_path / "db"), dram="16MiB") as store:
        store.put("k", b"v")
        assert store.get("k") == b"v"


def test_open_creates_missing_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "c"
    with mooncakefs.open(path, dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
        store.put("k", b"v", durable=True)
    assert path.is_dir()


def test_open_without_path_uses_env_data_dir(tmp_path, monkeypatch):
    data = tmp_path / "env-data"
    monkeypatch.setenv("MOONCAKEFS_DATA", str(data))
    with mooncakefs.open(dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
        store.put("k", b"v", durable=True)
        assert (data / "LOCK").exists()
        # the same dir is in use: opening it by its path is refused
        with pytest.raises(mooncakefs.StoreLocked):
            mooncakefs.open(data, dram="16MiB")
    # and the durable key is there when the dir is opened by its path
    with mooncakefs.open(data, dram="16MiB", ssd="16MiB", segment_size="4MiB") as store:
        assert store.get("k") == b"v"


def test_open_default_args(tmp_path, monkeypatch):
    """open() with every default (dram="1GiB", no SSD)."""
    monkeypatch.setenv("MOONCAKEFS_DATA", str(tmp_path / "d"))
    with mooncakefs.open() as store:
        stats = store.stats()
        assert stats["dram"]["capacity"] == 1 << 30
        assert "ssd" not in stats
        store.put("k", b"v")
        assert store.get("k") == b"v"


# --------------------------------------------------------------------------------------- put and get


@pytest.mark.parametrize("key", ["k", b"k-bytes", "ключ", "a/b/c:d", b"\x00\xff\xfe", "x" * 1024, b"y" * 1024])
def test_put_get_keys(store, key):
    value = rand_bytes(100, str(key))
    store.put(key, value)
    got = store.get(key)
    assert type(got) is bytes
    assert got == value


def test_key_length_is_counted_in_utf8_bytes(store):
    ok = "é" * 512  # 512 characters, 1024 UTF-8 bytes
    store.put(ok, b"v")
    assert store.get(ok) == b"v"
    too_long = "é" * 513  # 513 characters, 1026 bytes
    with pytest.raises(mooncakefs.InvalidKey):
        store.put(too_long, b"v")


def test_get_returns_bytes_for_every_value_type(store):
    store.put("a", bytearray(b"abc"))
    store.put("b", memoryview(b"defg"))
    for key, expected in (("a", b"abc"), ("b", b"defg")):
        got = store.get(key)
        assert type(got) is bytes
        assert got == expected


def test_overwrite_replaces(store):
    store.put("k", b"first value, longer")
    store.put("k", b"second")
    assert store.get("k") == b"second"
    assert store.stat("k").size == 6
    store.put("k", b"")
    assert store.get("k") == b""
    assert store.stat("k").size == 0


def test_put_copies_the_value(store):
    """Mutating the caller's buffer after put must not change the stored value."""
    buf = bytearray(b"original")
    store.put("k", buf)
    buf[:] = b"mutated!"
    assert store.get("k") == b"original"
    arr = np.arange(10, dtype=np.int32)
    store.put("n", arr)
    arr[:] = -1
    assert store.get("n") == np.arange(10, dtype=np.int32).tobytes()


def test_get_result_is_independent_of_later_writes(store):
    store.put("k", b"one")
    got = store.get("k")
    store.put("k", b"two")
    store.remove("k")
    assert got == b"one"


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b""), np.empty(0, dtype=np.float32)])
def test_empty_values(store, empty):
    store.put("e", empty)
    assert store.exists("e")
    assert "e" in store
    assert store.get("e") == b""
    assert store.stat("e").size == 0
    assert store.stat("e").checksum == crc32c(b"")
    assert store.get_into("e", bytearray(0)) == 0
    assert store.get_into("e", bytearray(5)) == 0
    with store.view("e") as mv:
        assert len(mv) == 0
        assert bytes(mv) == b""
    assert store.batch_get(["e"]) == [b""]
    assert store.remove("e") is True
    assert not store.exists("e")


@pytest.mark.parametrize(
    "dtype",
    [
        np.uint8,
        np.int8,
        np.int16,
        np.uint16,
        np.int32,
        np.int64,
        np.float16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
        np.bool_,
    ],
)
def test_numpy_values(store, dtype):
    rng = np.random.default_rng(7)
    arr = (rng.random(1000) * 100).astype(dtype)
    store.put("arr", arr)
    assert store.get("arr") == arr.tobytes()
    assert store.stat("arr").size == arr.nbytes
    out = np.empty_like(arr)
    assert store.get_into("arr", out) == arr.nbytes
    np.testing.assert_array_equal(out, arr)
    with store.view("arr") as mv:
        np.testing.assert_array_equal(np.frombuffer(mv, dtype=dtype), arr)


def test_numpy_2d_and_3d_values(store):
    a2 = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
    a3 = np.arange(4 * 8 * 16, dtype=np.float16).reshape(4, 8, 16)
    store.put("2d", a2)
    store.put("3d", a3)
    assert store.get("2d") == a2.tobytes()
    assert store.get("3d") == a3.tobytes()
    out = np.zeros_like(a2)
    assert store.get_into("2d", out) == a2.nbytes
    np.testing.assert_array_equal(out, a2)


def test_large_value(store):
    value = rand_bytes(8 * MiB, "large")
    store.put("big", value)
    assert store.get("big") == value
    assert store.stat("big").size == 8 * MiB
    assert store.stat("big").checksum == crc32c(value)


@pytest.mark.parametrize("bad", ["a string", 12345, None, 3.5, object(), ["list"]])
def test_put_non_buffer_value_rejected(store, bad):
    with pytest.raises((TypeError, ValueError)):
        store.put("k", bad)
    assert not store.exists("k")


def test_get_missing(store):
    with pytest.raises(mooncakefs.KeyNotFound) as info:
        store.get("no-such-key-xyz")
    assert isinstance(info.value, KeyError)
    assert "no-such-key-xyz" in str(info.value)


# ----------------------------------------------------------------------------------------- bad keys

INVALID_KEYS = [
    pytest.param("", id="empty-str"),
    pytest.param(b"", id="empty-bytes"),
    pytest.param("k" * 1025, id="1025-chars"),
    pytest.param(b"k" * 1025, id="1025-bytes"),
    pytest.param("é" * 513, id="1026-utf8-bytes"),
    pytest.param(1, id="int"),
    pytest.param(None, id="None"),
    pytest.param(1.5, id="float"),
    pytest.param(("a",), id="tuple"),
    pytest.param(object(), id="object"),
    pytest.param("\ud800", id="lone-surrogate"),
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_key_put(store, key):
    with pytest.raises(mooncakefs.InvalidKey):
        store.put(key, b"v")
    assert len(store) == 0


@pytest.mark.parametrize("key", INVALID_KEYS)
@pytest.mark.parametrize(
    "call",
    [
        lambda s, k: s.get(k),
        lambda s, k: s.get_into(k, bytearray(10)),
        lambda s, k: s.exists(k),
        lambda s, k: s.remove(k),
        lambda s, k: s.stat(k),
        lambda s, k: s.view(k).__enter__(),
        lambda s, k: s[k],
        lambda s, k: s.__setitem__(k, b"v"),
        lambda s, k: s.__delitem__(k),
    ],
    ids=["get", "get_into", "exists", "remove", "stat", "view", "getitem", "setitem", "delitem"],
)
def test_invalid_key_every_method(store, key, call):
    with pytest.raises(mooncakefs.InvalidKey):
        call(store, key)


def test_invalid_key_message_names_the_reason(store):
    with pytest.raises(mooncakefs.InvalidKey) as info:
        store.put("k" * 1025, b"v")
    assert str(info.value)  # a non-empty message
    assert "1025" in str(info.value) or "1024" in str(info.value) or "long" in str(info.value).lower()


# ------------------------------------------------------------------------------------------- get_into


def test_get_into_exact_and_larger(store):
    value = rand_bytes(1000, "gi")
    store.put("k", value)
    exact = bytearray(1000)
    assert store.get_into("k", exact) == 1000
    assert exact == value
    larger = bytearray(b"\xaa" * 1500)
    assert store.get_into("k", larger) == 1000
    assert bytes(larger[:1000]) == value
    assert bytes(larger[1000:]) == b"\xaa" * 500


def test_get_into_memoryview_slice(store):
    store.put("k", b"0123456789")
    backing = bytearray(b"-" * 30)
    n = store.get_into("k", memoryview(backing)[10:25])
    assert n == 10
    assert backing == bytearray(b"-" * 10 + b"0123456789" + b"-" * 10)


def test_get_into_numpy_buffer_counts_bytes(store):
    value = rand_bytes(4000, "np")
    store.put("k", value)
    out = np.zeros(1000, dtype=np.float32)  # 4000 bytes
    assert store.get_into("k", out) == 4000
    assert out.tobytes() == value


@pytest.mark.parametrize(
    "buffer",
    [
        pytest.param("a str buffer of plenty of length", id="str"),
        pytest.param(b"\x00" * 100, id="bytes"),
        pytest.param(memoryview(b"\x00" * 100), id="memoryview-of-bytes"),
        pytest.param(memoryview(bytearray(100)).toreadonly(), id="readonly-memoryview"),
        pytest.param(None, id="None"),
        pytest.param(100, id="int"),
    ],
)
def test_get_into_wrong_buffer_type(store, buffer):
    store.put("k", b"value")
    with pytest.raises(TypeError):
        store.get_into("k", buffer)


def test_get_into_readonly_numpy(store):
    store.put("k", b"value")
    arr = np.zeros(16, dtype=np.uint8)
    arr.flags.writeable = False
    with pytest.raises(TypeError):
        store.get_into("k", arr)


def _object_arrays() -> list[np.ndarray]:
    """Arrays whose bytes are pointers to Python objects: of dtype object, and a record with such a field
    (the other field's name has an O in it, which is no object)."""
    return [np.array([b"a", 7, None], dtype=object), np.zeros(2, dtype=[("Obj", "i4"), ("ptr", "O")])]


def test_arrays_of_python_objects_are_refused_and_nothing_is_stored_or_written(store):
    """Their bytes are pointers: stored, they would come back as dangling addresses; a value read into one
    would overwrite its pointers (the process crashed on the next look at the array)."""
    store.put("k", b"\x01" * 48)
    for objects in _object_arrays():
        with pytest.raises(mooncakefs.InvalidArgument, match="holds Python objects"):
            store.put("o", objects)
        assert not store.exists("o")
        with pytest.raises(mooncakefs.InvalidArgument, match="holds Python objects"):
            store.get_into("k", objects)
        (error,) = store.batch_put([("o", objects)])
        assert isinstance(error, mooncakefs.InvalidArgument) and not store.exists("o")
        (error,) = store.batch_get_into(["k"], [objects])
        assert isinstance(error, mooncakefs.InvalidArgument)
    assert _object_arrays()[0][0] == b"a"  # what a read would have overwritten
    record = np.zeros(2, dtype=[("Obj", "i4"), ("f", "f4")])  # no objects, whatever the names
    store.put("record", record)
    assert store.get("record") == record.tobytes()


@pytest.mark.parametrize("size", [0, 1, 999])
def test_get_into_too_small(store, size):
    value = rand_bytes(1000, "small")
    store.put("key-too-small", value)
    buf = bytearray(b"\xaa" * size)
    with pytest.raises(mooncakefs.BufferTooSmall) as info:
        store.get_into("key-too-small", buf)
    assert isinstance(info.value, ValueError)
    assert buf == bytearray(b"\xaa" * size), "a failed get_into wrote into the buffer"
    assert "key-too-small" in str(info.value)


def test_get_into_too_small_numpy(store):
    store.put("k", b"x" * 100)
    out = np.full(24, 7, dtype=np.float32)  # 96 bytes
    with pytest.raises(mooncakefs.BufferTooSmall):
        store.get_into("k", out)
    assert (out == 7).all()


def test_get_into_missing(store):
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get_into("missing", bytearray(10))


# ----------------------------------------------------------------------------------------------- view


def test_view_basic(store):
    value = rand_bytes(5000, "view")
    store.put("k", value)
    with store.view("k") as mv:
        assert isinstance(mv, memoryview)
        assert mv.readonly
        assert mv.nbytes == 5000
        assert bytes(mv) == value
        with pytest.raises(TypeError):
            mv[0] = 1


def test_view_missing(store):
    with pytest.raises(mooncakefs.KeyNotFound), store.view("missing"):
        pass


def test_view_survives_overwrite(store):
    old = rand_bytes(100_000, "old")
    store.put("k", old)
    with store.view("k") as mv:
        for i in range(5):
            store.put("k", rand_bytes(100_000, f"new{i}"))
        assert bytes(mv) == old
        assert store.get("k") == rand_bytes(100_000, "new4")
    assert store.get("k") == rand_bytes(100_000, "new4")


def test_view_survives_remove(store):
    old = rand_bytes(100_000, "old")
    store.put("k", old)
    with store.view("k") as mv:
        assert store.remove("k") is True
        assert not store.exists("k")
        # the freed space is reused by new values: the view must still show the old bytes
        for i in range(20):
            store.put(f"other{i}", rand_bytes(100_000, i))
        assert bytes(mv) == old
    assert not store.exists("k")


def test_view_survives_remove_prefix(store):
    old = rand_bytes(50_000, "old")
    store.put("p/k", old)
    with store.view("p/k") as mv:
        assert store.remove_prefix("p/") == 1
        for i in range(10):
            store.put(f"p/x{i}", rand_bytes(50_000, i))
        assert bytes(mv) == old


def test_many_views_at_once(store):
    values = {f"k{i}": rand_bytes(10_000, i) for i in range(20)}
    for k, v in values.items():
        store.put(k, v)
    import contextlib

    with contextlib.ExitStack() as stack:
        views = {k: stack.enter_context(store.view(k)) for k in values}
        views2 = {k: stack.enter_context(store.view(k)) for k in values}
        for k in values:
            store.put(k, b"replaced")
        for k, v in values.items():
            assert bytes(views[k]) == v
            assert bytes(views2[k]) == v
    for k in values:
        assert store.get(k) == b"replaced"


def test_space_of_removed_value_is_reused_after_view_closes(store_factory):
    """A removed value's space comes back once its last view is gone (no leak per view)."""
    store = store_factory(dram="8MiB")
    for i in range(50):
        store.put("k", rand_bytes(1 * MiB, i))
        with store.view("k") as mv:
            store.remove("k")
            assert bytes(mv[:16]) == rand_bytes(1 * MiB, i)[:16]
    store.put("final", rand_bytes(4 * MiB, "final"))
    assert store.get("final") == rand_bytes(4 * MiB, "final")
    assert store.stats()["dram"]["evictions"] == 0


# ---------------------------------------------------------------------------------- exists / remove


def test_exists_and_remove(store):
    assert store.exists("k") is False
    store.put("k", b"v")
    assert store.exists("k") is True
    assert store.remove("k") is True
    assert store.exists("k") is False
    assert store.remove("k") is False
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get("k")


def test_remove_never_put(store):
    assert store.remove("never") is False


def test_put_after_remove(store):
    store.put("k", b"one")
    store.remove("k")
    store.put("k", b"two")
    assert store.get("k") == b"two"


# --------------------------------------------------------------------------------- keys and prefixes


def test_keys_all_and_prefix(store):
    names = ["a/1", "a/2", "a/3", "b/1", "ab", b"a/bytes"]
    for name in names:
        store.put(name, b"v")
    it = store.keys()
    assert iter(it) is it, "keys() must return an iterator"
    assert _keyset(it) == _keyset(names)
    assert _keyset(store.keys("a/")) == _keyset(["a/1", "a/2", "a/3", b"a/bytes"])
    assert _keyset(store.keys(prefix="a")) == _keyset(["a/1", "a/2", "a/3", "ab", b"a/bytes"])
    assert _keyset(store.keys(b"b/")) == _keyset(["b/1"])
    assert list(store.keys("zzz")) == []


def test_keys_types(store):
    store.put("text", b"v")
    store.put(b"\xff\xfe", b"v")
    for key in store.keys():  # noqa: SIM118 - keys() is the API under test
        assert isinstance(key, (str, bytes))


def test_keys_empty_store(store):
    assert list(store.keys()) == []


def test_keys_after_remove(store):
    for i in range(10):
        store.put(f"k{i}", b"v")
    for i in range(0, 10, 2):
        store.remove(f"k{i}")
    assert _keyset(store.keys()) == _keyset(f"k{i}" for i in range(1, 10, 2))


def test_keys_many(store):
    names = {f"prefix/{i:05d}" for i in range(2000)} | {f"other/{i}" for i in range(500)}
    for n in names:
        store.put(n, b"")
    assert len(store) == 2500
    assert _keyset(store.keys("prefix/")) == _keyset(n for n in names if n.startswith("prefix/"))
    assert _keyset(store.keys("prefix/0001")) == _keyset(f"prefix/{i:05d}" for i in range(10, 20))
    assert _keyset(store.keys("prefix/001")) == _keyset(f"prefix/{i:05d}" for i in range(100, 200))


def test_remove_prefix(store):
    for i in range(10):
        store.put(f"a/{i}", b"x")
        store.put(f"b/{i}", b"y")
    store.put("a", b"not under a/")
    assert store.remove_prefix("a/") == 10
    assert _keyset(store.keys()) == _keyset([f"b/{i}" for i in range(10)] + ["a"])
    assert store.remove_prefix("a/") == 0
    assert store.remove_prefix(b"b/") == 10
    assert _keyset(store.keys()) == {b"a"}
    assert store.get("a") == b"not under a/"
    assert len(store) == 1


def test_remove_prefix_nothing(store):
    store.put("k", b"v")
    assert store.remove_prefix("zzz") == 0
    assert store.get("k") == b"v"


def test_remove_prefix_frees_space(store_factory):
    store = store_factory(dram="8MiB")
    for round_ in range(5):
        for i in range(5):
            store.put(f"r/{i}", rand_bytes(1 * MiB, (round_, i)))
        assert store.remove_prefix("r/") == 5
    assert store.stats()["dram"]["evictions"] == 0
    assert len(store) == 0


def test_match_prefix(store):
    for k in ("b0", "b1", "b2", "b4"):
        store.put(k, b"block")
    assert store.match_prefix(["b0", "b1", "b2", "b3", "b4"]) == 3
    assert store.match_prefix(["b0", "b1", "b2"]) == 3
    assert store.match_prefix(["b0"]) == 1
    assert store.match_prefix(["x", "b0", "b1"]) == 0
    assert store.match_prefix([]) == 0
    assert store.match_prefix(["b4", "b0", "b1", "b2", "b3"]) == 4
    assert store.match_prefix(iter(["b0", "b1", "missing", "b2"])) == 2
    assert store.match_prefix([b"b0", "b1"]) == 2


def test_match_prefix_after_remove(store):
    keys = [f"blk{i}" for i in range(100)]
    for k in keys:
        store.put(k, b"x")
    assert store.match_prefix(keys) == 100
    store.remove("blk50")
    assert store.match_prefix(keys) == 50


# ------------------------------------------------------------------------------------ stat and stats


def test_stat(store):
    value = rand_bytes(12345, "stat")
    store.put("stat-key", value)
    st = store.stat("stat-key")
    assert as_bytes_key(st.key) == b"stat-key"
    assert st.size == 12345
    assert st.checksum == crc32c(value)
    assert st.tier == "dram"
    assert st.pinned is False
    assert st.expires is None


def test_stat_bytes_key(store):
    store.put(b"\x01\x02", b"abc")
    st = store.stat(b"\x01\x02")
    assert as_bytes_key(st.key) == b"\x01\x02"
    assert st.size == 3


def test_stat_checksum_follows_overwrite(store):
    store.put("k", b"one")
    assert store.stat("k").checksum == crc32c(b"one")
    store.put("k", b"two!")
    assert store.stat("k").checksum == crc32c(b"two!")
    assert store.stat("k").size == 4


def test_stat_numpy_checksum_is_over_bytes(store):
    arr = np.linspace(0, 1, 777, dtype=np.float64)
    store.put("k", arr)
    assert store.stat("k").checksum == crc32c(arr.tobytes())
    assert store.stat("k").size == arr.nbytes


def test_stat_missing(store):
    with pytest.raises(mooncakefs.KeyNotFound):
        store.stat("missing")


def test_stat_pinned_and_ttl(store):
    store.put("p", b"v", pin=True)
    assert store.stat("p").pinned is True
    before = time.time()
    store.put("t", b"v", ttl=100)
    after = time.time()
    expires = store.stat("t").expires
    assert isinstance(expires, float)
    assert before + 100 - 1 <= expires <= after + 100 + 1


def test_stats_shape(ssd_store):
    stats = ssd_store.stats()
    assert isinstance(stats, dict)
    for tier in ("dram", "ssd"):
        for field in ("capacity", "used", "objects", "hits", "misses", "evictions", "promotions"):
            assert field in stats[tier], (tier, field)
            assert isinstance(stats[tier][field], int), (tier, field)
            assert stats[tier][field] >= 0
    assert stats["objects"] == 0
    assert stats["dram"]["used"] == 0
    assert stats["dram"]["objects"] == 0


def test_stats_used_and_objects_move(store):
    s0 = store.stats()
    values = {f"k{i}": rand_bytes(100_000, i) for i in range(10)}
    for k, v in values.items():
        store.put(k, v)
    s1 = store.stats()
    assert s1["objects"] == 10
    assert s1["dram"]["objects"] == 10
    assert s1["dram"]["used"] >= s0["dram"]["used"] + 10 * 100_000
    assert s1["dram"]["used"] <= s1["dram"]["capacity"]
    for k in list(values)[:5]:
        store.remove(k)
    s2 = store.stats()
    assert s2["objects"] == 5
    assert s2["dram"]["objects"] == 5
    assert s2["dram"]["used"] < s1["dram"]["used"]
    assert s2["dram"]["used"] >= 5 * 100_000
    store.remove_prefix("k")
    s3 = store.stats()
    assert s3["objects"] == 0
    assert s3["dram"]["used"] == s0["dram"]["used"]


def test_stats_used_after_overwrite_does_not_grow(store):
    store.put("k", rand_bytes(1 * MiB, 0))
    used = store.stats()["dram"]["used"]
    for i in range(20):
        store.put("k", rand_bytes(1 * MiB, i))
    assert store.stats()["dram"]["used"] == used
    assert store.stats()["objects"] == 1


def test_stats_hits_and_misses(store):
    store.put("k", b"v")
    s0 = store.stats()
    store.get("k")
    store.get_into("k", bytearray(1))
    s1 = store.stats()
    assert s1["dram"]["hits"] >= s0["dram"]["hits"] + 2
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get("absent")
    s2 = store.stats()
    assert _total(s2, "misses") >= _total(s1, "misses") + 1
    assert s2["dram"]["hits"] == s1["dram"]["hits"]


def test_stats_objects_matches_len(ssd_store):
    for i in range(7):
        ssd_store.put(f"k{i}", b"v" * i)
    ssd_store.put("d", b"durable", durable=True)
    assert ssd_store.stats()["objects"] == len(ssd_store) == 8


# ---------------------------------------------------------------------------------------------- ttl


def test_ttl_expires(store):
    store.put("t", b"short-lived", ttl=0.5)
    store.put("keep", b"forever")
    assert store.get("t") == b"short-lived"
    time.sleep(0.8)
    assert store.exists("t") is False
    assert "t" not in store
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get("t")
    with pytest.raises(mooncakefs.KeyNotFound):
        store.get_into("t", bytearray(100))
    with pytest.raises(mooncakefs.KeyNotFound), store.view("t"):
        pass
    with pytest.raises(mooncakefs.KeyNotFound):
        store.stat("t")
    assert _keyset(store.keys()) == {b"keep"}
    assert len(store) == 1
    assert store.batch_get(["t", "keep"]) == [None, b"forever"]
    assert store.batch_exists(["t", "keep"]) == [False, True]
    assert store.match_prefix(["keep", "t"]) == 1
    assert store.remove("t") is False


def test_ttl_if_absent_after_expiry(store):
    store.put("t", b"old", ttl=0.5)
    with pytest.raises(mooncakefs.KeyExists):
        store.put("t", b"new", if_absent=True)
    time.sleep(0.8)
    store.put("t", b"new", if_absent=True)
    assert store.get("t") == b"new"


def test_put_without_ttl_clears_ttl(store):
    store.put("t", b"old", ttl=0.2)
    store.put("t", b"new")
    assert store.stat("t").expires is None
    time.sleep(0.5)
    assert store.get("t") == b"new"


def test_ttl_not_yet_expired(store):
    store.put("t", b"v", ttl=60)
    time.sleep(0.1)
    assert store.get("t") == b"v"


def test_ttl_expiry_frees_space(store_factory):
    store = store_factory(dram="8MiB")
    for i in range(6):
        store.put(f"t{i}", rand_bytes(1 * MiB, i), ttl=0.2)
    time.sleep(0.5)
    # the expired values' space must be usable without evicting anything live
    store.put("live", rand_bytes(1 * MiB, "live"), pin=True)
    for i in range(6):
        store.put(f"n{i}", rand_bytes(1 * MiB, ("n", i)), pin=True)
    for i in range(6):
        assert store.get(f"n{i}") == rand_bytes(1 * MiB, ("n", i))


# ---------------------------------------------------------------------------------------- if_absent


def test_if_absent(store):
    store.put("k", b"first", if_absent=True)
    assert store.get("k") == b"first"
    with pytest.raises(mooncakefs.KeyExists) as info:
        store.put("k", b"second", if_absent=True)
    assert "k" in str(info.value)
    assert store.get("k") == b"first"
    store.put("k", b"third")
    assert store.get("k") == b"third"


def test_if_absent_after_remove(store):
    store.put("k", b"first")
    store.remove("k")
    store.put("k", b"second", if_absent=True)
    assert store.get("k") == b"second"


def test_if_absent_message_names_key(store):
    store.put("some-unique-key", b"v")
    with pytest.raises(mooncakefs.KeyExists, match="some-unique-key"):
        store.put("some-unique-key", b"w", if_absent=True)


# ---------------------------------------------------------------------------------------------- pin


def test_pin_flag(store):
    store.put("p", b"pinned", pin=True)
    store.put("u", b"unpinned")
    assert store.stat("p").pinned is True
    assert store.stat("u").pinned is False
    assert store.get("p") == b"pinned"
    assert store.remove("p") is True  # pinned objects can still be removed explicitly
    assert not store.exists("p")


def test_pin_then_overwrite_unpinned(store):
    store.put("p", b"v1", pin=True)
    store.put("p", b"v2", pin=False)
    assert store.get("p") == b"v2"
    assert store.stat("p").pinned is False


# ------------------------------------------------------------------------------------------ durable


def test_durable_with_ssd(ssd_store):
    ssd_store.put("d", b"durable value", durable=True)
    assert ssd_store.get("d") == b"durable value"
    assert ssd_store.stat("d").checksum == crc32c(b"durable value")


def test_durable_without_ssd_is_an_error(store):
    with pytest.raises((mooncakefs.MooncakeError, ValueError)):
        store.put("d", b"v", durable=True)
    assert not store.exists("d")


def test_durable_without_ssd_leaves_store_usable(store):
    with pytest.raises((mooncakefs.MooncakeError, ValueError)):
        store.put("d", b"v", durable=True)
    store.put("d", b"v")
    assert store.get("d") == b"v"


# -------------------------------------------------------------------------------------------- batches


def test_batch_put_mapping(store):
    items = {f"k{i}": rand_bytes(1000, i) for i in range(20)}
    results = store.batch_put(items)
    assert isinstance(results, list)
    assert len(results) == 20
    for r in results:
        assert r is None or isinstance(r, int)
    for k, v in items.items():
        assert store.get(k) == v


def test_batch_put_iterable_of_pairs_and_generator(store):
    pairs = [(f"p{i}", rand_bytes(100, i)) for i in range(10)]
    results = store.batch_put(pairs)
    assert len(results) == 10
    assert all(r is None or isinstance(r, int) for r in results)
    gen_results = store.batch_put((f"g{i}", bytes([i]) * i) for i in range(10))
    assert len(gen_results) == 10
    for k, v in pairs:
        assert store.get(k) == v
    for i in range(10):
        assert store.get(f"g{i}") == bytes([i]) * i


def test_batch_put_mixed_good_and_bad(store):
    items = [
        ("good0", b"a"),
        ("", b"empty key"),
        ("good1", b"b"),
        ("x" * 1025, b"too long"),
        (42, b"int key"),
        ("good2", np.arange(4, dtype=np.int16)),
        ("bad-value", "a str is not a buffer"),
        ("good3", b""),
    ]
    results = store.batch_put(items)
    assert len(results) == len(items)
    assert results[0] is None or isinstance(results[0], int)
    assert isinstance(results[1], mooncakefs.InvalidKey)
    assert results[2] is None or isinstance(results[2], int)
    assert isinstance(results[3], mooncakefs.InvalidKey)
    assert isinstance(results[4], mooncakefs.InvalidKey)
    assert results[5] is None or isinstance(results[5], int)
    assert isinstance(results[6], (TypeError, ValueError))
    assert results[7] is None or isinstance(results[7], int)
    assert store.get("good0") == b"a"
    assert store.get("good1") == b"b"
    assert store.get("good2") == np.arange(4, dtype=np.int16).tobytes()
    assert store.get("good3") == b""
    assert not store.exists("bad-value")
    assert len(store) == 4


def test_batch_get(store):
    store.put("a", b"A")
    store.put("c", b"")
    store.put(b"d", b"D")
    assert store.batch_get(["a", "b", "c", b"d", "a"]) == [b"A", None, b"", b"D", b"A"]
    assert store.batch_get([]) == []
    for v in store.batch_get(["a", "c"]):
        assert type(v) is bytes


def test_batch_get_invalid_key_does_not_fail_the_batch(store):
    store.put("a", b"A")
    results = store.batch_get(["a", "", None, "a"])
    assert len(results) == 4
    assert results[0] == b"A" and results[3] == b"A"
    for r in results[1:3]:
        assert r is None or isinstance(r, mooncakefs.InvalidKey)


def test_batch_exists(store):
    store.put("a", b"A")
    store.put("b", b"")
    assert store.batch_exists(["a", "x", "b", "a"]) == [True, False, True, True]
    assert store.batch_exists([]) == []
    for r in store.batch_exists(["a", "x"]):
        assert isinstance(r, bool)


def test_batch_get_into(store):
    values = {"a": rand_bytes(100, "a"), "b": rand_bytes(200, "b"), "e": b""}
    for k, v in values.items():
        store.put(k, v)
    bufs = [
        bytearray(100),
        bytearray(b"\xaa" * 50),
        bytearray(300),
        bytearray(7),
        bytearray(b"\xbb" * 10),
        bytearray(1),
    ]
    keys = ["a", "b", "b", "missing", "", "e"]
    results = store.batch_get_into(keys, bufs)
    assert len(results) == 6
    assert results[0] == 100 and bufs[0] == values["a"]
    assert isinstance(results[1], mooncakefs.BufferTooSmall)
    assert bufs[1] == bytearray(b"\xaa" * 50)
    assert results[2] == 200 and bytes(bufs[2][:200]) == values["b"]
    assert isinstance(results[3], mooncakefs.KeyNotFound)
    assert isinstance(results[4], mooncakefs.InvalidKey)
    assert bufs[4] == bytearray(b"\xbb" * 10)
    assert results[5] == 0


def test_batch_get_into_wrong_buffer_type_is_per_key(store):
    store.put("a", b"A")
    store.put("b", b"B")
    results = store.batch_get_into(["a", "b"], [b"readonly", bytearray(1)])
    assert isinstance(results[0], TypeError)
    assert results[1] == 1


def test_batch_get_into_numpy(store):
    arrays = [np.arange(i * 10, dtype=np.float32) for i in range(1, 5)]
    store.batch_put({f"arr{i}": a for i, a in enumerate(arrays)})
    outs = [np.zeros_like(a) for a in arrays]
    results = store.batch_get_into([f"arr{i}" for i in range(4)], outs)
    assert results == [a.nbytes for a in arrays]
    for a, o in zip(arrays, outs, strict=True):
        np.testing.assert_array_equal(a, o)


def test_batch_order_is_input_order(store):
    keys = [f"k{i}" for i in range(50)]
    values = [rand_bytes(i + 1, i) for i in range(50)]
    store.batch_put(list(zip(keys, values, strict=True)))
    assert store.batch_get(keys[::-1]) == values[::-1]


# ---------------------------------------------------------------------------------- mapping protocol


def test_mapping_protocol(store):
    assert len(store) == 0
    store["a"] = b"A"
    store[b"b"] = bytearray(b"B")
    store["n"] = np.arange(3, dtype=np.int64)
    assert len(store) == 3
    assert store["a"] == b"A"
    assert store[b"b"] == b"B"
    assert store["n"] == np.arange(3, dtype=np.int64).tobytes()
    assert "a" in store
    assert "zz" not in store
    del store["a"]
    assert "a" not in store
    assert len(store) == 2
    with pytest.raises(KeyError):
        _ = store["a"]
    with pytest.raises(mooncakefs.KeyNotFound):
        _ = store["a"]
    with pytest.raises(KeyError):
        del store["a"]
    store["b"] = b"B2"
    assert store["b"] == b"B2"
    assert len(store) == 2


def test_len_counts_keys(store):
    for i in range(100):
        store[f"k{i}"] = b"v"
    assert len(store) == 100
    for i in range(100):
        store[f"k{i}"] = b"w"  # overwrites do not add
    assert len(store) == 100
    store.remove_prefix("k1")
    assert len(store) == 100 - 11


# ------------------------------------------------------------------------------------- closed store

CLOSED_CALLS = {
    "put": lambda s: s.put("k", b"v"),
    "get": lambda s: s.get("k"),
    "get_into": lambda s: s.get_into("k", bytearray(10)),
    "view": lambda s: s.view("k").__enter__(),
    "exists": lambda s: s.exists("k"),
    "remove": lambda s: s.remove("k"),
    "remove_prefix": lambda s: s.remove_prefix("k"),
    "stat": lambda s: s.stat("k"),
    "keys": lambda s: list(s.keys()),
    "match_prefix": lambda s: s.match_prefix(["k"]),
    "stats": lambda s: s.stats(),
    "batch_put": lambda s: s.batch_put({"k": b"v"}),
    "batch_get": lambda s: s.batch_get(["k"]),
    "batch_get_into": lambda s: s.batch_get_into(["k"], [bytearray(10)]),
    "batch_exists": lambda s: s.batch_exists(["k"]),
    "getitem": lambda s: s["k"],
    "setitem": lambda s: s.__setitem__("k", b"v"),
    "contains": lambda s: "k" in s,
    "delitem": lambda s: s.__delitem__("k"),
    "len": lambda s: len(s),
}


@pytest.mark.parametrize("name", list(CLOSED_CALLS))
def test_closed_store_raises(store, name):
    store.put("k", b"v")
    store.close()
    with pytest.raises(mooncakefs.StoreClosed):
        CLOSED_CALLS[name](store)


# -------------------------------------------------------------------------------------- error text


def test_error_messages_name_the_key(store):
    with pytest.raises(mooncakefs.KeyNotFound, match="needle-key"):
        store.get("needle-key")
    with pytest.raises(mooncakefs.KeyNotFound, match="needle-key"):
        store.stat("needle-key")
    store.put("needle-key", b"0123456789")
    with pytest.raises(mooncakefs.BufferTooSmall, match="needle-key"):
        store.get_into("needle-key", bytearray(3))


def test_array_module_buffers(store):
    import array

    src = array.array("d", [1.5, -2.25, 3.0])
    store.put("arr", src)
    assert store.get("arr") == src.tobytes()
    assert store.stat("arr").size == 24
    dst = array.array("d", [0.0] * 3)
    assert store.get_into("arr", dst) == 24
    assert dst == src
    dst_i = array.array("i", [0] * 10)  # 40 bytes of another item type: bytes are bytes
    assert store.get_into("arr", dst_i) == 24
    assert dst_i.tobytes()[:24] == src.tobytes()


def test_typed_memoryview_values(store):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    store.put("mv", memoryview(arr))
    assert store.get("mv") == arr.tobytes()
    store.put("mv-cast", memoryview(arr).cast("B"))
    assert store.get("mv-cast") == arr.tobytes()
