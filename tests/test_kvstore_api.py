"""The shared API (mooncakefs/api.py): ``PutOptions`` checks put's keywords in one place, and every store
offers what ``KVStore`` names, with the same keywords."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import mooncakefs
from mooncakefs import wire
from mooncakefs.api import PLAIN_PUT, KVStore, PutOptions, Replace, put_options
from mooncakefs.cluster.client import ClusterStore
from mooncakefs.errors import InvalidArgument

STORES = [mooncakefs.Store, mooncakefs.RemoteStore, ClusterStore]


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"pin": "no"}, "pin must be True or False"),
        ({"durable": 1}, "durable must be True or False"),
        ({"ttl": "30"}, "ttl must be a number of seconds"),
        ({"ttl": True}, "ttl must be a number of seconds"),
        ({"ttl": -1}, "ttl must be a positive, finite number"),
        ({"ttl": float("nan")}, "ttl must be a positive, finite number"),
        ({"version": -1}, "version must be an int from 0 to 2\\*\\*126 - 1"),
        ({"version": 1 << 126}, "version must be an int"),
        ({"tag": 1 << 32}, "tag must be an int from 0 to 2\\*\\*32 - 1"),
        ({"if_absent": True, "if_newer": True}, "put takes if_absent or if_newer, not both"),
    ],
)
def test_put_options_refuse_bad_keywords_with_one_message(keywords, message):
    with pytest.raises(InvalidArgument, match=message):
        PutOptions(**keywords)
    with pytest.raises(InvalidArgument, match=message):
        put_options(**keywords)


def test_put_options_normalise_and_are_frozen():
    options = PutOptions(ttl=30, if_newer=True, version=7)
    assert options.ttl == 30.0 and type(options.ttl) is float
    assert options.replace is Replace.IF_OLDER
    assert PutOptions(if_absent=True).replace is Replace.NEVER
    assert PLAIN_PUT.replace is Replace.ALWAYS
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ttl = 5  # type: ignore[misc]
    assert put_options() is PLAIN_PUT  # the defaults cost no check and no allocation
    assert put_options(pin=True) == PutOptions(pin=True)


@pytest.mark.parametrize(
    "options", [PLAIN_PUT, put_options(replicas=2), PutOptions(ttl=3, if_absent=True, tag=7, replicas=3)]
)
def test_stamped_options_equal_the_same_options_made_with_the_version(options):
    """What a cluster client sends with each value: the options it was given, with its version; checked."""
    stamped = options.stamped(11)
    assert stamped == dataclasses.replace(options, version=11) and stamped.replace is options.replace
    assert options.version == 0  # a copy: the options given stay as they were
    with pytest.raises(InvalidArgument, match="version must be an int"):
        options.stamped(-1)


def test_a_replica_count_alone_costs_no_check():
    assert put_options(replicas=2) is put_options(replicas=2) == PutOptions(replicas=2)


@pytest.mark.parametrize("options", [PutOptions(replicas=2), PutOptions(placement="local")])
def test_single_store_refuses_cluster_options(options):
    with pytest.raises(InvalidArgument, match="need a cluster, and the embedded store at /x is a single store"):
        options.single_store("put", "embedded store", "/x")
    PutOptions(replicas=1).single_store("put", "embedded store", "/x")  # one copy: fine


def test_put_options_travel_to_a_node_as_put_options():
    """A node turns a put's meta into the same checked ``PutOptions`` a local put makes, and carries it to
    the store as it is: no keywords repeated, one check.  The defaults come back as PLAIN_PUT itself,
    which the store's fast path recognises by identity."""
    assert wire.unpack_put_options(*wire.pack_put_options()) is PLAIN_PUT
    options = PutOptions(pin=True, ttl=30, durable=True, version=9, if_newer=True)
    assert wire.unpack_put_options(*wire.pack_put_options(options)) == options
    placed = wire.unpack_put_options(*wire.pack_put_options(PLAIN_PUT, wire.LOCAL | 3 << wire.REPLICAS_SHIFT))
    assert placed == PutOptions(tag=wire.LOCAL | 3 << wire.REPLICAS_SHIFT)
    tag = 2 << wire.REPLICAS_SHIFT
    versioned = wire.unpack_put_options(*wire.pack_put_options(PutOptions(version=5), tag))
    assert versioned == PutOptions(tag=tag, version=5) and versioned.replace is Replace.ALWAYS
    with pytest.raises(InvalidArgument, match="ttl must be a number of seconds"):
        wire.unpack_put_options(0, "30", None)
    with pytest.raises(InvalidArgument, match="if_absent or if_newer"):
        wire.unpack_put_options(wire.IF_ABSENT | wire.IF_NEWER, None, None)


def test_a_put_tier_travels_as_the_last_field_of_its_meta_and_only_when_given():
    """A put's tier hint follows its options in PUT and PUT_BEGIN meta, only when there is one: a put
    without one is the frame of before the field came, and such a frame unpacks to no tier."""
    options = PutOptions(ttl=30, version=9)
    assert wire.pack_put_options(options, 0, "vram") == [*wire.pack_put_options(options), "vram"]
    assert wire.unpack_put_head([b"k", 3, *wire.pack_put_options(options, 0, "vram")]) == (b"k", 3, options, "vram")
    assert wire.unpack_put_head([b"k", 3, *wire.pack_put_options()]) == (b"k", 3, PLAIN_PUT, None)


def _protocol_methods() -> dict[str, inspect.Signature]:
    names = [n for n, v in vars(KVStore).items() if callable(v) and (not n.startswith("_") or n.startswith("__"))]
    wanted = {n for n in names if n not in vars(object) or n in ("__contains__", "__len__", "__enter__", "__exit__")}
    return {n: inspect.signature(getattr(KVStore, n)) for n in wanted if not n.startswith("_abc")}


@pytest.mark.parametrize("store_class", STORES, ids=lambda c: c.__name__)
def test_every_store_offers_the_kvstore_protocol(store_class):
    """Each method of KVStore is there, and takes at least the protocol's keywords (a store may add its
    own, with defaults)."""
    assert isinstance(vars(KVStore).get("closed"), property)
    assert isinstance(getattr(store_class, "closed", None), property), f"{store_class.__name__}.closed"
    for name, protocol in _protocol_methods().items():
        method = getattr(store_class, name, None)
        assert callable(method), f"{store_class.__name__} has no {name}"
        params = inspect.signature(method).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for param in protocol.parameters.values():
            if param.kind is param.KEYWORD_ONLY:
                assert param.name in params or takes_any, f"{store_class.__name__}.{name} lacks {param.name}="


def test_connect_lives_at_the_front_and_the_node_client_imports_no_cluster():
    """``connect`` chooses between RemoteStore and ClusterStore from the package's front, so client.py
    (which cluster/client.py builds on) needs nothing from the cluster: no import cycle."""
    assert mooncakefs.connect.__module__ == "mooncakefs"
    source = Path(mooncakefs.client.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert not {m for m in imported if m.startswith("mooncakefs.cluster")}, imported
    assert not hasattr(mooncakefs.client, "connect")
