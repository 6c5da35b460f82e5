#!/usr/bin/env python3
"""How a copy's speed depends on where its destination lies past its source, modulo a page: glibc's
memcpy against the store's ``mc_copy`` (``mooncakefs/_stream_copy.h``), in one build.

glibc copies 2112 bytes and more with REP MOVSB on CPUs with FSRM; on the AMD EPYC dev VMs that is 4-6x
slower when the destination lies 1 to 31 bytes past the source modulo 4 KiB (numpy's large arrays start
16 bytes into a page, the store's values at 0).  ``mc_copy`` takes a vector loop there.  Each row copies
``size`` bytes from blocks of a page-aligned source ring (64 MiB, so mostly out of the caches, as a
store's values are) into one destination ``skew`` bytes past a page; ``memcpy`` is glibc's (the copy path
forced with ``_engine.force_stream_copy("memcpy")``), ``mc_copy`` the default.  Medians of interleaved
reps, ns per copy; on a CPU without the slow case the two columns agree.

Example::

    python3 tools/bench/copy_skew.py --json bench-results/copy_skew.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import format_table, median, write_json

from mooncakefs import _engine

SIZES = (4096, 65536, 262144)
SKEWS = (0, 8, 16, 24, 32, 64, 4080)
RING = 64 << 20


def ns_per_copy(size: int, skew: int, kind: str, src: np.ndarray, dst: np.ndarray) -> float:
    """One rep: a pass over the source ring, ``size`` bytes a copy, with the copy path ``kind``."""
    _engine.force_stream_copy(kind)
    target = dst[skew : skew + size]
    count = RING // size
    start = time.perf_counter()
    for i in range(count):
        _engine.copy(target, src[i * size : (i + 1) * size])
    return (time.perf_counter() - start) / count * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved reps per row (5)")
    p.add_argument("--json", default="bench-results/copy_skew.json", help="where the JSON goes")
    args = p.parse_args()
    memory = np.ones(RING + 4096, dtype=np.uint8)
    src = memory[-memory.ctypes.data % 4096 :][:RING]  # on a page, as the pool's values are
    room = np.ones(2 * 4096 + max(SIZES), dtype=np.uint8)
    dst = room[-room.ctypes.data % 4096 :]
    rows, results = [], []
    try:
        for size in SIZES:
            for skew in SKEWS:
                reps: dict[str, list[float]] = {"memcpy": [], "auto": []}
                for _ in range(args.reps):
                    for kind in reps:
                        reps[kind].append(ns_per_copy(size, skew, kind, src, dst))
                glibc, ours = median(reps["memcpy"]), median(reps["auto"])
                assert glibc is not None and ours is not None
                results.append({"size": size, "skew": skew, "memcpy_ns": glibc, "mc_copy_ns": ours, "reps": reps})
                rows.append([str(size), str(skew), f"{glibc:,.0f}", f"{ours:,.0f}", f"{glibc / ours:.2f}x"])
    finally:
        _engine.force_stream_copy("auto")
    print(format_table(["size", "skew", "memcpy ns", "mc_copy ns", "memcpy/mc_copy"], rows, [True] * 5))
    print(f"note: skew = (destination - source) mod 4096; medians of {args.reps} interleaved reps")
    write_json(args.json, {"copy_path": _engine.stream_copy_kind(), "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
