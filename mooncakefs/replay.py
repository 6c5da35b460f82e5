"""Replay a KV-cache trace through a store and score its cache policy against LRU and Belady.

A trace is Mooncake's format: JSON lines, one request each, whose ``hash_ids`` list the request's
prompt blocks as a prefix chain (block i is only useful after blocks 0..i-1).  A request's **hits** are
its leading blocks present before it is served (what an inference engine can load instead of
recomputing); the hit ratio is hits / block references.  Each request is served as a connector does:
``match_prefix`` on the chain, ``batch_get_into`` of the prefix found, ``batch_put`` of the rest.

LRU and Belady (the offline optimum: evict the block used furthest in the future, or do not admit
the new one if it is that block) are computed here on the same requests with the same capacity in
blocks, so every run prints its own yardsticks.
"""

from __future__ import annotations

import heapq
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mooncakefs.errors import InvalidArgument, KeyNotFound, MooncakeError

Request = list[int]
PATTERNS = 16  # block b holds the byte b % PATTERNS: few enough sources to stay in the CPU's caches


class TraceError(InvalidArgument):
    """A trace that cannot be read: missing, empty, or a line that is not a request."""


def load_trace(path: Path, limit: int | None = None) -> list[Request]:
    """The requests of a JSON-lines trace (at most ``limit``), each a list of block hashes (ints).

    Blank lines are skipped; anything else that is not a JSON object with a list of ints under
    ``hash_ids`` is an error naming the line, since a silently skipped line would change the result."""
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise TraceError(f"trace {path}: no such file") from None
    except OSError as exc:
        raise TraceError(f"trace {path}: cannot open it: {exc.strerror}") from None
    requests: list[Request] = []
    with f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise TraceError(f"trace {path} line {n}: not JSON ({exc})") from None
            if not isinstance(record, dict) or "hash_ids" not in record:
                raise TraceError(
                    f"trace {path} line {n}: a request is a JSON object with a 'hash_ids' list, got {line[:80]!r}"
                )
            chain = record["hash_ids"]
            if not isinstance(chain, list) or not all(type(b) is int for b in chain):
                raise TraceError(f"trace {path} line {n}: 'hash_ids' must be a list of integers, got {str(chain)[:80]}")
            requests.append(chain)
    if not requests:
        raise TraceError(f"trace {path}: no requests in it")
    return requests


def prefix_hits(present: Callable[[int], bool], chain: Sequence[int]) -> int:
    """How many leading blocks of ``chain`` are present."""
    hits = 0
    for b in chain:
        if not present(b):
            break
        hits += 1
    return hits


def lru_hits(requests: Sequence[Request], capacity: int) -> int:
    """Prefix hits of one LRU cache of ``capacity`` blocks (every block of a request is used, in order)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for chain in requests:
        hits += prefix_hits(cache.__contains__, chain)
        for b in chain:
            if b in cache:
                cache.move_to_end(b)
            else:
                cache[b] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits


def belady_hits(requests: Sequence[Request], capacity: int) -> int:
    """Prefix hits of Belady's MIN over ``capacity`` blocks: on a miss with the cache full, drop the
    block whose next use is furthest away, which may be the new block itself (it is then not admitted)."""
    flat = [b for chain in requests for b in chain]
    never = len(flat) + 1
    next_use = [0] * len(flat)
    last: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = last.get(flat[i], never)
        last[flat[i]] = i
    cached: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block), with stale items skipped lazily
    hits = i = 0
    for chain in requests:
        hits += prefix_hits(cached.__contains__, chain)
        for b in chain:
            n = next_use[i]
            i += 1
            if b not in cached and len(cached) >= capacity:
                while cached.get(heap[0][1]) != -heap[0][0]:
                    heapq.heappop(heap)
                if -heap[0][0] <= n:  # the new block is needed last: do not admit it
                    continue
                del cached[heapq.heappop(heap)[1]]
            cached[b] = n
            heapq.heappush(heap, (-n, b))
    return hits


@dataclass
class ReplayResult:
    """What a replay measured: the store's hits, the yardsticks', and the store's speed."""

    requests: int
    block_refs: int
    unique_blocks: int
    capacity_blocks: int
    hits: int
    lru_hits: int
    belady_hits: int
    seconds: float
    wrong_bytes: int = 0
    copy_seconds: float = 0.0  # the same copies alone (numpy), the physical ceiling

    def as_json(self) -> dict[str, Any]:
        refs = max(self.block_refs, 1)
        return {
            "requests": self.requests,
            "block_refs": self.block_refs,
            "unique_blocks": self.unique_blocks,
            "capacity_blocks": self.capacity_blocks,
            "hits": self.hits,
            "hit_ratio": self.hits / refs,
            "lru_hit_ratio": self.lru_hits / refs,
            "belady_hit_ratio": self.belady_hits / refs,
            "gap_closed": gap_closed(self.hits, self.lru_hits, self.belady_hits),
            "seconds": self.seconds,
            "block_refs_per_s": self.block_refs / self.seconds if self.seconds > 0 else 0.0,
            "copy_ceiling_block_refs_per_s": self.block_refs / self.copy_seconds if self.copy_seconds > 0 else None,
            "wrong_bytes": self.wrong_bytes,
        }


def gap_closed(hits: int, lru: int, belady: int) -> float | None:
    """The share of the LRU-to-Belady gap that ``hits`` closes (negative: worse than LRU)."""
    return None if belady <= lru else (hits - lru) / (belady - lru)


def replay_store(
    store: Any,
    requests: Sequence[Request],
    block_size: int,
    *,
    key_prefix: str = "blk/",
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[int, float, int]:
    """Serve every request through ``store`` as a connector would; returns (hits, seconds, wrong).

    A hit is a block of the cached prefix that was then loaded (a block evicted between the match
    and the load is recomputed, so it is not one).  Block b holds the byte b % PATTERNS throughout, and
    the first byte of every block loaded is checked (``wrong`` counts mismatches)."""
    import numpy as np

    patterns = [bytes([i]) * block_size for i in range(PATTERNS)]
    longest = max(map(len, requests))
    arena = np.empty((longest, block_size), dtype=np.uint8)
    arena.fill(0)  # touch the pages now, not in the timed loop
    buffers = list(arena)
    keys: dict[int, bytes] = {}
    prefix = key_prefix.encode()
    hits = wrong = 0
    match_prefix, batch_get_into, batch_put = store.match_prefix, store.batch_get_into, store.batch_put
    start = time.perf_counter()
    for n, chain in enumerate(requests, 1):
        chain_keys = [keys.get(b) or keys.setdefault(b, prefix + str(b).encode()) for b in chain]
        cached = match_prefix(chain_keys)
        loaded = 0
        if cached:
            results = batch_get_into(chain_keys[:cached], buffers[:cached])
            for res in results:
                if type(res) is not int:
                    if isinstance(res, KeyNotFound | MooncakeError):
                        break
                    raise res
                loaded += 1
            for j in range(loaded):
                if arena[j, 0] != chain[j] % PATTERNS:
                    wrong += 1
        hits += loaded
        batch_put([(chain_keys[j], patterns[chain[j] % PATTERNS]) for j in range(loaded, len(chain))])
        if not n & 63:
            advance(64)
    seconds = time.perf_counter() - start
    advance(len(requests) & 63)
    return hits, seconds, wrong


def copy_ceiling(requests: Sequence[Request], hits: int, capacity: int, block_size: int) -> float:
    """Seconds that the replay's data movement alone takes: a numpy copy of one block into a pool of
    ``capacity`` blocks for each block stored, and out of it for each hit.  The store cannot beat it."""
    import numpy as np

    refs = sum(map(len, requests))
    slots = max(1, min(capacity, refs))
    pool = np.ones((slots, block_size), dtype=np.uint8)  # written once: its pages are there
    sources = np.ones((PATTERNS, block_size), dtype=np.uint8)
    out = np.ones(block_size, dtype=np.uint8)
    start = time.perf_counter()
    for i in range(refs - hits):
        pool[i % slots] = sources[i % PATTERNS]
    for i in range(hits):
        out[:] = pool[i % slots]
    return time.perf_counter() - start
