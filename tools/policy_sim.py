#!/usr/bin/env python3
"""Prefix-hit ratios of candidate cache policies on a KV-cache trace, in plain Python (no store).

This is how mooncakefs's policy was chosen: each candidate runs over the same requests with the same
capacity in blocks, scored as `mooncakefs replay` scores the store (a request's hits are its leading
blocks present before it is served; every block of the request is then used, hits first).  Oracles
(Belady, perfect admission, the best static set, a reuse-time bit) bound what is reachable.

    python3 tools/policy_sim.py                     # the shared synthetic trace at 5%, 10%, 25%
    python3 tools/policy_sim.py TRACE --capacity 0.05,0.1 --json out.json
    python3 tools/policy_sim.py --only LRU,fresh    # candidates whose name contains one of these
    python3 tools/policy_sim.py --dram-share 0.33   # also DRAM + SSD: a DRAM policy over an SSD FIFO
    python3 tools/policy_sim.py --shape shuffled    # the trace shuffled within windows of 200 requests
    python3 tools/policy_sim.py --shape zipf        # a synthetic Zipf workload of shared prefixes
    python3 tools/policy_sim.py --analyze           # the trace's structure instead: what a policy can use
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mooncakefs.cli import DEFAULT_TRACE
from mooncakefs.replay import belady_hits, load_trace, lru_hits

Requests = Sequence[list[int]]
NEVER = 1 << 40  # the next-use gap of a reference whose block is not used again
Evicted = Callable[[int, bool], None]  # (block, read since it was put): what a lower tier is offered


def _drop(block: int, read: bool) -> None:
    """A single tier: victims leave the cache."""


class Policy:
    """A cache of blocks: ``present`` answers lookups, ``serve`` uses a request's blocks.

    ``serve`` gets the chain and how many of its leading blocks hit; by default it calls ``use`` on
    each block, last block first when ``leaf_first`` (the tail then sits nearest to eviction, as the
    store's ``match_prefix`` and ``batch_put`` leave it).  ``evicted`` is told each victim, so that a
    policy can be the DRAM tier above an SSD tier (`TwoLevel`)."""

    leaf_first = False
    evicted: Evicted = staticmethod(_drop)

    def present(self, block: int) -> bool:
        raise NotImplementedError

    def use(self, block: int) -> None:
        raise NotImplementedError

    def serve(self, chain: list[int], hits: int) -> None:
        for b in reversed(chain) if self.leaf_first else chain:
            self.use(b)

    def read_below(self, block: int) -> None:
        """``block``, not here, was just read from the tier below and is about to be used here."""


def prefix_len(policy: Policy, chain: list[int]) -> int:
    n = 0
    for b in chain:
        if not policy.present(b):
            break
        n += 1
    return n


def score(requests: Requests, policy: Policy) -> int:
    hits = 0
    for chain in requests:
        found = prefix_len(policy, chain)
        hits += found
        policy.serve(chain, found)
    return hits


# ------------------------------------------------------------------------------------ recency family


class Lru(Policy):
    """LRU; ``leaf_first`` uses a request's blocks last to first, so its tail is the oldest."""

    def __init__(self, capacity: int, leaf_first: bool = False) -> None:
        self.capacity, self.leaf_first = capacity, leaf_first
        self.cache: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.cache

    def use(self, block: int) -> None:
        cache = self.cache
        if block in cache:
            cache.move_to_end(block)
            return
        cache[block] = None
        if len(cache) > self.capacity:
            self.evicted(cache.popitem(last=False)[0], True)


class Lru2(Policy):
    """LRU-2 (O'Neil): evict the block whose second-last use is oldest; blocks used once go first, least
    recently used first.  A heap, not O(1): a yardstick for 'one use is no evidence'."""

    leaf_first = True

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.last: dict[int, int] = {}  # every block seen: its last use (history, as LRU-K keeps)
        self.key: dict[int, tuple[int, int]] = {}  # cached block -> (second-last use or -1, last use)
        self.heap: list[tuple[int, int, int]] = []
        self.clock = 0

    def present(self, block: int) -> bool:
        return block in self.key

    def use(self, block: int) -> None:
        self.clock += 1
        key = (self.last.get(block, -1), self.clock)
        self.last[block] = self.clock
        if block not in self.key and len(self.key) >= self.capacity:
            while True:
                second, last, victim = heapq.heappop(self.heap)
                if self.key.get(victim) == (second, last):
                    del self.key[victim]
                    break
        self.key[block] = key
        heapq.heappush(self.heap, (*key, block))


class Clock(Policy):
    """CLOCK (a reference bit per block, second chance: the victim's bit cleared, it goes round)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bit: dict[int, bool] = {}
        self.ring: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.bit

    def use(self, block: int) -> None:
        if block in self.bit:
            self.bit[block] = True
            return
        while len(self.bit) >= self.capacity:
            x, _ = self.ring.popitem(last=False)
            if self.bit[x]:
                self.bit[x] = False
                self.ring[x] = None
            else:
                del self.bit[x]
        self.bit[block] = False
        self.ring[block] = None


class Sieve(Policy):
    """SIEVE (Zhang et al., NSDI'24): one FIFO, a visited bit, a hand that walks from old to new and
    evicts the first unvisited block, clearing bits as it passes; survivors keep their place."""

    leaf_first = True

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.visited: dict[int, bool] = {}
        self.newer: dict[int, int | None] = {}  # a doubly linked FIFO, oldest at self.tail
        self.older: dict[int, int | None] = {}
        self.head: int | None = None
        self.tail: int | None = None
        self.hand: int | None = None

    def present(self, block: int) -> bool:
        return block in self.visited

    def _unlink(self, b: int) -> None:
        newer, older = self.newer.pop(b), self.older.pop(b)
        if newer is None:
            self.head = older
        else:
            self.older[newer] = older
        if older is None:
            self.tail = newer
        else:
            self.newer[older] = newer
        del self.visited[b]

    def use(self, block: int) -> None:
        if block in self.visited:
            self.visited[block] = True
            return
        if len(self.visited) >= self.capacity:
            hand = self.hand if self.hand is not None else self.tail
            while self.visited[hand]:
                self.visited[hand] = False
                hand = self.newer[hand] if self.newer[hand] is not None else self.tail
            self.hand = self.newer[hand]
            self._unlink(hand)
        self.visited[block] = False
        self.newer[block], self.older[block] = None, self.head
        if self.head is not None:
            self.newer[self.head] = block
        self.head = block
        if self.tail is None:
            self.tail = block


class S3Fifo(Policy):
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO (10%) for new blocks, a main FIFO with 2-bit
    frequencies, a ghost FIFO of blocks that left small unread."""

    def __init__(self, capacity: int, small: float = 0.1) -> None:
        self.capacity, self.small_max = capacity, max(1, int(capacity * small))
        self.small: OrderedDict[int, int] = OrderedDict()
        self.main: OrderedDict[int, int] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.small or block in self.main

    def _evict(self) -> None:
        if len(self.small) >= self.small_max or not self.main:
            while self.small:
                b, freq = self.small.popitem(last=False)
                if freq:
                    self.main[b] = 0
                else:
                    self.ghost[b] = None
                    if len(self.ghost) > self.capacity:
                        self.ghost.popitem(last=False)
                    return
        while self.main:
            b, freq = self.main.popitem(last=False)
            if not freq:
                return
            self.main[b] = freq - 1

    def use(self, block: int) -> None:
        for q in (self.small, self.main):
            if block in q:
                q[block] = min(q[block] + 1, 3)
                return
        while len(self.small) + len(self.main) >= self.capacity:
            self._evict()
        if block in self.ghost:
            del self.ghost[block]
            self.main[block] = 0
        else:
            self.small[block] = 0


class Arc(Policy):
    """ARC (Megiddo & Modha): T1 (seen once lately) and T2 (seen twice or more), ghosts B1 and B2 of
    what each dropped, and a target size p for T1 that a hit in a ghost moves."""

    leaf_first = True

    def __init__(self, capacity: int) -> None:
        self.c, self.p = capacity, 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.t1 or block in self.t2

    def _replace(self, in_b2: bool) -> None:
        if self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p)):
            victim = self.t1.popitem(last=False)[0]
            self.b1[victim] = None
            self.evicted(victim, False)
        else:
            victim = self.t2.popitem(last=False)[0]
            self.b2[victim] = None
            self.evicted(victim, True)

    def use(self, block: int) -> None:
        t1, t2, b1, b2, c = self.t1, self.t2, self.b1, self.b2, self.c
        if block in t1:
            del t1[block]
            t2[block] = None
        elif block in t2:
            t2.move_to_end(block)
        elif block in b1:
            self.p = min(c, self.p + max(len(b2) / len(b1), 1))
            self._replace(False)
            del b1[block]
            t2[block] = None
        elif block in b2:
            self.p = max(0.0, self.p - max(len(b1) / len(b2), 1))
            self._replace(True)
            del b2[block]
            t2[block] = None
        else:
            if len(t1) + len(b1) == c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    self._replace(False)
                else:
                    self.evicted(t1.popitem(last=False)[0], False)
            elif len(t1) + len(b1) < c <= len(t1) + len(t2) + len(b1) + len(b2):
                if len(t1) + len(t2) + len(b1) + len(b2) >= 2 * c:
                    b2.popitem(last=False)
                self._replace(False)
            t1[block] = None


# ---------------------------------------------------------------------------------- frequency family


class Lfu(Policy):
    """LFU over every block's count since the start (halved each ``age`` x capacity uses if ``age``),
    least recently used first among equals.  A heap, not O(1): a yardstick."""

    def __init__(self, capacity: int, age: int = 0) -> None:
        self.capacity, self.age = capacity, age
        self.count: Counter[int] = Counter()
        self.cache: dict[int, tuple[int, int]] = {}  # block -> its key in the heap
        self.heap: list[tuple[int, int, int]] = []  # (count, last use, block), stale items skipped
        self.clock = self.uses = 0

    def present(self, block: int) -> bool:
        return block in self.cache

    def use(self, block: int) -> None:
        self.count[block] += 1
        self.uses += 1
        self.clock += 1
        if self.age and self.uses >= self.age * self.capacity:
            self.uses = 0
            self.count = Counter({k: v // 2 for k, v in self.count.items() if v > 1})
            self.cache = {k: (self.count[k], t) for k, (_, t) in self.cache.items()}
            self.heap = [(c, t, k) for k, (c, t) in self.cache.items()]
            heapq.heapify(self.heap)
        if block not in self.cache and len(self.cache) >= self.capacity:
            while True:
                c, t, k = heapq.heappop(self.heap)
                if self.cache.get(k) == (c, t):
                    del self.cache[k]
                    break
        key = (self.count[block], self.clock)
        self.cache[block] = key
        heapq.heappush(self.heap, (*key, block))


class CountMinSketch:
    """TinyLFU's frequency estimate: 4 rows of 4-bit-like counters (capped at 15), all halved every
    ``reset`` increments so that old popularity fades."""

    def __init__(self, width: int, reset: int) -> None:
        self.width, self.reset, self.added = max(16, width), reset, 0
        self.rows = [[0] * self.width for _ in range(4)]

    def _slots(self, key: int) -> list[int]:
        return [hash((key, row)) % self.width for row in range(4)]

    def add(self, key: int) -> None:
        for row, i in zip(self.rows, self._slots(key), strict=True):
            row[i] = min(row[i] + 1, 15)
        self.added += 1
        if self.added >= self.reset:
            self.added = 0
            self.rows = [[v >> 1 for v in row] for row in self.rows]

    def estimate(self, key: int) -> int:
        return min(row[i] for row, i in zip(self.rows, self._slots(key), strict=True))


class ExactCounts:
    """The sketch's interface over exact counts (no collisions), halved alike: what a sketch approximates."""

    def __init__(self, width: int, reset: int) -> None:
        self.reset, self.added, self.counts = reset, 0, Counter[int]()

    def add(self, key: int) -> None:
        self.counts[key] = min(self.counts[key] + 1, 15)
        self.added += 1
        if self.added >= self.reset:
            self.added = 0
            self.counts = Counter({k: v >> 1 for k, v in self.counts.items() if v > 1})

    def estimate(self, key: int) -> int:
        return self.counts[key]


class TinyLfu(Policy):
    """W-TinyLFU (Einziger et al.): a 1% LRU window, then a segmented LRU (80% protected) that admits a
    block leaving the window only if the sketch says it was used more often than the block it would
    evict.  Decides block by block.  ``exact``: exact counts instead of a count-min sketch 16 x capacity
    wide."""

    def __init__(self, capacity: int, exact: bool = False) -> None:
        self.window_max = max(1, capacity // 100)
        self.main_max = capacity - self.window_max
        self.protected_max = int(self.main_max * 0.8)
        self.window: OrderedDict[int, None] = OrderedDict()
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.protected: OrderedDict[int, None] = OrderedDict()
        self.sketch: CountMinSketch | ExactCounts = (ExactCounts if exact else CountMinSketch)(
            16 * capacity, 10 * capacity
        )

    def present(self, block: int) -> bool:
        return block in self.window or block in self.probation or block in self.protected

    def use(self, block: int) -> None:
        self.sketch.add(block)
        if block in self.window:
            self.window.move_to_end(block)
        elif block in self.probation:
            del self.probation[block]
            self.protected[block] = None
            if len(self.protected) > self.protected_max:
                self.probation[self.protected.popitem(last=False)[0]] = None
        elif block in self.protected:
            self.protected.move_to_end(block)
        else:
            self.window[block] = None
            if len(self.window) > self.window_max:
                candidate = self.window.popitem(last=False)[0]
                if len(self.probation) + len(self.protected) < self.main_max:
                    self.probation[candidate] = None
                    return
                queue = self.probation or self.protected
                victim = next(iter(queue))
                if self.sketch.estimate(candidate) > self.sketch.estimate(victim):
                    del queue[victim]
                    self.probation[candidate] = None


class ChainTinyLfu(Lru):
    """TinyLFU admission decided per request, not per block: the blocks a request misses are admitted
    together (into a leaf-first LRU) only if the sketch counts its first missing block at least as
    often as the LRU's next victim.  A chain is never admitted in part."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, leaf_first=True)
        self.sketch = CountMinSketch(16 * capacity, 10 * capacity)

    def serve(self, chain: list[int], hits: int) -> None:
        for b in chain:
            self.sketch.add(b)
        cache = self.cache
        missing = [b for b in chain if b not in cache]
        admit = not missing or not cache or len(cache) + len(missing) <= self.capacity
        if not admit:
            victim = next(iter(cache))
            admit = self.sketch.estimate(missing[0]) >= self.sketch.estimate(victim)
        for b in reversed(chain):
            if b in cache:
                cache.move_to_end(b)
            elif admit:
                self.use(b)


# ----------------------------------------------------------------------------- chain-aware variants


class SampledLeaves(Policy):
    """Eviction by sampling (as Redis and LHD evict): ``k`` random *leaves* (cached blocks with no cached
    successor, so a chain is only ever cut at its tail), the lowest ``score`` goes.  O(k) per eviction.
    Scores: 'lru' (last use), 'count/age' (uses over time since the last, a frequency-recency mix)."""

    def __init__(self, capacity: int, score: str = "count/age", k: int = 16) -> None:
        self.capacity, self.k, self.rng = capacity, k, random.Random(1)
        self.score = self._by_last if score == "lru" else self._by_count_over_age
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.children: dict[int, int] = {}  # cached block -> its cached successors
        self.parent: dict[int, int | None] = {}
        self.leaves: list[int] = []
        self.leaf_at: dict[int, int] = {}
        self.clock = 0

    def _by_last(self, b: int) -> float:
        return self.last[b]

    def _by_count_over_age(self, b: int) -> float:
        return self.count[b] / (self.clock - self.last[b] + self.capacity)

    def present(self, block: int) -> bool:
        return block in self.children

    def _add_leaf(self, b: int) -> None:
        self.leaf_at[b] = len(self.leaves)
        self.leaves.append(b)

    def _remove_leaf(self, b: int) -> None:
        i, last = self.leaf_at.pop(b), self.leaves.pop()
        if last != b:
            self.leaves[i], self.leaf_at[last] = last, i

    def _evict(self) -> None:
        sample = (self.leaves[self.rng.randrange(len(self.leaves))] for _ in range(self.k))
        victim = min(sample, key=self.score)
        self._remove_leaf(victim)
        del self.children[victim]
        parent = self.parent.pop(victim)
        if parent is not None and parent in self.children:
            self.children[parent] -= 1
            if not self.children[parent]:
                self._add_leaf(parent)
        self.evicted(victim, self.count[victim] > 1)

    def serve(self, chain: list[int], hits: int) -> None:
        previous = None
        for b in chain:
            self.clock += 1
            self.count[b] = self.count.get(b, 0) + 1
            self.last[b] = self.clock
            if b not in self.children:
                if len(self.children) >= self.capacity:
                    self._evict()
                parent = previous if previous in self.children else None
                self.children[b], self.parent[b] = 0, parent
                self._add_leaf(b)
                if parent is not None:
                    if not self.children[parent]:
                        self._remove_leaf(parent)
                    self.children[parent] += 1
            previous = b


class DeepestFirst(Policy):
    """Chain-aware scoring taken to the end: evict the deepest block (position in its request), LRU
    among equals: roots outlive their chains."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.depth: dict[int, int] = {}
        self.levels: dict[int, OrderedDict[int, None]] = {}

    def present(self, block: int) -> bool:
        return block in self.depth

    def serve(self, chain: list[int], hits: int) -> None:
        for d, b in enumerate(chain):
            old = self.depth.get(b)
            if old is not None:
                del self.levels[old][b]
            elif len(self.depth) >= self.capacity:
                deepest = max(k for k, v in self.levels.items() if v)
                del self.depth[self.levels[deepest].popitem(last=False)[0]]
            self.levels.setdefault(d, OrderedDict())[b] = None
            self.depth[b] = d


class RequestAdmission(Lru):
    """LRU that admits a request's missing blocks only with probability ``p`` (1.0 if the first missing
    block was evicted lately): bimodal insertion, chain at a time, against thrashing."""

    def __init__(self, capacity: int, p: float = 0.1) -> None:
        super().__init__(capacity, leaf_first=True)
        self.p, self.rng = p, random.Random(1)
        self.ghost: OrderedDict[int, None] = OrderedDict()

    def serve(self, chain: list[int], hits: int) -> None:
        cache = self.cache
        missing = [b for b in chain if b not in cache]
        admit = bool(missing) and (missing[0] in self.ghost or self.rng.random() < self.p)
        for b in reversed(chain):
            if b in cache:
                cache.move_to_end(b)
                continue
            if admit:
                cache[b] = None
            if not admit or len(cache) > self.capacity:
                self.ghost[cache.popitem(last=False)[0] if admit else b] = None
                if len(self.ghost) > 8 * self.capacity:
                    self.ghost.popitem(last=False)


class FreshMain(Policy):
    """mooncakefs's policy: new blocks in a FIFO (``fresh`` share), blocks used again (or back from the
    ghost list of ``ghost`` x capacity evicted keys) in an LRU; fresh goes first while over its share.

    ``total``: the capacity of DRAM and SSD together, when this is the DRAM tier above an SSD.
    ``cold_tail``: a request's last block, and the new blocks after the prefix it hit (a new branch
    off a known chain), go to the old end of fresh: 2-12% of them are ever used again (``--analyze``)."""

    def __init__(
        self,
        capacity: int,
        fresh: float = 0.05,
        ghost: float = 2.0,
        leaf_first: bool = False,
        cold_tail: bool = False,
        total: int | None = None,
    ) -> None:
        total = total or capacity  # above an SSD tier, fresh and ghost are shares of both tiers
        self.capacity, self.fresh_max = capacity, max(1, min(int(total * fresh), capacity // 2))
        self.ghost_max, self.leaf_first, self.cold_tail = int(total * ghost), leaf_first, cold_tail
        self.fresh: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.fresh or block in self.main

    def _make_room(self) -> None:
        while len(self.fresh) + len(self.main) >= self.capacity:
            from_fresh = len(self.fresh) > self.fresh_max or not self.main
            victim = (self.fresh if from_fresh else self.main).popitem(last=False)[0]
            self.evicted(victim, not from_fresh)
            self.ghost[victim] = None
            if len(self.ghost) > self.ghost_max:
                self.ghost.popitem(last=False)

    def use(self, block: int, cold: bool = False) -> None:
        if block in self.main:
            self.main.move_to_end(block)
        elif block in self.fresh:
            del self.fresh[block]
            self.main[block] = None
        else:
            self._make_room()
            if block in self.ghost:
                del self.ghost[block]
                self.main[block] = None
            else:
                self.fresh[block] = None
                if cold:
                    self.fresh.move_to_end(block, last=False)

    def read_below(self, block: int) -> None:
        self.ghost[block] = None  # promoted into main, as the store promotes a value read on SSD

    def serve(self, chain: list[int], hits: int) -> None:
        if not self.cold_tail:
            super().serve(chain, hits)
            return
        # a branch off a known chain: the blocks past the hit prefix; always the request's last block
        cold_from = hits if hits else len(chain) - 1
        for d in range(len(chain) - 1, -1, -1):
            self.use(chain[d], cold=d >= cold_from)


# ------------------------------------------------------------------------------------------- tiers


class TwoLevel(Policy):
    """A DRAM policy over an SSD tier, as the store runs them once its SSD is full: DRAM's victims that
    were read are demoted to SSD, unread ones only into free SSD room; SSD drops its oldest copy first;
    a block a request uses that sits on SSD moves up into DRAM (one copy of each block)."""

    def __init__(self, dram: Policy, ssd_capacity: int) -> None:
        self.dram, self.ssd_capacity = dram, ssd_capacity
        self.ssd: OrderedDict[int, None] = OrderedDict()
        dram.evicted = self._demote

    def present(self, block: int) -> bool:
        return self.dram.present(block) or block in self.ssd

    def _demote(self, block: int, read: bool) -> None:
        if self.ssd_capacity <= 0 or (not read and len(self.ssd) >= self.ssd_capacity):
            return
        if len(self.ssd) >= self.ssd_capacity:
            self.ssd.popitem(last=False)
        self.ssd[block] = None

    def serve(self, chain: list[int], hits: int) -> None:
        for d, b in enumerate(chain):
            if b in self.ssd:
                del self.ssd[b]
                if d < hits:
                    self.dram.read_below(b)
        self.dram.serve(chain, hits)
        for b in chain:  # one demoted while its own request was served, and used again: DRAM has it
            if b in self.ssd and self.dram.present(b):
                del self.ssd[b]


# ----------------------------------------------------------------------------------------- oracles


class Belady(Policy):
    """Belady's MIN as a policy, as `replay.belady_hits` runs it (the new block itself is not admitted
    when it is the one needed last), so that its hits can be broken down (``--hits-by-uses``)."""

    def __init__(self, capacity: int, requests: Requests) -> None:
        self.capacity, self.gaps, self.at = capacity, next_use_gaps(requests), 0
        self.cached: dict[int, int] = {}  # block -> its next use
        self.heap: list[tuple[int, int]] = []  # (-next use, block), stale items skipped

    def present(self, block: int) -> bool:
        return block in self.cached

    def use(self, block: int) -> None:
        nxt = self.at + self.gaps[self.at] if self.gaps[self.at] != NEVER else NEVER
        self.at += 1
        if block not in self.cached and len(self.cached) >= self.capacity:
            while self.cached.get(self.heap[0][1]) != -self.heap[0][0]:
                heapq.heappop(self.heap)
            if -self.heap[0][0] <= nxt:
                return
            del self.cached[heapq.heappop(self.heap)[1]]
        self.cached[block] = nxt
        heapq.heappush(self.heap, (-nxt, block))


def hits_by_uses(requests: Requests, policy: Policy) -> dict[str, tuple[int, int]]:
    """Hits and references, keyed by how often the block was used before (1, 2-5, 6+): which reuses a
    policy serves."""
    used: Counter[int] = Counter()
    hits: Counter[str] = Counter()
    refs: Counter[str] = Counter()
    for chain in requests:
        found = prefix_len(policy, chain)
        for d, b in enumerate(chain):
            if used[b]:
                k = "1" if used[b] == 1 else "2-5" if used[b] <= 5 else "6+"
                refs[k] += 1
                hits[k] += d < found
            used[b] += 1
        policy.serve(chain, found)
    return {k: (hits[k], refs[k]) for k in ("1", "2-5", "6+")}


class AdmissionOracle(Lru):
    """LRU that never admits a block that will not be used again: what perfect admission is worth."""

    def __init__(self, capacity: int, requests: Requests) -> None:
        super().__init__(capacity)
        self.left = Counter(b for chain in requests for b in chain)

    def use(self, block: int) -> None:
        self.left[block] -= 1
        if block in self.cache:
            self.cache.move_to_end(block)
        elif self.left[block] > 0:
            super().use(block)


def next_use_gaps(requests: Requests) -> list[int]:
    """For each block reference in order: how many references later its block is used next (NEVER)."""
    flat = [b for chain in requests for b in chain]
    gaps, last = [NEVER] * len(flat), {}
    for i in range(len(flat) - 1, -1, -1):
        if flat[i] in last:
            gaps[i] = last[flat[i]] - i
        last[flat[i]] = i
    return gaps


class ReuseBitOracle(Lru):
    """Leaf-first LRU told, at every use, whether the block comes back within ``horizon`` x capacity
    references; a block that does not is dropped (or not admitted).  With ``predict`` it gets instead
    the probability that blocks *like it* come back in time, from a table of classes (times used,
    time since first use, last gap; log scales) counted over the whole trace, and keeps it if that is
    at least ``threshold``: the best that those features could do, known perfectly."""

    def __init__(
        self, capacity: int, requests: Requests, horizon: float = 4.0, predict: bool = False, threshold: float = 0.4
    ) -> None:
        super().__init__(capacity, leaf_first=True)
        soon = [g <= horizon * capacity for g in next_use_gaps(requests)]
        if predict:
            classes = reuse_classes(requests)
            seen, back = Counter(classes), Counter(k for k, s in zip(classes, soon, strict=True) if s)
            soon = [back[k] / seen[k] >= threshold for k in classes]
        self.keep, self.at = soon, 0

    def serve(self, chain: list[int], hits: int) -> None:
        base, self.at = self.at, self.at + len(chain)
        for d in range(len(chain) - 1, -1, -1):
            b = chain[d]
            if self.keep[base + d]:
                self.use(b)
            elif b in self.cache:
                del self.cache[b]


def best_class_oracle(capacity: int, requests: Requests) -> int:
    """The class-table oracle's hits at its best threshold for this capacity (the horizon fixed at 4x)."""
    thresholds = (0.1, 0.2, 0.3, 0.4, 0.5)
    return max(score(requests, ReuseBitOracle(capacity, requests, predict=True, threshold=t)) for t in thresholds)


def reuse_classes(requests: Requests) -> list[tuple[int, int, int]]:
    """Each reference's class: (times its block was used before, capped at 8; 2 log2 of the references
    since its first use; log2 of its last gap), what a policy with a few ints per key could know."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    count: Counter[int] = Counter()
    classes = []
    for i, b in enumerate(b for chain in requests for b in chain):
        age = int(2 * math.log2(i - first[b] + 1)) if b in first else -1
        gap = int(math.log2(i - last[b] + 1)) if b in last else -1
        classes.append((min(count[b], 8), age, gap))
        count[b] += 1
        first.setdefault(b, i)
        last[b] = i
    return classes


def two_level(make: Callable[[int, int], Policy], capacity: int, dram_share: float) -> Policy:
    """``make(dram capacity, total capacity)`` over an SSD tier holding the rest."""
    dram = round(capacity * dram_share)
    return TwoLevel(make(dram, capacity), capacity - dram)


def static_best(requests: Requests, capacity: int) -> int:
    """Hits of the best fixed set of blocks chosen knowing every count (each block's first use misses)."""
    counts = sorted(Counter(b for chain in requests for b in chain).values(), reverse=True)
    return sum(c - 1 for c in counts[:capacity])


Make = Callable[[int, Requests], "Policy | int"]

CANDIDATES: dict[str, Make] = {
    "LRU": lambda c, r: lru_hits(r, c),
    "LRU, leaf first": lambda c, r: Lru(c, leaf_first=True),
    "LRU-2 (heap)": lambda c, r: Lru2(c),
    "CLOCK": lambda c, r: Clock(c),
    "SIEVE": lambda c, r: Sieve(c),
    "S3-FIFO": lambda c, r: S3Fifo(c),
    "ARC": lambda c, r: Arc(c),
    "LFU (all history, heap)": lambda c, r: Lfu(c),
    "LFU, halved every 10x (heap)": lambda c, r: Lfu(c, age=10),
    "W-TinyLFU (per block)": lambda c, r: TinyLfu(c),
    "W-TinyLFU (per block), exact counts": lambda c, r: TinyLfu(c, exact=True),
    "TinyLFU admission per request": lambda c, r: ChainTinyLfu(c),
    "sampled leaves, LRU": lambda c, r: SampledLeaves(c, "lru"),
    "sampled leaves, count/age": lambda c, r: SampledLeaves(c),
    "deepest block first": lambda c, r: DeepestFirst(c),
    "request admission p=0.1": lambda c, r: RequestAdmission(c),
    "fresh 5% + main, ghost 2x": lambda c, r: FreshMain(c),
    "  same, leaf first (the store's)": lambda c, r: FreshMain(c, leaf_first=True),
    "  same, leaf first, cold tails": lambda c, r: FreshMain(c, leaf_first=True, cold_tail=True),
    "  leaf first, fresh 1%": lambda c, r: FreshMain(c, fresh=0.01, leaf_first=True),
    "  leaf first, fresh 1%, cold tails": lambda c, r: FreshMain(c, fresh=0.01, leaf_first=True, cold_tail=True),
    "  leaf first, fresh 2%": lambda c, r: FreshMain(c, fresh=0.02, leaf_first=True),
    "  leaf first, fresh 10%": lambda c, r: FreshMain(c, fresh=0.1, leaf_first=True),
    "  leaf first, fresh 25%": lambda c, r: FreshMain(c, fresh=0.25, leaf_first=True),
    "  leaf first, ghost 0.5x": lambda c, r: FreshMain(c, ghost=0.5, leaf_first=True),
    "  leaf first, ghost 1x": lambda c, r: FreshMain(c, ghost=1.0, leaf_first=True),
    "  leaf first, ghost 4x": lambda c, r: FreshMain(c, ghost=4.0, leaf_first=True),
    "  leaf first, ghost 8x": lambda c, r: FreshMain(c, ghost=8.0, leaf_first=True),
    "oracle: perfect admission + LRU": lambda c, r: AdmissionOracle(c, r),
    "oracle: best static set": lambda c, r: static_best(r, c),
    "oracle: classes known, LRU": lambda c, r: best_class_oracle(c, r),
    "oracle: back within 4x capacity, LRU": lambda c, r: ReuseBitOracle(c, r),
    "oracle: Belady": lambda c, r: belady_hits(r, c),
}

# Run also as DRAM over SSD (``--dram-share``): the DRAM policies a store could run.
TIERED: dict[str, Callable[[int, int], Policy]] = {
    "LRU, leaf first": lambda c, total: Lru(c, leaf_first=True),
    "ARC": lambda c, total: Arc(c),
    "sampled leaves, count/age": lambda c, total: SampledLeaves(c),
    "  same, leaf first (the store's)": lambda c, total: FreshMain(c, leaf_first=True, total=total),
    "  leaf first, fresh 1%": lambda c, total: FreshMain(c, fresh=0.01, leaf_first=True, total=total),
    "  leaf first, fresh 1%, cold tails": lambda c, total: FreshMain(
        c, fresh=0.01, leaf_first=True, cold_tail=True, total=total
    ),
}


# ----------------------------------------------------------------------------------- trace shapes


def shuffled(requests: Requests, window: int = 200, seed: int = 1) -> list[list[int]]:
    """The same requests shuffled within consecutive windows: popularity over time kept, order lost."""
    rng, out = random.Random(seed), []
    for i in range(0, len(requests), window):
        part = list(requests[i : i + window])
        rng.shuffle(part)
        out.extend(part)
    return out


def zipf_chains(
    requests: int = 4000, groups: int = 800, alpha: float = 0.9, one_off: float = 0.4, seed: int = 1
) -> list[list[int]]:
    """A synthetic workload of shared prefixes: ``one_off`` of the requests are new chains never seen
    again; the rest pick a group by Zipf(``alpha``) popularity, whose prefix (2-80 blocks) they share,
    and add 1-4 blocks of their own.  Stationary popularity: where frequency should pay."""
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    prefixes = [fresh(rng.randint(2, 80)) for _ in range(groups)]
    weights = [1 / (g + 1) ** alpha for g in range(groups)]
    out = []
    for _ in range(requests):
        if rng.random() < one_off:
            out.append(fresh(rng.randint(3, 80)))
        else:
            out.append(prefixes[rng.choices(range(groups), weights)[0]] + fresh(rng.randint(1, 4)))
    return out


# -------------------------------------------------------------------------------------- structure


def quantiles(xs: list[int], qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> list[int]:
    xs = sorted(xs)
    return [xs[min(len(xs) - 1, int(len(xs) * q))] for q in qs]


def analyze(requests: Requests) -> None:
    """Print what a policy could exploit: reuse, its distances, and how both depend on features known
    when a block is used (times seen, position, whether its request branched off a known prefix)."""
    flat = [b for chain in requests for b in chain]
    counts = Counter(flat)
    print(f"requests {len(requests)}, block refs {len(flat)}, unique blocks {len(counts)}")
    print(
        f"blocks used once: {sum(c == 1 for c in counts.values())}; refs that are reuses: "
        f"{(len(flat) - len(counts)) / len(flat):.3f} (the hit ratio of an infinite cache)"
    )
    gaps, last = [], {}
    for i, b in enumerate(flat):
        if b in last:
            gaps.append(i - last[b])
        last[b] = i
    gaps.sort()
    print("reuse gap (references since the block's last use) quantiles 10/25/50/75/90%:", quantiles(gaps))
    for x in (2000, 4000, 8000, 16000, 32000):
        print(f"  share of all refs that reuse a block used within {x}: {bisect.bisect_right(gaps, x) / len(flat):.3f}")
    # the prefix tree: does every block have one predecessor and one position?
    parents: dict[int, set[int | None]] = {}
    for chain in requests:
        for d, b in enumerate(chain):
            parents.setdefault(b, set()).add(chain[d - 1] if d else None)
    print(f"blocks with more than one predecessor: {sum(len(p) > 1 for p in parents.values())} (0: a prefix tree)")
    # reuse by position in the request, and of new blocks by feature
    seen: set[int] = set()
    by_depth: dict[int, list[int]] = {}
    new_reused: dict[str, list[int]] = {}
    for chain in requests:
        hit = 0
        while hit < len(chain) and chain[hit] in seen:
            hit += 1
        for d, b in enumerate(chain):
            by_depth.setdefault(min(d // 10, 10), [0, 0])
            by_depth[min(d // 10, 10)][0] += 1
            by_depth[min(d // 10, 10)][1] += b in seen
            if b not in seen:
                kind = (
                    "last block of its request"
                    if d == len(chain) - 1
                    else ("new branch off a known prefix" if hit else "new chain")
                )
                new_reused.setdefault(kind, [0, 0])
                new_reused[kind][0] += 1
                new_reused[kind][1] += counts[b] > 1
        seen.update(chain)
    print(
        "share of refs that are reuses, by position in the request (tens):",
        " ".join(f"{10 * k}+:{r / n:.2f}" for k, (n, r) in sorted(by_depth.items())),
    )
    for kind, (n, r) in sorted(new_reused.items()):
        print(f"  new blocks, {kind}: {n}, ever used again {r / n:.2f}")
    # requests: the prefix shared with earlier requests, and how it relates
    shared, relation = [], Counter()
    last_request: dict[int, int] = {}
    since: list[int] = []
    for i, chain in enumerate(requests):
        p = 0
        while p < len(chain) and chain[p] in last_request:
            p += 1
        shared.append(p)
        if p:
            j = last_request[chain[p - 1]]
            since.append(i - j)
            earlier = requests[j]
            relation[
                "same chain"
                if p == len(chain) == len(earlier)
                else "extends the earlier"
                if p == len(earlier)
                else "branches off it"
            ] += 1
        for b in chain:
            last_request[b] = i
    print(
        f"requests sharing a prefix with an earlier one: {sum(p > 0 for p in shared)}; "
        f"of them: {dict(relation)}; shared length quantiles {quantiles([p for p in shared if p])}"
    )
    print("requests since the latest one sharing that prefix, quantiles:", quantiles(since))
    by_seen = reuse_by_times_seen(requests, 600)
    print(
        "first block requested again within 600 requests, by times seen before:",
        " ".join(f"{k}:{share:.2f} (n={n})" for k, (n, share) in by_seen.items()),
    )
    classes = reuse_classes(requests)
    after = next_use_gaps(requests)
    by_count: dict[int, list[int]] = {}
    for (used, _, _), g in zip(classes, after, strict=True):
        by_count.setdefault(used, []).append(g)
    print("a use, by times its block was used before (0 = first use): used again, median gap to then")
    for k, gs in sorted(by_count.items()):
        back = [g for g in gs if g != NEVER]
        share, median = len(back) / len(gs), statistics.median(back)
        print(f"  {k}{'+' if k == 8 else ''}: n={len(gs)} again {share:.2f}, median {median:.0f}")


def reuse_by_times_seen(requests: Requests, horizon: int) -> dict[str, tuple[int, float]]:
    """For each request, keyed by how often its first block was requested before (6 = 6 or more):
    how many such requests there are and the share whose first block is requested again within
    ``horizon`` requests.  What an online policy can know (the past) against what it needs (the
    future)."""
    times: dict[int, list[int]] = {}
    for i, chain in enumerate(requests):
        times.setdefault(chain[0], []).append(i)
    seen: Counter[int] = Counter()
    again: Counter[int] = Counter()
    for at in times.values():
        for j, t in enumerate(at):
            k = min(j, 6)
            seen[k] += 1
            again[k] += j + 1 < len(at) and at[j + 1] - t <= horizon
    return {str(k): (seen[k], again[k] / seen[k]) for k in sorted(seen)}


# ------------------------------------------------------------------------------------------- main


def run(
    requests: Requests, fractions: list[float], names: list[str], dram_share: float | None
) -> dict[str, dict[str, float]]:
    """Each candidate's hit ratio at each capacity, printed as it comes."""
    unique = len({b for chain in requests for b in chain})
    refs = sum(map(len, requests))
    table: dict[str, dict[str, float]] = {}
    rows: list[tuple[str, Callable[[int], Policy | int]]] = [
        (name, lambda c, make=make: make(c, requests)) for name, make in CANDIDATES.items() if name in names
    ]
    if dram_share is not None:
        rows += [
            (f"DRAM+SSD {name.strip()}", lambda c, make=make: two_level(make, c, dram_share))
            for name, make in TIERED.items()
            if name in names
        ]
    print(f"{'policy':44}" + "".join(f"{f:>8.0%}" for f in fractions) + "   seconds")
    for name, make in rows:
        started = time.perf_counter()
        table[name] = {}
        for f in fractions:
            made = make(int(f * unique))
            hits = made if isinstance(made, int) else score(requests, made)
            table[name][f"{f:g}"] = hits / refs
        cells = "".join(f"{table[name][f'{f:g}']:8.3f}" for f in fractions)
        print(f"{name:44}{cells}{time.perf_counter() - started:10.1f}", flush=True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--capacity", default="0.05,0.1,0.25", help="fractions of the unique blocks")
    p.add_argument("--only", help="comma-separated parts of candidate names to run (default: all)")
    p.add_argument("--dram-share", type=float, help="also run the DRAM policies over an SSD tier, this share in DRAM")
    p.add_argument(
        "--shape",
        choices=["trace", "shuffled", "zipf"],
        default="trace",
        help="the trace as it is, shuffled within windows of 200 requests, or a synthetic Zipf workload",
    )
    p.add_argument("--json", type=Path, help="also write the ratios here")
    p.add_argument("--analyze", action="store_true", help="instead: the trace's structure")
    p.add_argument(
        "--hits-by-uses",
        action="store_true",
        help="instead: which reuses (by times the block was used before) LRU, the store's policy and Belady serve",
    )
    p.add_argument(
        "--reuse",
        type=int,
        metavar="H",
        help="instead: the share of requests whose first block comes back within H requests, by "
        "how often it came before",
    )
    args = p.parse_args()
    requests: Requests = zipf_chains() if args.shape == "zipf" else load_trace(args.trace)
    if args.shape == "shuffled":
        requests = shuffled(requests)
    if args.analyze:
        analyze(requests)
        return
    if args.hits_by_uses:
        unique = len({b for chain in requests for b in chain})
        for f in [float(x) for x in args.capacity.split(",")]:
            c = int(f * unique)
            for name, policy in [
                ("LRU, leaf first", Lru(c, leaf_first=True)),
                ("fresh/main, leaf first (the store's)", FreshMain(c, leaf_first=True)),
                ("Belady", Belady(c, requests)),
            ]:
                cells = "  ".join(
                    f"used {k} before: {h}/{n} ({h / n:.2f})" for k, (h, n) in hits_by_uses(requests, policy).items()
                )
                print(f"{f:4.0%} {name:38} {cells}")
        return
    if args.reuse:
        print(f"{'times seen before':>18}  {'requests':>8}  {f'again within {args.reuse}':>16}")
        for k, (n, share) in reuse_by_times_seen(requests, args.reuse).items():
            print(f"{k + ('+' if k == '6' else ''):>18}  {n:>8}  {share:>16.2f}")
        return
    wanted = args.only.split(",") if args.only else [""]
    names = [name for name in CANDIDATES if any(w in name for w in wanted)]
    table = run(requests, [float(x) for x in args.capacity.split(",")], names, args.dram_share)
    lru, belady = table.get("LRU"), table.get("oracle: Belady")
    closed: dict[str, dict[str, float]] = {}
    if lru and belady:
        for name, row in table.items():
            closed[name] = {f: (row[f] - lru[f]) / (belady[f] - lru[f]) for f in row if belady[f] > lru[f]}
    if args.json:
        flat = [b for chain in requests for b in chain]
        args.json.write_text(
            json.dumps(
                {
                    "trace": str(args.trace) if args.shape == "trace" else args.shape,
                    "block_refs": len(flat),
                    "unique_blocks": len(set(flat)),
                    "dram_share": args.dram_share,
                    "hit_ratio": table,
                    "gap_closed": closed,  # of the gap from LRU to Belady
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
