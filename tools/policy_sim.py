#!/usr/bin/env python3
"""Prefix-hit ratios of candidate cache policies on a KV-cache trace, in plain Python (no store).

This is how mooncakefs's policy was chosen: each candidate runs over the same requests with the same
capacity in blocks, scored as `mooncakefs replay` scores the store (a request's hits are its leading
blocks present before it is served; every block of the request is then used, hits first).  Oracles
(Belady, perfect admission, the best static set) bound what is reachable.

    python3 tools/policy_sim.py                     # the shared synthetic trace at 5%, 10%, 25%
    python3 tools/policy_sim.py TRACE --capacity 0.05,0.1 --json out.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mooncakefs.cli import DEFAULT_TRACE
from mooncakefs.replay import belady_hits, load_trace, lru_hits

Requests = Sequence[list[int]]


class Policy:
    """A cache of blocks: ``present`` answers lookups, ``serve`` uses a request's blocks in order."""

    def present(self, block: int) -> bool:
        raise NotImplementedError

    def serve(self, chain: list[int]) -> None:
        raise NotImplementedError


def score(requests: Requests, policy: Policy) -> int:
    hits = 0
    for chain in requests:
        for b in chain:
            if not policy.present(b):
                break
            hits += 1
        policy.serve(chain)
    return hits


class Lru(Policy):
    """LRU; ``leaf_first`` uses a request's blocks last to first, so its tail is the oldest."""

    def __init__(self, capacity: int, leaf_first: bool = False) -> None:
        self.capacity, self.leaf_first = capacity, leaf_first
        self.cache: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.cache

    def serve(self, chain: list[int]) -> None:
        cache = self.cache
        for b in reversed(chain) if self.leaf_first else chain:
            if b in cache:
                cache.move_to_end(b)
            else:
                cache[b] = None
                if len(cache) > self.capacity:
                    cache.popitem(last=False)


class Clock(Policy):
    """CLOCK (a reference bit per block, second chance), the core of SIEVE and S3-FIFO's main queue."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bit: dict[int, bool] = {}
        self.ring: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.bit

    def serve(self, chain: list[int]) -> None:
        for b in chain:
            if b in self.bit:
                self.bit[b] = True
                continue
            while len(self.bit) >= self.capacity:
                x, _ = self.ring.popitem(last=False)
                if self.bit[x]:
                    self.bit[x] = False
                    self.ring[x] = None
                else:
                    del self.bit[x]
            self.bit[b] = False
            self.ring[b] = None


class S3Fifo(Policy):
    """S3-FIFO: a small FIFO (10%) for new blocks, a main FIFO with 2-bit frequencies, a ghost FIFO."""

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

    def serve(self, chain: list[int]) -> None:
        for b in chain:
            for q in (self.small, self.main):
                if b in q:
                    q[b] = min(q[b] + 1, 3)
                    break
            else:
                while len(self.small) + len(self.main) >= self.capacity:
                    self._evict()
                if b in self.ghost:
                    del self.ghost[b]
                    self.main[b] = 0
                else:
                    self.small[b] = 0


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

    def serve(self, chain: list[int]) -> None:
        for b in chain:
            self.count[b] += 1
            self.uses += 1
            self.clock += 1
            if self.age and self.uses >= self.age * self.capacity:
                self.uses = 0
                self.count = Counter({k: v // 2 for k, v in self.count.items() if v > 1})
                self.cache = {k: (self.count[k], t) for k, (_, t) in self.cache.items()}
                self.heap = [(c, t, k) for k, (c, t) in self.cache.items()]
                heapq.heapify(self.heap)
            if b not in self.cache and len(self.cache) >= self.capacity:
                while True:
                    c, t, k = heapq.heappop(self.heap)
                    if self.cache.get(k) == (c, t):
                        del self.cache[k]
                        break
            key = (self.count[b], self.clock)
            self.cache[b] = key
            heapq.heappush(self.heap, (*key, b))


class TinyLfu(Policy):
    """W-TinyLFU: a 1% LRU window, then a segmented LRU (80% protected) that admits a block leaving the
    window only if it was used more often (exact counts, halved every 10 x capacity uses) than the
    block it would evict."""

    def __init__(self, capacity: int) -> None:
        self.window_max = max(1, capacity // 100)
        self.main_max = capacity - self.window_max
        self.protected_max = int(self.main_max * 0.8)
        self.window: OrderedDict[int, None] = OrderedDict()
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.protected: OrderedDict[int, None] = OrderedDict()
        self.count: Counter[int] = Counter()
        self.uses, self.reset = 0, 10 * capacity

    def present(self, block: int) -> bool:
        return block in self.window or block in self.probation or block in self.protected

    def serve(self, chain: list[int]) -> None:
        for b in chain:
            self.count[b] += 1
            self.uses += 1
            if self.uses >= self.reset:
                self.uses = 0
                self.count = Counter({k: v // 2 for k, v in self.count.items() if v > 1})
            if b in self.window:
                self.window.move_to_end(b)
            elif b in self.probation:
                del self.probation[b]
                self.protected[b] = None
                if len(self.protected) > self.protected_max:
                    self.probation[self.protected.popitem(last=False)[0]] = None
            elif b in self.protected:
                self.protected.move_to_end(b)
            else:
                self.window[b] = None
                if len(self.window) > self.window_max:
                    candidate = self.window.popitem(last=False)[0]
                    if len(self.probation) + len(self.protected) < self.main_max:
                        self.probation[candidate] = None
                        continue
                    queue = self.probation or self.protected
                    victim = next(iter(queue))
                    if self.count[candidate] > self.count[victim]:
                        del queue[victim]
                        self.probation[candidate] = None


class FreshMain(Policy):
    """mooncakefs's policy: new blocks in a FIFO (``fresh`` share), blocks used again (or back from the
    ghost list of ``ghost`` x capacity evicted keys) in an LRU; fresh goes first while over its share."""

    def __init__(self, capacity: int, fresh: float = 0.05, ghost: float = 2.0, leaf_first: bool = False) -> None:
        self.capacity, self.fresh_max = capacity, max(1, int(capacity * fresh))
        self.ghost_max, self.leaf_first = int(capacity * ghost), leaf_first
        self.fresh: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()

    def present(self, block: int) -> bool:
        return block in self.fresh or block in self.main

    def _make_room(self) -> None:
        while len(self.fresh) + len(self.main) >= self.capacity:
            queue = self.fresh if len(self.fresh) > self.fresh_max or not self.main else self.main
            self.ghost[queue.popitem(last=False)[0]] = None
            if len(self.ghost) > self.ghost_max:
                self.ghost.popitem(last=False)

    def serve(self, chain: list[int]) -> None:
        for b in reversed(chain) if self.leaf_first else chain:
            if b in self.main:
                self.main.move_to_end(b)
            elif b in self.fresh:
                del self.fresh[b]
                self.main[b] = None
            else:
                self._make_room()
                if b in self.ghost:
                    del self.ghost[b]
                    self.main[b] = None
                else:
                    self.fresh[b] = None


class DeepestFirst(Policy):
    """Chain-aware scoring taken to the end: evict the deepest block (position in its request), LRU
    among equals: roots outlive their chains."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.depth: dict[int, int] = {}
        self.levels: dict[int, OrderedDict[int, None]] = {}

    def present(self, block: int) -> bool:
        return block in self.depth

    def serve(self, chain: list[int]) -> None:
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

    def serve(self, chain: list[int]) -> None:
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


class AdmissionOracle(Lru):
    """LRU that never admits a block that will not be used again: what perfect admission is worth."""

    def __init__(self, capacity: int, requests: Requests) -> None:
        super().__init__(capacity)
        self.left = Counter(b for chain in requests for b in chain)

    def serve(self, chain: list[int]) -> None:
        for b in chain:
            self.left[b] -= 1
            if b in self.cache:
                self.cache.move_to_end(b)
            elif self.left[b] > 0:
                self.cache[b] = None
                if len(self.cache) > self.capacity:
                    self.cache.popitem(last=False)


def static_best(requests: Requests, capacity: int) -> int:
    """Hits of the best fixed set of blocks chosen knowing every count (each block's first use misses)."""
    counts = sorted(Counter(b for chain in requests for b in chain).values(), reverse=True)
    return sum(c - 1 for c in counts[:capacity])


CANDIDATES: dict[str, Callable[[int, Requests], Policy | int]] = {
    "LRU": lambda c, r: lru_hits(r, c),
    "LRU, leaf first": lambda c, r: Lru(c, leaf_first=True),
    "CLOCK / SIEVE-like": lambda c, r: Clock(c),
    "S3-FIFO": lambda c, r: S3Fifo(c),
    "LFU (all history)": lambda c, r: Lfu(c),
    "LFU, halved every 10x": lambda c, r: Lfu(c, age=10),
    "W-TinyLFU": lambda c, r: TinyLfu(c),
    "deepest block first": lambda c, r: DeepestFirst(c),
    "request admission p=0.1": lambda c, r: RequestAdmission(c),
    "fresh 5% + main, ghost 2x (mooncakefs)": lambda c, r: FreshMain(c),
    "  same, leaf first on every use": lambda c, r: FreshMain(c, leaf_first=True),
    "  fresh 1%": lambda c, r: FreshMain(c, fresh=0.01),
    "  fresh 25%": lambda c, r: FreshMain(c, fresh=0.25),
    "oracle: perfect admission + LRU": lambda c, r: AdmissionOracle(c, r),
    "oracle: best static set": lambda c, r: static_best(r, c),
    "oracle: Belady": lambda c, r: belady_hits(r, c),
}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--capacity", default="0.05,0.1,0.25", help="fractions of the unique blocks")
    p.add_argument("--json", type=Path, help="also write the ratios here")
    p.add_argument(
        "--reuse",
        type=int,
        metavar="H",
        help="instead: the share of requests whose first block comes back within H requests, by "
        "how often it came before",
    )
    args = p.parse_args()
    requests = load_trace(args.trace)
    unique = len({b for chain in requests for b in chain})
    if args.reuse:
        print(f"{'times seen before':>18}  {'requests':>8}  {f'again within {args.reuse}':>16}")
        for k, (n, share) in reuse_by_times_seen(requests, args.reuse).items():
            print(f"{k + ('+' if k == '6' else ''):>18}  {n:>8}  {share:>16.2f}")
        once = sum(1 for c in Counter(b for chain in requests for b in chain).values() if c == 1)
        print(f"blocks referenced once: {once} of {unique}")
        return
    refs = sum(map(len, requests))
    fractions = [float(x) for x in args.capacity.split(",")]
    table: dict[str, dict[str, float]] = {}
    for name, make in CANDIDATES.items():
        table[name] = {}
        for f in fractions:
            capacity = int(f * unique)
            made = make(capacity, requests)
            hits = made if isinstance(made, int) else score(requests, made)
            table[name][f"{f:g}"] = hits / refs
        print(f"{name:40}" + "".join(f"{table[name][f'{f:g}']:8.3f}" for f in fractions), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"trace": str(args.trace), "block_refs": refs, "unique_blocks": unique, "hit_ratio": table}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
