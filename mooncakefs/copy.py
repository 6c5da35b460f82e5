"""``mooncakefs cp``: copy files and trees into and out of a mount, with a progress bar for long copies.

The kernel's ``cp`` works on a mount as on any filesystem; this one adds what a checkpoint copy of
many gigabytes wants: a bar of bytes on a terminal (nothing when unattended), large reads and writes
(the mount's chunk size, so each FUSE request carries a whole chunk), and cp's rules for where each
source lands, checked before a byte is written.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4 << 20  # bytes per read and write: one chunk of a mount with the default chunk size


class CopyError(Exception):
    """A copy that cannot be done as asked (a missing source, a directory without -r, ...)."""


@dataclass(frozen=True)
class Item:
    """One thing to create at ``dst``: a directory, a symlink or a regular file of ``size`` bytes."""

    src: Path
    dst: Path
    kind: str  # "dir", "link" or "file"
    size: int = 0


def plan(sources: Iterable[Path], dest: Path, *, recursive: bool) -> list[Item]:
    """Every directory, link and file to create, in order, by cp's rules: into ``dest`` when it is an
    existing directory (or several sources are given), else as ``dest``."""
    sources = [Path(s) for s in sources]
    if not sources:
        raise CopyError("nothing to copy: give at least one SOURCE")
    into = dest.is_dir()
    if len(sources) > 1 and not into:
        raise CopyError(f"copying {len(sources)} sources needs DEST to be an existing directory; {dest} is not")
    items: list[Item] = []
    for src in sources:
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise CopyError(f"{src}: no such file or directory") from None
        target = dest / src.name if into else dest
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise CopyError(f"{src} is a directory: use -r to copy it and everything below it")
            if _inside(target, src):
                raise CopyError(f"cannot copy {src} into itself ({target})")
            items.extend(_tree(src, target))
        else:
            items.append(_item(src, target, st))
    for item in items:
        if _same_file(item):
            raise CopyError(f"{item.src} and {item.dst} are the same file: not copied")
    return items


def _same_file(item: Item) -> bool:
    """Whether ``item.dst`` already is ``item.src``: copying a file onto itself (by its own name, a
    link to it, or a directory holding it) truncates it before the first byte is read, and a link onto
    itself is unlinked before it is read."""
    try:
        src = os.lstat(item.src)
        dst = os.stat(item.dst) if item.kind == "file" else os.lstat(item.dst)  # a file is written through links
    except OSError:  # no such destination, or one that cannot be reached: the copy itself says why
        return False
    return os.path.samestat(src, dst)


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _item(src: Path, dst: Path, st: os.stat_result) -> Item:
    if stat.S_ISLNK(st.st_mode):
        return Item(src, dst, "link")
    if stat.S_ISREG(st.st_mode):
        return Item(src, dst, "file", st.st_size)
    raise CopyError(f"{src} is not a regular file, directory or symlink: not copied")


def _tree(src: Path, dst: Path) -> list[Item]:
    items = [Item(src, dst, "dir")]
    for top, dirs, files in os.walk(src):
        dirs.sort()
        rel = Path(top).relative_to(src)
        for name in sorted(dirs):
            path = Path(top) / name
            if os.path.islink(path):  # os.walk lists links to directories here: copy the link itself
                items.append(Item(path, dst / rel / name, "link"))
            else:
                items.append(Item(path, dst / rel / name, "dir"))
        for name in sorted(files):
            path = Path(top) / name
            items.append(_item(path, dst / rel / name, os.lstat(path)))
    return items


def run(items: list[Item], advance: Callable[[int], None], block: int = BLOCK) -> int:
    """Create ``items`` in order, calling ``advance(bytes)`` as file data is written; bytes copied.
    Modes and modification times are kept, as ``cp -p`` keeps them."""
    copied = 0
    buf = bytearray(block)
    view = memoryview(buf)
    for item in items:
        if item.kind == "dir":
            item.dst.mkdir(exist_ok=True)
        elif item.kind == "link":
            if item.dst.is_symlink() or item.dst.exists():
                item.dst.unlink()
            item.dst.symlink_to(os.readlink(item.src))
            continue
        else:
            copied += _copy_file(item.src, item.dst, view, advance)
        shutil.copystat(item.src, item.dst, follow_symlinks=False)
    for item in reversed(items):  # directories last: writing into them changed their times
        if item.kind == "dir":
            shutil.copystat(item.src, item.dst)
    return copied


def _copy_file(src: Path, dst: Path, view: memoryview, advance: Callable[[int], None]) -> int:
    copied = 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while n := fin.readinto(view):
            chunk = view[:n]
            while chunk:
                written = fout.write(chunk)
                chunk = chunk[written:]
            copied += n
            advance(n)
    return copied
