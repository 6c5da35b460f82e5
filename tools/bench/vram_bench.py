#!/usr/bin/env python3
"""The VRAM tier and SSD -> VRAM reads against the GPU's own copies, in the same run.

Rows (16 MiB values by default, each a median of interleaved repetitions):

- ``cudaMemcpy D2D``: ``cuMemcpyDtoDAsync`` + stream sync between two device buffers: the reference.
- ``vram get_into``: ``store.get_into(key, gpu_buffer)`` of a VRAM value (device to device).
  Target (issue 13): at least 0.8 x cudaMemcpy D2D.
- ``vram put``: ``store.put(key, gpu_buffer)`` into VRAM (replacing the key's value).
- ``ssd -> vram (cuFile)``: ``get_into`` of values only on the SSD tier, read by cuFile in whichever mode
  it runs (the table says: "gds", or "compat" without the nvidia-fs driver), unchecked: what every read
  but a value's first costs under the default ``gpu_verify="first"``.
- ``ssd -> vram (cuFile, CRC checked)``: the same with each read checked against the value's CRC-32C by
  a copy back to the host (``gpu_verify="always"``; under "first", a value's first read).
- ``ssd -> vram (store, pread+h2d)``: the same through the store's fallback (pread into pinned memory,
  CRC-32C check, copy to the device).
- ``pread + H2D``: the plain reference: ``preadv`` of the same bytes into pinned memory, then one
  ``cuMemcpyHtoDAsync``; no store.  Target: cuFile at least 1.0 x this.

SSD rows drop the segment files from the page cache before each repetition (``--warm`` keeps it).
Without a GPU (or without ``mooncakefs[cuda]``) it says why and exits 0, writing that reason to --json
(bench-results/vram_bench.json, as every benchmark writes its JSON under bench-results/).

Examples::

    python tools/bench/vram_bench.py --quick
    python tools/bench/vram_bench.py --json bench-results/vram_bench.json
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    GB,
    MiB,
    format_number,
    format_size,
    format_table,
    machine_info,
    measure,
    median,
    progress,
    report,
    write_json,
)

import mooncakefs
from mooncakefs.gpu import Cuda, DeviceArray, gpu_unavailable
from mooncakefs.tiers.gds import FALLBACK
from mooncakefs.units import parse_size


def drop_cache(directory: Path) -> None:
    """Evict the SSD tier's segment files from the page cache (cold reads)."""
    for path in directory.glob("seg-*.dat"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="16MiB", help="value size")
    parser.add_argument("--count", type=int, default=8, help="values per row (keys cycled through)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rep-seconds", type=float, default=0.3)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--data", type=Path, help="data dir (SSD tier files); default a temporary dir")
    parser.add_argument("--warm", action="store_true", help="keep the page cache between SSD repetitions")
    parser.add_argument("--quick", action="store_true", help="3 reps of 0.1 s")
    parser.add_argument("--json", type=Path, default=Path("bench-results/vram_bench.json"), help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.rep_seconds = 3, 0.1
    size = parse_size(args.size, what="--size")
    why = gpu_unavailable(args.device)
    if why is not None:
        progress(f"vram_bench: skipped: {why}")
        if args.json:
            write_json(args.json, {"skipped": why, "machine": machine_info()})
        return 0
    cuda = Cuda(args.device)
    progress(f"vram_bench: GPU {args.device} ({cuda.name}), {format_size(size)} values")
    with tempfile.TemporaryDirectory(prefix="vram-bench-", dir=args.data) as tmp:
        return run(cuda, Path(tmp), size, args)


def run(cuda: Cuda, root: Path, size: int, args: argparse.Namespace) -> int:
    n = args.count
    arrays = [DeviceArray(cuda, size) for _ in range(n + 1)]
    pattern = os.urandom(size)
    for a in arrays:
        a.upload(pattern)
    src, dsts = arrays[0], arrays[1:]
    vram_bytes = (n + 2) * size + (64 * MiB)
    store = mooncakefs.open(
        root / "kv", dram=f"{2 * size + MiB}", ssd=f"{(n + 4) * size * 2}", vram=vram_bytes, device=args.device,
        promote_after=1 << 30,
    )  # fmt: skip
    try:
        for i in range(n):
            store.put(f"v{i}", dsts[i])
            store.put(f"s{i}", pattern, durable=True)
        for _ in range(n):  # the SSD values out of DRAM: put values of DRAM's size through it
            store.put("filler", bytes(size))
            store.remove("filler")
        tiers = {store.stat(f"s{i}").tier for i in range(n)}
        assert tiers == {"ssd"}, f"SSD values not only on SSD: {tiers}"
        gds = store._gds
        assert gds is not None
        mode, why = gds.mode, gds.why
        progress(f"cuFile: {mode} ({why})")
        ssd_dir = root / "kv" / "ssd"
        where = []
        with store._lock:
            for i in range(n):
                entry = store._index[f"s{i}".encode()]
                where.append((store._ssd.segments[entry.seg].place.gpu_source()[0], entry.seg_off))
        fds = {path: os.open(path, os.O_RDONLY) for path, _ in where}
        stage_ptr = cuda.alloc_host(size)  # pread + H2D reference: pread into pinned memory, then one copy
        stage = memoryview((ctypes.c_char * size).from_address(stage_ptr)).cast("B")

        def pread_h2d(i: int) -> None:
            path, off = where[i]
            got = 0
            while got < size:
                got += os.preadv(fds[path], [stage[got:size]], off + got)
            cuda.h2d(arrays[1 + i].ptr, stage_ptr, size)

        def get_ssd(i: int, fallback: bool, verify: str = "never") -> None:
            saved = gds.mode, gds.verify
            if fallback:
                gds.mode = FALLBACK
            gds.verify = verify
            try:
                store.get_into(f"s{i}", dsts[i])
            finally:
                gds.mode, gds.verify = saved

        ops: dict[str, tuple[Callable[[int], Any], bool]] = {
            "cudaMemcpy D2D": (lambda i: cuda.d2d(dsts[i].ptr, src.ptr, size), False),
            "vram get_into": (lambda i: store.get_into(f"v{i}", dsts[i]), False),
            "vram put": (lambda i: store.put(f"v{i}", src), False),
            f"ssd -> vram (cuFile, {mode})": (lambda i: get_ssd(i, False), True),
            f"ssd -> vram (cuFile, {mode}, CRC checked)": (lambda i: get_ssd(i, False, "always"), True),
            "ssd -> vram (store, pread+h2d)": (lambda i: get_ssd(i, True), True),
            "pread + H2D": (pread_h2d, True),
        }
        rates: dict[str, list[float]] = {name: [] for name in ops}
        for rep in range(args.reps):  # interleaved: each rep runs every row once
            for name, (op, cold) in ops.items():

                def runner(start: int, count: int, op: Callable[[int], Any] = op) -> None:
                    for k in range(start, start + count):
                        op(k % n)

                before = (lambda: drop_cache(ssd_dir)) if cold and not args.warm else None
                rates[name] += measure(
                    runner, period=n, reps=1, rep_seconds=args.rep_seconds, warmup=rep == 0, before_rep=before,
                    max_ops_per_rep=n if cold and not args.warm else None,
                )  # fmt: skip
        for i in range(n):  # every path read the right bytes
            assert dsts[i].download() == pattern, f"row output {i} differs"
        for fd in fds.values():
            os.close(fd)
    finally:
        store.close()
        for a in arrays:
            a.close()
    gbps = {name: median(r) * size / GB for name, r in rates.items()}  # type: ignore[operator]
    ref_d2d, ref_pread = gbps["cudaMemcpy D2D"], gbps["pread + H2D"]
    ratio = {
        "vram get_into": gbps["vram get_into"] / ref_d2d,
        "vram put": gbps["vram put"] / ref_d2d,
        f"ssd -> vram (cuFile, {mode})": gbps[f"ssd -> vram (cuFile, {mode})"] / ref_pread,
        f"ssd -> vram (cuFile, {mode}, CRC checked)": gbps[f"ssd -> vram (cuFile, {mode}, CRC checked)"] / ref_pread,
        "ssd -> vram (store, pread+h2d)": gbps["ssd -> vram (store, pread+h2d)"] / ref_pread,
    }
    rows = [
        (name, format_number(gbps[name]), f"{ratio[name]:.2f}" if name in ratio else "ref", f"{len(rates[name])}")
        for name in ops
    ]
    table = format_table(("path", "GB/s", "x ref", "reps"), rows, (False, True, True, True))
    payload = {
        "machine": machine_info({"gpu": cuda.name, "device": args.device}),
        "size": size,
        "cold_ssd": not args.warm,
        "cufile_mode": mode,
        "cufile_why": why,
        "gbps": gbps,
        "ratio": ratio,
        "reps": rates,
        "targets": {"vram get_into / D2D": 0.8, "cuFile / pread+H2D": 1.0},
    }
    report(table, payload, args.json)
    cuda.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
