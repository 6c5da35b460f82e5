"""The SSD tier on a raw block device (a loop device here; docs/nvme-of.md says what else was tested).

test_tiers.py runs the tier's contract over both backends; this file has what only a device has: kill -9
of a real node using ``--ssd /dev/loopN`` and its recovery, a node re-attaching its device, the
refusals that keep a user's disk safe, and a 4096-byte-sector device."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from blockdev_helpers import device_size_for
from conftest import MiB, child_env, rand_bytes
from node_helpers import NodeProcess

import mooncakefs
from mooncakefs.errors import EX_USAGE, DeviceRefused, InvalidArgument, OutOfSpace, StoreLocked
from mooncakefs.units import parse_ssd

SEGMENT = 4 * MiB
SMALL = dict(dram="8MiB", segment_size="4MiB")


@pytest.fixture
def device(loop_devices) -> str:
    """A fresh (all zeros) loop device with room for 16 MiB of values in 4 MiB segments."""
    return loop_devices.attach(device_size_for(16 * MiB, SEGMENT))


def digest(path: str, size: int = 2 * MiB) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def fsck(data, device: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mooncakefs.cli", "fsck", "--data", str(data), "--ssd-dir", device, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


# -- a real node on the device --------------------------------------------------------------------------


def test_node_killed_with_sigkill_recovers_its_durable_values_from_the_device(tmp_path, loop_devices):
    device = loop_devices.attach(256 * MiB)
    node = NodeProcess(tmp_path, dram="16MiB", ssd=device)
    try:
        node.start()
        durable = {f"d{i}": rand_bytes(50_000 + i, i) for i in range(60)}
        with mooncakefs.connect(node.unix_url) as client:
            for key, value in durable.items():
                client.put(key, value, durable=True)
                client.put(f"plain-{key}", value)  # not durable: may or may not survive
            assert client.stats()["ssd"]["capacity"] == 128 * MiB  # 3 regions of 64 MiB, one kept free
        node.kill()  # SIGKILL: no close, no flush
        assert not node.alive
        checked = fsck(node.data, device)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        for index in node.data.glob("index.sqlite*"):  # and the index is lost too: the regions' journals
            index.unlink()  # are all that is left to rebuild it from
        node.start()
        with mooncakefs.connect(node.unix_url) as client:
            for key, value in durable.items():
                assert client.get(key) == value, key
        assert "rebuilt it from the segment journals in " + device in node.log(), node.log()
        assert node.terminate() == 0
        checked = fsck(node.data, device)
        assert checked.returncode == 0 and "ok" in checked.stdout, checked.stdout + checked.stderr
        assert "0 not yet in the index" in checked.stdout, checked.stdout  # the restart took them in
    finally:
        node.kill()


def test_node_restart_reattaches_the_device_and_a_second_node_is_refused(tmp_path, loop_devices):
    device = loop_devices.attach(256 * MiB)
    node = NodeProcess(tmp_path, name="a", dram="16MiB", ssd=device)
    other = NodeProcess(tmp_path, name="b", dram="16MiB", ssd=device)
    try:
        node.start()
        with mooncakefs.connect(node.unix_url) as client:
            client.put("kept", b"x" * 300_000, durable=True)
            capacity = client.stats()["ssd"]["capacity"]
        other.launch()  # the same device for a second node: O_EXCL refuses it
        assert other.proc is not None and other.proc.wait(timeout=60) != 0
        assert "in use" in other.log(), other.log()
        assert node.terminate() == 0
        node.start()  # the same device again: attached, not formatted
        with mooncakefs.connect(node.unix_url) as client:
            assert client.get("kept") == b"x" * 300_000
            assert client.stats()["ssd"]["capacity"] == capacity
        assert node.log().count("formatted block device") == 1, node.log()  # by the first start only
    finally:
        node.kill()
        other.kill()


# -- refusals: nothing is written to a device the tier will not use ---------------------------------------


def test_a_filesystem_on_the_device_is_refused_unless_formatting_is_asked_for(tmp_path, device):
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True, timeout=120)
    before = digest(device)
    with pytest.raises(DeviceRefused, match=r"ext2/3/4 filesystem.*will not overwrite"):
        mooncakefs.open(tmp_path / "a", ssd=device, **SMALL)
    assert digest(device) == before, "a refused device was written to"
    with mooncakefs.open(tmp_path / "a", ssd=device, ssd_format=True, **SMALL) as store:
        store.put("k", b"v", durable=True)
    with mooncakefs.open(tmp_path / "a", ssd=device, **SMALL) as store:  # ours now: no flag needed
        assert store.get("k") == b"v"


def test_the_node_cli_refuses_a_device_with_a_partition_table(tmp_path, device):
    with open(device, "r+b") as f:  # a GPT header's signature in sector 1
        f.seek(512)
        f.write(b"EFI PART")
    argv = [sys.executable, "-m", "mooncakefs.cli", "node", "--data", str(tmp_path / "d"), "--ssd", device]
    result = subprocess.run(
        [*argv, "--listen", "none", "--metrics", "none", "--socket", str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == EX_USAGE, result.stderr
    assert "GPT partition table" in result.stderr and "--format-ssd" in result.stderr, result.stderr


def test_stray_data_on_the_device_is_refused(tmp_path, device):
    with open(device, "r+b") as f:
        f.seek(70_000)
        f.write(b"someone's bytes")
    with pytest.raises(DeviceRefused, match="holds data"):
        mooncakefs.open(tmp_path, ssd=device, **SMALL)


def test_another_superblock_version_is_refused(tmp_path, device):
    from mooncakefs._engine import crc32c

    from mooncakefs.tiers import ssd_device

    mooncakefs.open(tmp_path, ssd=device, **SMALL).close()
    with open(device, "r+b") as f:  # a later format version, with a valid CRC
        sb = bytearray(f.read(ssd_device._SUPER.size))
        sb[8:12] = (2).to_bytes(4, "little")
        f.seek(0)
        f.write(sb + crc32c(bytes(sb)).to_bytes(4, "little"))
    with pytest.raises(DeviceRefused, match="format version 2"):
        mooncakefs.open(tmp_path, ssd=device, **SMALL)


def test_sizes_that_do_not_fit_are_refused(tmp_path, loop_devices, device):
    device_bytes = device_size_for(16 * MiB, SEGMENT)
    with pytest.raises(DeviceRefused, match="larger than the device"):
        mooncakefs.open(tmp_path, ssd=f"{device}:1GiB", **SMALL)
    with pytest.raises(DeviceRefused, match="not a multiple of 4096"):
        mooncakefs.open(tmp_path, ssd=f"{device}:{device_bytes - 512}", **SMALL)
    tiny = loop_devices.attach(4 * MiB)
    with pytest.raises(DeviceRefused, match="too small"):
        mooncakefs.open(tmp_path, ssd=tiny, **SMALL)
    mooncakefs.open(tmp_path, ssd=f"{device}:{device_bytes}", **SMALL).close()
    with pytest.raises(DeviceRefused, match="formatted for"):  # another size than it was formatted for
        mooncakefs.open(tmp_path, ssd=f"{device}:{device_bytes - 4096 * 1024}", **SMALL)


def test_a_device_held_by_another_process_is_refused(tmp_path, device):
    hold = f"import os, sys; os.open({device!r}, os.O_RDONLY | os.O_EXCL); print(1, flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"1\n"
        with pytest.raises(StoreLocked, match="in use"):
            mooncakefs.open(tmp_path, ssd=device, **SMALL)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    with mooncakefs.open(tmp_path, ssd=device, **SMALL), pytest.raises(StoreLocked, match="in use"):
        mooncakefs.open(tmp_path / "second", ssd=device, **SMALL)  # and by another store in this one


def test_bad_forms_are_refused_with_a_reason(tmp_path, device):
    with pytest.raises(InvalidArgument, match="is for a block device"):
        mooncakefs.open(tmp_path / "a", ssd="64MiB", ssd_format=True)
    with pytest.raises(ValueError, match="give a size"):
        parse_ssd(str(tmp_path))
    assert parse_ssd(device) == (None, __import__("pathlib").Path(device))
    with pytest.raises(InvalidArgument, match="not both"):
        mooncakefs.open(tmp_path / "b", ssd=device, ssd_dir=tmp_path)


def test_a_value_larger_than_a_region_is_out_of_space(tmp_path, device):
    with mooncakefs.open(tmp_path, ssd=device, **SMALL) as store:
        with pytest.raises(OutOfSpace, match=r"one region, which holds 4MiB.*segment_size.*--format-ssd"):
            store.put("big", rand_bytes(10 * MiB, "big"))
        store.put("fits", rand_bytes(3 * MiB, "fits"))
        assert store.get("fits") == rand_bytes(3 * MiB, "fits")


def test_a_durable_commit_syncs_the_device_once_for_all_its_regions(tmp_path, device, monkeypatch):
    """The regions of a device share its one descriptor: a commit that makes three segments durable
    syncs it once for their values and once for their journals, not twice per segment."""
    values = {f"k{i}": rand_bytes(3 * MiB, i) for i in range(3)}  # one 4 MiB segment each
    with mooncakefs.open(tmp_path, ssd=device, dram="16MiB", segment_size="4MiB") as store:
        for key, value in values.items():
            store.put(key, value)
        synced: list[int] = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_rdev), real(fd))[1])
        assert store.persist(values) == 3
        monkeypatch.undo()
        assert synced.count(os.stat(device).st_rdev) == 2, synced
    with mooncakefs.open(tmp_path, ssd=device, **SMALL) as store:
        for key, value in values.items():
            assert store.get(key) == value


# -- layouts ----------------------------------------------------------------------------------------------


def test_a_4096_byte_sector_device_reads_back_unaligned_values_after_restart(tmp_path, loop_devices):
    device = loop_devices.attach(device_size_for(16 * MiB, SEGMENT), sector_size=4096)
    values = {f"k{i}": rand_bytes(1 + 777 * i, i) for i in range(120)}  # sizes and offsets off the sector
    with mooncakefs.open(tmp_path, ssd=device, **SMALL) as store:
        for key, value in values.items():
            store.put(key, value, durable=True)
        store.remove("k7")
    with mooncakefs.open(tmp_path, ssd=device, **SMALL) as store:
        assert "k7" not in store
        for key, value in values.items():
            if key != "k7":
                assert store.get(key) == value, key
                buf = bytearray(len(value) + 5)
                assert store.get_into(key, memoryview(buf)[3:]) == len(value)
                assert bytes(buf[3 : 3 + len(value)]) == value
    checked = fsck(tmp_path, device)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_fsck_finds_a_corrupted_value_and_rebuild_recovers_from_the_device_journals(tmp_path, device):
    marker = b"MARKER-" + os.urandom(8)
    with mooncakefs.open(tmp_path, ssd=device, **SMALL) as store:
        for i in range(30):
            store.put(f"k{i}", rand_bytes(40_000, i), durable=True)
        store.put("victim", marker * 1000, durable=True)
    with open(device, "r+b") as f:  # flip one byte of the victim's value, on the device itself
        data = f.read()
        at = data.index(marker) + 3
        f.seek(at)
        f.write(bytes([data[at] ^ 0xFF]))
    checked = fsck(tmp_path, device)
    assert checked.returncode == 1 and "CRC-32C" in checked.stdout, checked.stdout + checked.stderr
    (tmp_path / "index.sqlite").unlink()  # lost: only the journals in the regions are left
    rebuilt = fsck(tmp_path, device, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "30 values" in rebuilt.stdout and "1 value" in rebuilt.stdout, rebuilt.stdout
    with mooncakefs.open(tmp_path, ssd=device, **SMALL) as store:
        assert "victim" not in store
        assert all(store.get(f"k{i}") == rand_bytes(40_000, i) for i in range(30))


# -- the index belongs to one device ----------------------------------------------------------------------


def _fill(data, device: str, prefix: str, n: int = 12) -> dict[str, bytes]:
    values = {f"{prefix}{i}": rand_bytes(30_000 + 101 * i, f"{prefix}{i}") for i in range(n)}
    with mooncakefs.open(data, ssd=device, **SMALL) as store:
        for key, value in values.items():
            store.put(key, value, durable=True)
    return values


def _serves_exactly(data, device: str, values: dict[str, bytes], gone: dict[str, bytes]) -> str:
    """Open ``data`` on ``device``: every key of ``values`` reads back byte-exact, none of ``gone`` is
    there; returns why the index was rebuilt."""
    with mooncakefs.open(data, ssd=device, **SMALL) as store:
        for key, value in values.items():
            assert store.get(key) == value, key
        assert not any(key in store for key in gone)
        recovery = store._ssd.recovery
        assert recovery is not None and recovery.rebuilt
        return recovery.reason


def test_devices_swapped_under_their_data_dirs_serve_their_own_values(tmp_path, loop_devices):
    first, second = (loop_devices.attach(device_size_for(16 * MiB, SEGMENT)) for _ in range(2))
    a_values = _fill(tmp_path / "a", first, "a")
    b_values = _fill(tmp_path / "b", second, "b")
    # a's index now meets b's device: it must serve b's values (from b's journals), never a's rows
    reason = _serves_exactly(tmp_path / "a", second, b_values, gone=a_values)
    assert "another device" in reason and reason.count("uuid") >= 2, reason
    assert list(tmp_path.joinpath("a").glob("index.sqlite.other-device-*")), "the old index is kept"
    _serves_exactly(tmp_path / "a", first, a_values, gone=b_values)  # and back again
    checked = fsck(tmp_path / "a", first)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_device_formatted_again_under_its_data_dir_serves_only_what_it_now_holds(tmp_path, device):
    old = _fill(tmp_path / "data", device, "old")
    new = {}
    with mooncakefs.open(tmp_path / "other", ssd=device, ssd_format=True, **SMALL) as store:
        for i in range(5):  # the same segment ids and offsets the old index names, other bytes
            new[f"new{i}"] = rand_bytes(30_000 + 101 * i, f"new{i}")
            store.put(f"new{i}", new[f"new{i}"], durable=True)
    reason = _serves_exactly(tmp_path / "data", device, new, gone=old)
    assert "formatted again" in reason, reason


def test_fsck_names_an_index_made_for_another_device(tmp_path, loop_devices):
    first, second = (loop_devices.attach(device_size_for(16 * MiB, SEGMENT)) for _ in range(2))
    _fill(tmp_path / "a", first, "a")
    _fill(tmp_path / "b", second, "b")
    checked = fsck(tmp_path / "a", second)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "another device" in checked.stdout and "--rebuild" in checked.stdout, checked.stdout
    assert "CRC-32C" not in checked.stdout, checked.stdout
