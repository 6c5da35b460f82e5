"""The store's GPU logic without a GPU: the CUDA calls (``gpu.Cuda``) replaced by a stand-in whose
"device memory" is host memory and whose copies are memmoves, so what the store does around them (which
streams it waits for, which stream it names to DLPack producers, what a failed copy leaves behind) runs
here; and ``gpu.Cuda`` itself over a stand-in of ``cuda.bindings.driver``, for what it gives back.
What the copies do on a real GPU is tests/test_vram.py's."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import threading
from types import SimpleNamespace
from typing import Any

import pytest

import mooncakefs
from mooncakefs import _engine, gpu
from mooncakefs.errors import ChecksumError, InvalidArgument
from mooncakefs.gpu import DL_CUDA, DeviceBuffer, export_dlpack
from mooncakefs.node import Node
from mooncakefs.tiers import gds as gds_module
from mooncakefs.tiers import vram as vram_module
from mooncakefs.tiers.gds import COMPAT, GpuDirect

HANG_GUARD = 60  # seconds: only so that a broken test fails rather than hangs; nothing is timed


class HostCuda:
    """``gpu.Cuda`` as the store uses it, on host memory: records the producer streams it waited for."""

    STREAM = 0x5EED

    def __init__(self, device: int = 0) -> None:
        self.device, self.name = device, "host stand-in"
        self.stream_handle = self.STREAM
        self.lock = threading.RLock()
        self.blocks: dict[int, Any] = {}
        self.waited: list[int] = []
        self.fail_d2d = self.fail_d2h = False
        self.closed = self.synced = 0
        self.active = contextlib.nullcontext()
        self.copies: list[str] = []  # the kind of each copy made, in order
        self._staging = [ctypes.create_string_buffer(gpu.STAGING_CHUNK) for _ in range(2)]
        self.staging = [ctypes.addressof(b) for b in self._staging]  # "pinned" staging buffers
        self.paused: tuple[str, threading.Event, threading.Event] | None = None

    def pause_next(self, kind: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next copy of ``kind`` ("d2d", "h2d", "d2h") until the second event is set; the first
        is set once it is held."""
        held, go = threading.Event(), threading.Event()
        self.paused = (kind, held, go)
        return held, go

    def _copy(self, kind: str) -> None:
        self.copies.append(kind)
        paused = self.paused
        if paused is not None and paused[0] == kind:
            self.paused = None
            paused[1].set()
            assert paused[2].wait(HANG_GUARD), "a paused copy was never let go"

    def mem_info(self) -> tuple[int, int]:
        return 1 << 30, 1 << 30

    def alloc(self, nbytes: int) -> int:
        block = ctypes.create_string_buffer(max(nbytes, 1))
        self.blocks[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def free(self, ptr: int) -> None:
        del self.blocks[ptr]

    def register_host(self, ptr: int, nbytes: int) -> bool:
        return True

    def unregister_host(self, ptr: int) -> None:
        pass

    def sync(self) -> None:
        self.synced += 1

    def wait_for(self, buf: DeviceBuffer) -> None:
        if buf.stream:
            self.waited.append(buf.stream)

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self._copy("d2d")
        if self.fail_d2d:
            raise RuntimeError("cuMemcpyDtoDAsync failed: CUDA_ERROR_ILLEGAL_ADDRESS")
        ctypes.memmove(dst, src, nbytes)

    def h2d(self, dst: int, src: int, nbytes: int) -> None:
        self._copy("h2d")
        ctypes.memmove(dst, src, nbytes)

    def d2h(self, dst: int, src: int, nbytes: int) -> None:
        self._copy("d2h")
        if self.fail_d2h:
            raise RuntimeError("cuMemcpyDtoHAsync failed: CUDA_ERROR_ILLEGAL_ADDRESS")
        ctypes.memmove(dst, src, nbytes)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def cudas(monkeypatch: pytest.MonkeyPatch) -> list[HostCuda]:
    """Every HostCuda the store makes, in order (the VRAM tier's, or the one GPU buffers bring up)."""
    made: list[HostCuda] = []

    def make(device: int = 0) -> HostCuda:
        made.append(HostCuda(device))
        return made[-1]

    monkeypatch.setattr(vram_module, "Cuda", make)
    monkeypatch.setattr(gpu, "Cuda", make)
    return made


class HostArray:
    """Host memory described by ``__cuda_array_interface__`` v3 only, naming a producer's stream."""

    def __init__(self, data: bytes, stream: int | None = None) -> None:
        self.memory = ctypes.create_string_buffer(data, len(data))
        self.__cuda_array_interface__ = {"version": 3, "shape": (len(data),), "typestr": "|u1",
                                         "data": (ctypes.addressof(self.memory), False), "strides": None,
                                         "stream": stream}  # fmt: skip

    def bytes(self) -> bytes:
        return self.memory.raw


class DLPackOnly:
    """A CUDA tensor as a DLPack-only producer shows it (on host memory): records the stream it was asked for."""

    def __init__(self, data: bytes) -> None:
        self.memory = ctypes.create_string_buffer(data, len(data))
        self.asked: list[Any] = []

    def __dlpack_device__(self) -> tuple[int, int]:
        return DL_CUDA, 0

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        self.asked.append(stream)
        return export_dlpack(ctypes.addressof(self.memory), len(self.memory), (DL_CUDA, 0), lambda: None)


def test_a_gpu_buffer_put_through_the_host_waits_for_its_producers_stream(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB") as store:  # no VRAM tier: the value goes to DRAM
        store.put("k", HostArray(b"written by a kernel", stream=0x1234))
        assert cudas[0].waited == [0x1234]
        assert store.get("k") == b"written by a kernel"


def test_a_dlpack_producer_is_asked_to_order_its_work_before_our_stream(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB") as store:  # CUDA is not up before the first GPU buffer
        tensor = DLPackOnly(b"from a DLPack-only producer")
        store.put("k", tensor)
        assert tensor.asked == [HostCuda.STREAM]  # not None: that orders it before the legacy stream only
        out = DLPackOnly(bytes(len(tensor.memory)))
        assert store.get_into("k", out) == len(tensor.memory)
        assert out.asked == [HostCuda.STREAM] and out.memory.raw == tensor.memory.raw


def test_a_failed_promotion_leaves_the_value_where_it_was(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB", promote_after=1) as store:
        store.put("k", b"v" * 1000)
        assert store.stat("k").tier == "dram"
        cudas[0].fail_d2d = True  # the read itself is host to device; the promotion's copy fails
        with pytest.raises(RuntimeError, match="cuMemcpyDtoDAsync"):
            store.get_into("k", HostArray(bytes(1000)))
        assert store.stat("k").tier == "dram" and store.stats()["vram"]["used"] == 0  # no unfilled block kept
        cudas[0].fail_d2d = False
        out = HostArray(bytes(1000))
        assert store.get_into("k", out) == 1000 and out.bytes() == b"v" * 1000
        assert store.stat("k").tier == "vram"  # promoted this time
        again = HostArray(bytes(1000))
        assert store.get_into("k", again) == 1000 and again.bytes() == b"v" * 1000


def test_a_failed_demotion_leaves_no_unfilled_copy_in_dram(tmp_path, cudas):
    """VRAM evicts a value with no copy below: it is copied to DRAM.  When that copy fails, the DRAM
    block must not stay the value's, or it becomes its only copy once VRAM lets the value go."""
    block = 512 << 10
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB") as store:
        first = bytes(range(256)) * (block // 256)
        store.put("first", HostArray(first))
        store.put("second", HostArray(b"s" * block))
        assert store.stat("first").tier == store.stat("second").tier == "vram"
        dram_used = store.stats()["dram"]["used"]
        cudas[0].fail_d2h = True
        with pytest.raises(RuntimeError, match="cuMemcpyDtoHAsync"):
            store.put("third", HostArray(b"t" * block))  # makes room: "first" goes to DRAM, and fails to
        cudas[0].fail_d2h = False
        assert store.stat("first").tier == "vram" and store.stats()["dram"]["used"] == dram_used
        store.put("third", HostArray(b"t" * block))  # "first" is demoted for real now
        assert store.stat("first").tier == "dram" and store.get("first") == first


def test_closing_the_store_leaves_the_vram_pool_to_its_last_device_view(tmp_path, cudas):
    """As a memoryview keeps the DRAM pool's mapping after close(), a device view (and each DLPack tensor
    made from it) keeps the VRAM pool and the device: a caller never reads freed device memory."""
    store = mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB")
    store.put("k", HostArray(b"kept on the gpu"))
    cuda = cudas[0]
    with store.device_view("k") as view:
        capsule = view.__dlpack__()
        store.close()
        assert cuda.blocks and cuda.closed == 0
        assert ctypes.string_at(view.ptr, view.nbytes) == b"kept on the gpu"
    assert cuda.blocks and cuda.closed == 0  # the capsule still holds it
    del capsule
    assert not cuda.blocks and cuda.closed == 1
    with pytest.raises(mooncakefs.StoreClosed):
        store.device_view("k")


def until(condition: Any) -> None:
    """Wait for ``condition()`` to hold (a hang guard: nothing is timed)."""
    for _ in range(HANG_GUARD * 100):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the condition never held")


def test_a_device_view_let_go_inside_a_store_call_does_not_deadlock(tmp_path, cudas):
    """A DLPack consumer lets go of our capsule on whichever thread frees its tensor, maybe one inside a
    store call (the GC collecting a cycle while the store's lock is held): the release must not wait for
    that lock there, and the lease still ends once the lock is free."""
    store = mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB")
    store.put("k", HostArray(b"v" * 100))
    with store.device_view("k") as view:
        capsules = [view.__dlpack__()]

    def freed_inside_a_store_call() -> None:
        with store._lock:
            capsules.clear()  # the deleter runs here, on this thread, lock held

    Started(freed_inside_a_store_call).result()
    store.remove("k")
    until(lambda: store.stats()["vram"]["used"] == 0)  # the lease ended: the block was freed
    store.close()


class Started:
    """A call run on its own thread: ``result()`` waits for it (a hang guard only) and returns or raises
    what it did."""

    def __init__(self, call: Any, *args: Any, **kwargs: Any) -> None:
        self._outcome: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(call, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, call: Any, args: Any, kwargs: Any) -> None:
        try:
            self._outcome.append((True, call(*args, **kwargs)))
        except BaseException as exc:
            self._outcome.append((False, exc))

    def result(self) -> Any:
        self._thread.join(HANG_GUARD)
        assert self._outcome, "the call is still waiting (for the store's lock?)"
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


def while_paused(cuda: HostCuda, kind: str, paused_call: Started | Any, *others: Any) -> Any:
    """Start ``paused_call`` (a function of no arguments) with its next ``kind`` copy held, run
    ``others`` (functions of no arguments) on another thread meanwhile, each to the end, then let the
    copy go; returns the paused call's ``Started``.  With the copy made under the store's lock, the
    others wait for it and the hang guard fails the test."""
    held, go = cuda.pause_next(kind)
    started = Started(paused_call)
    assert held.wait(HANG_GUARD), "the copy was never made"
    try:
        Started(lambda: [other() for other in others]).result()
    finally:
        go.set()
    return started


def test_a_put_into_vram_copies_without_the_store_lock(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB") as store:
        store.put("other", b"o" * 100)
        put = while_paused(
            cudas[0],
            "d2d",
            lambda: store.put("k", HostArray(b"from the gpu")),
            lambda: store.put("more", b"m" * 100),
            lambda: store.get("other"),
            store.stats,
        )
        assert put.result() is None
        assert store.get("k") == b"from the gpu" and store.stat("k").tier == "vram"


def test_a_put_into_vram_published_after_an_overwrite_wins(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB") as store:
        put = while_paused(
            cudas[0], "d2d", lambda: store.put("k", HostArray(b"g" * 1000)), lambda: store.put("k", b"h" * 1000)
        )
        put.result()  # published last: its value is the key's
        assert store.get("k") == b"g" * 1000 and store.stat("k").tier == "vram"
        stats = store.stats()
        assert stats["dram"]["used"] == 0 and stats["vram"]["objects"] == 1


def test_an_if_absent_put_into_vram_loses_to_a_put_made_during_its_copy(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB") as store:
        put = while_paused(
            cudas[0],
            "d2d",
            lambda: store.put("k", HostArray(b"g" * 1000), if_absent=True),
            lambda: store.put("k", b"h" * 1000),
        )
        with pytest.raises(mooncakefs.KeyExists):
            put.result()
        assert store.get("k") == b"h" * 1000 and store.stats()["vram"]["used"] == 0  # its block given back


def test_a_vram_block_being_filled_is_never_evicted(tmp_path, cudas):
    """VRAM fills up during a put's copy: the values already there make room, not the block in flight."""
    block = 512 << 10
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB") as store:
        first = bytes(range(256)) * (block // 256)
        put = while_paused(
            cudas[0],
            "d2d",
            lambda: store.put("first", HostArray(first)),
            lambda: store.put("second", HostArray(b"s" * block)),
            lambda: store.put("third", HostArray(b"t" * block)),  # evicts "second" to DRAM
        )
        put.result()
        assert [store.stat(k).tier for k in ("first", "second", "third")] == ["vram", "dram", "vram"]
        assert store.get("first") == first and store.get("second") == b"s" * block


def test_close_waits_for_a_vram_put_in_flight_and_the_put_says_so(tmp_path, cudas):
    store = mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB")
    cuda = cudas[0]
    held, go = cuda.pause_next("d2d")
    put = Started(store.put, "k", HostArray(b"g" * 1000))
    assert held.wait(HANG_GUARD)
    closing = Started(store.close)
    until(lambda: store._closed)  # close() has begun waiting for the copy
    assert cuda.blocks  # the pool is not freed under the copy
    go.set()
    with pytest.raises(mooncakefs.StoreClosed):
        put.result()
    closing.result()
    assert not cuda.blocks and cuda.closed == 1


@pytest.mark.parametrize("meanwhile", ["overwrite", "remove"])
def test_a_promotion_copies_without_the_store_lock_and_gives_up_on_a_changed_key(tmp_path, cudas, meanwhile):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB", promote_after=1) as store:
        store.put("k", b"v" * 1000)
        out = HostArray(bytes(1000))
        change = (lambda: store.put("k", b"w" * 1000)) if meanwhile == "overwrite" else (lambda: store.remove("k"))
        read = while_paused(cudas[0], "d2d", lambda: store.get_into("k", out), change)  # the read is h2d
        assert read.result() == 1000 and out.bytes() == b"v" * 1000
        assert store.stats()["vram"]["used"] == 0  # the promoted block was given back
        if meanwhile == "overwrite":
            assert store.get("k") == b"w" * 1000 and store.stat("k").tier == "dram"
        else:
            assert "k" not in store


def test_a_promotion_copies_without_the_store_lock(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB", promote_after=1) as store:
        store.put("k", b"v" * 1000)
        out = HostArray(bytes(1000))
        read = while_paused(cudas[0], "d2d", lambda: store.get_into("k", out), lambda: store.get("k"))
        assert read.result() == 1000 and out.bytes() == b"v" * 1000
        assert store.stat("k").tier == "vram" and store.stats()["vram"]["promotions"] == 1
        again = HostArray(bytes(1000))
        assert store.get_into("k", again) == 1000 and again.bytes() == b"v" * 1000


def test_the_checksum_of_a_vram_value_is_computed_without_the_store_lock(tmp_path, cudas):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="1MiB") as store:
        store.put("k", HostArray(b"g" * 1000))
        store.put("other", b"o" * 100)
        stat = while_paused(cudas[0], "d2h", lambda: store.stat("k"), lambda: store.get("other"))
        assert stat.result().checksum == _engine.crc32c(b"g" * 1000)


# -- gpu.Cuda over a stand-in driver ------------------------------------------------------------------


class Driver:
    """The ``cuda.bindings.driver`` calls ``gpu.Cuda`` makes, answering as they do ((CUresult, value)),
    counting what is held; ``cuMemHostAlloc`` succeeds ``host_allocs`` times."""

    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)

    def __init__(self, host_allocs: int) -> None:
        self.host_allocs = host_allocs
        self.retained = self.streams = self.pinned = 0
        self.current: list[str] = ["the caller's context"]  # the thread's context stack

    def cuCtxSetCurrent(self, context: str) -> tuple[int]:
        self.current[-1:] = [context]
        return (0,)

    def cuCtxPushCurrent(self, context: str) -> tuple[int]:
        self.current.append(context)
        return (0,)

    def cuCtxPopCurrent(self) -> tuple[int, str]:
        return 0, self.current.pop()

    def cuMemAlloc(self, nbytes: int) -> tuple[int, int]:
        assert self.current[-1] == "context", "cuMemAlloc outside our context"
        return 0, 0xD000

    def cuMemFree(self, ptr: int) -> tuple[int]:
        return (0,)

    def cuMemGetInfo(self) -> tuple[int, int, int]:
        return 0, 1 << 30, 1 << 31

    def CUdeviceptr(self, ptr: int) -> int:
        return ptr

    def cuInit(self, flags: int) -> tuple[int]:
        return (0,)

    def cuDeviceGetCount(self) -> tuple[int, int]:
        return 0, 1

    def cuDeviceGet(self, ordinal: int) -> tuple[int, int]:
        return 0, ordinal

    def cuDeviceGetName(self, length: int, device: int) -> tuple[int, bytes]:
        return 0, b"stand-in\0\0"

    def cuDevicePrimaryCtxRetain(self, device: int) -> tuple[int, str]:
        self.retained += 1
        return 0, "context"

    def cuDevicePrimaryCtxRelease(self, device: int) -> tuple[int]:
        self.retained -= 1
        return (0,)

    def cuStreamCreate(self, flags: int) -> tuple[int, int]:
        self.streams += 1
        return 0, 77

    def cuStreamDestroy(self, stream: int) -> tuple[int]:
        self.streams -= 1
        return (0,)

    def cuMemHostAlloc(self, nbytes: int, flags: int) -> tuple[int, int]:
        if self.host_allocs == 0:
            return 2, 0  # CUDA_ERROR_OUT_OF_MEMORY
        self.host_allocs -= 1
        self.pinned += 1
        return 0, 0x1000 * self.pinned

    def cuMemFreeHost(self, ptr: int) -> tuple[int]:
        self.pinned -= 1
        return (0,)

    def cuGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"CUDA_ERROR_OUT_OF_MEMORY"


def test_cuda_that_fails_half_way_gives_back_the_context_it_retained(monkeypatch):
    driver = Driver(host_allocs=1)
    monkeypatch.setattr(gpu, "load_driver", lambda: driver)
    with pytest.raises(RuntimeError, match="cuMemHostAlloc failed: CUDA_ERROR_OUT_OF_MEMORY"):
        gpu.Cuda(0)
    assert (driver.retained, driver.streams, driver.pinned) == (0, 0, 0)


def test_closing_cuda_twice_releases_the_primary_context_once(monkeypatch):
    driver = Driver(host_allocs=2)
    monkeypatch.setattr(gpu, "load_driver", lambda: driver)
    cuda = gpu.Cuda(0)
    assert (driver.retained, driver.streams, driver.pinned) == (1, 1, 2)
    cuda.close()
    cuda.close()  # another user's retain (torch's) must survive it
    assert (driver.retained, driver.streams, driver.pinned) == (0, 0, 0)


def test_cuda_leaves_the_callers_current_context_as_it_found_it(monkeypatch):
    """A caller on another GPU (torch's current device) keeps its context: ours is pushed and popped."""
    driver = Driver(host_allocs=2)
    monkeypatch.setattr(gpu, "load_driver", lambda: driver)
    cuda = gpu.Cuda(0)
    ptr = cuda.alloc(4096)
    assert cuda.mem_info() == (1 << 30, 1 << 31)
    cuda.free(ptr)
    assert driver.current == ["the caller's context"]
    cuda.close()
    assert driver.current == ["the caller's context"]


# -- cuFile's errors ----------------------------------------------------------------------------------


def cufile_stand_in(read: Any, verify: str = "never") -> GpuDirect:
    """A GpuDirect in compatibility mode on a HostCuda, whose cuFileRead is ``read``."""
    direct = GpuDirect.__new__(GpuDirect)
    direct.cuda = HostCuda()  # type: ignore[assignment]
    direct._read, direct.mode = read, COMPAT
    direct.verify, direct.verified, direct.checked = verify, {}, 0
    direct.why, direct.handles, direct.library = "a stand-in", {}, ""
    return direct


def test_a_cufile_read_failing_with_errno_says_the_system_error():
    def read(handle: int, dst: int, size: int, offset: int, dst_offset: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1  # cuFileRead: -1 and errno for a filesystem error, -status for a cuFile one

    direct = cufile_stand_in(read)
    direct._cufile = SimpleNamespace(op_status_error=lambda status: "unknown cufile error")
    entry = _engine.Entry(4096)
    entry.seg_off = 0
    seg = SimpleNamespace(place=SimpleNamespace(name="seg-000001"))
    with pytest.raises(OSError, match="Input/output error") as caught:
        direct.read(entry, seg, (1, 0), 0x7F0000000000)  # type: ignore[arg-type]
    assert caught.value.errno == errno.EIO


def test_a_cufile_read_waits_for_our_stream_first():
    """A DLPack destination's producer ordered its pending work before our stream; cuFile's read is not
    issued on that stream, so it must be waited for before the read starts."""
    synced_at_read: list[int] = []

    def read(handle: int, dst: int, size: int, offset: int, dst_offset: int) -> int:
        synced_at_read.append(direct.cuda.synced)  # type: ignore[attr-defined]
        return size

    direct = cufile_stand_in(read)
    entry = _engine.Entry(4096)
    entry.seg_off = 0
    seg = SimpleNamespace(id=1, place=SimpleNamespace(name="seg-000001"))
    assert direct.read(entry, seg, (1, 0), 0x7F0000000000) == "compat"  # type: ignore[arg-type]
    assert synced_at_read == [1]


# -- cuFile reads and the CRC-32C ---------------------------------------------------------------------


def file_read(disk: bytearray) -> Any:
    """cuFileRead over ``disk`` (the segment's bytes), into host memory standing in for the device's."""

    def read(handle: int, dst: int, size: int, offset: int, dst_offset: int) -> int:
        n = min(size, len(disk) - offset)
        ctypes.memmove(dst + dst_offset, bytes(disk[offset : offset + n]), n)
        return n

    return read


@pytest.mark.parametrize("verify", ["first", "always", "never"])
def test_which_cufile_reads_are_checked_against_the_crc(monkeypatch, verify):
    monkeypatch.setattr(gds_module, "STAGING_CHUNK", 4096)  # a value of several chunks
    value = bytes(range(256)) * 40
    disk = bytearray(512) + bytearray(value)
    direct = cufile_stand_in(file_read(disk), verify)
    entry = _engine.Entry(len(value))
    entry.seg_off, entry.crc = 512, _engine.crc32c(value)
    seg = SimpleNamespace(id=7, place=SimpleNamespace(name="seg-000007", gpu_source=lambda: ("seg-000007", 3, 0)))
    dst = ctypes.create_string_buffer(len(value))
    for _ in range(2):
        direct.read(entry, seg, (1, 0), ctypes.addressof(dst))  # type: ignore[arg-type]
        assert dst.raw == value
    assert direct.checked == {"first": 1, "always": 2, "never": 0}[verify]
    assert direct.status()["verify"] == verify
    disk[512 + 5000] ^= 1  # corrupted on disk
    if verify == "never":
        direct.read(entry, seg, (1, 0), ctypes.addressof(dst))  # type: ignore[arg-type]
        return
    if verify == "first":
        direct.released(seg)  # type: ignore[arg-type]  # its verified offsets go with it
        assert direct.verified == {}
    with pytest.raises(ChecksumError):
        direct.read(entry, seg, (1, 0), ctypes.addressof(dst))  # type: ignore[arg-type]


def test_a_value_corrupted_on_ssd_is_caught_on_its_first_cufile_read(tmp_path, cudas):
    """SSD -> GPU through cuFile (its read a pread here) checks the first read of each value, as host
    reads do every read: a corrupted value is dropped, never served."""
    with mooncakefs.open(tmp_path / "kv", dram="1MiB", ssd="64MiB", vram="1MiB", promote_after=99) as store:
        good, bad = b"g" * (1536 << 10), b"b" * (1536 << 10)  # over the DRAM pool: straight to SSD
        store.put("good", good)
        store.put("bad", bad)
        assert store.stat("good").tier == store.stat("bad").tier == "ssd"
        direct = store._gds
        assert direct is not None
        segment = store._ssd.segments[store._index[b"bad"].seg]
        name, _, base = segment.place.gpu_source()
        with open(name, "r+b") as f:
            f.seek(base + store._index[b"bad"].seg_off + 1000)
            f.write(b"X")

        def read(handle: Any, dst: int, size: int, offset: int, dst_offset: int) -> int:
            chunk = (ctypes.c_char * size).from_address(dst + dst_offset)
            return handle.place.read_into(memoryview(chunk).cast("B"), offset)

        direct.mode, direct._read = COMPAT, read
        direct.prepare = lambda seg: (seg, base)
        out = HostArray(bytes(len(good)))
        for _ in range(2):
            assert store.get_into("good", out) == len(good) and out.bytes() == good
        with pytest.raises(ChecksumError, match="dropped"):
            store.get_into("bad", HostArray(bytes(len(bad))))
        assert "bad" not in store and store.get("good") == good
        assert store.stats()["ssd"]["gpudirect"]["checked"] == 2  # the first read of each value only


@pytest.fixture
def vram_node(tmp_path, cudas) -> Any:
    """A node (in this process: its VRAM tier is the stand-in's) over a store with 1 MiB of VRAM, served on a
    Unix socket and loopback TCP; stopped (its store closed) at teardown."""
    store = mooncakefs.open(tmp_path / "kv", dram="8MiB", vram="1MiB")
    node = Node(store, unix_path=tmp_path / "node.sock", tcp=("127.0.0.1", 0))
    try:
        node.start()
    except BaseException:
        store.close()
        raise
    yield node
    node.stop()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("size", [1000, 256 << 10], ids=["in the PUT", "PUT_BEGIN"])
def test_a_node_client_places_a_host_value_with_tier(vram_node, transport, size):
    """``RemoteStore.put(tier=)`` reaches the node's store, which places the value as ``Store.put`` places
    a host buffer: "vram" into its VRAM tier (or DRAM, where VRAM has no room), "dram" and no tier not."""
    host, port = vram_node.tcp
    url = f"unix://{vram_node.unix_path}" if transport == "unix" else f"tcp://{host}:{port}"
    # inline_max: the larger value leaves the request for PUT_BEGIN on either transport (the pool, the engine)
    with mooncakefs.connect(url, timeout=HANG_GUARD, inline_max=32 << 10) as client:
        values = {tier: bytes([i + 1]) * size for i, tier in enumerate(("vram", "dram", None))}
        for tier, value in values.items():
            client.put(f"k-{tier}", value, tier=tier)
        assert [client.stat(f"k-{tier}").tier for tier in values] == ["vram", "dram", "dram"]
        assert all(client.get(f"k-{tier}") == value for tier, value in values.items())
        too_big = b"b" * (2 << 20)  # over the whole VRAM tier: it stays in DRAM, where it arrived
        client.put("big", too_big, tier="vram")
        assert client.stat("big").tier == "dram" and client.get("big") == too_big
        with pytest.raises(InvalidArgument, match="tier='vram' cannot be combined with pin"):
            client.put("pinned", b"p" * size, tier="vram", pin=True)
        assert "pinned" not in client
        assert client.remove_prefix("") == 4
    stats = vram_node.store.stats()
    assert stats["vram"]["used"] == stats["dram"]["used"] == 0  # the room a VRAM value arrived in was given back
