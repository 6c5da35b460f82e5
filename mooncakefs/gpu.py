"""GPU buffers without torch or cupy, and the CUDA calls the VRAM tier makes (NVIDIA's ``cuda.bindings``).

Two halves.  The first needs no GPU and no CUDA package: it reads what a caller hands us as a device
buffer, from ``__cuda_array_interface__`` (versions 2 and 3: pointer, shape, typestr, strides, stream) or
from DLPack (``__dlpack__`` / ``__dlpack_device__``: the ``DLManagedTensor`` in a PyCapsule, read with
ctypes), refuses what is not one contiguous range of bytes, and makes DLPack capsules of our own (the
zero-copy views of VRAM values).  numpy's CPU ``__dlpack__`` exercises the same structures, so the tests
run it here for real.  The second half (``Cuda``) is the driver API: one context per device, one stream,
pinned staging buffers, and the copies between host and device memory; it loads ``cuda.bindings`` only
when a store asks for a VRAM tier, and says what to install or which GPU is missing when it cannot.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mooncakefs import _engine
from mooncakefs.errors import CudaUnavailable, InvalidArgument, given

# DLPack device types (dlpack.h DLDeviceType)
DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED = 1, 2, 3, 13
DEVICE_TYPES = {DL_CUDA, DL_CUDA_MANAGED}  # memory a CUDA kernel (and our copies) address as device memory
DL_UINT = 1  # DLDataTypeCode kDLUInt
CUDA_STREAM_LEGACY, CUDA_STREAM_PER_THREAD = 1, 2  # what __cuda_array_interface__'s "stream" may name


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]

_capsule_get = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get.restype, _capsule_get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype, _capsule_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.restype, _capsule_set_name.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
_capsule_get_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_get_name.restype, _capsule_get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
# A capsule's destructor gets the dying capsule as a raw pointer: taking it as a py_object would
# revive it (a reference to an object already at zero) and free it twice.
CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_dying_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi)
)
_dying_get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)
DLTENSOR = b"dltensor"  # capsules keep a pointer to their name: it must outlive them
USED_DLTENSOR = b"used_dltensor"
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, CAPSULE_DESTRUCTOR]


@dataclass
class DeviceBuffer:
    """One contiguous range of bytes a caller handed us: where (``ptr``, ``nbytes``), on which device
    (a DLPack device type and id), whether we may write it, the CUDA stream its producer asked us to wait
    for (0: none), and a ``release`` to call once we are done with it (a DLPack capsule's deleter)."""

    ptr: int
    nbytes: int
    device_type: int
    device_id: int
    readonly: bool = False
    stream: int = 0
    release: Callable[[], None] | None = None

    @property
    def on_device(self) -> bool:
        return self.device_type in DEVICE_TYPES

    def close(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            release()

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _itemsize(typestr: str, what: str) -> int:
    """The size of one element of a numpy-style typestr ("<f4", "|u1", "<c16")."""
    if not isinstance(typestr, str) or len(typestr) < 3 or typestr[0] not in "<>|=" or not typestr[2:].isdigit():
        raise InvalidArgument(f"{what}: typestr must look like '<f4' or '|u1', got {given(typestr)}")
    return int(typestr[2:])


def contiguous_nbytes(shape: tuple[int, ...], itemsize: int, strides: tuple[int, ...] | None, what: str) -> int:
    """The byte length of a C-contiguous array of ``shape`` (``strides`` in bytes, None for compact);
    InvalidArgument for a strided one: a value is one range of bytes, and we never gather."""
    if any(type(n) is not int or n < 0 for n in shape):
        raise InvalidArgument(f"{what}: shape must be non-negative ints, got {given(shape)}")
    nbytes = itemsize * math.prod(shape)
    if strides is None or nbytes == 0:
        return nbytes
    if len(strides) != len(shape):
        raise InvalidArgument(f"{what}: {len(strides)} strides for {len(shape)} dimensions")
    expected = itemsize
    for n, stride in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and stride != expected:
            raise InvalidArgument(
                f"{what}: not contiguous (shape {tuple(shape)}, strides {tuple(strides)} bytes): a value must be "
                "one range of bytes; pass a contiguous copy (torch: .contiguous(), cupy: cupy.ascontiguousarray)"
            )
        expected *= n
    return nbytes


def from_cuda_array_interface(obj: Any, *, writable: bool = False, cai: Any = None) -> DeviceBuffer:
    """Read ``obj.__cuda_array_interface__`` (v2 or v3; ``cai``: already read, as producers build it anew
    each time).  ``writable``: refuse a read-only one (a get's destination).  The device is CUDA; which
    GPU is for the driver to say (unified addressing)."""
    what = f"__cuda_array_interface__ of {type(obj).__name__}"
    if cai is None:
        cai = obj.__cuda_array_interface__
    if not isinstance(cai, dict):
        raise InvalidArgument(f"{what} must be a dict, got {given(cai)}")
    version = cai.get("version")
    if version not in (2, 3):
        raise InvalidArgument(f"{what}: version {version!r} is not supported (2 or 3)")
    for field in ("shape", "typestr", "data"):
        if field not in cai:
            raise InvalidArgument(f"{what}: no {field!r}")
    if cai.get("mask") is not None:
        raise InvalidArgument(f"{what}: masked arrays are not supported")
    data = cai["data"]
    if not (isinstance(data, tuple) and len(data) == 2 and type(data[0]) is int and type(data[1]) in (bool, int)):
        raise InvalidArgument(f"{what}: data must be (pointer, read_only), got {given(data)}")
    ptr, readonly = data[0], bool(data[1])
    if writable and readonly:
        raise InvalidArgument(f"{what}: the buffer is read-only, and a get writes into it")
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    nbytes = contiguous_nbytes(
        shape, _itemsize(cai["typestr"], what), None if strides is None else tuple(strides), what
    )
    if ptr == 0 and nbytes:
        raise InvalidArgument(f"{what}: a null pointer for {nbytes} bytes")
    stream = cai.get("stream") if version >= 3 else None
    if stream is not None and (type(stream) is not int or stream == 0):
        raise InvalidArgument(f"{what}: stream must be None or a nonzero int (0 is ambiguous), got {given(stream)}")
    return DeviceBuffer(ptr, nbytes, DL_CUDA, -1, readonly, stream or 0)


def _deleter_of(managed: ctypes.c_void_p | int) -> Callable[[], None]:
    """What a consumer that took a DLManagedTensor (renamed its capsule "used_dltensor") calls when done."""

    def release() -> None:
        tensor = ctypes.cast(managed, ctypes.POINTER(DLManagedTensor))
        if tensor.contents.deleter:
            tensor.contents.deleter(tensor)

    return release


def from_dlpack_capsule(capsule: Any, what: str = "DLPack capsule", *, writable: bool = False) -> DeviceBuffer:
    """Take the tensor out of a "dltensor" capsule (marking it used, as the protocol asks) and describe it.
    The DeviceBuffer's ``close`` calls the producer's deleter: until then the memory stays valid.
    (``writable`` cannot be checked here: an unversioned DLPack tensor carries no read-only flag.)"""
    if not _capsule_valid(capsule, DLTENSOR):
        name = _capsule_get_name(capsule) if type(capsule).__name__ == "PyCapsule" else None
        raise InvalidArgument(
            f"{what}: not an unused DLPack capsule (name {name!r}; a capsule can be consumed only once)"
            if name is not None
            else f"{what}: not a PyCapsule, got {given(capsule)}"
        )
    address = _capsule_get(capsule, DLTENSOR)
    managed = ctypes.cast(address, ctypes.POINTER(DLManagedTensor)).contents
    _capsule_set_name(capsule, USED_DLTENSOR)  # ours now: the capsule's destructor leaves it alone
    release = _deleter_of(address)
    try:
        t = managed.dl_tensor
        shape = tuple(t.shape[i] for i in range(t.ndim))
        strides = None if not t.strides else tuple(t.strides[i] for i in range(t.ndim))
        if t.dtype.lanes != 1 or t.dtype.bits % 8:
            raise InvalidArgument(f"{what}: elements of {t.dtype.bits} bits x {t.dtype.lanes} lanes are not bytes")
        itemsize = t.dtype.bits // 8
        nbytes = contiguous_nbytes(
            shape, itemsize, None if strides is None else tuple(s * itemsize for s in strides), what
        )
        ptr = (t.data or 0) + t.byte_offset
        return DeviceBuffer(ptr, nbytes, t.device.device_type, t.device.device_id, False, 0, release)
    except BaseException:
        release()
        raise


Stream = int | Callable[[], int] | None  # our CUDA stream, or what makes CUDA ready and gives it


def from_dlpack(obj: Any, *, stream: Stream = None, writable: bool = False) -> DeviceBuffer:
    """Read an object with ``__dlpack__``: ask it for a capsule (naming our ``stream`` for a CUDA
    tensor, so its producer orders its work before ours: without one it orders it before the legacy
    default stream, which our non-blocking stream does not wait for) and parse that."""
    what = f"__dlpack__ of {type(obj).__name__}"
    device_type, _ = obj.__dlpack_device__()
    if device_type in DEVICE_TYPES and stream is not None:
        capsule = obj.__dlpack__(stream=stream() if callable(stream) else stream)
    else:
        capsule = obj.__dlpack__()
    buf = from_dlpack_capsule(capsule, what, writable=writable)
    if writable and not buf.on_device:  # a host array's writability: the buffer protocol knows it
        try:
            memoryview(obj).cast("B")[:0] = b""
        except (TypeError, ValueError):
            buf.close()
            raise InvalidArgument(f"{what}: the buffer is read-only, and a get writes into it") from None
    return buf


def is_gpu_buffer(obj: Any) -> bool:
    """Whether ``obj`` may describe GPU memory (it has one of the two protocols); cheap, parses nothing.
    Asked only of what the buffer protocol refused, so host arrays never get here."""
    return hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack_device__")


def device_buffer(obj: Any, *, stream: Stream = None, writable: bool = False) -> DeviceBuffer | None:
    """The device memory ``obj`` exposes, or None if it is host memory (or exposes neither protocol):
    the store then treats it as an ordinary buffer.  ``__cuda_array_interface__`` is preferred (no
    capsule to consume); DLPack counts only for a CUDA device.  ``stream`` (see ``from_dlpack``) may be
    a callable, called only for a CUDA DLPack tensor."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return from_cuda_array_interface(obj, writable=writable, cai=cai)
    dlpack_device = getattr(obj, "__dlpack_device__", None)
    if dlpack_device is not None and hasattr(obj, "__dlpack__"):
        device_type, _ = dlpack_device()
        if device_type in DEVICE_TYPES:
            return from_dlpack(obj, stream=stream, writable=writable)
    return None


# -- our own capsules (zero-copy views of VRAM values) ---------------------------------------------------

_exported: dict[int, tuple[DLManagedTensor, Any, Callable[[], None]]] = {}  # alive until the consumer is done
_exported_lock = threading.Lock()


@DELETER
def _delete_exported(tensor: Any) -> None:
    address = ctypes.cast(tensor, ctypes.c_void_p).value
    with _exported_lock:
        record = _exported.pop(address, None)
    if record is not None:
        record[2]()


@CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule: int) -> None:
    """An unused capsule dies (nobody took the tensor): delete the tensor ourselves, as the protocol asks."""
    if _dying_valid(capsule, DLTENSOR):
        address = _dying_get(capsule, DLTENSOR)
        _delete_exported(ctypes.cast(address, ctypes.POINTER(DLManagedTensor)))


def export_dlpack(ptr: int, nbytes: int, device: tuple[int, int], on_release: Callable[[], None]) -> Any:
    """A "dltensor" capsule of ``nbytes`` bytes (a 1-D uint8 tensor) at ``ptr`` on ``device``;
    ``on_release`` runs once, when the consumer deletes it or the capsule dies unused."""
    managed = DLManagedTensor()
    shape = (ctypes.c_int64 * 1)(nbytes)
    t = managed.dl_tensor
    t.data, t.device, t.ndim = ptr, DLDevice(*device), 1
    t.dtype, t.shape, t.strides, t.byte_offset = DLDataType(DL_UINT, 8, 1), shape, None, 0
    managed.deleter = _delete_exported
    address = ctypes.addressof(managed)
    with _exported_lock:
        _exported[address] = (managed, shape, on_release)
    return _capsule_new(address, DLTENSOR, _capsule_destructor)


def exported_alive() -> int:
    """How many of our capsules' tensors are still held (tests check that views let go)."""
    with _exported_lock:
        return len(_exported)


# -- CUDA (cuda.bindings) --------------------------------------------------------------------------------

CUDA_EXTRA = "pip install 'mooncakefs[cuda]'"
STAGING_CHUNK = 8 << 20  # pinned staging buffers: two of these, filled and copied in turn
EVENT_FLAGS = 2  # CU_EVENT_DISABLE_TIMING: the staging events only order copies


def load_driver() -> Any:
    """``cuda.bindings.driver``, or CudaUnavailable saying what to install."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise CudaUnavailable(
            f"the VRAM tier needs NVIDIA's cuda-bindings, which is not installed ({exc}): {CUDA_EXTRA}"
        ) from None
    return driver


def _check(driver: Any, result: Any, call: str) -> Any:
    """Unpack a cuda.bindings result tuple: the values after the status, or RuntimeError naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = driver.cuGetErrorName(err)[1]
        raise RuntimeError(f"{call} failed: {name.decode() if isinstance(name, bytes) else err}")
    return values[0] if len(values) == 1 else tuple(values) or None


class _Active:
    """``with cuda.active:``: the device's context current inside, and the thread's own back after (a
    caller working on another GPU, torch say, keeps the current context, and so the device, it had)."""

    __slots__ = ("context", "driver")

    def __init__(self, driver: Any, context: Any) -> None:
        self.driver, self.context = driver, context

    def __enter__(self) -> None:
        _check(self.driver, self.driver.cuCtxPushCurrent(self.context), "cuCtxPushCurrent")

    def __exit__(self, *exc: object) -> None:
        self.driver.cuCtxPopCurrent()


class Cuda:
    """One GPU as the VRAM tier uses it: its primary context (pushed for each call, then popped),
    one stream for our copies, and two pinned staging buffers for pageable host memory.  Copies are
    issued on the stream and waited for before returning: callers see plain synchronous copies."""

    def __init__(self, device: int = 0) -> None:
        driver = self.driver = load_driver()
        try:
            _check(driver, driver.cuInit(0), "cuInit")
        except RuntimeError as exc:
            raise CudaUnavailable(
                f"no CUDA device: {exc}{visible_devices()} (is the NVIDIA driver loaded? nvidia-smi)"
            ) from None
        except Exception as exc:  # libcuda.so.1 missing: a machine without the NVIDIA driver
            raise CudaUnavailable(
                f"no CUDA device: {exc} (the NVIDIA driver's libcuda.so.1 is not installed)"
            ) from None
        count = _check(driver, driver.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= device < count:
            raise CudaUnavailable(f"no CUDA device {device}: this machine has {count}{visible_devices()}")
        self.device = device
        self.handle = _check(driver, driver.cuDeviceGet(device), "cuDeviceGet")
        self.name = _check(driver, driver.cuDeviceGetName(128, self.handle), "cuDeviceGetName").split(b"\0")[0].decode()
        self.lock = threading.RLock()  # one copy at a time on the stream and the staging buffers
        self.stream: Any = None
        self.staging: list[int] = []  # two pinned buffers (cuMemHostAlloc) for copies of pageable memory
        self.registered: list[tuple[int, int]] = []  # host ranges pinned with cuMemHostRegister
        self.host_allocs: list[tuple[int, int]] = []  # pinned host memory from alloc_host
        self.context = _check(driver, driver.cuDevicePrimaryCtxRetain(self.handle), "cuDevicePrimaryCtxRetain")
        self.active = _Active(driver, self.context)
        try:  # a failure past here gives back what was taken (the primary context is shared: torch's too)
            with self.active:
                self.stream = _check(
                    driver, driver.cuStreamCreate(int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate"
                )
                for _ in range(2):
                    self.staging.append(int(_check(driver, driver.cuMemHostAlloc(STAGING_CHUNK, 0), "cuMemHostAlloc")))
        except BaseException:
            self.close()
            raise

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        _check(self.driver, self.driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def wait_for(self, buf: DeviceBuffer) -> None:
        """Order our copies after the producer's work on the stream it named (CAI v3)."""
        if buf.stream:
            _check(
                self.driver, self.driver.cuStreamSynchronize(self.driver.CUstream(buf.stream)), "cuStreamSynchronize"
            )

    def alloc(self, nbytes: int) -> int:
        with self.active:
            return int(_check(self.driver, self.driver.cuMemAlloc(nbytes), f"cuMemAlloc({nbytes})"))

    def free(self, ptr: int) -> None:
        with self.active:
            _check(self.driver, self.driver.cuMemFree(self.driver.CUdeviceptr(ptr)), "cuMemFree")

    def mem_info(self) -> tuple[int, int]:
        with self.active:
            return _check(self.driver, self.driver.cuMemGetInfo(), "cuMemGetInfo")

    def alloc_host(self, nbytes: int) -> int:
        """Pinned host memory (``cuMemHostAlloc``), freed by ``close``: copies from and to it are direct."""
        with self.active:
            ptr = int(_check(self.driver, self.driver.cuMemHostAlloc(nbytes, 0), "cuMemHostAlloc"))
        self.host_allocs.append((ptr, nbytes))
        return ptr

    def register_host(self, ptr: int, nbytes: int) -> bool:
        """Pin a host range (the DRAM pool) so copies to and from it are direct DMA; False if refused."""
        with self.active:
            err = self.driver.cuMemHostRegister(ptr, nbytes, 0)[0]
        if int(err) != 0:
            return False
        self.registered.append((ptr, nbytes))
        return True

    def unregister_host(self, ptr: int) -> None:
        """Unpin a range ``register_host`` pinned (nothing if it did not): before it is unmapped, when
        this device outlives it (a store closed while device views are alive)."""
        for i, (start, _) in enumerate(self.registered):
            if start == ptr:
                del self.registered[i]
                with self.active:
                    _check(self.driver, self.driver.cuMemHostUnregister(ptr), "cuMemHostUnregister")
                return

    def _is_pinned(self, ptr: int, nbytes: int) -> bool:
        ranges = [*self.registered, *self.host_allocs, *((p, STAGING_CHUNK) for p in self.staging)]
        return any(start <= ptr and ptr + nbytes <= start + size for start, size in ranges)

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        d = self.driver
        with self.lock, self.active:
            _check(
                d, d.cuMemcpyDtoDAsync(d.CUdeviceptr(dst), d.CUdeviceptr(src), nbytes, self.stream), "cuMemcpyDtoDAsync"
            )
            self.sync()

    def h2d(self, dst: int, src: int, nbytes: int) -> None:
        """Host ``src`` (an address) to device ``dst``: directly from pinned memory, else through the
        staging buffers, one filling while the other is copied."""
        d = self.driver
        with self.lock, self.active:
            if self._is_pinned(src, nbytes):
                _check(d, d.cuMemcpyHtoDAsync(d.CUdeviceptr(dst), src, nbytes, self.stream), "cuMemcpyHtoDAsync")
                self.sync()
                return
            events: list[Any] = []  # one per staging buffer: recorded after its copy was issued
            try:
                for i, done in enumerate(range(0, nbytes, STAGING_CHUNK)):
                    n = min(STAGING_CHUNK, nbytes - done)
                    slot = i % 2
                    if slot < len(events):  # its last copy must be done before it is refilled
                        _check(d, d.cuEventSynchronize(events[slot]), "cuEventSynchronize")
                    else:
                        events.append(_check(d, d.cuEventCreate(EVENT_FLAGS), "cuEventCreate"))
                    ctypes.memmove(self.staging[slot], src + done, n)
                    _check(
                        d,
                        d.cuMemcpyHtoDAsync(d.CUdeviceptr(dst + done), self.staging[slot], n, self.stream),
                        "cuMemcpyHtoDAsync",
                    )
                    _check(d, d.cuEventRecord(events[slot], self.stream), "cuEventRecord")
                self.sync()
            except BaseException:
                d.cuStreamSynchronize(self.stream)  # no copy issued may still read a buffer the next caller fills
                raise
            finally:
                for event in events:
                    d.cuEventDestroy(event)

    def d2h(self, dst: int, src: int, nbytes: int) -> None:
        """Device ``src`` to host ``dst`` (an address): directly into pinned memory, else through the
        staging buffers."""
        d = self.driver
        with self.lock, self.active:
            if self._is_pinned(dst, nbytes):
                _check(d, d.cuMemcpyDtoHAsync(dst, d.CUdeviceptr(src), nbytes, self.stream), "cuMemcpyDtoHAsync")
                self.sync()
                return
            for done in range(0, nbytes, STAGING_CHUNK):
                n = min(STAGING_CHUNK, nbytes - done)
                _check(
                    d,
                    d.cuMemcpyDtoHAsync(self.staging[0], d.CUdeviceptr(src + done), n, self.stream),
                    "cuMemcpyDtoHAsync",
                )
                self.sync()
                ctypes.memmove(dst + done, self.staging[0], n)

    def close(self) -> None:
        """Give back what ``__init__`` took, once: a second close does nothing (releasing the primary
        context twice would take it from whoever else retained it, torch say)."""
        d = self.driver
        with self.lock:
            if self.context is None:
                return
            d.cuCtxPushCurrent(self.context)
            for ptr, _ in self.registered:
                d.cuMemHostUnregister(ptr)
            self.registered.clear()
            for ptr in [*self.staging, *(p for p, _ in self.host_allocs)]:
                d.cuMemFreeHost(ptr)
            self.staging, self.host_allocs = [], []
            if self.stream is not None:
                d.cuStreamDestroy(self.stream)
                self.stream = None
            d.cuCtxPopCurrent()
            d.cuDevicePrimaryCtxRelease(self.handle)
            self.context = None


def gpu_unavailable(device: int = 0) -> str | None:
    """Why GPU ``device`` cannot be used here ("no CUDA device: ..."), or None if it can: what GPU tests
    skip with and benchmarks report."""
    try:
        Cuda(device).close()
    except CudaUnavailable as exc:
        text = str(exc)
        return text if text.startswith("no CUDA device") else f"no CUDA device: {text}"
    return None


def visible_devices() -> str:
    """What CUDA_VISIBLE_DEVICES says, for error messages (a GPU hidden from us looks absent)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if value is None else f" (CUDA_VISIBLE_DEVICES={value!r})"


class DeviceArray:
    """Plain device memory (``cuMemAlloc``) described by ``__cuda_array_interface__`` (1-D uint8): a
    GPU buffer for tests, benchmarks and callers without torch or cupy."""

    def __init__(self, cuda: Cuda, nbytes: int) -> None:
        self.cuda, self.nbytes = cuda, nbytes
        self.ptr = cuda.alloc(max(nbytes, 1))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"version": 3, "shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "stream": None}  # fmt: skip

    def upload(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes:
            self.cuda.h2d(self.ptr, _engine.address(view), view.nbytes)

    def download(self, nbytes: int | None = None) -> bytes:
        out = bytearray(self.nbytes if nbytes is None else nbytes)
        if out:
            self.cuda.d2h(_engine.address(out), self.ptr, len(out))
        return bytes(out)

    def close(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
            self.ptr = 0


class DLPackDeviceArray(DeviceArray):
    """The same memory described by DLPack only, as a DLPack-only producer would."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        raise AttributeError("described by DLPack only")

    def __dlpack_device__(self) -> tuple[int, int]:
        return DL_CUDA, self.cuda.device

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        return export_dlpack(self.ptr, self.nbytes, (DL_CUDA, self.cuda.device), lambda: None)
