#!/usr/bin/env python3
"""The smallest useful pyfuse3 filesystem: the "physical reference" for mooncakefs's mount.

``/file`` is a read-only file of ``--size`` bytes served as ``memoryview`` slices of one preallocated,
prefaulted buffer (pyfuse3 hands the buffer straight to ``fuse_reply_buf``: no copy in Python).  Any other
file (and directory) can be created; the bytes written to files are copied into one preallocated,
prefaulted arena, so the write ceiling is measured without page-fault or allocation costs.  Nothing else
happens per request, so what this filesystem reaches is the most a pyfuse3 + trio daemon can reach on this
machine with the same mount-time tuning.

``tune_mount()`` is that tuning, written to be reused by mooncakefs's own mount: the readahead of the
mount's bdi (FUSE requests grow from 128 KiB to the 1 MiB maximum) and the connection's max_background /
congestion_threshold (more asynchronous readahead requests in flight).  libfuse cannot set these itself
(pyfuse3 never calls ``fuse_parse_conn_info_opts``), and the kernel resets the readahead when it processes
the INIT reply, so the tuning has to be applied after the mount is up and answering.

Usage::

    python tools/bench/minimal_fs.py MOUNTPOINT [--size 1GiB] [--direct-io]

It runs in the foreground, prints "mounted" once the filesystem answers and is tuned, and unmounts on
SIGINT / SIGTERM (and, through ``auto_unmount``, when the process dies).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyfuse3
import trio

KiB, MiB, GiB = 1024, 1024**2, 1024**3
FILE_NAME = b"file"
FILE_INODE = pyfuse3.ROOT_INODE + 1
FUSECTL_DIR = Path("/sys/fs/fuse/connections")
TIMEOUT = 300.0  # entry/attr cache seconds: nothing changes behind the kernel's back
_SIZE_UNITS = {
    "": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


# -- mount-time tuning (reusable) ----------------------------------------------------------------------


def _unescape_mountinfo(field_text: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\040``)."""
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit() and i + 4 <= len(field_text):
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def _mounts() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, filesystem type) of every mount in this mount namespace, in mount order."""
    rows = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        parts = left.split()
        rows.append((parts[2], _unescape_mountinfo(parts[4]), right.split()[0] if right else ""))
    return rows


def mount_device(mountpoint: str | os.PathLike[str]) -> tuple[int, int]:
    """(major, minor) of the FUSE filesystem mounted at ``mountpoint``, read from /proc/self/mountinfo.

    Reading mountinfo sends nothing to the daemon, so this is safe even while the mount is not answering.
    The last matching line wins (that is the mount on top when mounts are stacked).
    """
    target = os.path.realpath(mountpoint)
    found = None
    for dev, point, fstype in _mounts():
        if point == target and fstype.startswith("fuse"):
            found = dev
    if found is None:
        raise RuntimeError(f"no FUSE filesystem is mounted at {target}")
    major, minor = found.split(":")
    return int(major), int(minor)


def _connection_dir(major: int, minor: int) -> Path:
    """fusectl names a connection by the kernel dev_t of its superblock; FUSE's anonymous devices have
    major 0, so that is just the minor number."""
    return FUSECTL_DIR / str((major << 20) | minor)


def _ensure_fusectl() -> None:
    """Mount fusectl at /sys/fs/fuse/connections (it is not mounted by default on these machines)."""
    if any(fstype == "fusectl" for _, _, fstype in _mounts()):
        return
    subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL_DIR)], check=True, capture_output=True, text=True)


def tune_mount(
    mountpoint: str | os.PathLike[str],
    read_ahead_kb: int = 1024,
    max_background: int = 64,
    congestion_threshold: int = 48,
) -> dict[str, int | str]:
    """Apply the mount-time tuning that turns 128 KiB FUSE reads into 1 MiB ones with more of them in flight.

    Call this once the mount is up, from a thread other than the trio thread serving it (or from another
    process): the first step stats the mount point, which waits until the daemon has answered FUSE INIT
    (the kernel clamps the bdi readahead to the INIT reply's max_readahead, so tuning before that is lost),
    and a syscall on the mount from the serving thread deadlocks.  Needs root.  Returns what was applied.
    """
    os.stat(mountpoint)  # blocks until INIT has been processed
    major, minor = mount_device(mountpoint)
    Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb").write_text(f"{read_ahead_kb}\n")
    _ensure_fusectl()
    conn = _connection_dir(major, minor)
    # The kernel rejects nothing here, but congestion_threshold above max_background makes no sense.
    (conn / "max_background").write_text(f"{max_background}\n")
    (conn / "congestion_threshold").write_text(f"{min(congestion_threshold, max_background)}\n")
    return {"device": f"{major}:{minor}", **mount_tuning(mountpoint)}


def mount_tuning(mountpoint: str | os.PathLike[str]) -> dict[str, int | str]:
    """The current readahead and background limits of the FUSE mount at ``mountpoint`` (-1 if unreadable).

    Sends nothing to the daemon.  Used by the benchmark to record what each mount actually ran with.
    """
    major, minor = mount_device(mountpoint)

    def read_int(path: Path) -> int:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return -1

    conn = _connection_dir(major, minor)
    return {
        "device": f"{major}:{minor}",
        "read_ahead_kb": read_int(Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb")),
        "max_background": read_int(conn / "max_background"),
        "congestion_threshold": read_int(conn / "congestion_threshold"),
    }


# -- the filesystem ------------------------------------------------------------------------------------


def prefaulted_mmap(nbytes: int, fill: str = "zero") -> mmap.mmap:
    """Anonymous memory, transparent-huge-page backed where possible, with every page written once.

    First touches of fresh memory cost 0.4-2.6 GB/s on these VMs (free-page reporting), so they happen
    here, before "mounted" is printed, and never on a request.  ``fill="pattern"`` writes the byte offset
    as little-endian uint64 words, so a read of the wrong range is detectable.
    """
    buf = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    step = 64 * MiB
    for start in range(0, nbytes - nbytes % 8, step):
        words = np.frombuffer(buf, dtype=np.uint64, count=min(step, nbytes - nbytes % 8 - start) // 8, offset=start)
        if fill == "pattern":
            words[:] = np.arange(start, start + 8 * len(words), 8, dtype=np.uint64)
        else:
            words[:] = 0
    return buf


@dataclass
class Node:
    """One inode.  A regular file's bytes live at ``arena[base : base + size]``."""

    inode: int
    mode: int
    parent: int
    size: int = 0
    base: int = 0
    nlink: int = 1
    lookups: int = 0
    children: dict[bytes, int] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)


class MinimalFS(pyfuse3.Operations):
    """Everything a benchmark needs and nothing more: lookup, getattr, readdir, create, mkdir, read, write,
    truncate, unlink, rmdir.  Written files get contiguous arena extents from a bump allocator (a growing
    file that is not the last one is moved to the tail), and the tail goes back to zero once no written
    bytes are live, so repeated benchmark runs reuse the same prefaulted pages."""

    enable_writeback_cache = False

    def __init__(self, size: int, arena_size: int, direct_io: bool = False) -> None:
        super().__init__()
        self.direct_io = direct_io
        self.file_buf = prefaulted_mmap(size, fill="pattern")
        self.file_view = memoryview(self.file_buf)[:size]
        self.arena_buf = prefaulted_mmap(arena_size)
        self.arena = memoryview(self.arena_buf)[:arena_size]
        self.tail = 0  # first free arena byte
        self.last: int | None = None  # inode owning the extent that ends at the tail
        self.live_files = 0
        root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, pyfuse3.ROOT_INODE, nlink=2)
        root.children[FILE_NAME] = FILE_INODE
        self.nodes: dict[int, Node] = {
            root.inode: root,
            FILE_INODE: Node(FILE_INODE, stat.S_IFREG | 0o444, root.inode, size=size),
        }
        self.next_inode = FILE_INODE + 1

    # attributes and names

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.st_size = node.size
        attr.st_blksize = MiB  # cp and friends size their buffers by this
        attr.st_blocks = (node.size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        return attr

    def _node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = self._node(parent.parent)
        else:
            child = parent.children.get(name)
            if child is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = self.nodes[child]
        node.lookups += 1
        return self._attr(node)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups -= count
                self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        """Free an inode once it is unlinked and the kernel has forgotten it."""
        if node.nlink == 0 and node.lookups <= 0 and node.inode in self.nodes:
            self._free_extent(node)
            del self.nodes[node.inode]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            if inode == FILE_INODE:
                raise pyfuse3.FUSEError(errno.EACCES)
            self._resize(node, attr.st_size)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        return self._attr(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = len(self.arena) // 4096
        out.f_bfree = out.f_bavail = (len(self.arena) - self.tail) // 4096
        out.f_files = out.f_ffree = out.f_favail = 1 << 20
        out.f_namemax = 255
        return out

    # directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._node(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets are positions in the (insertion-ordered) child list; fine while nobody deletes mid-listing.
        names = list(self._node(fh).children.items())
        for i in range(start_id, len(names)):
            name, inode = names[i]
            node = self.nodes[inode]
            if not pyfuse3.readdir_reply(token, name, self._attr(node), i + 1):
                break
            node.lookups += 1  # readdirplus: the kernel now holds a reference

    async def releasedir(self, fh: int) -> None:
        pass

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._new_child(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode))
        node.nlink = 2
        return self._attr(node)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        node = self._node(parent.children.get(name, -1))
        if not stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node.children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del parent.children[name]
        node.nlink = 0
        self._maybe_drop(node)

    def _new_child(self, parent_inode: int, name: bytes, mode: int) -> Node:
        parent = self._node(parent_inode)
        if name in parent.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(self.next_inode, mode, parent_inode, lookups=1)
        self.next_inode += 1
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        return node

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        node = self._node(parent.children.get(name, -1))
        if node.inode == FILE_INODE or stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EPERM if node.inode == FILE_INODE else errno.EISDIR)
        del parent.children[name]
        node.nlink = 0
        self._free_extent(node)  # the bytes are unreachable by name; release them now
        self._maybe_drop(node)

    # files

    def _file_info(self, inode: int) -> pyfuse3.FileInfo:
        # keep_cache: contents only change through this mount, so the kernel's page cache stays valid
        # across opens (a second read of an unchanged file never reaches the daemon).
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io, keep_cache=not self.direct_io)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode == FILE_INODE and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        if flags & os.O_TRUNC:
            self._resize(node, 0)
        return self._file_info(inode)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new_child(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode))
        return self._file_info(node.inode), self._attr(node)

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        node = self._node(fh)
        end = min(off + size, node.size)
        if off >= end:
            return b""
        if fh == FILE_INODE:
            return self.file_view[off:end]
        return self.arena[node.base + off : node.base + end]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        end = off + len(buf)
        if end > node.size:
            self._resize(node, end, zero=off > node.size)
        self.arena[node.base + off : node.base + end] = buf
        node.mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    # arena bookkeeping

    def _resize(self, node: Node, size: int, zero: bool = True) -> None:
        """Give ``node`` room for ``size`` bytes (zero-filling any gap when it grows)."""
        old = node.size
        if size <= old or self.last == node.inode:
            new_tail = node.base + size if self.last == node.inode else self.tail
            if new_tail > len(self.arena):
                raise pyfuse3.FUSEError(errno.ENOSPC)
            self.tail = new_tail
        else:  # move to the tail so the file can keep growing in place
            if self.tail + size > len(self.arena):
                raise pyfuse3.FUSEError(errno.ENOSPC)
            base = self.tail
            self.arena[base : base + old] = self.arena[node.base : node.base + old]
            node.base, self.tail, self.last = base, base + size, node.inode
        if old == 0 and size > 0:
            self.live_files += 1
        elif old > 0 and size == 0:
            self._dec_live()
        if zero and size > old:
            self.arena[node.base + old : node.base + size] = bytes(size - old)
        node.size = size

    def _free_extent(self, node: Node) -> None:
        if node.inode == FILE_INODE or not stat.S_ISREG(node.mode) or node.size == 0:
            return
        if self.last == node.inode:
            self.tail = node.base
            self.last = None
        node.size = 0
        self._dec_live()

    def _dec_live(self) -> None:
        self.live_files -= 1
        if self.live_files == 0:  # nothing written is live: reuse the arena from the start
            self.tail, self.last = 0, None


# -- running it ----------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from "1GiB", "256MiB", "4k" or a plain number."""
    t = text.strip().lower()
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits) :]
    if unit not in _SIZE_UNITS or not digits:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(digits) * _SIZE_UNITS[unit])


async def serve(ops: MinimalFS, mountpoint: str, tune: bool, debug: bool) -> None:
    """Mount, serve, tune from a worker thread, announce "mounted", and unmount on SIGINT/SIGTERM."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=minimal_fs", "subtype=minimal_fs", "noatime", "auto_unmount"}
    if debug:
        options.add("debug")
    pyfuse3.init(ops, mountpoint, options)
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:

            async def main_then_stop() -> None:
                await pyfuse3.main()  # returns once the session ends, e.g. after fusermount3 -u
                nursery.cancel_scope.cancel()

            nursery.start_soon(main_then_stop)
            if tune:
                applied = await trio.to_thread.run_sync(tune_mount, mountpoint)
                print(f"tuning {applied}", file=sys.stderr, flush=True)
            print(f"mounted {mountpoint}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
        pyfuse3.close(unmount=True)
        unmounted = True
    finally:
        if not unmounted:
            pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=parse_size, default=GiB, help="size of the read-only /file (1GiB)")
    ap.add_argument(
        "--arena",
        type=parse_size,
        default=None,
        help="bytes of prefaulted memory for written files (default: size + 128MiB)",
    )
    ap.add_argument("--direct-io", action="store_true", help="FileInfo(direct_io=True): bypass page cache")
    ap.add_argument("--no-tune", action="store_true", help="leave the kernel's readahead/background defaults")
    ap.add_argument("--debug", action="store_true", help="libfuse debug output")
    args = ap.parse_args(argv)
    arena = args.arena if args.arena is not None else args.size + 128 * MiB
    ops = MinimalFS(args.size, arena, direct_io=args.direct_io)
    trio.run(serve, ops, os.path.realpath(args.mountpoint), not args.no_tune, args.debug)


if __name__ == "__main__":
    main()
