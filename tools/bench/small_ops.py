#!/usr/bin/env python3
"""Keys per second of the embedded store's small calls, by wall clock and by this process's CPU time.

4 KiB ``put``, ``get``, ``get_into``, and 32-key ``batch_put`` / ``batch_get_into`` over 8192 resident keys
of a DRAM-only store (``--ssd``: with an SSD tier as well, as kv_bench's stores have).  ``--into numpy``
reads into 4 KiB slices of a numpy array that start 16 bytes into a page, as a large array's do (kv_bench's);
``--copy memcpy`` makes every copy glibc's memcpy (the A/B of ``_stream_copy.h``'s mc_copy).  ``copy_many``
is the floor of ``batch_get_into``: each batch's 4 KiB blocks copied by one ``_engine.copy_many`` from a
page-aligned array as large as the values (no store, no index).  On a shared VM the
wall clock says as much about the neighbours as about the code; the CPU time of the process is disturbed
far less, so A/B runs (``PYTHONPATH=<tree>`` from each tree, interleaved) compare it.  One line per op:
``op keys_per_wall_s keys_per_cpu_s``.

Example::

    python3 tools/bench/small_ops.py --seconds 2
    python3 tools/bench/small_ops.py --seconds 2 --ssd 1GiB
    python3 tools/bench/small_ops.py --ops get_into,batch_get_into --into numpy --copy memcpy
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import mooncakefs
from mooncakefs import _engine

OPS = ("put", "get", "get_into", "batch_put", "batch_get_into", "copy_many")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per op (default 2)")
    p.add_argument("--keys", type=int, default=8192, help="resident keys (default 8192)")
    p.add_argument("--batch", type=int, default=32, help="keys per batch call (default 32)")
    p.add_argument("--ssd", help="an SSD tier of this size too (default: none); the values stay in DRAM")
    p.add_argument(
        "--into",
        choices=("bytearray", "numpy"),
        default="bytearray",
        help="get_into destinations: bytearrays (default) or slices of one large numpy array",
    )
    p.add_argument("--copy", choices=("auto", "memcpy"), default="auto", help="memcpy: glibc's for every copy")
    args = p.parse_args()
    _engine.force_stream_copy(args.copy)
    values = [os.urandom(4096) for _ in range(64)]
    keys = [f"bench/key/{i:08d}" for i in range(args.keys)]
    groups = [keys[i : i + args.batch] for i in range(0, len(keys), args.batch)]
    items = [[(k, values[j % 64]) for j, k in enumerate(g)] for g in groups]
    if args.into == "numpy":  # numpy's large arrays start 16 bytes into a page, the store's values at 0
        pages = np.ones((args.batch + 2) * 4096, dtype=np.uint8)
        at = (16 - pages.ctypes.data) % 4096
        one, buffers = pages[at : at + 4096], [pages[at + i * 4096 : at + (i + 1) * 4096] for i in range(args.batch)]
    else:
        one, buffers = bytearray(4096), [bytearray(4096) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as d, mooncakefs.open(d, dram="256MiB", ssd=args.ssd) as store:
        for i, key in enumerate(keys):
            store.put(key, values[i % 64])

        def put() -> None:
            for i, key in enumerate(keys):
                store.put(key, values[i & 63])

        def get() -> None:
            for key in keys:
                store.get(key)  # each value dropped at once, as a caller would

        def get_into() -> None:
            for key in keys:
                store.get_into(key, one)

        def batch_put() -> None:
            for group in items:
                store.batch_put(group)

        def batch_get_into() -> None:
            for group in groups:
                store.batch_get_into(group, buffers)

        cold = np.ones(len(keys) * 4096 + 4096, dtype=np.uint8)
        at = -cold.ctypes.data % 4096  # on a page, as the pool's values are
        blocks = [cold[at + i * 4096 : at + (i + 1) * 4096] for i in range(len(keys))]
        block_groups = [blocks[i : i + args.batch] for i in range(0, len(blocks), args.batch)]

        def copy_many() -> None:
            for group in block_groups:
                _engine.copy_many(buffers[: len(group)], group)

        passes = {f.__name__: f for f in (put, get, get_into, batch_put, batch_get_into, copy_many)}
        for op in args.ops.split(","):
            one_pass, done = passes[op], 0
            wall, cpu = time.perf_counter(), time.process_time()
            while time.perf_counter() - wall < args.seconds:
                one_pass()
                done += len(keys)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(op, round(done / wall), round(done / cpu), flush=True)


if __name__ == "__main__":
    main()
