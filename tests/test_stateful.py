"""Hypothesis state machines: the store against a dict model.

Four set-ups:
* big DRAM, no SSD: nothing is ever evicted, the model is exact;
* small DRAM with SSD: eviction demotes, nothing is lost, the model is still exact;
* small DRAM, no SSD: eviction drops, so a key may vanish (never come back with wrong bytes);
* small DRAM with SSD, some puts durable, plus close/reopen: durable (and demoted) keys come back exactly,
  keys whose latest put was not durable may be gone after a reopen.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from conftest import as_bytes_key, rand_bytes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from mooncakefs._engine import crc32c  # checked against an independent oracle in test_engine_reference

import mooncakefs

KEYS = [f"k{i}" for i in range(6)] + [b"b0", b"b1", "p/x", "p/y", "p/z"]

keys_st = st.sampled_from(KEYS)
values_st = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=3000),
    st.builds(
        lambda seed, size: rand_bytes(size, seed),
        st.integers(0, 10_000),
        st.sampled_from([40_000, 150_000, 300_000]),
    ),
)


class StoreMachine(RuleBasedStateMachine):
    OPTIONS: dict = dict(dram="16MiB", ssd=None)
    LOSSY = False  # evictions drop objects (no SSD tier)
    DURABLE = False  # puts may be durable; a reopen rule exists

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="mooncakefs-stateful-")
        self.path = os.path.join(self.dir, "db")
        self.store = mooncakefs.open(self.path, **self.OPTIONS)
        self.model: dict = {}  # key -> the value it holds if present
        self.maybe: set = set()  # keys of the model that may have vanished (evicted without SSD, lost on reopen)
        self.volatile: set = set()  # keys whose latest put was not durable

    def teardown(self):
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers

    def _may_vanish(self, key) -> bool:
        return self.LOSSY or key in self.maybe

    def _certain(self):
        return [k for k in self.model if not self._may_vanish(k)]

    def _saw_absent(self, key, what: str) -> None:
        assert key not in self.model or self._may_vanish(key), f"{what}: {key!r} is missing but was put"
        self.model.pop(key, None)
        self.maybe.discard(key)

    def _saw_value(self, key, value: bytes, what: str) -> None:
        assert key in self.model, f"{what}: {key!r} is present but was never put or was removed"
        assert value == self.model[key], f"{what}: {key!r} returned wrong bytes"

    def _stored(self, key, value: bytes, durable: bool) -> None:
        self.model[key] = bytes(value)
        self.maybe.discard(key)
        if durable:
            self.volatile.discard(key)
        else:
            self.volatile.add(key)

    # -- rules

    @rule(key=keys_st, value=values_st, if_absent=st.booleans(), durable=st.booleans())
    def put(self, key, value, if_absent, durable):
        durable = durable and self.DURABLE
        if if_absent:
            try:
                self.store.put(key, value, if_absent=True, durable=durable)
            except mooncakefs.KeyExists:
                assert key in self.model, f"KeyExists for {key!r} which is not in the store"
                self.maybe.discard(key)  # it is there now
                return
            assert key not in self.model or self._may_vanish(key), f"if_absent put of {key!r} replaced it"
        else:
            self.store.put(key, value, durable=durable)
        self._stored(key, value, durable)

    @rule(key=keys_st, value=values_st)
    def setitem(self, key, value):
        self.store[key] = value
        self._stored(key, value, False)

    @rule(key=keys_st)
    def get(self, key):
        try:
            value = self.store.get(key)
        except mooncakefs.KeyNotFound:
            self._saw_absent(key, "get")
        else:
            assert type(value) is bytes
            self._saw_value(key, value, "get")

    @rule(key=keys_st, slack=st.sampled_from([-1, 0, 7]))
    def get_into(self, key, slack):
        size = len(self.model.get(key, b"")) + slack
        buf = bytearray(b"\xee" * max(size, 0))
        try:
            n = self.store.get_into(key, buf)
        except mooncakefs.KeyNotFound:
            self._saw_absent(key, "get_into")
        except mooncakefs.BufferTooSmall:
            assert key in self.model and len(self.model[key]) > len(buf), "BufferTooSmall with a big enough buffer"
            assert buf == bytearray(b"\xee" * len(buf)), "failed get_into wrote into the buffer"
        else:
            self._saw_value(key, bytes(buf[:n]), "get_into")
            assert buf[n:] == bytearray(b"\xee" * (len(buf) - n)), "get_into wrote past the value"

    @rule(key=keys_st)
    def view(self, key):
        try:
            with self.store.view(key) as mv:
                data = bytes(mv)
                assert mv.readonly
        except mooncakefs.KeyNotFound:
            self._saw_absent(key, "view")
        else:
            self._saw_value(key, data, "view")

    @rule(key=keys_st)
    def exists(self, key):
        if self.store.exists(key):
            assert key in self.model, f"exists({key!r}) is True for a key not put"
            self.maybe.discard(key)
        else:
            self._saw_absent(key, "exists")

    @rule(key=keys_st)
    def contains(self, key):
        if key in self.store:
            assert key in self.model
        else:
            self._saw_absent(key, "in")

    @rule(key=keys_st)
    def remove(self, key):
        removed = self.store.remove(key)
        if removed:
            assert key in self.model, f"remove({key!r}) removed a key that was not there"
        else:
            self._saw_absent(key, "remove")
        self.model.pop(key, None)
        self.maybe.discard(key)

    @rule(key=keys_st)
    def delitem(self, key):
        try:
            del self.store[key]
        except KeyError:
            self._saw_absent(key, "del")
        else:
            assert key in self.model
            self.model.pop(key)
            self.maybe.discard(key)

    @rule(prefix=st.sampled_from(["p/", "k", b"b", "zz"]))
    def remove_prefix(self, prefix):
        bprefix = as_bytes_key(prefix)
        matching = [k for k in self.model if as_bytes_key(k).startswith(bprefix)]
        certain = [k for k in matching if not self._may_vanish(k)]
        n = self.store.remove_prefix(prefix)
        assert len(certain) <= n <= len(matching), (prefix, n, matching)
        for k in matching:
            del self.model[k]
            self.maybe.discard(k)

    @rule(pairs=st.lists(st.tuples(keys_st, values_st), max_size=5), bad=st.booleans())
    def batch_put(self, pairs, bad):
        items = list(pairs)
        bad_at = None
        if bad:
            bad_at = len(items) // 2
            items.insert(bad_at, ("", b"bad key"))
        results = self.store.batch_put(items)
        assert len(results) == len(items)
        for i, ((key, value), result) in enumerate(zip(items, results, strict=True)):
            if i == bad_at:
                assert isinstance(result, mooncakefs.InvalidKey), result
                continue
            assert result is None or (isinstance(result, int) and not isinstance(result, bool)), result
            self._stored(key, value, False)

    @rule(keys=st.lists(keys_st, max_size=6))
    def batch_get(self, keys):
        results = self.store.batch_get(keys)
        assert len(results) == len(keys)
        for key, value in zip(keys, results, strict=True):
            if value is None:
                self._saw_absent(key, "batch_get")
            else:
                self._saw_value(key, value, "batch_get")

    @rule(keys=st.lists(keys_st, max_size=6))
    def batch_get_into(self, keys):
        bufs = [bytearray(len(self.model.get(k, b"")) + 1) for k in keys]
        results = self.store.batch_get_into(keys, bufs)
        assert len(results) == len(keys)
        for key, buf, result in zip(keys, bufs, results, strict=True):
            if isinstance(result, mooncakefs.KeyNotFound):
                self._saw_absent(key, "batch_get_into")
            else:
                assert isinstance(result, int), result
                self._saw_value(key, bytes(buf[:result]), "batch_get_into")

    @rule(keys=st.lists(keys_st, max_size=6))
    def batch_exists(self, keys):
        results = self.store.batch_exists(keys)
        assert len(results) == len(keys)
        for key, present in zip(keys, results, strict=True):
            if present:
                assert key in self.model
            else:
                self._saw_absent(key, "batch_exists")

    @rule(keys=st.lists(keys_st, max_size=6))
    def match_prefix(self, keys):
        n = self.store.match_prefix(keys)
        assert 0 <= n <= len(keys)
        # the first n are present, the (n+1)th is not
        for key in keys[:n]:
            assert key in self.model, f"match_prefix counted {key!r}, which is not there"
        if n < len(keys):
            self._saw_absent(keys[n], "match_prefix")

    @rule(key=keys_st)
    def stat(self, key):
        try:
            st_ = self.store.stat(key)
        except mooncakefs.KeyNotFound:
            self._saw_absent(key, "stat")
        else:
            assert key in self.model
            assert st_.size == len(self.model[key])
            assert st_.checksum == crc32c(self.model[key])
            assert st_.tier in ("dram", "ssd")
            assert st_.pinned is False

    # -- invariants

    @invariant()
    def keys_and_len_agree_with_model(self):
        listed = {as_bytes_key(k) for k in self.store.keys()}  # noqa: SIM118
        model = {as_bytes_key(k) for k in self.model}
        certain = {as_bytes_key(k) for k in self._certain()}
        assert listed <= model, f"keys() lists keys that are not in the store: {listed - model}"
        assert certain <= listed, f"keys() misses keys: {certain - listed}"
        n = len(self.store)
        assert n == len(listed)
        stats = self.store.stats()
        assert stats["objects"] == n
        dram = stats["dram"]
        assert dram["used"] <= dram["capacity"]


class SmallDramWithSsdMachine(StoreMachine):
    OPTIONS = dict(dram="1MiB", ssd="32MiB", segment_size="1MiB")


class SmallDramNoSsdMachine(StoreMachine):
    OPTIONS = dict(dram="1MiB", ssd=None)
    LOSSY = True


class DurableReopenMachine(StoreMachine):
    OPTIONS = dict(dram="1MiB", ssd="32MiB", segment_size="1MiB")
    DURABLE = True

    @rule()
    def reopen(self):
        self.store.close()
        self.store = mooncakefs.open(self.path, **self.OPTIONS)
        # objects whose latest put was not durable were perhaps only in DRAM
        self.maybe |= self.volatile & set(self.model)


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestBigDram = StoreMachine.TestCase
TestBigDram.settings = SETTINGS
TestSmallDramWithSsd = SmallDramWithSsdMachine.TestCase
TestSmallDramWithSsd.settings = SETTINGS
TestSmallDramNoSsd = SmallDramNoSsdMachine.TestCase
TestSmallDramNoSsd.settings = SETTINGS
TestDurableReopen = DurableReopenMachine.TestCase
TestDurableReopen.settings = SETTINGS
