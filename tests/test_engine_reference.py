"""The Cython hot paths (mooncakefs._engine) against the pure-Python reference (mooncakefs._reference).

Both modules provide copy(), crc32c() and OffsetAllocator and must behave identically; the allocator runs
the same deterministic algorithm in both, so the same alloc/free sequence gives the same handles and offsets.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

UNIT = 64  # the allocator's allocation unit, in bytes

IMPLEMENTATIONS = ["mooncakefs._engine", "mooncakefs._reference"]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    # A plain import (not importorskip): a missing or broken extension must fail, not skip.
    return importlib.import_module(request.param)


@pytest.fixture(scope="module")
def engine():
    return importlib.import_module("mooncakefs._engine")


@pytest.fixture(scope="module")
def reference():
    return importlib.import_module("mooncakefs._reference")


# --------------------------------------------------------------------------------------------- crc32c


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """Independent CRC-32C (Castagnoli, reflected poly 0x82F63B78), one bit at a time."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_bitwise_oracle_is_right():
    assert _crc32c_bitwise(b"123456789") == 0xE3069283


def test_crc32c_check_value(impl):
    assert impl.crc32c(b"123456789") == 0xE3069283


def test_crc32c_empty(impl):
    assert impl.crc32c(b"") == 0
    assert impl.crc32c(b"", 0x12345678) == 0x12345678


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x00" * 32, 0x8A9136AA),  # RFC 3720 B.4 test vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"a", 0xC1D04330),
    ],
)
def test_crc32c_known_vectors(impl, data, expected):
    assert impl.crc32c(data) == expected
    assert _crc32c_bitwise(data) == expected


def test_crc32c_returns_unsigned_32_bit_int(impl):
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4096):
        value = impl.crc32c(random.Random(n).randbytes(n))
        assert isinstance(value, int)
        assert 0 <= value <= 0xFFFFFFFF


@pytest.mark.parametrize(
    "make",
    [
        bytes,
        bytearray,
        memoryview,
        lambda b: memoryview(bytearray(b)),
        lambda b: np.frombuffer(b, dtype=np.uint8).copy(),
    ],
    ids=["bytes", "bytearray", "memoryview", "memoryview-rw", "numpy-u8"],
)
def test_crc32c_accepts_buffers(impl, make):
    data = random.Random(5).randbytes(1000)
    assert impl.crc32c(make(data)) == _crc32c_bitwise(data)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64, np.complex128])
def test_crc32c_numpy_any_dtype_is_over_its_bytes(impl, dtype):
    arr = np.arange(257, dtype=dtype) * 3
    assert impl.crc32c(arr) == _crc32c_bitwise(arr.tobytes())


def test_crc32c_2d_numpy(impl):
    arr = np.arange(12 * 17, dtype=np.float32).reshape(12, 17)
    assert impl.crc32c(arr) == _crc32c_bitwise(arr.tobytes())


def test_crc32c_unaligned_memoryview_slice(impl):
    data = random.Random(9).randbytes(4099)
    for start in range(0, 9):
        view = memoryview(data)[start : start + 3001]
        assert impl.crc32c(view) == _crc32c_bitwise(data[start : start + 3001])


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=3000), seed=st.integers(0, 0xFFFFFFFF))
def test_crc32c_engine_matches_reference_and_oracle(engine, reference, data, seed):
    expected = _crc32c_bitwise(data)
    assert reference.crc32c(data) == expected
    assert engine.crc32c(data) == expected
    assert engine.crc32c(data, seed) == reference.crc32c(data, seed) == _crc32c_bitwise(data, seed)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=2000), cut=st.integers(0, 2000))
def test_crc32c_incremental(engine, reference, data, cut):
    a, b = data[:cut], data[cut:]
    for impl in (engine, reference):
        assert impl.crc32c(b, impl.crc32c(a)) == impl.crc32c(a + b)


def test_crc32c_large_buffer_matches(engine, reference):
    data = random.Random(1).randbytes((1 << 20) + 13)
    assert engine.crc32c(data) == reference.crc32c(data)
    # incremental over many odd-sized chunks
    crc = 0
    pos = 0
    rng = random.Random(2)
    while pos < len(data):
        n = rng.randint(1, 100_000)
        crc = engine.crc32c(memoryview(data)[pos : pos + n], crc)
        pos += n
    assert crc == engine.crc32c(data)


# ----------------------------------------------------------------------------------------------- copy


def test_copy_basic(impl):
    src = random.Random(3).randbytes(1000)
    dst = bytearray(1000)
    assert impl.copy(dst, src) == 1000
    assert bytes(dst) == src


def test_copy_into_larger_buffer_leaves_the_rest(impl):
    src = b"hello world"
    dst = bytearray(b"\xaa" * 64)
    assert impl.copy(dst, src) == len(src)
    assert bytes(dst[: len(src)]) == src
    assert bytes(dst[len(src) :]) == b"\xaa" * (64 - len(src))


def test_copy_empty(impl):
    dst = bytearray(b"xyz")
    assert impl.copy(dst, b"") == 0
    assert dst == bytearray(b"xyz")
    assert impl.copy(bytearray(), b"") == 0


def test_copy_into_memoryview_slice(impl):
    backing = bytearray(b"\x00" * 100)
    view = memoryview(backing)[10:60]
    assert impl.copy(view, b"\x01" * 50) == 50
    assert backing == bytearray(10) + b"\x01" * 50 + bytearray(40)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex128])
def test_copy_numpy_src_counts_bytes(impl, dtype):
    src = (np.arange(100) * 7).astype(dtype)
    dst = bytearray(src.nbytes + 5)
    assert impl.copy(dst, src) == src.nbytes
    assert bytes(dst[: src.nbytes]) == src.tobytes()


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_copy_into_numpy_dst(impl, dtype):
    expected = (np.arange(64) * 3).astype(dtype)
    dst = np.zeros(64, dtype=dtype)
    assert impl.copy(dst, expected.tobytes()) == expected.nbytes
    np.testing.assert_array_equal(dst, expected)


def test_copy_into_2d_numpy_dst(impl):
    expected = np.arange(6 * 7, dtype=np.float64).reshape(6, 7)
    dst = np.zeros((6, 7), dtype=np.float64)
    assert impl.copy(dst, expected) == expected.nbytes
    np.testing.assert_array_equal(dst, expected)


def test_a_strided_source_is_a_type_error_and_a_closed_mmap_a_value_error(impl):
    """Callers tell the two apart: a strided array is a bad argument (InvalidArgument once the store
    words it), a mapping closed meanwhile is the transfer engine's cue to fall back (local.copy_now)."""
    import mmap

    with pytest.raises(TypeError, match="C-contiguous"):
        impl.copy(bytearray(64), np.zeros((4, 4))[:, ::2])
    closed = mmap.mmap(-1, 4096)
    closed.close()
    with pytest.raises(ValueError) as caught:
        impl.copy(bytearray(64), closed)
    assert not isinstance(caught.value, TypeError)


def test_copy_dst_too_small(impl):
    with pytest.raises(ValueError):
        impl.copy(bytearray(9), b"0123456789")
    with pytest.raises(ValueError):
        impl.copy(np.zeros(2, dtype=np.float32), b"123456789")  # 8 bytes < 9


def test_copy_many_copies_each_pair_and_counts_every_byte(impl):
    """Blocks big enough together to copy without the GIL, small ones, an empty one, numpy on either side."""
    srcs = [random.Random(1).randbytes(1 << 20), b"abc", b"", np.arange(8, dtype=np.uint16)]
    dsts = [bytearray(1 << 20), bytearray(5), bytearray(0), np.zeros(16, dtype=np.uint8)]
    assert impl.copy_many(dsts, srcs) == (1 << 20) + 3 + 16
    assert dsts[0] == srcs[0] and dsts[1] == b"abc\0\0"
    assert dsts[3].tobytes() == srcs[3].tobytes()


def test_copy_many_checks_every_pair_before_copying_any(impl):
    first = bytearray(4)
    with pytest.raises(ValueError, match="destination 1 holds 1 bytes"):
        impl.copy_many([first, bytearray(1)], [b"abcd", b"xy"])
    assert first == bytearray(4)
    with pytest.raises(ValueError):
        impl.copy_many([bytearray(4)], [b"ab", b"cd"])


def test_copy_at_copies_between_addresses_and_lets_the_pinned_go(impl):
    """Pointer copies (the transfer engine's same-host batches): each range byte-exact, an empty one
    skipped, the pinned mapping held only while copying (it closes afterwards)."""
    import mmap

    src = np.frombuffer(random.Random(2).randbytes(3 << 20), dtype=np.uint8)
    pool = mmap.mmap(-1, 4 << 20)
    dst = np.frombuffer(pool, dtype=np.uint8)
    base = dst.ctypes.data
    n = impl.copy_at(
        [base, base + (2 << 20), base + 5],
        [src.ctypes.data, src.ctypes.data + (1 << 20), 0],
        [1 << 20, (2 << 20) - 7, 0],
        [pool],
    )
    assert n == (3 << 20) - 7
    assert np.array_equal(dst[: 1 << 20], src[: 1 << 20])
    assert np.array_equal(dst[2 << 20 : (4 << 20) - 7], src[1 << 20 : (3 << 20) - 7])
    assert not dst[1 << 20 : 2 << 20].any()
    del dst
    pool.close()  # nothing holds it any more


def test_copy_at_of_a_large_batch_streams_byte_exact_at_any_alignment(impl):
    """Past 4 MiB in all the Cython copy streams its stores (_stream_copy.h): destinations and sources at
    odd offsets, lengths not a multiple of any vector, a short block among large ones; bytes around each
    destination stay untouched."""
    src = np.frombuffer(random.Random(3).randbytes(12 << 20), dtype=np.uint8)
    dst = np.zeros((12 << 20) + 4096, dtype=np.uint8)
    sizes = [(4 << 20) + 77, 100, 1 << 20, (3 << 20) + 31, 4095]
    dst_at, src_at, d, s = [], [], 5, 3
    for n in sizes:
        dst_at.append(d)
        src_at.append(s)
        d, s = d + n + 13, s + n + 1
    n = impl.copy_at([dst.ctypes.data + o for o in dst_at], [src.ctypes.data + o for o in src_at], sizes)
    assert n == sum(sizes)
    expected = np.zeros_like(dst)
    for o, p, k in zip(dst_at, src_at, sizes, strict=True):
        expected[o : o + k] = src[p : p + k]
    assert np.array_equal(dst, expected)


@pytest.fixture(params=["memcpy", "sse2", "avx2"])
def stream_kind(engine, request):
    """Every path of the streaming copy on this CPU (one it lacks falls to the best it has); auto after."""
    taken = engine.force_stream_copy(request.param)
    yield taken
    engine.force_stream_copy("auto")


def _copy_at_both(engine, reference, src: np.ndarray, sizes, dst_offsets, src_offsets) -> None:
    """Copy the same blocks with the engine and with the twin into two zeroed buffers; every byte equal,
    the guard bytes around each block untouched."""
    span = max(o + n for o, n in zip(dst_offsets, sizes, strict=True)) + 4096
    ours, theirs = np.zeros(span, dtype=np.uint8), np.zeros(span, dtype=np.uint8)
    for impl, dst in ((engine, ours), (reference, theirs)):
        n = impl.copy_at([dst.ctypes.data + o for o in dst_offsets], [src.ctypes.data + o for o in src_offsets], sizes)
        assert n == sum(sizes)
    assert np.array_equal(ours, theirs)
    assert ours.any()  # something was copied (the sources are random bytes)


@pytest.mark.parametrize("dst_head", [0, 1, 31, 32, 33])
@pytest.mark.parametrize("src_head", [0, 7])
@pytest.mark.parametrize("delta", [-1, 0, 1, 63, 127, 129])
def test_streaming_copy_matches_the_twin_around_the_threshold(
    engine, reference, stream_kind, dst_head, src_head, delta
):
    """A single block just under, at and over STREAM_COPY_MIN (memcpy below, streamed from it), from and to
    addresses off the 32-byte grid (the head memcpy'd to align the stores) and with every tail under one
    vector step (memcpy'd after the sfence): byte-exact against the twin's ctypes.memmove."""
    size = engine.STREAM_COPY_MIN + delta
    src = np.frombuffer(random.Random(delta).randbytes(size + 64), dtype=np.uint8)
    base = 64 - (src.ctypes.data % 64)  # offsets from a 64-byte boundary, whatever numpy handed out
    _copy_at_both(engine, reference, src, [size], [base + dst_head], [base + src_head])


def test_streaming_copy_of_a_batch_with_blocks_around_the_block_minimum_matches_the_twin(
    engine, reference, stream_kind
):
    """A streamed batch (over STREAM_COPY_MIN in all) whose short blocks sit around MC_STREAM_BLOCK_MIN
    (4096: memcpy'd below, streamed from it), at odd offsets: byte-exact against the twin."""
    sizes = [engine.STREAM_COPY_MIN, 4095, 4096, 4097, 4096 + 127, 4096 + 128, 31, 0, 129]
    src = np.frombuffer(random.Random(9).randbytes(sum(sizes) + 4096), dtype=np.uint8)
    dst_at, src_at, d, s = [], [], 3, 1
    for n in sizes:
        dst_at.append(d)
        src_at.append(s)
        d, s = d + n + 17, s + n + 5
    _copy_at_both(engine, reference, src, sizes, dst_at, src_at)


@pytest.mark.parametrize("size", [2047, 2048, 2049, 4096, 4096 + 127, (64 << 10) + 33])
@pytest.mark.parametrize("skew", [1, 16, 31, 63, 64, 4080])
@pytest.mark.parametrize("dst_head", [0, 5, 32])
def test_a_copy_just_past_its_source_is_byte_exact(engine, stream_kind, size, skew, dst_head):
    """Copies whose destination is 1 to 63 bytes past the source, modulo a page (REP MOVSB's slow case,
    which mc_copy takes with its own vector loop), of sizes around MC_SKEW_MIN, with every head (the
    destination off the 32-byte grid) and tail: the bytes land, the bytes around them stay untouched."""
    src = np.frombuffer(random.Random(size + skew).randbytes(size + 8192), dtype=np.uint8)
    src_at = 4096 - src.ctypes.data % 4096 + dst_head
    source = src[src_at : src_at + size]
    dst = np.zeros(size + 8192, dtype=np.uint8)
    at = (source.ctypes.data + skew - dst.ctypes.data) % 4096
    assert engine.copy(dst[at : at + size + 7], source) == size
    assert np.array_equal(dst[at : at + size], source)
    assert not dst[:at].any() and not dst[at + size :].any()


def test_the_streaming_copy_paths_are_named_and_bad_ones_refused(impl):
    """The benches print the path beside their references; the twin never streams."""
    assert impl.stream_copy_kind() in ("memcpy", "sse2", "avx2")
    with pytest.raises(ValueError, match="stream copy kind 'avx512'"):
        impl.force_stream_copy("avx512")
    try:
        assert impl.force_stream_copy("memcpy") == "memcpy" == impl.stream_copy_kind()
        assert impl.force_stream_copy("avx2") in (
            ("memcpy",) if impl.__name__.endswith("_reference") else ("sse2", "avx2")
        )
    finally:
        impl.force_stream_copy("auto")


def test_copy_at_refuses_mismatched_lists_and_null_addresses_before_copying(impl):
    out = np.zeros(8, dtype=np.uint8)
    src = np.arange(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="2 destinations and 1 sources for 1 lengths"):
        impl.copy_at([out.ctypes.data, out.ctypes.data], [src.ctypes.data], [8])
    with pytest.raises(ValueError, match="copy 1: no memory at address 0"):
        impl.copy_at([out.ctypes.data, out.ctypes.data], [src.ctypes.data, 0], [4, 4])
    with pytest.raises(OverflowError):
        impl.copy_at([out.ctypes.data], [src.ctypes.data], [-1])
    assert not out.any()


@pytest.mark.parametrize(
    "dst",
    [b"\x00" * 16, memoryview(b"\x00" * 16), memoryview(bytearray(16)).toreadonly()],
    ids=["bytes", "memoryview-of-bytes", "readonly-memoryview"],
)
def test_copy_readonly_dst(impl, dst):
    with pytest.raises(TypeError):
        impl.copy(dst, b"abc")


def test_copy_readonly_numpy_dst(impl):
    arr = np.zeros(16, dtype=np.uint8)
    arr.flags.writeable = False
    with pytest.raises(TypeError):
        impl.copy(arr, b"abc")


@settings(max_examples=100, deadline=None)
@given(src=st.binary(max_size=5000), extra=st.integers(0, 100))
def test_copy_engine_matches_reference(engine, reference, src, extra):
    a = bytearray(b"\x5a" * (len(src) + extra))
    b = bytearray(b"\x5a" * (len(src) + extra))
    assert engine.copy(a, src) == reference.copy(b, src) == len(src)
    assert a == b
    assert bytes(a[: len(src)]) == src


def test_copy_large(impl):
    src = random.Random(4).randbytes(8 << 20)
    dst = bytearray(8 << 20)
    assert impl.copy(dst, src) == len(src)
    assert dst == src


# ------------------------------------------------------------------------------------ OffsetAllocator


def _round_up(n: int) -> int:
    return (n + UNIT - 1) // UNIT * UNIT


class CheckedAllocator:
    """Wraps an OffsetAllocator and checks every invariant after every call."""

    def __init__(self, module, capacity: int):
        self.alloc_obj = module.OffsetAllocator(capacity)
        self.capacity = capacity
        self.live: dict[int, tuple[int, int]] = {}  # handle -> (offset, rounded size)

    def alloc(self, nbytes: int) -> int:
        used_before = self.alloc_obj.used
        handle = self.alloc_obj.alloc(nbytes)
        assert isinstance(handle, int)
        if handle == -1:
            assert self.alloc_obj.used == used_before
            return handle
        assert handle >= 0
        assert handle not in self.live, "handle of a live allocation handed out twice"
        offset = self.alloc_obj.offset(handle)
        size = _round_up(nbytes)
        assert offset >= 0, offset
        assert offset + nbytes <= self.capacity, (offset, nbytes, self.capacity)
        assert offset % UNIT == 0, offset
        for other, (o_off, o_size) in self.live.items():
            assert offset + size <= o_off or o_off + o_size <= offset, (
                f"allocation {handle} [{offset}, {offset + size}) overlaps {other} [{o_off}, {o_off + o_size})"
            )
        self.live[handle] = (offset, size)
        self.check_used()
        return handle

    def free(self, handle: int) -> None:
        self.alloc_obj.free(handle)
        del self.live[handle]
        self.check_used()

    def check_used(self) -> None:
        assert self.alloc_obj.used == sum(size for _, size in self.live.values())
        assert self.alloc_obj.used <= self.capacity
        assert self.alloc_obj.capacity == self.capacity


def test_allocator_capacity_and_empty(impl):
    a = impl.OffsetAllocator(1 << 20)
    assert a.capacity == 1 << 20
    assert a.used == 0


def test_allocator_used_is_rounded_to_unit(impl):
    a = CheckedAllocator(impl, 1 << 16)
    h1 = a.alloc(1)
    assert a.alloc_obj.used == 64
    h2 = a.alloc(65)
    assert a.alloc_obj.used == 64 + 128
    h3 = a.alloc(128)
    assert a.alloc_obj.used == 64 + 128 + 128
    for h in (h2, h1, h3):
        a.free(h)
    assert a.alloc_obj.used == 0


def test_allocator_offsets_readable_until_freed(impl):
    a = CheckedAllocator(impl, 1 << 16)
    handles = [a.alloc(100 * (i + 1)) for i in range(10)]
    offsets = [a.alloc_obj.offset(h) for h in handles]
    assert len(set(offsets)) == len(offsets)
    for h, off in zip(handles, offsets, strict=True):
        assert a.alloc_obj.offset(h) == off


def test_allocator_too_big_fails(impl):
    a = CheckedAllocator(impl, 1 << 16)
    assert a.alloc((1 << 16) + 1) == -1
    assert a.alloc(1 << 30) == -1
    assert a.alloc_obj.used == 0


def test_allocator_full_then_fails(impl):
    capacity = 64 * 64
    a = CheckedAllocator(impl, capacity)
    handles = [a.alloc(64) for _ in range(64)]
    assert all(h >= 0 for h in handles)
    assert a.alloc_obj.used == capacity
    assert a.alloc(1) == -1
    a.free(handles[17])
    h = a.alloc(64)
    assert h >= 0
    assert a.alloc_obj.offset(h) == 17 * 64  # the only free slot
    assert a.alloc(1) == -1


@pytest.mark.parametrize("capacity", [1 << 20, 1 << 16, 64 << 20])
def test_allocator_whole_capacity_power_of_two(impl, capacity):
    a = CheckedAllocator(impl, capacity)
    h = a.alloc(capacity)
    assert h >= 0
    assert a.alloc_obj.offset(h) == 0
    assert a.alloc(1) == -1
    a.free(h)
    assert a.alloc_obj.used == 0


@pytest.mark.parametrize("capacity", [64 * 1000, 64 * 12345, 3 * (1 << 20), 1000 * 1000 * 64])
def test_allocator_whole_capacity_not_power_of_two(impl, capacity):
    a = CheckedAllocator(impl, capacity)
    h = a.alloc(capacity)
    assert h >= 0, f"fresh allocator of {capacity} bytes could not allocate all of it"
    assert a.alloc_obj.offset(h) == 0


@pytest.mark.parametrize("capacity", [1 << 20, 64 * 12345])
def test_allocator_coalescing_after_random_churn(impl, capacity):
    """Allocate and free at random, then free everything: one allocation of the full capacity must succeed."""
    rng = random.Random(capacity)
    a = CheckedAllocator(impl, capacity)
    for _ in range(2000):
        if a.live and rng.random() < 0.45:
            a.free(rng.choice(list(a.live)))
        else:
            a.alloc(rng.choice([1, 63, 64, 65, 200, 1000, 4096, 10_000, 50_000]))
    for h in list(a.live):
        a.free(h)
    assert a.alloc_obj.used == 0
    h = a.alloc(capacity)
    assert h >= 0, "after freeing everything the free space did not coalesce back into one block"
    assert a.alloc_obj.offset(h) == 0


def test_allocator_coalescing_in_every_free_order(impl):
    """Four neighbours freed in each of the orders that merge left, right and both sides."""
    import itertools

    capacity = 4 * 4096
    for order in itertools.permutations(range(4)):
        a = CheckedAllocator(impl, capacity)
        handles = [a.alloc(4096) for _ in range(4)]
        assert all(h >= 0 for h in handles)
        for i in order:
            a.free(handles[i])
        h = a.alloc(capacity)
        assert h >= 0, f"free order {order} did not coalesce"


def test_allocator_reuses_freed_space(impl):
    capacity = 1 << 20
    a = CheckedAllocator(impl, capacity)
    for _ in range(1000):
        h = a.alloc(300_000)
        assert h >= 0
        h2 = a.alloc(500_000)
        assert h2 >= 0
        a.free(h)
        a.free(h2)
    assert a.alloc_obj.used == 0


def test_allocator_fails_when_sum_exceeds_capacity(impl):
    """Whatever the policy, alloc must fail when the used bytes plus the request exceed capacity."""
    capacity = 1 << 16
    rng = random.Random(11)
    a = CheckedAllocator(impl, capacity)
    for _ in range(3000):
        if a.live and rng.random() < 0.4:
            a.free(rng.choice(list(a.live)))
            continue
        n = rng.randint(1, 9000)
        used_before = a.alloc_obj.used
        h = a.alloc(n)
        if used_before + _round_up(n) > capacity:
            assert h == -1


# Hypothesis: the same random sequence of alloc/free on both implementations gives the same results.

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=300_000)),
        st.tuples(st.just("alloc"), st.sampled_from([1, 63, 64, 65, 127, 128, 4095, 4096, 4097])),
        st.tuples(st.just("free"), st.integers(min_value=0, max_value=10_000)),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity_units=st.integers(min_value=1, max_value=32768), ops=_ops)
def test_allocator_engine_matches_reference(engine, reference, capacity_units, ops):
    capacity = capacity_units * UNIT
    e = CheckedAllocator(engine, capacity)
    r = CheckedAllocator(reference, capacity)
    live: list[int] = []
    for op, arg in ops:
        if op == "alloc":
            he = e.alloc(arg)
            hr = r.alloc(arg)
            assert he == hr, f"alloc({arg}): engine handle {he} != reference handle {hr}"
            if he >= 0:
                assert e.alloc_obj.offset(he) == r.alloc_obj.offset(hr)
                live.append(he)
        elif live:
            h = live.pop(arg % len(live))
            e.free(h)
            r.free(h)
        assert e.alloc_obj.used == r.alloc_obj.used
    # and both coalesce fully
    for h in live:
        e.free(h)
        r.free(h)
    assert e.alloc_obj.used == r.alloc_obj.used == 0


def test_allocator_engine_matches_reference_long_run(engine, reference):
    """A long deterministic churn (many size classes, many free-list states) gives identical results."""
    rng = random.Random(2024)
    capacity = 8 << 20
    e = engine.OffsetAllocator(capacity)
    r = reference.OffsetAllocator(capacity)
    live: list[int] = []
    for step in range(20_000):
        if live and rng.random() < 0.48:
            h = live.pop(rng.randrange(len(live)))
            e.free(h)
            r.free(h)
        else:
            n = int(rng.paretovariate(1.2) * 100) if rng.random() < 0.9 else rng.randint(1, 2 << 20)
            he, hr = e.alloc(n), r.alloc(n)
            assert he == hr, f"step {step}: alloc({n}) engine {he} != reference {hr}"
            if he >= 0:
                assert e.offset(he) == r.offset(hr), f"step {step}"
                live.append(he)
        assert e.used == r.used, f"step {step}"


def test_bytes_to_fill_hands_bytes_and_a_view_that_writes_them(impl):
    out, view = impl.bytes_to_fill(6)
    assert len(out) == 6 and not view.readonly and view.nbytes == 6
    view[:] = b"abcdef"
    del view
    assert bytes(out) == b"abcdef"
    empty, view = impl.bytes_to_fill(0)
    assert len(empty) == 0 and view.nbytes == 0


def test_the_view_of_bytes_to_fill_keeps_its_bytes_alive(engine):
    out, view = engine.bytes_to_fill(1 << 20)
    del out  # the view alone holds it now: writing through it must not touch freed memory
    view[:] = b"x" * (1 << 20)
    assert view.obj is not None and bytes(view[:3]) == b"xxx"


def test_fill_bytes_hands_a_writable_view_then_bytes(impl):
    out = impl.fill_bytes(6, lambda view: view.__setitem__(slice(None), b"abcdef"))
    assert type(out) is bytes and out == b"abcdef"
    assert impl.fill_bytes(0, lambda view: None) == b""
    with pytest.raises(ZeroDivisionError):  # the filler's error propagates; no half-filled bytes escape
        impl.fill_bytes(3, lambda view: 1 / 0)
    # a large value (its pages advised huge, where the kernel allows) is filled end to end
    big = bytes(range(256)) * ((9 << 20) // 256) + b"xyz"
    assert impl.fill_bytes(len(big), lambda view: view.__setitem__(slice(None), big)) == big


# -- the store's plain batch put ------------------------------------------------------------------------


def _batch_put_script(store, seed: int) -> list[tuple]:
    """A random run of KV-cache-shaped calls on a small store, with what it holds after each:
    chains put (some overwritten, some back after eviction), prefixes matched and read, a leased head,
    a value of the wrong size and one that is not a buffer, single and batched reads (some into short
    buffers)."""
    import mooncakefs

    rng = random.Random(seed)
    block = 16 * 1024
    values = [bytes([i]) * block for i in range(8)]
    snapshots = []
    lease = None
    for step in range(120):
        chain = [f"c{rng.randrange(12)}/{j}".encode() for j in range(rng.randrange(1, 9))]
        hit = store.match_prefix(chain)
        reads: list[object] = []
        if hit:
            store.batch_get(chain[:hit])
            if step % 3 == 0:  # into buffers, one of them too small now and then
                buffers = [bytearray(block) for _ in range(hit)]
                if step % 9 == 0:
                    buffers[0] = bytearray(10)
                reads += [
                    r if isinstance(r, int) else type(r).__name__ for r in store.batch_get_into(chain[:hit], buffers)
                ]
            if step % 5 == 0:  # one key at a time: the single-key paths touch and count too
                reads.append(len(store.get(chain[hit - 1])))
                try:
                    reads.append(store.get_into(chain[0], bytearray(block // 2)))
                except mooncakefs.BufferTooSmall:
                    reads.append("BufferTooSmall")
        items = [(k, values[j % 8]) for j, k in enumerate(chain[hit:])]
        if step % 17 == 5:
            items.append((b"odd", values[0][:100] + values[1]))  # another size: fine
            items.append((b"bad", 12345))  # not a buffer: that item fails, not the batch
        results = store.batch_put(items)
        errors = [type(r).__name__ for r in results if r is not None]
        if step % 23 == 7 and lease is None and store._fresh:
            lease = store.view(next(iter(store._fresh)))  # a leased head: eviction must step around it
            lease.__enter__()
        elif step % 23 == 15 and lease is not None:
            lease.__exit__(None, None, None)
            lease = None
        snapshots.append(
            (
                errors,
                reads,
                list(store._fresh),
                list(store._lru),
                list(store._ghost),
                store._fresh_bytes,
                store.stats()["dram"],
                store.stats().get("ssd"),
                sorted(store._index),
            )
        )
    if lease is not None:
        lease.__exit__(None, None, None)
    assert isinstance(store, mooncakefs.Store)
    return snapshots


@pytest.mark.parametrize("ssd", [None, "4MiB"], ids=["dram-only", "with-ssd"])
def test_plain_path_engine_matches_reference(tmp_path, monkeypatch, ssd):
    """The same calls on the Cython PlainPath and its twin leave the same store behind, in a DRAM-only
    store (eviction drops queue heads inline) and in one with an SSD tier (eviction demotes)."""
    import mooncakefs
    from mooncakefs import _engine as engine_module
    from mooncakefs import _reference as reference_module

    def run(impl, name: str) -> list[tuple]:
        monkeypatch.setattr(engine_module, "PlainPath", impl)
        with mooncakefs.open(tmp_path / name, dram="256KiB", ssd=ssd, segment_size="1MiB") as store:
            return _batch_put_script(store, seed=3)

    native = run(engine_module.PlainPath, "engine")
    twin = run(reference_module.PlainPath, "reference")
    assert native == twin
    assert any(s[0] for s in native), "the script never put a bad value"
    assert native[-1][6]["evictions"] > 100, "the script never filled the store"
    assert ssd is None or native[-1][7]["objects"] > 0, "nothing was demoted to SSD"
    assert any("BufferTooSmall" in s[1] for s in native), "the script never read into a short buffer"


# --------------------------------------------------------------------------------------- encode_key


class _StrKey(str):
    pass


class _BytesKey(bytes):
    pass


def _encode_outcome(impl, key: object) -> tuple:
    """What ``impl.encode_key`` does with ``key``: the bytes (and whether it is the key object itself), or
    the error's type and message."""
    try:
        raw = impl.encode_key(key)
    except Exception as exc:  # the type and message are what is compared
        return type(exc), str(exc)
    return type(raw), raw, raw is key


ENCODE_CASES = [
    "a",
    "bench/key/00000001",
    "x" * 1024,
    "x" * 1025,
    "",
    "é",
    "é" * 512,  # 1024 bytes in UTF-8
    "é" * 513,  # 513 characters, 1026 bytes: too long
    "\U0001f600" * 256,
    "\ud800",  # a lone surrogate: not UTF-8
    "ok\ud800",
    b"a",
    b"\x80\xff",  # not UTF-8: a bytes key may be any bytes
    b"x" * 1024,
    b"x" * 1025,
    b"",
    b"\xc0",
    b"\xc0\x80",
    b"\xc0\x80name",  # the internal namespace: refused as a bytes key
    b"\x80\xc0",
    _StrKey("sub"),
    _StrKey(""),
    _BytesKey(b"sub"),
    _BytesKey(b"\xc0\x80x"),
    bytearray(b"a"),
    memoryview(b"a"),
    5,
    None,
    ("a",),
]


@pytest.mark.parametrize("key", ENCODE_CASES, ids=repr)
def test_encode_key_engine_matches_reference(engine, reference, key):
    """The C key encoding (``_engine.encode_key``) against its twin, the general ``keys.encode_key``: the same
    bytes for every valid key, the same error and message for every refused one."""
    assert _encode_outcome(engine, key) == _encode_outcome(reference, key)


def test_encode_key_internal_keys_match_reference(engine, reference):
    from mooncakefs.keys import CachedKey, InternalKey

    for key in (InternalKey(b"chunk"), CachedKey(b"shard"), InternalKey(b"x" * 1100)):
        assert _encode_outcome(engine, key) == _encode_outcome(reference, key)
    assert engine.encode_key(InternalKey(b"c")) == b"\xc0\x80c"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=600), st.binary(max_size=1100)))
def test_encode_key_engine_matches_reference_on_any_key(engine, reference, key):
    assert _encode_outcome(engine, key) == _encode_outcome(reference, key)


# ------------------------------------------------------------------------------------ the other twins


def test_crc32c_portable_matches_the_hardware_path(engine):
    """The Cython module's table-driven CRC (used where the CPU lacks SSE 4.2) against the fast path,
    and both against the bitwise oracle where that is quick enough."""
    rng = random.Random(7)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4095, 4096, 4097, 1 << 16, (1 << 20) + 3):
        data, seed = rng.randbytes(n), rng.getrandbits(32)
        assert engine.crc32c_portable(data, seed) == engine.crc32c(data, seed)
        if n <= 4097:
            assert engine.crc32c_portable(data, seed) == _crc32c_bitwise(data, seed)


# Lengths around the folding path's edges (128 bytes a step, from 256 bytes on) and the lanes' tails.
_CRC_EDGE_LENGTHS = sorted({n + d for n in (128, 256, 384, 512, 1024, 1280, 4000) for d in (-1, 0, 1, 7, 8, 127)})
_CRC_EDGE_OFFSETS = (0, 1, 3, 8, 13)  # unaligned starts


def _crc_edge_cases() -> tuple[bytes, list[tuple[int, int, int]], bytes]:
    """Data, (offset, length, seed) cases over it, and a buffer long enough for every path's main loop."""
    rng = random.Random(11)
    data = rng.randbytes(1 << 12)
    cases = [(offset, n, rng.getrandbits(32)) for n in _CRC_EDGE_LENGTHS for offset in _CRC_EDGE_OFFSETS]
    return data, cases, rng.randbytes((3 << 20) + 77)


def test_crc32c_folding_path_matches_the_oracle_at_every_edge(engine):
    """The folding path (128 bytes a step, from 256 bytes on, where the CPU has VPCLMULQDQ) at each length
    around its edges, from unaligned addresses and with a register carried in, against the bitwise oracle;
    a long buffer against the table-driven one.  On other CPUs this checks the crc32 lanes the same way."""
    data, cases, big = _crc_edge_cases()
    for offset, n, seed in cases:
        expected = _crc32c_bitwise(data[offset : offset + n], seed)
        assert engine.crc32c(memoryview(data)[offset : offset + n], seed) == expected, (n, offset)
    assert engine.crc32c(memoryview(big)[5:], 0xDEADBEEF) == engine.crc32c_portable(big[5:], 0xDEADBEEF)
    # split anywhere, the running CRC is the whole buffer's
    cut = (1 << 20) + 129
    assert engine.crc32c(big[cut:], engine.crc32c(big[:cut])) == engine.crc32c(big)


_CRC_CHILD = """
import json, sys
import mooncakefs._engine as engine
from test_engine_reference import _crc_edge_cases
data, cases, big = _crc_edge_cases()
crcs = [engine.crc32c(memoryview(data)[offset : offset + n], seed) for offset, n, seed in cases]
print(json.dumps({"path": engine.crc32c_path(), "crcs": crcs, "big": engine.crc32c(memoryview(big)[5:], 7)}))
"""


@pytest.mark.parametrize(("limit", "paths"), [("lanes", {"lanes", "table"}), ("table", {"table"})])
def test_crc32c_falls_back_to_the_slower_paths_and_they_agree(reference, limit, paths):
    """A CPU without VPCLMULQDQ (or without SSE 4.2) takes the crc32 lanes (or the tables): the Cython
    engine, imported with MOONCAKEFS_CRC32C keeping it off the faster paths, goes through the same
    dispatch and gives the bitwise oracle's CRC at every edge."""
    env = child_env() | {"MOONCAKEFS_CRC32C": limit}
    env.pop("MOONCAKEFS_ENGINE", None)  # the C paths, in the pure-Python run too
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    child = subprocess.run([sys.executable, "-c", _CRC_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["path"] in paths
    data, cases, big = _crc_edge_cases()
    assert out["crcs"] == [_crc32c_bitwise(data[offset : offset + n], seed) for offset, n, seed in cases]
    assert out["big"] == reference.crc32c(big[5:], 7)


def test_crc32c_path_names_the_path_taken(impl):
    """Both modules say which path their crc32c takes (the twin has one), so a report can name it."""
    expected = {"python"} if impl.__name__.endswith("_reference") else {"fold", "lanes", "table"}
    assert impl.crc32c_path() in expected


def test_an_unknown_crc32c_path_is_a_clear_error():
    env = child_env() | {"MOONCAKEFS_CRC32C": "avx9000"}
    env.pop("MOONCAKEFS_ENGINE", None)
    out = subprocess.run([sys.executable, "-c", "import mooncakefs._engine"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "MOONCAKEFS_CRC32C='avx9000': expected 'fold', 'lanes' or 'table'" in out.stderr


@pytest.mark.parametrize("seed", range(3))
def test_arena_engine_matches_reference(engine, reference, seed):
    """The same random writes, reads, checksums and out-of-range calls on both arenas: same results, same
    errors, same pool bytes."""
    rng = random.Random(seed)
    size = 1 << 14
    pools = [bytearray(size), bytearray(size)]
    arenas = [engine.Arena(pools[0]), reference.Arena(pools[1])]
    for _ in range(400):
        op = rng.choice(("write", "read", "read_into", "crc32c"))
        off, n = rng.randrange(size + 64), rng.randrange(512)
        data, short = rng.randbytes(n), rng.random() < 0.3 and n > 0
        results = []
        for arena in arenas:
            try:
                if op == "write":
                    results.append(arena.write(off, data))
                elif op == "read_into":
                    out = bytearray(n - short)
                    results.append((arena.read_into(off, n, out), bytes(out)))
                else:
                    results.append(getattr(arena, op)(off, n))
            except (ValueError, TypeError, OverflowError) as exc:
                results.append(type(exc))
        assert results[0] == results[1], (op, off, n)
    assert pools[0] == pools[1]
    for arena in arenas:
        arena.release()
        with pytest.raises(ValueError, match="released"):
            arena.read(0, 1)


@pytest.mark.parametrize("dst_head, delta", [(0, 0), (1, -1), (33, 1), (4095, 129)])
def test_a_large_arena_write_streams_byte_exact(engine, reference, stream_kind, dst_head, delta):
    """Arena.write of STREAM_COPY_MIN bytes or more (a FUSE chunk's put) takes the streaming copy on every
    path: the same pool bytes as the twin, off the 32-byte grid and with odd tails, the guard bytes
    around the value untouched."""
    value = random.Random(delta).randbytes(engine.STREAM_COPY_MIN + delta)
    size = len(value) + dst_head + 4096
    pools = [bytearray(size), bytearray(size)]
    for arena in (engine.Arena(pools[0]), reference.Arena(pools[1])):
        assert arena.write(dst_head, value) == len(value)
        arena.release()
    assert pools[0] == pools[1]
    assert pools[0][dst_head : dst_head + len(value)] == value


def test_entry_engine_matches_reference(engine, reference):
    """Both entries start with the same fields and keep what is set, versions up to 2**126 included."""
    fields = [f.lstrip("_") for f in reference.Entry.__slots__]
    assert {f: getattr(engine.Entry(5), f) for f in fields} == {f: getattr(reference.Entry(5), f) for f in fields}
    for entry in (engine.Entry(), reference.Entry()):
        for version in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 126) - 1):
            entry.version = version
            assert entry.version == version
        for bad in (-1, 1 << 126):
            with pytest.raises(ValueError, match="version"):
                entry.version = bad


def test_an_unknown_engine_switch_is_a_clear_error():
    """MOONCAKEFS_ENGINE takes 'cython' or 'python': anything else stops the import and says so, rather
    than silently running one of them."""
    env = child_env() | {"MOONCAKEFS_ENGINE": "rust"}
    out = subprocess.run([sys.executable, "-c", "import mooncakefs"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "MOONCAKEFS_ENGINE='rust': expected 'cython' or 'python'" in out.stderr
    env["MOONCAKEFS_ENGINE"] = "python"
    code = "import mooncakefs._engine as e; print(e.__name__)"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == (
        "mooncakefs._reference"
    )


def test_entry_is_112_bytes_and_not_tracked_by_the_collector(engine):
    """One entry exists per object in the store: its size is most of the index's memory (docs/architecture.md)."""
    import gc

    if engine.__name__ != "mooncakefs._engine":
        pytest.skip("the Cython entry's layout (this run has the twins in its place)")
    entry = engine.Entry(5)
    assert sys.getsizeof(entry) <= 112
    assert not gc.is_tracked(entry)


def test_entry_fields_refuse_what_they_cannot_hold(impl):
    """The narrow fields take their whole range and refuse the rest, in both engines alike."""
    entry = impl.Entry()
    for value in (0, 64, (0xFFFFFFFF - 1) * 64, -1):
        entry.dram_off = value
        assert entry.dram_off == value
    for bad in (1, 65, 0xFFFFFFFF * 64, -2):
        with pytest.raises(ValueError, match="DRAM offset"):
            entry.dram_off = bad
    for value in (0, 512, (0xFFFFFFFF - 1) * 512, -1):
        entry.seg_off = value
        assert entry.seg_off == value
    for bad in (64, 0xFFFFFFFF * 512, -2):
        with pytest.raises(ValueError, match="SSD offset"):
            entry.seg_off = bad
    for value in (0, 0xFFFFFFFF, -1):
        entry.crc = value
        assert entry.crc == value
    with pytest.raises(ValueError, match="CRC"):
        entry.crc = 1 << 32
    entry.size = (1 << 48) - 1
    assert entry.size == (1 << 48) - 1
    for bad in (1 << 48, -1):
        with pytest.raises(ValueError, match="size"):
            entry.size = bad
    for flag in ("pinned", "sticky", "dead", "durable"):
        setattr(entry, flag, True)
        assert getattr(entry, flag) is True
        setattr(entry, flag, False)
        assert getattr(entry, flag) is False


@pytest.mark.parametrize("seed", range(3))
def test_entry_queue_engine_matches_reference(engine, reference, seed):
    """The same random pushes, removals, moves to the back and wrong-queue calls on both engines' pairs of
    queues: same order, counts, bytes, errors and ``Entry.queue``."""
    rng = random.Random(seed)
    sizes = [rng.randrange(1, 1000) for _ in range(40)]
    sides = [
        ((impl.EntryQueue(1), impl.EntryQueue(2)), [impl.Entry(size) for size in sizes]) for impl in (engine, reference)
    ]
    for step in range(2000):
        op, q, k = rng.choice(("append", "remove", "move_to_back", "first")), rng.randrange(2), rng.randrange(40)
        seen = []
        for queues, entries in sides:
            try:
                if op == "append":
                    result = queues[q].append(f"k{k}".encode(), entries[k])
                elif op == "first":
                    first = queues[q].first()
                    result = None if first is None else first.key
                else:
                    result = getattr(queues[q], op)(entries[k])
            except ValueError as exc:
                result = ("ValueError", str(exc))
            state = [(list(qu), [key for key, _ in qu.items()], len(qu), qu.nbytes) for qu in queues]
            seen.append((result, state, [e.queue for e in entries]))
        assert seen[0] == seen[1], f"step {step}: {op} queue {q} entry {k}"
    for queues, entries in sides:
        entry = queues[0].first()
        if entry is not None:  # an entry that leaves the queue under an iteration stops it
            items = queues[0].items()
            next(items)
            queues[0].remove(entry)
            with pytest.raises(RuntimeError):
                next(items)
        for qu in queues:
            qu.clear()
            assert len(qu) == qu.nbytes == 0 and qu.first() is None
        assert all(e.queue == 0 for e in entries)


# -- the framing of a connection ------------------------------------------------------------------------


class _Peer:
    """A socket stand-in: what is sent to it is kept in ``sent``; receives are served from ``incoming``, at
    most ``chunk`` bytes a call (as a slow peer's bytes arrive), then end of stream.  A send takes at most
    ``max_send`` bytes (a partial send, as a send timeout gives)."""

    family = socket.AF_UNIX

    def __init__(self, incoming: bytes = b"", chunk: int = 1 << 30, max_send: int = 1 << 30) -> None:
        self.incoming, self.pos, self.chunk, self.max_send = incoming, 0, chunk, max_send
        self.sent = bytearray()

    def setsockopt(self, *_args: object) -> None:
        pass

    def sendall(self, data: object) -> None:
        self.sent += memoryview(data).cast("B")  # type: ignore[arg-type]

    def sendmsg(self, buffers: list) -> int:
        taken = 0
        for b in buffers:
            view = memoryview(b).cast("B")[: self.max_send - taken]
            self.sent += view
            taken += len(view)
        return taken

    def recv_into(self, buffer: memoryview, nbytes: int = 0, _flags: int = 0) -> int:
        n = min(nbytes or len(buffer), self.chunk, len(self.incoming) - self.pos)
        buffer[:n] = self.incoming[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        pass


def _random_frames(seed: int) -> list[tuple[int, int, object, object, int]]:
    """Frames of every shape: (opcode, flags, meta, payload: None, a buffer or a list of them, the
    destination's phase).  Payloads across the small-send bound, some at odd addresses (so padded
    differently); one meta larger than the receive buffer."""
    rng = random.Random(seed)
    frames = []
    for i in range(40):
        meta = [rng.randrange(1 << 40), f"key/{i}", bytes(rng.randrange(50)), None, True, rng.random()]
        if i == 17:
            meta.append(bytes(300 << 10))  # read through the payload path: larger than the receive buffer
        size = rng.choice([0, 1, 100, 4096, 64 << 10, (64 << 10) + 1, 200 << 10])
        data = memoryview(bytes(rng.randrange(256) for _ in range(min(size, 256))) * (size // 256 + 1))
        offset = rng.randrange(64)
        payload: object = data[offset : offset + size] if size else None
        if size and rng.random() < 0.3:  # a list of buffers, an empty one among them
            cut = rng.randrange(size)
            payload = [data[offset : offset + cut], b"", data[offset + cut : offset + size]]
        frames.append((rng.randrange(256), rng.randrange(4), meta, payload, rng.randrange(1 << 20)))
    return frames


@pytest.mark.parametrize("seed", [1, 2])
def test_the_framing_sends_the_bytes_its_twin_sends(engine, reference, seed):
    """Header, meta, padding and payload byte for byte, partial sends resumed where they stopped."""
    frames = _random_frames(seed)  # made once: a payload's address decides its padding
    for max_send in (1 << 30, 1000):
        streams = []
        for impl in (engine, reference):
            peer = _Peer(max_send=max_send)
            framing = impl.Framing(peer, "peer")
            for op, flags, meta, payload, destination in frames:
                framing.send(op, meta, payload, flags, destination)
            streams.append(bytes(peer.sent))
        assert streams[0] == streams[1]


def _read_all(impl, stream: bytes, chunk: int) -> list:
    """Every frame of ``stream`` as ``impl`` reads it: its header fields and meta, then its payload read
    in two pieces, or skipped (every third frame)."""
    framing = impl.Framing(_Peer(stream, chunk), "peer")
    out = []
    for i in range(len(_random_frames(1))):
        op, flags, meta, n = framing.read_frame()
        out.append((op, flags, meta, n, framing.flags))
        if i % 3 and n:
            payload = bytearray(n)
            framing.read_payload_into(memoryview(payload)[: n // 2])
            framing.read_payload_into(memoryview(payload)[n // 2 :])
            out.append(bytes(payload))
    return out


@pytest.mark.parametrize("chunk", [1 << 30, 4096, 7])
def test_the_framing_reads_what_its_twin_reads(engine, reference, chunk):
    peer = _Peer()
    sender = reference.Framing(peer, "peer")
    frames = _random_frames(1)
    for op, flags, meta, payload, destination in frames:
        sender.send(op, meta, payload, flags, destination)
    got = _read_all(engine, bytes(peer.sent), chunk)
    assert got == _read_all(reference, bytes(peer.sent), chunk)
    assert [g[:3] for g in got if isinstance(g, tuple)] == [(op, flags, meta) for op, flags, meta, *_ in frames]


def _frame(meta: bytes = b"\x90", payload: bytes = b"", magic: int = 0x434D, op: int = 100, flags: int = 0) -> bytes:
    return struct.pack("<HBBIQ", magic, op, flags, len(meta), len(payload)) + meta + payload


@pytest.mark.parametrize(
    ("stream", "limits", "payload"),
    [
        (_frame(magic=0x1234), {}, 0),  # not a frame
        (_frame(meta=b"\x91" * 9), {"max_meta": 8}, 0),  # meta over the limit: refused before it is read
        (_frame(payload=b"x" * 9), {"max_payload": 8}, 0),
        (_frame(meta=b"\xc1"), {}, 0),  # undecodable meta
        (_frame(meta=b"\x92\x01"), {}, 0),  # meta cut short by the peer's end
        (_frame()[:9], {}, 0),  # header cut short
        (_frame(payload=b"abc")[:-1], {}, 3),  # payload cut short
        (_frame(payload=b"abc"), {}, 4),  # more wanted than the payload holds
        (_frame(flags=5 << 2), {}, 0),  # padding the peer never sends
    ],
)
def test_the_framing_refuses_what_its_twin_refuses(engine, reference, stream, limits, payload):
    """Each broken or oversized frame raises the same error, with the same message, from both."""
    seen = []
    for impl in (engine, reference):
        framing = impl.Framing(_Peer(stream, chunk=3), "peer")
        try:
            framing.read_frame(**limits)
            framing.read_payload_into(memoryview(bytearray(payload)))
            seen.append(None)
        except Exception as exc:
            seen.append((type(exc).__name__, str(exc)))
    assert seen[0] is not None and seen[0] == seen[1]


def test_the_framing_drops_a_peer_that_trickles_past_the_deadline(engine, reference):
    """A frame whose bytes come one at a time past its deadline ends the connection in both: each recv
    made progress, the deadline did not move."""
    for impl in (engine, reference):
        framing = impl.Framing(_Peer(_frame(meta=b"\x92\x01\xc0"), chunk=1), "peer")
        with pytest.raises(Exception, match="peer: connection timed out") as caught:
            framing.read_frame(within=-1.0)
        assert type(caught.value).__name__ == "Unavailable" and framing.closed


@pytest.mark.parametrize("size", [0, 5, 64 << 10, (64 << 10) + 1, (1 << 20) + 3, (3 << 20) + 5])
@pytest.mark.parametrize("known", [False, True])
def test_a_value_and_its_crc_cross_as_in_the_twin(engine, reference, size, known):
    """``send_value`` sends the same bytes from both (the CRC computed as it goes, or the one given), and
    ``read_value_into`` lands the same value and returns the same CRC, read in any piece sizes."""
    value = memoryview(bytes(random.Random(size).randbytes(size)))
    crc = engine.crc32c(value)
    streams = []
    for impl in (engine, reference):
        peer = _Peer(max_send=300_000)
        assert impl.Framing(peer, "peer").send_value(10, ["k", size], value, crc if known else None) == crc
        streams.append(bytes(peer.sent))
    assert streams[0] == streams[1]
    for impl in (engine, reference):
        framing = impl.Framing(_Peer(streams[0], chunk=100_003), "peer")
        assert framing.read_frame()[:3] == (10, 1, ["k", size])
        into = bytearray(size)
        assert framing.read_value_into(memoryview(into), lambda: "v") == crc and into == value
        assert framing.payload_left == 0


@pytest.mark.parametrize(
    ("payload", "flags", "room"),
    [
        (b"abcd" + struct.pack("<I", 0), 1, 4),  # a CRC that is not the value's
        (b"abcd" + struct.pack("<I", 0xD5A8AB1C), 1, 5),  # a value of another size than announced
        (b"abcd", 0, 3),  # no CRC, and the size does not match either
    ],
)
def test_a_value_that_does_not_match_is_refused_as_in_the_twin(engine, reference, payload, flags, room):
    seen = []
    for impl in (engine, reference):
        framing = impl.Framing(_Peer(_frame(payload=payload, flags=flags)), "peer")
        framing.read_frame()
        try:
            framing.read_value_into(memoryview(bytearray(room)), lambda: "the value of k")
            seen.append(None)
        except Exception as exc:
            seen.append((type(exc).__name__, str(exc)))
    assert seen[0] is not None and seen[0] == seen[1]


# ---------------------------------------------------------------------------------------- KeyIndex


def _lookup_outcome(index, key: object) -> tuple:
    """What ``index.lookup(key)`` does: the entry found (or None), or the error's type and message."""
    try:
        return ("found", index.lookup(key))
    except Exception as exc:  # the type and message are what is compared
        return type(exc), str(exc)


@pytest.mark.parametrize("key", ENCODE_CASES, ids=repr)
def test_key_index_lookup_takes_every_key_as_encode_key_does(impl, key):
    """``lookup`` finds a caller's key as the store encodes it (an ASCII str without encoding it, anything
    else through ``encode_key``), and refuses what ``encode_key`` refuses, with its words."""
    index = impl.KeyIndex()
    try:
        raw = impl.encode_key(key)
    except Exception as exc:  # a refused key: lookup says the same
        assert _lookup_outcome(index, key) == (type(exc), str(exc))
        return
    assert index.lookup(key) is None
    entry = impl.Entry(1)
    index[raw] = entry
    assert index.lookup(key) is entry and index.lookup(raw) is entry and entry.key == raw


_index_keys = st.one_of(
    st.text(alphabet="abcé", min_size=1, max_size=3),  # a few keys: replaced and removed often
    st.binary(min_size=1, max_size=2).filter(lambda b: not b.startswith(b"\xc0\x80")),
)
_index_op_names = st.sampled_from(["set", "del", "pop", "get", "lookup", "clear"])
_index_ops = st.lists(st.tuples(_index_op_names, _index_keys), max_size=300)


def _replay_index(impl, ops: list[tuple[str, object]]) -> list:
    """Run ``ops`` on a KeyIndex and on a dict, checking them against each other at every step; returns
    what each step saw, to compare the two engines."""
    index, model, seen = impl.KeyIndex(), {}, []
    for n, (op, key) in enumerate(ops):
        raw = impl.encode_key(key)
        if op == "set":
            entry = impl.Entry(n)
            index[raw] = entry
            model[raw] = entry
            assert entry.key == raw
        elif op == "del":
            if raw in model:
                del index[raw], model[raw]
            else:
                with pytest.raises(KeyError):
                    del index[raw]
        elif op == "pop":
            assert index.pop(raw, None) is model.pop(raw, None)
        elif op == "get":
            assert index.get(raw) is model.get(raw) and (raw in index) == (raw in model)
        elif op == "lookup":
            assert index.lookup(key) is model.get(raw)
        elif n % 50 == 0:  # clear, now and then
            index.clear()
            model.clear()
        assert len(index) == len(model)
        seen.append(sorted((k, e.size) for k, e in index.items()))
    assert sorted(index.keys()) == sorted(model) and sorted(map(id, index.values())) == sorted(map(id, model.values()))
    assert all(index[k] is e for k, e in model.items())
    return seen


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_index_ops)
def test_key_index_is_a_dict_of_entries_on_both_engines(engine, reference, ops):
    assert _replay_index(engine, ops) == _replay_index(reference, ops)


def test_key_index_long_run_of_growth_and_removal(engine, reference):
    """Thousands of keys put and removed in a random order: the table grows many times, and each removal
    moves back the entries whose probe passed its slot; every key stays findable throughout."""
    rng = random.Random(14)
    words = [f"k{i}" for i in range(3000)] + [f"é{i}" for i in range(200)]
    ops = [(rng.choice(["set", "set", "set", "del", "pop", "lookup", "get"]), rng.choice(words)) for _ in range(20000)]
    for impl in (engine, reference):
        index, model = impl.KeyIndex(), {}
        for n, (op, key) in enumerate(ops):
            raw = impl.encode_key(key)
            if op == "set":
                model[raw] = index[raw] = impl.Entry(n)
            elif op in ("del", "pop"):
                assert index.pop(raw, None) is model.pop(raw, None)
            else:
                assert index.lookup(key) is model.get(raw) and index.get(raw) is model.get(raw)
        assert len(index) == len(model) > 1000
        assert all(index.lookup(k.decode()) is e for k, e in model.items())


def test_key_index_refuses_what_is_not_a_key_or_an_entry(impl):
    index = impl.KeyIndex()
    with pytest.raises(TypeError, match="encoded keys"):
        index["str"] = impl.Entry(1)
    with pytest.raises(TypeError, match="entries"):
        index[b"k"] = object()
    with pytest.raises(KeyError):
        index[b"missing"]
    with pytest.raises(KeyError):
        index.pop(b"missing")
    assert index.get("str") is None and "str" not in index and len(index) == 0


def test_key_index_holds_one_reference_to_each_entry(engine):
    """An entry in the index is held once: replaced, removed or cleared, it is let go (a leak would keep
    every value's entry alive; one reference too few would free an entry still in use)."""
    index, entry = engine.KeyIndex(), engine.Entry(1)
    alone = sys.getrefcount(entry)
    index[b"k"] = entry
    assert sys.getrefcount(entry) == alone + 1
    index[b"k"] = engine.Entry(2)  # replaced
    assert sys.getrefcount(entry) == alone
    index[b"k"] = entry
    popped = index.pop(b"k")  # (not inside the assert: pytest keeps what an assert's parts return)
    assert popped is entry
    del popped
    assert sys.getrefcount(entry) == alone
    index[b"k"] = entry
    del index[b"k"]
    assert sys.getrefcount(entry) == alone
    index[b"k"] = entry
    index.clear()
    assert sys.getrefcount(entry) == alone and len(index) == 0
    index[b"k"] = entry  # usable after clear
    assert index[b"k"] is entry
    del index
    assert sys.getrefcount(entry) == alone


def test_pages_mapped_sees_a_range_unmapped_since(impl):
    """``pages_mapped``: true for memory of this process, at any offset into a page and across pages,
    false once any page of the range is unmapped; an empty range is always mapped."""
    import mmap

    region = mmap.mmap(-1, 5 * 4096)
    base = impl.address(region)
    assert impl.pages_mapped(base, 5 * 4096) and impl.pages_mapped(base + 100, 3 * 4096) and impl.pages_mapped(0, 0)
    region.close()
    assert not impl.pages_mapped(base, 4096) and not impl.pages_mapped(base + 4095, 2)
    assert not impl.pages_mapped((1 << 64) - 4096, 4096)
    big = np.zeros(40 << 20, dtype=np.uint8)  # past one system call's 16 MiB of pages
    assert impl.pages_mapped(big.ctypes.data, big.nbytes)
