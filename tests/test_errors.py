"""The same mistake gives the same clear error in every store.

Each bad call below is made on the embedded store (``mooncakefs.open``), on a node's client over its
Unix socket and over TCP (``mooncakefs.connect``), and on a cluster (``mooncakefs.connect("etcd://…")``,
when etcd is installed): each must raise ``InvalidArgument`` (a TypeError and a ValueError too) with the
same message, store nothing, and, for the clients, be refused before any request leaves the process.
"""

from __future__ import annotations

import contextlib
import math
import shutil

import numpy as np
import pytest
from conftest import MiB, wait_until
from node_helpers import EtcdCluster, NodeProcess

import mooncakefs
from mooncakefs.errors import InvalidArgument, InvalidKey, MooncakeError, OutOfSpace

SINGLE = ["embedded", "unix", "tcp"]
ALL = [*SINGLE, "cluster"]

VALUE_KINDS = "bytes, bytearray, memoryview, numpy array"
WRITABLE_KINDS = "bytearray, writable memoryview, numpy array"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node (64 MiB DRAM, no SSD) for the unix and tcp clients of this module."""
    node = NodeProcess(tmp_path_factory.mktemp("errors"), name="err", dram="64MiB", ssd="0")
    node.start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    """A one-node cluster (64 MiB DRAM, no SSD) with its own etcd."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (tools/install-deps.sh installs etcd-server)")
    etcd = EtcdCluster().start()
    extra = ("--etcd", etcd.url, "--cluster", "errors", "--lease-ttl", "3")
    node = NodeProcess(tmp_path_factory.mktemp("errors-cluster"), name="c0", dram="64MiB", ssd="0", extra=extra)
    try:
        node.start()
        url = f"etcd://{etcd.url.replace('http://', '')}/errors"

        def listed() -> bool:
            try:
                with mooncakefs.connect(url) as probe:
                    return len(probe.map.nodes) == 1
            except mooncakefs.Unavailable:
                return False

        assert wait_until(listed, timeout=20, interval=0.2), "the cluster's map never listed its node"
        yield url
    finally:
        node.kill()
        etcd.close()


def _open(kind: str, request, tmp_path):
    if kind == "embedded":
        return mooncakefs.open(tmp_path / "store", dram="64MiB")
    if kind == "cluster":
        return mooncakefs.connect(request.getfixturevalue("cluster_url"))
    return mooncakefs.connect(request.getfixturevalue("node").url(kind), timeout=10)


@contextlib.contextmanager
def _opened(kind: str, request, tmp_path):
    store = _open(kind, request, tmp_path)
    store.ns = f"e{abs(hash(request.node.nodeid)) % 10**8}/"  # this test's keys, removed after it
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):
            store.remove_prefix(store.ns)
        store.close()


@pytest.fixture(params=ALL)
def kv(request, tmp_path):
    """Each store in turn; its keys go under ``kv.ns``."""
    with _opened(request.param, request, tmp_path) as store:
        yield store


@pytest.fixture(params=SINGLE)
def single(request, tmp_path):
    """Each single store (embedded, one node over unix and over tcp) in turn."""
    with _opened(request.param, request, tmp_path) as store:
        yield store


@contextlib.contextmanager
def nothing_sent(store):
    """Inside, a client that sends a request fails the test: bad arguments are refused client-side."""

    def sent(*_args, **_kwargs):
        raise AssertionError("a request was sent for a call with bad arguments")

    if isinstance(store, mooncakefs.RemoteStore):
        saved = store._take
        store._take = sent
        try:
            yield
        finally:
            store._take = saved
    elif type(store).__name__ == "ClusterStore":
        saved = store._link
        store._link = sent
        try:
            yield
        finally:
            store._link = saved
    else:
        yield


def refused(store, call, message: str):
    """``call(store)`` raises InvalidArgument whose message matches ``message`` (a regex), sending nothing."""
    with nothing_sent(store), pytest.raises(InvalidArgument, match=message) as caught:
        call(store)
    return caught.value


# ------------------------------------------------------------------------------------------- the error


def test_invalid_argument_is_caught_by_every_clause_a_caller_would_write():
    error = InvalidArgument("x")
    assert isinstance(error, MooncakeError) and isinstance(error, TypeError) and isinstance(error, ValueError)
    assert issubclass(InvalidKey, InvalidArgument)


# ------------------------------------------------------------------------------------------- put options

BAD_TTLS = [
    ("30", r"ttl must be a number of seconds \(int or float\) or None, got '30' \(str\)$"),
    (b"30", r"ttl must be a number of seconds \(int or float\) or None, got b'30' \(bytes\)$"),
    (True, r"ttl must be a number of seconds \(int or float\) or None, got True \(bool\)$"),
    ([30], r"ttl must be a number of seconds \(int or float\) or None, got \[30\] \(list\)$"),
    (-1, r"ttl must be a positive, finite number of seconds, got -1$"),
    (0, r"ttl must be a positive, finite number of seconds, got 0$"),
    (math.nan, r"ttl must be a positive, finite number of seconds, got nan$"),
    (math.inf, r"ttl must be a positive, finite number of seconds, got inf$"),
    (-math.inf, r"ttl must be a positive, finite number of seconds, got -inf$"),
]


@pytest.mark.parametrize("ttl, message", BAD_TTLS, ids=[repr(t) for t, _ in BAD_TTLS])
def test_a_bad_ttl_is_refused_before_anything_is_stored(kv, ttl, message):
    key = kv.ns + "ttl"
    refused(kv, lambda s: s.put(key, b"v", ttl=ttl), message)
    refused(kv, lambda s: s.batch_put([(key, b"v")], ttl=ttl), message)  # the whole call, not per item
    assert not kv.exists(key)


@pytest.mark.parametrize(
    "option, value",
    [("pin", "no"), ("pin", 1), ("pin", None), ("if_absent", "yes"), ("durable", 0), ("if_absent", 1.0)],
)
def test_a_flag_must_be_a_bool(kv, option, value):
    """pin="no" used to pin: a flag is True or False."""
    key = kv.ns + "flag"
    message = rf"{option} must be True or False, got {value!r} \({type(value).__name__}\)$"
    refused(kv, lambda s: s.put(key, b"v", **{option: value}), message)
    refused(kv, lambda s: s.batch_put({key: b"v"}, **{option: value}), message)
    assert not kv.exists(key)


@pytest.mark.parametrize("version", [1.5, -1, True, "7", 1 << 126])
def test_a_bad_version_is_refused(single, version):
    key = single.ns + "ver"
    message = rf"version must be an int from 0 to 2\*\*126 - 1, got .*\({type(version).__name__}\)$"
    refused(single, lambda s: s.put(key, b"v", version=version), message)
    refused(single, lambda s: s.batch_put([(key, b"v")], version=version), message)
    assert not single.exists(key)


def test_if_absent_and_if_newer_together_are_refused_before_sending(single):
    refused(
        single,
        lambda s: s.put(single.ns + "k", b"v", if_absent=True, if_newer=True),
        "put takes if_absent or if_newer, not both",
    )


def test_durable_without_an_ssd_tier_says_the_same_everywhere(kv):
    """The embedded store has no SSD tier, nor have the nodes: the node's message names the key as the
    caller wrote it, not as it travelled."""
    key = kv.ns + "durable"
    with pytest.raises(InvalidArgument) as caught:
        kv.put(key, b"v", durable=True)
    assert str(caught.value) == (
        f"put({key!r}, durable=True) needs an SSD tier: open the store with ssd=... (a node: --ssd)"
    )
    assert not kv.exists(key)


# ------------------------------------------------------------------------------------------- values

BAD_VALUES = [
    (None, f"value must be a bytes-like object ({VALUE_KINDS}), not NoneType"),
    ("text", f"value must be a bytes-like object ({VALUE_KINDS}), not str: encode it first (value.encode())"),
    (5, f"value must be a bytes-like object ({VALUE_KINDS}), not int"),
    ([1, 2, 3], f"value must be a bytes-like object ({VALUE_KINDS}), not list"),
    (
        memoryview(bytearray(16))[::2],
        "value must be a C-contiguous buffer (memoryview is not; numpy: np.ascontiguousarray(a))",
    ),
    (  # numpy refuses a strided array's buffer with ValueError, not BufferError: it used to escape raw
        np.zeros((4, 4))[:, ::2],
        "value must be a C-contiguous buffer (ndarray is not; numpy: np.ascontiguousarray(a))",
    ),
]


@pytest.mark.parametrize("value, message", BAD_VALUES, ids=[type(v).__name__ for v, _ in BAD_VALUES])
def test_a_value_that_is_not_a_buffer_gets_the_same_message_everywhere(kv, value, message):
    """A None value used to get Python's raw memoryview message through connect() but not open()."""
    key = kv.ns + "value"
    error = refused(kv, lambda s: s.put(key, value), None)
    assert str(error) == message
    results = kv.batch_put([(kv.ns + "fine", b"ok"), (key, value)])  # per item: the others are stored
    assert results[0] is None and isinstance(results[1], InvalidArgument) and str(results[1]) == message
    assert kv.get(kv.ns + "fine") == b"ok" and not kv.exists(key)


# ------------------------------------------------------------------------------------------- buffers

BAD_BUFFERS = [
    ("xxxxxxxx", f"buffer must be a writable bytes-like object ({WRITABLE_KINDS}), not str"),
    (None, f"buffer must be a writable bytes-like object ({WRITABLE_KINDS}), not NoneType"),
    (
        b"xxxxxxxx",
        "buffer must be writable, and this bytes is read-only: pass a bytearray, writable memoryview or numpy array",
    ),
    (
        memoryview(bytes(8)),
        "buffer must be writable, and this memoryview is read-only: pass a bytearray, "
        "writable memoryview or numpy array",
    ),
    (
        memoryview(bytearray(16))[::2],
        "buffer must be a C-contiguous buffer (memoryview is not; numpy: np.ascontiguousarray(a))",
    ),
]


@pytest.mark.parametrize("buffer, message", BAD_BUFFERS, ids=[repr(b)[:12] for b, _ in BAD_BUFFERS])
def test_get_into_a_buffer_that_cannot_take_the_value(kv, buffer, message):
    key = kv.ns + "into"
    kv.put(key, b"value")
    error = refused(kv, lambda s: s.get_into(key, buffer), None)
    assert str(error) == message
    results = kv.batch_get_into([key, key], [buffer, bytearray(8)])  # per key
    assert isinstance(results[0], InvalidArgument) and str(results[0]) == message and results[1] == 5


def test_batch_get_into_takes_one_buffer_per_key(kv):
    key = kv.ns + "k"
    kv.put(key, b"value")
    refused(
        kv,
        lambda s: s.batch_get_into([key, key], [bytearray(8)]),
        r"batch_get_into takes one buffer per key, got 2 keys and 1 buffers$",
    )
    refused(
        kv,
        lambda s: s.batch_get_into([key], bytearray(8)),
        r"batch_get_into takes a list of buffers, not a single bytearray .*: pass \[buffer\] for one$",
    )


# ------------------------------------------------------------------------------------------- key lists


@pytest.mark.parametrize("one", ["a/b", b"a/b"])
def test_match_prefix_of_a_single_key_is_refused_not_zero(kv, one):
    """match_prefix("a/b") used to look up "a", "/" and "b", and return 0."""
    kv.put("a", b"1")  # with the old behaviour, the lookup of "a" would even hit
    try:
        message = (
            rf"match_prefix takes a list of keys, not a single {type(one).__name__} \({one!r}\): "
            rf"pass \[{one!r}\] for one$"
        )
        refused(kv, lambda s: s.match_prefix(one), message)
    finally:
        kv.remove("a")


@pytest.mark.parametrize("call", ["match_prefix", "batch_get", "batch_exists"])
def test_calls_taking_many_keys_refuse_one_key_or_none(kv, call):
    refused(kv, lambda s: getattr(s, call)("abc"), rf"{call} takes a list of keys, not a single str")
    refused(kv, lambda s: getattr(s, call)(None), rf"{call} takes a list of keys, got None \(NoneType\)$")
    refused(kv, lambda s: getattr(s, call)(7), rf"{call} takes a list of keys, got 7 \(int\)$")


def test_versions_refuses_one_key(single):
    refused(single, lambda s: s.versions("abc"), "versions takes a list of keys, not a single str")


# ------------------------------------------------------------------------------------------- prefixes


@pytest.mark.parametrize("prefix", [5, None, 2.0, ["a"]])
def test_a_prefix_must_be_str_or_bytes(kv, prefix):
    """remove_prefix(5) used to remove every key starting with five NUL bytes (bytes(5))."""
    nul = "\0\0\0\0\0 nul-key"
    kv.put(nul, b"v")
    try:
        message = rf"prefix must be str or bytes, got .* \({type(prefix).__name__}\)$"
        refused(kv, lambda s: s.remove_prefix(prefix), message)
        refused(kv, lambda s: list(s.keys(prefix)), message)
        assert kv.exists(nul)
    finally:
        kv.remove(nul)


# ------------------------------------------------------------------------------------------- batch_put items


@pytest.mark.parametrize(
    "items, message",
    [
        (["a", "b"], r"batch_put takes \(key, value\) pairs, but item 0 is 'a' \(str\)$"),
        ([("a", b"v", 1)], r"batch_put takes \(key, value\) pairs, but item 0 is \('a', b'v', 1\) \(tuple\)$"),
        ([("a", b"v"), None], r"batch_put takes \(key, value\) pairs, but item 1 is None \(NoneType\)$"),
        (None, r"batch_put takes a mapping or a list of \(key, value\) pairs, got None \(NoneType\)$"),
        (5, r"batch_put takes a mapping or a list of \(key, value\) pairs, got 5 \(int\)$"),
        ("ab", r"batch_put takes a mapping or a list of \(key, value\) pairs, not a single str \('ab'\)$"),
    ],
    ids=["strs", "triple", "none-item", "none", "int", "str"],
)
def test_batch_put_of_items_that_are_not_pairs_stores_nothing(kv, items, message):
    """Malformed items used to fail half-way, with Python's unpacking message."""
    if isinstance(items, list):  # this test's keys
        items = [
            (kv.ns + i[0], *i[1:]) if isinstance(i, tuple) else kv.ns + i if isinstance(i, str) else i for i in items
        ]
        message = message.replace("'a'", repr(kv.ns + "a"))
    refused(kv, lambda s: s.batch_put(items), message)
    assert not kv.exists(kv.ns + "a")


# ------------------------------------------------------------------------------------------- cluster options


@pytest.mark.parametrize(
    "options",
    [
        {"replicas": 2},
        {"replicas": 3},
        {"replicas": 0},
        {"replicas": True},
        {"placement": "local"},
        {"placement": "elsewhere"},
        {"replicas": 2, "placement": "local"},
    ],
)
def test_replicas_and_placement_on_a_single_store_say_they_need_a_cluster(single, options):
    """put(replicas=2) on one node used to be a bare "unexpected keyword argument" TypeError."""
    key = single.ns + "r"
    message = (
        r"^(batch_)?put\((replicas|placement)=.*\): replicas and placement need a cluster, and .* is a "
        r"single store that keeps one copy of each value; connect to a cluster with "
        r"mooncakefs.connect\('etcd://HOST:2379/CLUSTER'\)$"
    )
    refused(single, lambda s: s.put(key, b"v", **options), message)
    refused(single, lambda s: s.batch_put([(key, b"v")], **options), message)
    assert not single.exists(key)


def test_one_replica_and_no_placement_is_what_a_single_store_does(single):
    """Code written for a cluster with replicas=1 runs on a single store unchanged."""
    single.put(single.ns + "one", b"v", replicas=1, placement=None)
    assert single.batch_put([[single.ns + "two", b"w"]], replicas=1) == [None]  # a pair may be a list
    assert single.get(single.ns + "one") == b"v" and single.get(single.ns + "two") == b"w"


# ------------------------------------------------------------------------------------------- out of space


def test_a_value_over_the_high_watermark_names_the_pool_the_watermark_and_what_fits(kv):
    """61 MiB into an empty 64 MiB pool used to say "0B used by pinned or in-use objects", which does
    not explain anything: the value is over the pool's high watermark (95% = 60.8 MiB)."""
    key = kv.ns + "big"
    with pytest.raises(OutOfSpace) as caught:
        kv.put(key, bytes(61 * MiB))
    assert str(caught.value) == (
        f"key {key!r}: no room for a value of 61MiB: the DRAM pool is 64MiB and its high watermark (95%) lets "
        "values up to 60.8MiB in; there is no SSD tier: give the store more DRAM (dram=, a node: --dram) or an "
        "SSD tier (ssd=, a node: --ssd)"
    )
    assert not kv.exists(key)


def test_a_full_pool_of_pinned_values_says_how_much_fits_now(store_factory):
    store = store_factory(dram="4MiB")
    store.put("held", bytes(3 * MiB), pin=True)
    with pytest.raises(OutOfSpace) as caught:
        store.put("more", bytes(2 * MiB), pin=True)
    assert str(caught.value) == (
        "key 'more': no room for a pinned value of 2MiB: 3MiB of the 4MiB DRAM pool is held by pinned or in-use "
        "objects, so at most 1MiB fits now (the high watermark, 95%, is 3.8MiB); pinned values live only in "
        "DRAM: give the store more DRAM (dram=, a node: --dram) or unpin"
    )
