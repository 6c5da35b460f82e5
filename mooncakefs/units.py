"""Human sizes: "512MiB", "2GiB", "10GB", "4k" <-> bytes."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from mooncakefs.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Bytes from an int or a string such as "512MiB", "2GiB", "10GB" (powers of 1000) or "4k" (1024).
    A bad one is ``InvalidArgument`` (a TypeError and a ValueError), as every bad argument is."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an int or a string like '2GiB', not a bool")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"{what} must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be an int or a string like '2GiB', not {type(value).__name__}")
    match = _SIZE.match(value)
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise InvalidArgument(f"{what} {value!r} is not a size: give bytes or a string like '512MiB', '10GB'")
    return int(float(match.group(1)) * unit)


def format_size(n: float) -> str:
    """The shortest readable binary size: 1536 -> '1.5KiB'."""
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            break
        n /= 1024
        unit = bigger
    digits = 0 if unit == "B" or abs(n) >= 100 else 1 if abs(n) >= 10 else 2
    text = f"{n:.{digits}f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + unit


def parse_ssd(value: str) -> tuple[int | None, Path | None]:
    """The --ssd option: "SIZE", "PATH:SIZE", "0" for no SSD tier, or a block device alone ("/dev/nvme1n1":
    all of it, the size None)."""
    path, _, size = value.rpartition(":")
    if not path and "/" in value:
        if not stat.S_ISBLK(os.stat(value).st_mode if os.path.exists(value) else 0):
            raise ValueError(f"--ssd {value}: give a size (PATH:SIZE); only a block device may be given alone")
        return None, Path(value)
    nbytes = parse_size(size, what="--ssd")
    return (nbytes or None), (Path(path) if path else None)


def parse_vram(value: str) -> tuple[int, int] | None:
    """The --vram option: "DEVICE:SIZE" (GPU number and pool size), "SIZE" for GPU 0, "0" for no VRAM
    tier.  Returns (device, size), or None for none."""
    device, _, size = value.rpartition(":")
    if device and not device.isdigit():
        raise ValueError(f"--vram {value}: give DEVICE:SIZE with DEVICE a GPU number, like 0:16GiB")
    nbytes = parse_size(size, what="--vram")
    return (int(device or 0), nbytes) if nbytes else None
