"""The store's small calls in one C call each (``_engine.PlainPath``, and its twin ``_reference.PlainPath``,
step for step): plain puts into a store with an SSD tier (eviction demotes, a replaced value's SSD copy
is freed, a sticky value is written through), and ``batch_put`` / ``batch_get_into`` with their argument
checks inside that call, saying what is wrong exactly as the store's general path does."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from conftest import run_python

import mooncakefs
from mooncakefs import store as store_module
from mooncakefs.keys import InternalKey

BLOCK = 16 * 1024  # below the single-put limit (64 KiB) and the batch one (256 KiB)
SSD = dict(dram="256KiB", ssd="16MiB", segment_size="2MiB")  # DRAM holds ~13 blocks, SSD the rest


@pytest.fixture(params=["cython", "twin"])
def engine(request, monkeypatch) -> str:
    """Each test runs on the Cython PlainPath and on its pure-Python twin."""
    from mooncakefs import _engine, _reference

    if request.param == "twin":
        monkeypatch.setattr(_engine, "PlainPath", _reference.PlainPath)
    return request.param


def _put_then_die(tmp_path, engine: str, body: str) -> Any:
    """Run ``body`` on a store at ``tmp_path`` (opened with ``SSD``) in a child interpreter that then exits
    without closing it, as a killed process would, and return what the body printed (JSON): a reopen
    finds only what the puts themselves committed, not what a close would have."""
    prelude = (
        "import json, os, sys\n"
        "import mooncakefs\n"
        "from mooncakefs import _engine, _reference\n"
        "from mooncakefs.keys import InternalKey\n"
        "if sys.argv[2] == 'twin':\n"
        "    _engine.PlainPath = _reference.PlainPath\n"
        f"BLOCK = {BLOCK}\n"
        "store = mooncakefs.open(sys.argv[1], **json.loads(sys.argv[3]))\n"
    )
    code = prelude + textwrap.dedent(body) + "\nos._exit(0)  # no close\n"
    done = run_python(code, str(tmp_path), engine, json.dumps(SSD))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _refuse(monkeypatch, name: str, where: Any = store_module.Store) -> None:
    """Make ``where.name`` fail the test if called: the work must not reach the general path."""

    def called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{name} called: the call left the one-C-call path")

    monkeypatch.setattr(where, name, called)


def test_small_puts_into_a_store_with_an_ssd_tier_take_the_plain_path(tmp_path, monkeypatch, engine):
    """An SSD tier no longer sends every put through the general path (kv_bench's stores have one: its
    4 KiB puts ran at a seventh of its gets)."""
    with mooncakefs.open(tmp_path, **SSD) as store:
        _refuse(monkeypatch, "_put_locked")
        store.put("one", b"a" * BLOCK)
        assert store.batch_put([("two", b"b" * BLOCK), ("three", b"c" * BLOCK)]) == [None, None]
        assert store.batch_put({"four": b"d" * BLOCK}) == [None]
        store.put("one", b"e" * BLOCK)  # replaced
        assert [store.get(k) for k in ("one", "two", "three", "four")] == [
            b"e" * BLOCK,
            b"b" * BLOCK,
            b"c" * BLOCK,
            b"d" * BLOCK,
        ]


@pytest.mark.parametrize("way", ["put", "batch_put"])
def test_plain_puts_demote_what_dram_evicts_and_commit_it(tmp_path, engine, way):
    """Past the high watermark, eviction goes through the DRAM tier's general path: victims are written
    to SSD, not dropped, and their SSD copies are committed by the puts (they are there after a reopen
    of a store that was never closed)."""
    values = {f"k/{i}": bytes([i]) * BLOCK for i in range(40)}
    seen = _put_then_die(
        tmp_path,
        engine,
        f"""
        values = {{f"k/{{i}}": bytes([i]) * BLOCK for i in range(40)}}
        if {way!r} == "put":
            for key, value in values.items():
                store.put(key, value)
        else:
            for i in range(0, 40, 8):
                assert store.batch_put(list(values.items())[i : i + 8]) == [None] * 8
        read_back = all(store.get(key) == value for key, value in values.items())
        on_ssd = sorted(key for key in values if store.stat(key).tier == "ssd")
        print(json.dumps(dict(stats=store.stats(), read_back=read_back, on_ssd=on_ssd)))
        """,
    )
    stats = seen["stats"]
    assert stats["dram"]["evictions"] > 0
    assert stats["ssd"]["objects"] > 0
    assert stats["objects"] == 40  # none dropped
    assert seen["read_back"]
    with mooncakefs.open(tmp_path, **SSD) as store:
        assert seen["on_ssd"] and all(store.get(key) == values[key] for key in seen["on_ssd"])


@pytest.mark.parametrize("way", ["put", "batch_put"])
def test_a_plain_put_frees_the_ssd_copy_of_the_value_it_replaces(tmp_path, engine, way):
    """The value replaced had an SSD copy: the store frees it, and the put commits the removal (a reopen
    of a store that was never closed does not bring the old value back)."""
    seen = _put_then_die(
        tmp_path,
        engine,
        f"""
        store.put("keep", b"kept" * 100, durable=True)  # the segment stays: only the index forgets "k"
        store.put("k", b"old" * 100, durable=True)
        before = store.stats()["ssd"]["objects"]
        if {way!r} == "put":
            store.put("k", b"new" * 100)
        else:
            assert store.batch_put([("k", b"new" * 100), ("other", b"x")]) == [None, None]
        print(json.dumps([before, store.stats()["ssd"]["objects"], store.get("k") == b"new" * 100]))
        """,
    )
    assert seen == [2, 1, True]
    with mooncakefs.open(tmp_path, **SSD) as store:
        assert "k" not in store  # the new value lived in DRAM only; the old one is gone for good
        assert store.get("keep") == b"kept" * 100


def test_a_sticky_value_in_a_plain_batch_is_written_through(tmp_path, engine):
    """A file chunk (an InternalKey) put in a batch with plain values goes to SSD as it is put."""
    chunk = InternalKey(b"chunk/0")
    with mooncakefs.open(tmp_path, **SSD) as store:
        assert store.batch_put([(chunk, b"c" * BLOCK), ("plain", b"p" * BLOCK)]) == [None, None]
        assert store.stats()["ssd"]["objects"] == 1
        assert store.get(chunk) == b"c" * BLOCK
    with mooncakefs.open(tmp_path, **SSD) as store:
        assert store.get(chunk) == b"c" * BLOCK
        assert "plain" not in store


@pytest.mark.parametrize("ssd", [None, "16MiB"])
def test_batch_calls_on_lists_are_one_call_with_their_checks_inside(tmp_path, monkeypatch, engine, ssd):
    """A list of (key, value) tuples, and lists of keys and buffers, need no Python pass of their own."""
    with mooncakefs.open(tmp_path, dram="1MiB", ssd=ssd) as store:
        _refuse(monkeypatch, "put_pairs", store_module)
        _refuse(monkeypatch, "batch_targets", store_module)
        keys = [f"k/{i}" for i in range(32)]
        assert store.batch_put([(k, bytes([i]) * 4096) for i, k in enumerate(keys)]) == [None] * 32
        buffers = [bytearray(4096) for _ in keys]
        assert store.batch_get_into(keys, buffers) == [4096] * 32
        assert all(b == bytes([i]) * 4096 for i, b in enumerate(buffers))


def test_batch_put_errors_per_item_and_per_call(tmp_path, engine):
    """Bad items fail alone, with the general path's errors; a bad batch fails as a whole, before
    anything is stored; pairs given as lists, and large values, still work."""
    with mooncakefs.open(tmp_path, dram="4MiB") as store:
        results = store.batch_put(
            [("ok", b"v"), ("", b"v"), ("str", "text"), (b"\xc0\x80x", b"v"), (5, b"v"), ("also", memoryview(b"w"))]
        )
        assert results[0] is None and results[5] is None
        assert [type(r).__name__ for r in results[1:5]] == ["InvalidKey", "InvalidArgument", "InvalidKey", "InvalidKey"]
        assert str(results[2]).startswith("value must be a bytes-like object") and "not str" in str(results[2])
        assert "keys are 1 to 1024 bytes" in str(results[1])
        with pytest.raises(mooncakefs.InvalidArgument, match=r"batch_put takes \(key, value\) pairs, but item 1 is"):
            store.batch_put([("a", b"1"), ("b", b"2", b"3")])
        assert "a" not in store
        assert store.batch_put([["as-list", b"l"], ("big", bytes(300 * 1024))]) == [None, None]
        assert store.get("as-list") == b"l" and len(store.get("big")) == 300 * 1024


@pytest.mark.parametrize("large", [False, True])
def test_batch_put_lets_go_of_every_value_buffer(tmp_path, engine, large):
    """The buffers a batch's values lend its copies are all given back when it returns: those of stored
    values, of an item refused for its key, and (``large``: a value too large for the batch's run, which
    sends the batch to the store's general path) of the run it had begun."""
    with mooncakefs.open(tmp_path, dram="4MiB") as store:
        values = [bytearray([i]) * 4096 for i in range(4)]
        items = [("a", values[0]), ("", values[1]), ("b", values[2])]
        if large:
            items.append(("big", bytearray(300 * 1024)))
        items.append(("c", values[3]))
        results = store.batch_put(items)
        assert [type(r).__name__ for r in results] == ["NoneType", "InvalidKey"] + ["NoneType"] * (len(items) - 2)
        for value in values:
            value.extend(b"more")  # BufferError if a view of it were still held
        assert [store.get(k) for k in "abc"] == [bytes([0]) * 4096, bytes([2]) * 4096, bytes([3]) * 4096]


def test_batch_get_into_errors_per_key_and_per_call(tmp_path, engine):
    """A short or read-only buffer, a bad key and a missing key fail alone, as ``get_into`` says; lists
    of different lengths fail the call; tuples of keys and buffers work."""
    with mooncakefs.open(tmp_path, dram="4MiB") as store:
        store.batch_put([("a", b"x" * 100), ("b", b"y" * 100), ("c", b"z" * 100)])
        results = store.batch_get_into(
            ["a", "b", "c", "", "missing"], [bytearray(100), bytearray(10), b"r" * 100, bytearray(1), bytearray(1)]
        )
        assert results[0] == 100
        assert [type(r).__name__ for r in results[1:]] == [
            "BufferTooSmall",
            "InvalidArgument",
            "InvalidKey",
            "KeyNotFound",
        ]
        assert "value is 100 bytes but the buffer holds 10" in str(results[1])
        assert "writable" in str(results[2])
        with pytest.raises(mooncakefs.InvalidArgument, match="one buffer per key, got 2 keys and 1 buffers"):
            store.batch_get_into(["a", "b"], [bytearray(100)])
        buffers = (bytearray(100), bytearray(100))
        assert store.batch_get_into(("a", "b"), buffers) == [100, 100]
        assert buffers[1] == b"y" * 100


def test_a_subclass_keeps_its_own_put_get_and_batch_put(tmp_path, engine):
    """An instance's put, get and batch_put are PlainPath's only where its class has Store's own: a
    subclass that overrides one is answered by its override, for plain calls as for calls with options."""
    calls: list[str] = []

    class Logged(store_module.Store):
        def put(self, key: Any, value: Any, **options: Any) -> None:
            calls.append("put")
            super().put(key, value, **options)

        def get(self, key: Any) -> bytes:
            calls.append("get")
            return super().get(key)

        def batch_put(self, items: Any, **options: Any) -> list[Any]:
            calls.append("batch_put")
            return super().batch_put(items, **options)

    store = Logged(tmp_path / "s", dram="4MiB")
    try:
        store.put("a", b"x" * BLOCK)
        store.put("b", b"y", pin=True)
        store.batch_put([("c", b"z")])
        assert store.get("a") == b"x" * BLOCK
        assert calls == ["put", "put", "batch_put", "get"], "a subclass's override was passed by"
    finally:
        store.close()
    plain = mooncakefs.open(tmp_path / "plain", dram="4MiB")
    try:
        assert plain.get.__self__ is plain._plain, "a plain Store's get no longer goes straight to C"
    finally:
        plain.close()
