"""Loop devices over sparse files: real block devices for the SSD tier's raw-device backend.

A loop device is a kernel block device like an NVMe namespace as far as the tier can tell (O_DIRECT,
O_EXCL, BLKGETSIZE64, BLKZEROOUT); creating one needs root and /dev/loop-control."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mooncakefs.tiers.ssd_device import FIRST_REGION, HEADER, MIN_JOURNAL

MiB = 1 << 20


def device_size_for(capacity: int, segment_size: int) -> int:
    """The device size whose SSD tier holds at least ``capacity`` bytes of values in segments of
    ``segment_size`` (the file-backed tier's ``ssd=`` for the same store)."""
    journal = max(MIN_JOURNAL, segment_size // 16)
    journal += -journal % 4096
    regions = -(-capacity // segment_size) + 1  # the tier keeps one region free
    return FIRST_REGION + regions * (HEADER + journal + segment_size)


class LoopDevices:
    """Loop devices made on demand, each over its own sparse file in ``directory``; ``detach_all``
    detaches every one (the fixture calls it at teardown, whatever the test did)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.attached: list[str] = []

    def attach(self, size: int, *, sector_size: int = 512) -> str:
        backing = self.directory / f"loop-{len(self.attached)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        result = subprocess.run(
            ["losetup", "-f", "--show", "--sector-size", str(sector_size), str(backing)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise OSError(f"losetup: {result.stderr.strip() or result.returncode}")
        device = result.stdout.strip()
        self.attached.append(device)
        return device

    def detach_all(self) -> list[str]:
        """Detach every device made here; returns the errors (a device still open is detached by the
        kernel when its last user closes it)."""
        errors = []
        for device in reversed(self.attached):
            result = subprocess.run(["losetup", "-d", device], capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                errors.append(f"{device}: {result.stderr.strip()}")
        self.attached.clear()
        return errors
