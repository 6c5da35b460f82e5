"""Mount-time knobs that pyfuse3 cannot set, written where the kernel exposes them.

Measured on these machines (shared/reference/environment.md): 1 MiB readahead on the mount's backing
device info, and 64 background requests in the FUSE connection, take page-cache reads from ~0.6 to
2.6-3.6 GB/s.  Both must be written after the kernel's INIT exchange (which sets its own values) and
never from the thread serving the mount.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger("mooncakefs.fuse")
FUSECTL = Path("/sys/fs/fuse/connections")


def mount_device(mountpoint: str) -> tuple[int, int] | None:
    """(major, minor) of the filesystem mounted at ``mountpoint``, from /proc/self/mountinfo (which,
    unlike stat(), does not ask the filesystem itself)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == mountpoint:
                major, minor = fields[2].split(":")
                found = (int(major), int(minor))  # the last one: mounts stack
    return found


def tune_mount(
    mountpoint: str, *, read_ahead_kb: int = 1024, max_background: int = 64, congestion_threshold: int = 48
) -> dict[str, int]:
    """Apply the knobs; returns those that took.  Failures are logged, never fatal (non-root, no sysfs)."""
    applied: dict[str, int] = {}
    device = mount_device(mountpoint)
    if device is None:
        log.warning("tuning: %s is not in /proc/self/mountinfo", mountpoint)
        return applied
    major, minor = device
    knobs = [(Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"), "read_ahead_kb", read_ahead_kb)]
    if not (FUSECTL / str(minor)).exists() and FUSECTL.exists():
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True, check=False)
    knobs += [
        (FUSECTL / str(minor) / "max_background", "max_background", max_background),
        (FUSECTL / str(minor) / "congestion_threshold", "congestion_threshold", congestion_threshold),
    ]
    for path, name, value in knobs:
        try:
            path.write_text(f"{value}\n")
            applied[name] = value
        except OSError as exc:
            log.info("tuning: cannot set %s (%s): %s", name, path, exc.strerror or exc)
    return applied


def is_stale_mount(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died: any request fails with ENOTCONN.  (statfs, because stat may be
    answered from the kernel's attribute cache without asking the dead daemon.)"""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False
