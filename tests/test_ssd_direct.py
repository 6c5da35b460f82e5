"""Large page-aligned values reach SSD segments with O_DIRECT; everything still reads back exactly."""

import mmap
import os

import mooncakefs
from mooncakefs.keys import InternalKey
from mooncakefs.tiers.ssd import DIRECT_ALIGN

MiB = 1 << 20


def aligned_buffer(fill: int, size: int = MiB) -> mmap.mmap:
    buf = mmap.mmap(-1, size)  # page-aligned, as the filesystem's chunk buffers are
    buf.write(bytes([fill]) * size)
    return buf


def test_aligned_values_go_direct_and_mix_with_buffered_ones(tmp_path):
    small = {f"small/{i}": os.urandom(1000 + i) for i in range(5)}
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        for i in range(4):
            store.put(InternalKey(b"big/%d" % i), aligned_buffer(i))  # written through to SSD
            key = f"small/{i}"
            store.put(key, small[key], durable=True)  # buffered, unaligned, in the same segment
        segments = list(store._ssd.segments.values())
        assert any(seg.place.direct_fd >= 0 for seg in segments), "no O_DIRECT write happened"
        offsets = [int(off) for (off,) in store._ssd.db.execute("SELECT off FROM objects WHERE size = ?", (MiB,))]
        assert offsets and all(off % DIRECT_ALIGN == 0 for off in offsets)
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        for i in range(4):
            assert store.get(InternalKey(b"big/%d" % i)) == bytes([i]) * MiB
            key = f"small/{i}"
            assert store.get(key) == small[key]


def test_unaligned_large_values_take_the_page_cache(tmp_path):
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        data = bytearray(os.urandom(MiB + 1))  # not a multiple of the page size
        store.put("odd", data, durable=True)
        assert all(seg.place.direct_fd == -1 for seg in store._ssd.segments.values())
    with mooncakefs.open(tmp_path, dram="64MiB", ssd="256MiB") as store:
        assert store.get("odd") == data
