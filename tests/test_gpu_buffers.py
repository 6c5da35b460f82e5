"""What the VRAM tier does without a GPU, for real: reading GPU buffers' descriptions
(``__cuda_array_interface__``, DLPack capsules parsed with ctypes, exercised with numpy's CPU tensors),
refusing strided ones, making DLPack capsules numpy can consume, where a put places a value, which
cuFile mode is reported, and the errors a store gives when CUDA or a GPU is missing."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest
from conftest import child_env

import mooncakefs
from mooncakefs import _engine
from mooncakefs.errors import CudaUnavailable, InvalidArgument
from mooncakefs.gpu import (
    DL_CPU,
    DL_CUDA,
    device_buffer,
    export_dlpack,
    exported_alive,
    from_cuda_array_interface,
    from_dlpack,
    from_dlpack_capsule,
    gpu_unavailable,
)
from mooncakefs.tiers.gds import COMPAT, FALLBACK, GDS, describe_mode
from mooncakefs.tiers.vram import choose_tier, should_promote
from mooncakefs.units import parse_vram


class CudaArray:
    """An object that only describes device memory (as torch and cupy tensors do); nothing reads it."""

    def __init__(self, **interface: object) -> None:
        self.__cuda_array_interface__ = {
            "version": 3,
            "shape": (4, 8),
            "typestr": "<f4",
            "data": (0x7F0000000000, False),
            "strides": None,
            "stream": None,
            **interface,
        }


# -- __cuda_array_interface__ -------------------------------------------------------------------------


def test_cuda_array_interface_gives_pointer_size_and_stream():
    buf = from_cuda_array_interface(CudaArray(stream=7))
    assert (buf.ptr, buf.nbytes, buf.device_type, buf.stream, buf.readonly) == (0x7F0000000000, 128, DL_CUDA, 7, False)
    assert buf.on_device
    v2 = from_cuda_array_interface(CudaArray(version=2, stream=99))  # v2 has no stream: it is not read
    assert (v2.nbytes, v2.stream) == (128, 0)


def test_compact_strides_are_contiguous_and_others_are_refused():
    assert from_cuda_array_interface(CudaArray(strides=(32, 4))).nbytes == 128
    assert from_cuda_array_interface(CudaArray(shape=(1, 8), strides=(999, 4))).nbytes == 32  # size-1 dim
    assert from_cuda_array_interface(CudaArray(shape=(0, 8), strides=(4, 8))).nbytes == 0
    with pytest.raises(
        InvalidArgument, match=r"not contiguous \(shape \(4, 8\), strides \(4, 16\) bytes\).*contiguous"
    ):
        from_cuda_array_interface(CudaArray(strides=(4, 16)))  # a transpose
    with pytest.raises(InvalidArgument, match="not contiguous"):
        from_cuda_array_interface(CudaArray(strides=(64, 4)))  # every other row


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        ({"version": 1}, "version 1 is not supported"),
        ({"mask": object()}, "masked arrays"),
        ({"data": (0, False)}, "null pointer for 128 bytes"),
        ({"data": "0x1234"}, r"data must be \(pointer, read_only\)"),
        ({"typestr": "float32"}, "typestr must look like"),
        ({"stream": 0}, "0 is ambiguous"),
        ({"shape": (4, -1)}, "shape must be non-negative"),
        ({"strides": (4,)}, "1 strides for 2 dimensions"),
    ],
)
def test_bad_cuda_array_interfaces_say_what_is_wrong(interface, message):
    with pytest.raises(InvalidArgument, match=message):
        from_cuda_array_interface(CudaArray(**interface))


def test_a_read_only_buffer_is_no_destination():
    readonly = CudaArray(data=(0x1000, True))
    assert from_cuda_array_interface(readonly).readonly
    with pytest.raises(InvalidArgument, match="read-only, and a get writes into it"):
        from_cuda_array_interface(readonly, writable=True)


# -- DLPack -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "complex128", "bool"])
def test_dlpack_capsules_of_numpy_arrays_parse_to_their_memory(dtype):
    array = np.zeros((3, 5), dtype=dtype)
    with from_dlpack(array) as buf:
        assert (buf.ptr, buf.nbytes) == (array.ctypes.data, array.nbytes)
        assert (buf.device_type, buf.device_id, buf.on_device) == (DL_CPU, 0, False)


def test_a_contiguous_slice_keeps_its_offset():
    array = np.arange(100, dtype=np.int32)
    part = array[10:30]
    with from_dlpack(part) as buf:
        assert (buf.ptr, buf.nbytes) == (array.ctypes.data + 40, 80)


def test_the_capsules_tensor_is_held_until_closed_then_let_go():
    array = np.arange(1000, dtype=np.float64)
    alive = weakref.ref(array)
    buf = from_dlpack(array)
    del array
    gc.collect()
    assert alive() is not None  # the capsule's tensor keeps it
    buf.close()
    buf.close()  # once only
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("view", [lambda a: a[::2], lambda a: a.T], ids=["every-other", "transposed"])
def test_strided_dlpack_tensors_are_refused_and_let_go(view):
    array = np.zeros((8, 8), dtype=np.float32)
    alive = weakref.ref(array)
    with pytest.raises(InvalidArgument, match="not contiguous"):
        from_dlpack(view(array))
    del array
    gc.collect()
    assert alive() is None  # the refused tensor's deleter ran


def test_a_capsule_is_taken_once():
    capsule = np.zeros(4, dtype=np.uint8).__dlpack__()
    from_dlpack_capsule(capsule).close()
    with pytest.raises(InvalidArgument, match=r"not an unused DLPack capsule.*consumed only once"):
        from_dlpack_capsule(capsule)
    with pytest.raises(InvalidArgument, match="not a PyCapsule"):
        from_dlpack_capsule(b"dltensor")


def test_host_dlpack_objects_are_not_device_buffers():
    assert device_buffer(np.zeros(4)) is None  # numpy: host memory, the store uses the buffer protocol
    assert device_buffer(b"abc") is None


class Exported:
    """What Store.device_view hands out, around host memory (numpy cannot consume a CUDA tensor)."""

    def __init__(self, data: bytearray, released: list[int]) -> None:
        self.data, self.released = data, released

    def __dlpack_device__(self) -> tuple[int, int]:
        return DL_CPU, 0

    def __dlpack__(self, **_: object) -> object:
        return export_dlpack(_engine.address(self.data), len(self.data), (DL_CPU, 0), lambda: self.released.append(1))


def test_our_capsules_are_read_by_numpy_without_a_copy_and_released_once():
    data = bytearray(b"0123456789abcdef")
    released: list[int] = []
    before = exported_alive()
    view = np.from_dlpack(Exported(data, released))
    assert view.dtype == np.uint8 and bytes(view) == bytes(data)
    data[0:1] = b"X"
    assert bytes(view[:1]) == b"X"  # the same memory
    assert exported_alive() == before + 1 and released == []
    del view
    gc.collect()
    assert released == [1] and exported_alive() == before


def test_our_capsules_parse_with_our_parser_and_an_unused_one_releases_when_it_dies():
    data = bytearray(64)
    released: list[int] = []
    with from_dlpack(Exported(data, released)) as buf:
        assert (buf.ptr, buf.nbytes) == (_engine.address(data), 64)
    assert released == [1]
    capsule = Exported(data, released).__dlpack__()
    del capsule
    gc.collect()
    assert released == [1, 1]


# -- placement --------------------------------------------------------------------------------------------


def place(hint=None, *, on_device=False, has_vram=True, pinned=False, durable=False, sticky=False) -> str:
    return choose_tier(hint, on_device=on_device, has_vram=has_vram, pinned=pinned, durable=durable, sticky=sticky)


def test_gpu_buffers_go_to_vram_and_host_buffers_to_dram():
    assert place(on_device=True) == "vram"
    assert place(on_device=False) == "dram"
    assert place(on_device=True, has_vram=False) == "dram"  # copied to the host, stored as any put
    assert place("vram") == "vram" and place("dram", on_device=True) == "dram"


def test_pinned_durable_and_internal_values_stay_on_the_host():
    for flag in ("pinned", "durable", "sticky"):
        assert place(on_device=True, **{flag: True}) == "dram"
    with pytest.raises(InvalidArgument, match="cannot be combined with pin or durable"):
        place("vram", pinned=True)
    with pytest.raises(InvalidArgument, match="needs a VRAM tier: open the store with vram="):
        place("vram", has_vram=False)
    with pytest.raises(InvalidArgument, match="tier must be one of"):
        place("ssd")


def test_reads_into_gpu_buffers_promote_after_enough_of_them():
    entry = _engine.Entry(100)
    assert entry.vram == -1
    entry.hits = 1
    assert not should_promote(entry, 2, True)
    entry.hits = 2
    assert should_promote(entry, 2, True) and not should_promote(entry, 2, False)
    entry.pinned = True
    assert not should_promote(entry, 2, True)


def test_the_cufile_mode_says_which_and_why():
    assert describe_mode(True, True, False)[0] == GDS
    mode, why = describe_mode(True, False, False)
    assert mode == COMPAT and "nvidia-fs kernel driver is not loaded" in why
    assert describe_mode(True, True, True)[0] == COMPAT
    assert describe_mode(False, True, False)[0] == FALLBACK


def test_vram_option():
    assert parse_vram("0:16GiB") == (0, 16 << 30)
    assert parse_vram("3:1GiB") == (3, 1 << 30)
    assert parse_vram("8GiB") == (0, 8 << 30)
    assert parse_vram("0") is None
    with pytest.raises(ValueError, match="DEVICE a GPU number"):
        parse_vram("gpu0:1GiB")


# -- without CUDA -----------------------------------------------------------------------------------------


def test_cuda_unavailable_is_a_device_error():
    assert CudaUnavailable.errno == 19 and CudaUnavailable.exit_code == 69  # ENODEV, EX_UNAVAILABLE
    assert mooncakefs.CudaUnavailable is CudaUnavailable


@pytest.fixture
def without_gpu():
    reason = gpu_unavailable(0)
    if reason is None:
        pytest.skip("this machine has a GPU: tests/test_vram.py runs there")
    return reason


CUDA_MISSING = r"pip install 'mooncakefs\[cuda\]'|no CUDA device"


def test_a_vram_tier_without_cuda_says_what_is_missing(tmp_path, without_gpu):
    with pytest.raises(CudaUnavailable, match=CUDA_MISSING):
        mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="64MiB")
    with mooncakefs.open(tmp_path / "kv", dram="4MiB") as store:  # the data dir was let go
        store.put("k", b"v")


def test_gpu_buffers_without_cuda_say_what_is_missing(tmp_path, without_gpu):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB") as store:
        store.put("k", b"x" * 128)
        with pytest.raises(CudaUnavailable, match=CUDA_MISSING):
            store.put("gpu", CudaArray())
        with pytest.raises(CudaUnavailable, match=CUDA_MISSING):
            store.get_into("k", CudaArray())
        with pytest.raises(InvalidArgument, match="not contiguous"):  # refused before CUDA is needed
            store.put("gpu", CudaArray(strides=(4, 16)))
        with pytest.raises(InvalidArgument, match="needs a VRAM tier"):
            store.put("x", b"host", tier="vram")
        store.put("x", b"host", tier="dram")
        assert store.stat("x").tier == "dram" and store.get("x") == b"host"
        assert "gpu" not in store and store.get("k") == b"x" * 128
        assert "vram" not in store.stats()


def test_which_gpu_reads_are_checked_is_one_of_three(tmp_path):
    with pytest.raises(ValueError, match="gpu_verify must be one of"):
        mooncakefs.open(tmp_path / "kv", dram="4MiB", gpu_verify="sometimes")
    out = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "node", "--data", str(tmp_path / "node"), "--dram", "4MiB",
         "--gpu-verify", "sometimes", "--listen", "none", "--metrics", "none"],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )  # fmt: skip
    assert out.returncode == 2 and "'first', 'always', 'never'" in out.stderr, out.stderr


def test_the_node_refuses_vram_without_cuda(tmp_path, without_gpu):
    out = subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "node", "--data", str(tmp_path / "node"), "--dram", "4MiB",
         "--vram", "0:64MiB", "--listen", "none", "--metrics", "none", "--no-prefault",
         "--socket", str(tmp_path / "node.sock")],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )  # fmt: skip
    assert out.returncode == 69, out.stderr
    assert "pip install 'mooncakefs[cuda]'" in out.stderr or "no CUDA device" in out.stderr
