"""The key vocabulary shared by every store, the node's wire and the cluster's placement: what a key
is (str or bytes, 1 to 1024 bytes, "a" and b"a" the same key), the reserved internal namespace
(``InternalKey``, ``CachedKey``), and a key's canonical bytes, prefix bytes and digest.

Nothing here imports a store, so placement hashing, the node and the FUSE layer can name keys without
loading the engine's index.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mooncakefs.errors import InvalidArgument, InvalidKey, given

MAX_KEY_BYTES = 1024
INTERNAL_PREFIX = b"\xc0\x80"  # never valid UTF-8, so no str key has it; bytes keys may not use it
Key = str | bytes


class InternalKey(bytes):
    """A key in mooncakefs's own namespace (the filesystem's file chunks): it starts with
    INTERNAL_PREFIX, is hidden from ``keys()`` and ``remove_prefix()``, and its objects are sticky:
    written through to SSD as they are put (so they survive a crash of the process; ``durable`` also
    flushes them to the disk), evicted from DRAM only by demotion, never dropped."""

    def __new__(cls, name: bytes) -> InternalKey:
        return super().__new__(cls, INTERNAL_PREFIX + name)


CACHE_NAME_PREFIX = b"p2p/"  # internal names under this are CachedKeys: copies a reader keeps to serve


class CachedKey(InternalKey):
    """An internal key for a copy that can be fetched again (a chunk a reader keeps to serve other
    readers, a P2P Store shard): reserved like every internal key, but not sticky, so the copy is
    evicted like any cached value instead of filling the SSD tier."""

    def __new__(cls, name: bytes) -> CachedKey:
        if not name.startswith(CACHE_NAME_PREFIX):
            name = CACHE_NAME_PREFIX + name
        return super().__new__(cls, name)  # type: ignore[return-value]


def wire_key(raw: Any) -> Key:
    """A key as it came over the wire (raw bytes), as the store's API takes it: internal ones (file
    chunks, cluster pointers, cached copies) marked so; the store checks the rest."""
    if type(raw) is bytes and raw.startswith(INTERNAL_PREFIX):
        name = raw[len(INTERNAL_PREFIX) :]
        return CachedKey(name) if name.startswith(CACHE_NAME_PREFIX) else InternalKey(name)
    return raw


def encode_key(key: object) -> bytes:
    """The canonical bytes of a key: str keys are UTF-8, so "a" and b"a" are the same key."""
    if type(key) is str:
        try:
            raw = key.encode()
        except UnicodeEncodeError as exc:
            raise InvalidKey(f"key {key!r} is not valid UTF-8: {exc.reason}") from None
    elif type(key) is bytes:
        raw = key
        if raw.startswith(INTERNAL_PREFIX):
            raise InvalidKey(f"key {key!r:.80} starts with {INTERNAL_PREFIX!r}, which mooncakefs reserves")
    elif type(key) is InternalKey or type(key) is CachedKey:
        raw = bytes(key)
    elif isinstance(key, str | bytes):
        return encode_key(str(key) if isinstance(key, str) else bytes(key))
    else:
        raise InvalidKey(f"key must be str or bytes, not {type(key).__name__} ({key!r:.80})")
    if not 0 < len(raw) <= MAX_KEY_BYTES:
        what = "empty" if not raw else f"{len(raw)} bytes long"
        raise InvalidKey(f"key {key!r:.80} is {what}; keys are 1 to {MAX_KEY_BYTES} bytes")
    return raw


def encode_prefix(prefix: object) -> bytes:
    """The bytes of a key prefix ("" matches every key).  An int is refused: ``bytes(5)`` would be five
    NUL bytes, and ``remove_prefix(5)`` would remove the wrong keys."""
    if type(prefix) is str:
        try:
            return prefix.encode()
        except UnicodeEncodeError as exc:
            raise InvalidKey(f"prefix {prefix!r:.80} is not valid UTF-8: {exc.reason}") from None
    if isinstance(prefix, bytes | bytearray | memoryview):
        return bytes(prefix)
    if isinstance(prefix, str):
        return encode_prefix(str(prefix))
    raise InvalidArgument(f"prefix must be str or bytes, got {given(prefix)}")


def key_digest(raw: bytes) -> bytes:
    """A key's name in the shared index: 128 bits of BLAKE2b, so distinct keys never meet."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def decode_key(raw: bytes) -> Key:
    """Keys come back as str when they are UTF-8 (as every str key is), else as bytes."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw
