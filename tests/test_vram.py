"""The VRAM tier on a real GPU: puts and gets between host and device buffers (CUDA array interface and
DLPack), device-to-device copies, values demoted to DRAM when VRAM is full and promoted back by reads
into GPU buffers, byte-exact SSD -> VRAM reads through cuFile (and through pread + H2D), and zero-copy
DLPack views.  Without a usable GPU every test here is skipped with the reason ("no CUDA device: ...");
tools/device/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
from conftest import rand_bytes

import mooncakefs
from mooncakefs.errors import BufferTooSmall, ChecksumError, InvalidArgument
from mooncakefs.gpu import Cuda, DeviceArray, DLPackDeviceArray, exported_alive, from_dlpack, gpu_unavailable
from mooncakefs.tiers.gds import COMPAT, FALLBACK, GDS

WHY = gpu_unavailable(0)
CUDA = Cuda(0) if WHY is None else None
pytestmark = pytest.mark.skipif(CUDA is None, reason=str(WHY))
MiB = 1 << 20


@pytest.fixture
def gpu_arrays() -> Iterator[list[DeviceArray]]:
    """Device buffers made by a test, freed after it."""
    made: list[DeviceArray] = []
    yield made
    for array in made:
        array.close()


def device_array(made: list[DeviceArray], nbytes: int, data: bytes | None = None, dlpack: bool = False) -> DeviceArray:
    assert CUDA is not None
    array = (DLPackDeviceArray if dlpack else DeviceArray)(CUDA, nbytes)
    made.append(array)
    if data is not None:
        array.upload(data)
    return array


def test_host_and_device_buffers_in_and_out_of_vram(tmp_path, gpu_arrays):
    with mooncakefs.open(tmp_path / "kv", dram="16MiB", vram="64MiB", device=0) as store:
        host = rand_bytes(3 * MiB + 17, seed="host")
        store.put("host", host, tier="vram")
        assert store.stat("host").tier == "vram"
        assert store.get("host") == host
        out = bytearray(len(host))
        assert store.get_into("host", out) == len(host) and out == host
        dst = device_array(gpu_arrays, len(host))
        assert store.get_into("host", dst) == len(host)  # device to device
        assert dst.download() == host

        for dlpack in (False, True):
            data = rand_bytes(2 * MiB, seed=dlpack)
            src = device_array(gpu_arrays, len(data), data, dlpack=dlpack)
            store.put(f"dev-{dlpack}", src)  # a GPU buffer goes to VRAM by default
            assert store.stat(f"dev-{dlpack}").tier == "vram"
            assert store.get(f"dev-{dlpack}") == data
            back = device_array(gpu_arrays, len(data), dlpack=dlpack)
            assert store.get_into(f"dev-{dlpack}", back) == len(data) and back.download() == data
        assert exported_alive() == 0

        outs = [device_array(gpu_arrays, len(host)) for _ in range(2)]
        assert store.batch_get_into(["host", "dev-False"], outs) == [len(host), 2 * MiB]
        assert outs[0].download() == host and outs[1].download(2 * MiB) == rand_bytes(2 * MiB, seed=False)

        store.put("to-dram", device_array(gpu_arrays, 4096, b"d" * 4096), tier="dram")
        assert store.stat("to-dram").tier == "dram" and store.get("to-dram") == b"d" * 4096
        with pytest.raises(BufferTooSmall):
            store.get_into("host", device_array(gpu_arrays, 100))
        stats = store.stats()
        assert stats["vram"]["objects"] == 3 and stats["vram"]["used"] >= len(host) + 4 * MiB


def test_gpu_buffers_in_a_store_without_vram_go_through_the_host(tmp_path, gpu_arrays):
    with mooncakefs.open(tmp_path / "kv", dram="16MiB") as store:
        data = rand_bytes(MiB, seed="no-vram")
        store.put("k", device_array(gpu_arrays, MiB, data))
        assert store.stat("k").tier == "dram" and store.get("k") == data
        dst = device_array(gpu_arrays, MiB)
        assert store.get_into("k", dst) == MiB and dst.download() == data


def test_full_vram_demotes_to_dram_and_reads_promote_back(tmp_path, gpu_arrays):
    values = {f"blk-{i}": rand_bytes(MiB, seed=i) for i in range(8)}
    with mooncakefs.open(tmp_path / "kv", dram="32MiB", vram="4MiB", promote_after=2) as store:
        for key, data in values.items():
            store.put(key, device_array(gpu_arrays, MiB, data))
        tiers = {key: store.stat(key).tier for key in values}
        assert set(tiers.values()) == {"vram", "dram"}, tiers
        assert tiers["blk-0"] == "dram" and tiers["blk-7"] == "vram"  # least recently used went first
        assert store.stats()["vram"]["evictions"] >= 4
        for key, data in values.items():
            assert store.get(key) == data, key
        dst = device_array(gpu_arrays, MiB)
        for _ in range(2):
            assert store.get_into("blk-0", dst) == MiB and dst.download() == values["blk-0"]
        assert store.stat("blk-0").tier == "vram"
        assert store.stats()["vram"]["promotions"] >= 1
        for key, data in values.items():  # nothing lost in the moves
            assert store.get(key) == data, key


def test_vram_values_without_room_below_are_dropped_not_kept(tmp_path, gpu_arrays):
    with mooncakefs.open(tmp_path / "kv", dram="1MiB", vram="2MiB") as store:
        for i in range(6):
            store.put(f"k{i}", device_array(gpu_arrays, MiB // 2, bytes([i]) * (MiB // 2)))
        present = [i for i in range(6) if f"k{i}" in store]
        assert 5 in present and len(present) < 6
        for i in present:
            assert store.get(f"k{i}") == bytes([i]) * (MiB // 2)


@pytest.fixture(params=["files", "blockdev"])
def ssd_backend(request) -> str:
    """SSD -> VRAM over segment files and over a raw block device (a loop device: one registration)."""
    return request.param


@pytest.mark.parametrize("path", ["cufile", "pread+h2d"])
def test_ssd_to_vram_is_byte_exact(store_factory, gpu_arrays, path):
    values = {f"ssd-{i}": rand_bytes(3 * MiB + 4096 * i + i, seed=("ssd", i)) for i in range(4)}
    store = store_factory(dram="4MiB", ssd="256MiB", vram="16MiB", promote_after=99, segment_size="16MiB")
    with store:
        for key, data in values.items():
            store.put(key, data, durable=True)
        gds = store._gds
        assert gds is not None and gds.mode in (GDS, COMPAT, FALLBACK)
        print(f"cuFile mode: {gds.mode} ({gds.why})")
        assert store.stats()["ssd"]["gpudirect"]["mode"] == gds.mode
        if path == "pread+h2d":
            gds.mode = FALLBACK
        for key, data in values.items():
            for _ in range(20):  # push it out of DRAM, so that it is read from SSD
                if store.stat(key).tier == "ssd":
                    break
                store.put("filler", bytes(3 * MiB))
                store.remove("filler")
            assert store.stat(key).tier == "ssd"
            dst = device_array(gpu_arrays, len(data) + 100)
            assert store.get_into(key, dst) == len(data)
            assert dst.download(len(data)) == data, key
        registered = store.stats()["ssd"]["gpudirect"]["registered"]
        assert registered == 0 if gds.mode == FALLBACK and path == "pread+h2d" else registered >= 0


@pytest.mark.parametrize("path", ["cufile", "pread+h2d"])
def test_a_value_corrupted_on_ssd_fails_its_first_read_into_vram(store_factory, gpu_arrays, path):
    """cuFile reads are checked against the CRC-32C on their first read of each value (gpu_verify="first",
    by a copy back to the host); the pread + H2D path on every read."""
    data = rand_bytes(6 * MiB, seed="corrupted")  # over the DRAM pool: straight to SSD
    with store_factory(dram="4MiB", ssd="64MiB", vram="16MiB", promote_after=99, segment_size="16MiB") as store:
        store.put("bad", data)
        assert store.stat("bad").tier == "ssd"
        entry = store._index[b"bad"]
        name, _, base = store._ssd.segments[entry.seg].place.gpu_source()
        fd = os.open(name, os.O_RDWR)
        try:
            os.pwrite(fd, bytes([data[1000] ^ 1]), base + entry.seg_off + 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        dst = device_array(gpu_arrays, len(data))
        if path == "pread+h2d":
            store._gds.mode = FALLBACK
        with pytest.raises(ChecksumError):
            store.get_into("bad", dst)
        assert "bad" not in store


def test_a_zero_copy_view_of_a_vram_value(tmp_path, gpu_arrays):
    with mooncakefs.open(tmp_path / "kv", dram="4MiB", vram="16MiB") as store:
        data = rand_bytes(MiB, seed="view")
        store.put("v", data, tier="vram")
        used = store.stats()["vram"]["used"]
        with store.device_view("v") as view:
            cai = view.__cuda_array_interface__
            assert cai["shape"] == (MiB,) and cai["data"][1] is True
            with from_dlpack(view) as buf:  # our capsule through our parser: the same device memory
                assert buf.on_device and (buf.ptr, buf.nbytes) == (cai["data"][0], MiB)
            store.remove("v")  # the view's lease keeps the block
            assert store.stats()["vram"]["used"] == used
            copy = device_array(gpu_arrays, MiB)
            assert CUDA is not None
            CUDA.d2d(copy.ptr, view.ptr, MiB)
            assert copy.download() == data
        gc.collect()
        assert store.stats()["vram"]["used"] == 0 and exported_alive() == 0
        store.put("host-only", b"x" * 100)
        with pytest.raises(InvalidArgument, match="not in VRAM"):
            store.device_view("host-only")


def test_torch_tensors_in_and_out_without_copies_through_the_host(tmp_path):
    """torch (where the GPU machine has it): its CUDA tensors' __cuda_array_interface__ in, get_into a
    tensor, a strided one refused, and torch.from_dlpack of a VRAM view sharing its memory."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    with mooncakefs.open(tmp_path / "kv", dram="16MiB", vram="64MiB") as store:
        t = torch.randint(0, 255, (1024, 1024), dtype=torch.uint8, device="cuda")
        store.put("t", t)
        assert store.stat("t").tier == "vram"
        out = torch.empty_like(t)
        assert store.get_into("t", out) == t.numel() and torch.equal(out, t)
        f = torch.randn(256, 256, device="cuda")  # float32: 4 bytes an element
        store.put("f", f)
        back = torch.empty_like(f)
        assert store.get_into("f", back) == f.numel() * 4 and torch.equal(back, f)
        with pytest.raises(InvalidArgument, match="not contiguous"):
            store.put("strided", t.t())
        with store.device_view("t") as view:
            u = torch.from_dlpack(view)
            assert u.device.type == "cuda" and u.numel() == t.numel()
            assert torch.equal(u.view(1024, 1024), t)
            del u
        gc.collect()
        assert exported_alive() == 0


def test_cupy_arrays_in_and_out(tmp_path):
    cupy = pytest.importorskip("cupy")
    with mooncakefs.open(tmp_path / "kv", dram="16MiB", vram="64MiB") as store:
        a = cupy.arange(1 << 18, dtype=cupy.int32)
        store.put("a", a)
        assert store.stat("a").tier == "vram"
        b = cupy.zeros_like(a)
        assert store.get_into("a", b) == a.nbytes and bool((a == b).all())
        with pytest.raises(InvalidArgument, match="not contiguous"):
            store.put("strided", a[::2])
